#!/usr/bin/env bash
# Make the Docker images the cluster/tests need available locally.
#
#   cluster/images.sh KIND [KIND...]      KIND: base | redis   (-h for the list)
#
# For each image: if it is already present nothing happens; otherwise the
# official image is pulled (with a timeout); if no registry is reachable, the
# image is built locally from Debian packages (debootstrap + docker import for
# the base, then `docker build` on top of it).
#
# Idempotent, and safe to run concurrently (serialised with flock).
#
# Environment:
#   FABRIC_BASE_IMAGE     base image name      (default quic-fabric/debian:bookworm)
#   FABRIC_REDIS_IMAGE    redis image name     (default redis:7)
#   FABRIC_DEBIAN_MIRROR  mirror for debootstrap (default http://deb.debian.org/debian)
#   FABRIC_PULL_TIMEOUT   seconds per `docker pull` attempt (default 60)
#   FABRIC_IMAGES_LOCK    lock file            (default /tmp/quic-fabric-images.lock)
#
# Adding an image kind: write a function `image_<kind>` that ensures the image
# exists (use the helpers below); the dispatcher picks it up automatically.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DOCKER_DIR="$SCRIPT_DIR/docker"

FABRIC_BASE_IMAGE="${FABRIC_BASE_IMAGE:-quic-fabric/debian:bookworm}"
FABRIC_REDIS_IMAGE="${FABRIC_REDIS_IMAGE:-redis:7}"
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
build_image() {
    local name="$1" dockerfile="$2"; shift 2
    [[ -f "$dockerfile" ]] || die "missing $dockerfile"
    log "building $name from ${dockerfile#"$SCRIPT_DIR/"}"
    # Context is the dockerfile's directory (small; only Dockerfiles live there).
    # No --pull: FROM must resolve to the local base image.
    local tmp
    make_tmpdir tmp
    if ! docker build -t "$name" -f "$dockerfile" "$@" "$(dirname "$dockerfile")" >"$tmp/build.log" 2>&1; then
        tail -n 30 "$tmp/build.log" >&2 || true
        die "docker build of $name failed"
    fi
    have_image "$name" || die "built $name but it is not visible in 'docker images'"
    log "built $name"
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
