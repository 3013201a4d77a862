#!/usr/bin/env bash
# Make the Docker images the cluster/tests need available locally.
#
#   cluster/images.sh KIND [KIND...]      KIND: base | redis | node | lb | redis-ha   (-h for the list)
#
# base, redis: if the image is already present nothing happens; otherwise the
# official image is pulled (with a timeout); if no registry is reachable, the
# image is built locally from Debian packages (debootstrap + docker import for
# the base, then `docker build` on top of it).
#
# node: the fabric-node image, brought up to date with the working tree on
# EVERY run: from source in docker/node.Dockerfile when the Rust image can be
# pulled (layer cache makes an unchanged tree cheap), otherwise
# `cargo build --release --locked` on the host + docker/node-prebuilt.Dockerfile
# (skipped when the binary, Dockerfile and base image are unchanged: label).
# lb: nginx UDP load balancer (docker/lb.Dockerfile + nginx/nginx.conf) on the
# base image; rebuilt only when one of those changed (label).
# redis-ha: the redis image plus the Redis Cluster / Sentinel start scripts in
# redis/ (docker/redis-ha.Dockerfile), for the tests of issue 17; rebuilt only
# when the Dockerfile, a script or the redis image changed (label). Offline.
#
# Idempotent, and safe to run concurrently (serialised with flock).
#
# Environment:
#   FABRIC_BASE_IMAGE     base image name      (default quic-fabric/debian:bookworm)
#   FABRIC_REDIS_IMAGE    redis image name     (default redis:7)
#   FABRIC_NODE_IMAGE     node image name      (default quic-fabric/node:latest)
#   FABRIC_LB_IMAGE       lb image name        (default quic-fabric/lb:latest)
#   FABRIC_REDIS_HA_IMAGE redis-ha image name  (default quic-fabric/redis-ha:latest)
#   FABRIC_NODE_BUILD     auto | docker | host (default auto: docker if the Rust
#                         image is present or pullable, else host)
#   FABRIC_RUST_IMAGE     builder image for node.Dockerfile (default rust:1-bookworm)
#   FABRIC_RUNTIME_IMAGE  runtime image for node.Dockerfile (default
#                         debian:bookworm-slim; falls back to the base image)
#   FABRIC_DEBIAN_MIRROR  mirror for debootstrap (default http://deb.debian.org/debian)
#   FABRIC_PULL_TIMEOUT   seconds per `docker pull` attempt (default 60)
#   FABRIC_IMAGES_LOCK    lock file            (default /tmp/quic-fabric-images.lock)
#
# Adding an image kind: write a function `image_<kind>` that ensures the image
# exists (use the helpers below); the dispatcher picks it up automatically.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DOCKER_DIR="$SCRIPT_DIR/docker"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
INPUTS_LABEL=io.quic-fabric.inputs

FABRIC_BASE_IMAGE="${FABRIC_BASE_IMAGE:-quic-fabric/debian:bookworm}"
FABRIC_REDIS_IMAGE="${FABRIC_REDIS_IMAGE:-redis:7}"
FABRIC_NODE_IMAGE="${FABRIC_NODE_IMAGE:-quic-fabric/node:latest}"
FABRIC_LB_IMAGE="${FABRIC_LB_IMAGE:-quic-fabric/lb:latest}"
FABRIC_REDIS_HA_IMAGE="${FABRIC_REDIS_HA_IMAGE:-quic-fabric/redis-ha:latest}"
FABRIC_NODE_BUILD="${FABRIC_NODE_BUILD:-auto}"
FABRIC_RUST_IMAGE="${FABRIC_RUST_IMAGE:-rust:1-bookworm}"
FABRIC_RUNTIME_IMAGE="${FABRIC_RUNTIME_IMAGE:-debian:bookworm-slim}"
FABRIC_DEBIAN_MIRROR="${FABRIC_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
FABRIC_PULL_TIMEOUT="${FABRIC_PULL_TIMEOUT:-60}"
FABRIC_IMAGES_LOCK="${FABRIC_IMAGES_LOCK:-/tmp/quic-fabric-images.lock}"

