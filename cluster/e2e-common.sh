# shellcheck shell=bash
# Helpers shared by the compose end-to-end scripts (cluster/e2e.sh,
# cluster/e2e-redis-cluster.sh). Sourced by bash from the repo root, under
# `set -euo pipefail`; not a script of its own.
#
#   e2e_setup PROJECT LB_PORT WEB_PORT NET_PREFIX [COMPOSE_FILE...]
#       defaults for FABRIC_E2E_PROJECT, FABRIC_LB_PORT, FABRIC_WEB_PORT,
#       FABRIC_NET_PREFIX (the environment wins), a random admin token and
#       session secret, FABRIC_E2E_COMPOSE, the COMPOSE command array (with
#       -f for each COMPOSE_FILE, none = docker-compose.yml), LOG_DIR, START.
#   e2e_up STEP IMAGE_KIND...
#       images, certificates, `up -d` from scratch, node1..node3 healthy;
#       prints "step STEP PASS ..." or fails with "step STEP ...".
#   trap 'e2e_teardown STEP' EXIT
#       kills the processes listed in E2E_PIDS, prints the cluster logs on
#       failure, `down -v`, checks that nothing of the project is left and
#       prints "step STEP PASS|FAIL ..."; exits with the script's status (1 if
#       something was left).
#   say, fail: one `e2e ...` line; fail exits 1.

say() { printf 'e2e %s\n' "$*"; }
fail() { say "FAIL $*"; exit 1; }

E2E_PIDS=()

e2e_setup() {
    export FABRIC_E2E_PROJECT="${FABRIC_E2E_PROJECT:-$1}"
    export FABRIC_LB_PORT="${FABRIC_LB_PORT:-$2}"
    export FABRIC_WEB_PORT="${FABRIC_WEB_PORT:-$3}"
    export FABRIC_NET_PREFIX="${FABRIC_NET_PREFIX:-$4}"
    shift 4
    # Never the compose file's dev default: a fresh token per run.
    export FABRIC_ADMIN_TOKEN="${FABRIC_ADMIN_TOKEN:-e2e-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')}"
    export FABRIC_SESSION_SECRET="${FABRIC_SESSION_SECRET:-e2e-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')}"
    if command -v docker-compose >/dev/null 2>&1; then
        export FABRIC_E2E_COMPOSE="docker-compose"
    else
        export FABRIC_E2E_COMPOSE="docker compose"
    fi
    read -ra COMPOSE <<<"$FABRIC_E2E_COMPOSE"
    local file
    for file in "$@"; do
        COMPOSE+=(-f "$file")
    done
    COMPOSE+=(-p "$FABRIC_E2E_PROJECT")
    LOG_DIR="$(mktemp -d)"
    START=$SECONDS
}

e2e_teardown() {
    local rc=$? step="$1" pid
    for pid in "${E2E_PIDS[@]+"${E2E_PIDS[@]}"}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${E2E_PIDS[@]+"${E2E_PIDS[@]}"}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $rc -ne 0 ]]; then
        say "cluster logs (last 40 lines per service) follow"
        "${COMPOSE[@]}" logs --no-color --tail 40 >&2 2>/dev/null || true
    fi
    "${COMPOSE[@]}" down -v --remove-orphans >"$LOG_DIR/down.log" 2>&1 || true
    local left
    left="$(docker ps -aq --filter "label=com.docker.compose.project=$FABRIC_E2E_PROJECT")"
    left+="$(docker network ls -q --filter "label=com.docker.compose.project=$FABRIC_E2E_PROJECT")"
    left+="$(docker volume ls -q --filter "label=com.docker.compose.project=$FABRIC_E2E_PROJECT")"
    if [[ -n "$left" ]]; then
        say "step $step FAIL teardown left containers, networks or volumes behind"
        rc=1
    else
        say "step $step PASS torn down: no containers, networks or volumes left ($((SECONDS - START))s total)"
    fi
    rm -rf "$LOG_DIR"
    exit "$rc"
}

e2e_up() {
    local step="$1"
    shift
    cluster/images.sh "$@" || fail "step $step could not build the images"
    cargo run --quiet --release --locked --bin fabric-node -- gen-certs --certs-dir certs \
        --cert-names localhost,127.0.0.1,lb >/dev/null || fail "step $step could not generate certificates"
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    "${COMPOSE[@]}" up -d >"$LOG_DIR/up.log" 2>&1 || { cat "$LOG_DIR/up.log" >&2; fail "step $step compose up failed"; }
    local deadline=$((SECONDS + 120)) service id
    for service in node1 node2 node3; do
        id="$("${COMPOSE[@]}" ps -q "$service")"
        [[ -n "$id" ]] || fail "step $step no container for $service"
        until [[ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" == healthy ]]; do
            (( SECONDS < deadline )) || fail "step $step $service not healthy within 120s"
            sleep 1
        done
    done
    say "step $step PASS images built, cluster up, node1..node3 healthy ($((SECONDS - START))s)"
}