DEBIAN_SUITE=bookworm
UPSTREAM_BASE_IMAGE="debian:$DEBIAN_SUITE"

# ---------------------------------------------------------------- helpers ---

log() { printf 'images.sh: %s\n' "$*" >&2; }
die() { printf 'images.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# Temp dirs created by make_tmpdir; removed on exit (any exit).
TMPDIRS=()
cleanup() {
    local d m
    for d in "${TMPDIRS[@]+"${TMPDIRS[@]}"}"; do
        [[ -d "$d" ]] || continue
        # debootstrap mounts proc/sys inside the target; if it died half-way
        # they may still be mounted. Unmount (deepest first) before removing.
        if command -v findmnt >/dev/null 2>&1; then
            findmnt -rn -o TARGET | awk -v p="$d/" 'index($0, p) == 1' | sort -r |
                while read -r m; do as_root umount -l "$m" 2>/dev/null || true; done
        fi
        as_root rm -rf --one-file-system "$d" 2>/dev/null || log "warning: could not remove $d"
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

make_tmpdir() {  # make_tmpdir VAR  -> sets VAR to a fresh temp dir (auto-removed)
    local _d
    _d="$(mktemp -d "${TMPDIR:-/tmp}/quic-fabric-images.XXXXXX")"
    TMPDIRS+=("$_d")
    printf -v "$1" '%s' "$_d"
}

as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else die "need root for: $*"
    fi
}

have_image() {  # have_image NAME
    docker image inspect "$1" >/dev/null 2>&1
}

try_pull() {  # try_pull NAME  -> 0 if pulled, 1 otherwise (never fatal)
    log "trying: docker pull $1 (timeout ${FABRIC_PULL_TIMEOUT}s)"
    if timeout "$FABRIC_PULL_TIMEOUT" docker pull -q "$1" >/dev/null 2>&1 && have_image "$1"; then
        log "pulled $1"
        return 0
    fi
    log "pull of $1 failed (no registry?); will build locally"
    return 1
}

ensure_cmd() {  # ensure_cmd COMMAND [APT_PACKAGE]
    command -v "$1" >/dev/null 2>&1 && return 0
    local pkg="${2:-$1}"
    command -v apt-get >/dev/null 2>&1 || die "'$1' not found and apt-get unavailable; install $pkg"
    log "installing $pkg (apt-get)"
    local tmp
    make_tmpdir tmp
    if ! { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "$pkg"; } >"$tmp/apt.log" 2>&1; then
        tail -n 20 "$tmp/apt.log" >&2 || true
        die "apt-get install $pkg failed"
    fi
    command -v "$1" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1 \
        || die "'$1' still not found after installing $pkg"
}

# build_image NAME DOCKERFILE [docker build args...]
# Context is the dockerfile's directory (small; only Dockerfiles live there).
build_image() {
    local name="$1" dockerfile="$2"; shift 2
    build_image_in "$(dirname "$dockerfile")" "$name" "$dockerfile" "$@"
}

# build_image_in CONTEXT_DIR NAME DOCKERFILE [docker build args...]
build_image_in() {
    local context="$1" name="$2" dockerfile="$3"; shift 3
    [[ -f "$dockerfile" ]] || die "missing $dockerfile"
    log "building $name from ${dockerfile#"$SCRIPT_DIR/"}"
    # No --pull: FROM must resolve to the local base image.
    local tmp start=$SECONDS
    make_tmpdir tmp
    if ! docker build -t "$name" -f "$dockerfile" "$@" "$context" >"$tmp/build.log" 2>&1; then
        tail -n 30 "$tmp/build.log" >&2 || true
        die "docker build of $name failed"
    fi
    have_image "$name" || die "built $name but it is not visible in 'docker images'"
    log "built $name ($((SECONDS - start))s)"
}

id_of() {  # id_of NAME  -> image id, or nothing
    docker image inspect --format '{{.Id}}' "$1" 2>/dev/null || true
}

inputs_label() {  # inputs_label NAME  -> value of the io.quic-fabric.inputs label, or nothing
    docker image inspect --format "{{ index .Config.Labels \"$INPUTS_LABEL\" }}" "$1" 2>/dev/null || true
}

# inputs_hash FILE... -- STRING...  -> sha256 over the files' contents and the strings
inputs_hash() {
    {
        while [[ $# -gt 0 && "$1" != -- ]]; do
            [[ -f "$1" ]] || die "missing $1"
            printf '%s  %s\n' "$(sha256sum <"$1" | cut -d' ' -f1)" "${1##*/}"
            shift
        done
        [[ $# -gt 0 ]] && shift
        printf '%s\n' "$@"
    } | sha256sum | cut -d' ' -f1
}

# build_if_changed CONTEXT NAME DOCKERFILE INPUTS [docker build args...]
# Builds unless NAME exists with label io.quic-fabric.inputs=INPUTS (set with
# `docker build --label`). Afterwards removes the untagged images earlier
# builds left (those carrying that label) unless a container still uses them:
# keeps `docker images` tidy; shared layers stay.
build_if_changed() {
    local context="$1" name="$2" dockerfile="$3" inputs="$4"; shift 4
    if have_image "$name" && [[ "$(inputs_label "$name")" == "$inputs" ]]; then
        log "$name is up to date"
        return 0
    fi
    build_image_in "$context" "$name" "$dockerfile" --label "$INPUTS_LABEL=$inputs" "$@"
    [[ "$(inputs_label "$name")" == "$inputs" ]] || die "$name lacks label $INPUTS_LABEL=$inputs"
    local old
    for old in $(docker image ls -q --filter dangling=true --filter "label=$INPUTS_LABEL"); do
        docker image rm "$old" >/dev/null 2>&1 || true   # fails harmlessly if still in use
    done
}

# export_source DIR: copy of the working tree as git sees it (tracked files and
# untracked-but-not-ignored ones, so no target/ or certs/) — the build context
# for node.Dockerfile, which does not depend on a .dockerignore at the repo root.
export_source() {
    local dst="$1"
    mkdir -p "$dst"
    if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        ( cd "$REPO_ROOT" &&
          git ls-files -z --cached --others --exclude-standard |
          while IFS= read -r -d '' f; do
              [[ -e "$f" || -L "$f" ]] && printf '%s\0' "$f"   # skip deleted files
          done | tar --null -T - -cf - ) | tar -C "$dst" -xf - \
            || die "could not copy the source tree to $dst"
    else
        ( cd "$REPO_ROOT" && tar --exclude=./target --exclude=./certs --exclude=./.git -cf - . ) |
            tar -C "$dst" -xf - || die "could not copy the source tree to $dst"
    fi
    [[ -f "$dst/Cargo.toml" && -f "$dst/Cargo.lock" ]] || die "source copy lacks Cargo.toml/Cargo.lock"
}

# host_build_node: cargo build on the host; sets NODE_BIN to the binary's path.
# (A global, not stdout: a $(...) subshell would lose make_tmpdir's cleanup.)
NODE_BIN=
host_build_node() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found (needed to build fabric-node on the host)"
    local tmp start=$SECONDS bin
    make_tmpdir tmp
    log "cargo build --release --locked --bin fabric-node (on the host)"
    if ! ( cd "$REPO_ROOT" && cargo build --release --locked --bin fabric-node \
                --message-format=json-render-diagnostics ) >"$tmp/cargo.json" 2>"$tmp/cargo.log"; then
        tail -n 30 "$tmp/cargo.log" >&2 || true
        die "cargo build of fabric-node failed"
    fi
    # The artifact message gives the real path (honours CARGO_TARGET_DIR etc.).
    bin="$(grep -o '"executable":"[^"]*/fabric-node"' "$tmp/cargo.json" | tail -n 1 | cut -d'"' -f4)"
    [[ -n "$bin" && -x "$bin" ]] || die "cargo build succeeded but the fabric-node binary was not found"
    log "fabric-node built ($((SECONDS - start))s): $bin"
    NODE_BIN="$bin"
}

# ------------------------------------------------------------------ images ---

# Debian bookworm base image: official debian:bookworm if obtainable, otherwise
# a debootstrap'd minbase rootfs imported with `docker import`.
image_base() {
    local name="$FABRIC_BASE_IMAGE"
    have_image "$name" && return 0

    if have_image "$UPSTREAM_BASE_IMAGE" || try_pull "$UPSTREAM_BASE_IMAGE"; then
        if [[ "$name" != "$UPSTREAM_BASE_IMAGE" ]]; then
            docker tag "$UPSTREAM_BASE_IMAGE" "$name"
        fi
        log "base image $name ready (from $UPSTREAM_BASE_IMAGE)"
        return 0
    fi

    PATH="$PATH:/usr/sbin:/sbin"
    ensure_cmd debootstrap
    local rootfs
    make_tmpdir rootfs
    log "debootstrap --variant=minbase $DEBIAN_SUITE from $FABRIC_DEBIAN_MIRROR (~30s)"
    if ! as_root debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs/root" "$FABRIC_DEBIAN_MIRROR" \
            >"$rootfs/debootstrap.log" 2>&1; then
        tail -n 20 "$rootfs/debootstrap.log" >&2 || true
        die "debootstrap from $FABRIC_DEBIAN_MIRROR failed (last log lines above)"
    fi
    # Trim the rootfs a little; apt lists are re-fetched by every image build.
    as_root rm -rf "$rootfs/root/var/cache/apt/archives/"*.deb "$rootfs/root/var/lib/apt/lists/"* \
        "$rootfs/root/debootstrap"
    log "importing rootfs as $name"
    as_root tar -C "$rootfs/root" --numeric-owner -c . |
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["bash"]' \
            -m "debootstrap --variant=minbase $DEBIAN_SUITE $FABRIC_DEBIAN_MIRROR" \
            - "$name" >/dev/null \
        || die "docker import of $name failed"
    have_image "$name" || die "imported $name but it is not visible in 'docker images'"
    log "base image $name ready (debootstrap)"
}

# Redis: official image if obtainable, otherwise docker/redis.Dockerfile on the base.
image_redis() {
    local name="$FABRIC_REDIS_IMAGE"
    have_image "$name" && return 0
    try_pull "$name" && return 0
    image_base
    build_image "$name" "$DOCKER_DIR/redis.Dockerfile" --build-arg "BASE_IMAGE=$FABRIC_BASE_IMAGE"
}

# fabric-node image, always brought up to date with the working tree.
image_node() {
    local mode="$FABRIC_NODE_BUILD"
    case "$mode" in
        auto)
            if have_image "$FABRIC_RUST_IMAGE" || try_pull "$FABRIC_RUST_IMAGE"; then
                mode=docker
            else
                mode=host
            fi ;;
        docker|host) ;;
        *) die "FABRIC_NODE_BUILD must be auto, docker or host (got '$mode')" ;;
    esac
    if [[ "$mode" == docker ]]; then
        node_from_source
    else
        node_from_host_binary
    fi
}

# Registry machines: multi-stage build from source. Always runs `docker build`;
# the layer cache makes an unchanged tree cheap, a changed tree rebuilds.
node_from_source() {
    local name="$FABRIC_NODE_IMAGE" runtime="$FABRIC_RUNTIME_IMAGE" ctx
    have_image "$FABRIC_RUST_IMAGE" || try_pull "$FABRIC_RUST_IMAGE" \
        || die "FABRIC_NODE_BUILD=docker but $FABRIC_RUST_IMAGE is not available"
    if ! have_image "$runtime" && ! try_pull "$runtime"; then
        image_base
        runtime="$FABRIC_BASE_IMAGE"
    fi
    make_tmpdir ctx
    export_source "$ctx/src"
    build_image_in "$ctx/src" "$name" "$DOCKER_DIR/node.Dockerfile" \
        --build-arg "RUST_IMAGE=$FABRIC_RUST_IMAGE" --build-arg "RUNTIME_IMAGE=$runtime"
}

# No registry: binary built on the host, copied onto the local base image.
# Rebuilt only when the binary (sha256), the Dockerfile or the base changed.
node_from_host_binary() {
    local name="$FABRIC_NODE_IMAGE" dockerfile="$DOCKER_DIR/node-prebuilt.Dockerfile" bin ctx inputs
    host_build_node
    bin="$NODE_BIN"
    image_base
    inputs="$(inputs_hash "$bin" "$dockerfile" -- "$(id_of "$FABRIC_BASE_IMAGE")")"
    if have_image "$name" && [[ "$(inputs_label "$name")" == "$inputs" ]]; then
        log "$name is up to date"
        return 0
    fi
    make_tmpdir ctx
    cp "$bin" "$ctx/fabric-node"
    build_if_changed "$ctx" "$name" "$dockerfile" "$inputs" \
        --build-arg "FABRIC_BASE_IMAGE=$FABRIC_BASE_IMAGE"
}

# nginx UDP load balancer on the base image (official debian:bookworm where a
# registry exists). Rebuilt only when lb.Dockerfile, nginx.conf or the base changed.
image_lb() {
    local name="$FABRIC_LB_IMAGE" dockerfile="$DOCKER_DIR/lb.Dockerfile"
    local conf="$SCRIPT_DIR/nginx/nginx.conf" ctx inputs
    image_base
    inputs="$(inputs_hash "$dockerfile" "$conf" -- "$(id_of "$FABRIC_BASE_IMAGE")")"
    make_tmpdir ctx
    cp "$conf" "$ctx/nginx.conf"
    build_if_changed "$ctx" "$name" "$dockerfile" "$inputs" \
        --build-arg "BASE_IMAGE=$FABRIC_BASE_IMAGE"
}

# Redis Cluster and Sentinel topologies (redis/*.sh) on the redis image.
# Rebuilt only when redis-ha.Dockerfile, a script or the redis image changed.
image_redis-ha() {
    local name="$FABRIC_REDIS_HA_IMAGE" dockerfile="$DOCKER_DIR/redis-ha.Dockerfile"
    local scripts=("$SCRIPT_DIR/redis/lib.sh" "$SCRIPT_DIR/redis/cluster.sh" "$SCRIPT_DIR/redis/sentinel.sh")
    local ctx inputs
    image_redis
    inputs="$(inputs_hash "$dockerfile" "${scripts[@]}" -- "$(id_of "$FABRIC_REDIS_IMAGE")")"
    make_tmpdir ctx
    cp "${scripts[@]}" "$ctx/"
    build_if_changed "$ctx" "$name" "$dockerfile" "$inputs" \
        --build-arg "REDIS_IMAGE=$FABRIC_REDIS_IMAGE"
}

# -------------------------------------------------------------- dispatcher ---

kinds() { declare -F | awk '$3 ~ /^image_/ { sub(/^image_/, "", $3); print $3 }'; }

usage() {
    echo "usage: $0 KIND [KIND...]   (KIND: $(kinds | paste -sd'|' -))" >&2
    exit "${1:-2}"
}

main() {
    [[ $# -ge 1 ]] || usage
    case "$1" in -h|--help) usage 0 ;; esac
    local kind
    for kind in "$@"; do
        declare -F "image_$kind" >/dev/null \
            || { echo "images.sh: unknown image kind '$kind'" >&2; usage; }
    done

    command -v docker >/dev/null 2>&1 || die "docker CLI not found"
    docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
        || die "cannot talk to the Docker engine (is dockerd running / DOCKER_HOST set / permissions?)"
    command -v flock >/dev/null 2>&1 || die "flock not found (util-linux)"

    exec 9>>"$FABRIC_IMAGES_LOCK" || die "cannot open lock file $FABRIC_IMAGES_LOCK"
    if ! flock -n 9; then
        log "another images.sh is running; waiting for $FABRIC_IMAGES_LOCK"
        flock -w 1800 9 || die "timed out waiting for lock $FABRIC_IMAGES_LOCK"
    fi

    for kind in "$@"; do
        "image_$kind"
    done
}

main "$@"
