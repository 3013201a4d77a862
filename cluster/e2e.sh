#!/usr/bin/env bash
# End-to-end check of the 3-node docker-compose cluster behind the UDP load
# balancer: build images, start, connect clients through the LB, broadcast,
# direct, list, admin API and metrics, rolling restart of every node under
# traffic (SIGTERM drain, clients reconnect), kill a node, restart Redis, a
# channel with subscribers on two nodes (publish, presence), a channel with
# history across a node restart and a node kill (nothing acknowledged lost),
# headless Chromium on node1's demo page talking to a client on another node
# through the LB (WebTransport), tear down. One summary line per step; exits non-zero on any failure and always
# tears down.
#
#   cluster/e2e.sh
#
# Environment: FABRIC_E2E_PROJECT (compose project, default fabric-e2e),
# FABRIC_LB_PORT (host UDP port of the LB, default 14433), FABRIC_WEB_PORT
# (host TCP port of node1's demo page, default 18080), FABRIC_NET_PREFIX
# (compose network, default 172.29.53), FABRIC_ADMIN_TOKEN and
# FABRIC_SESSION_SECRET (default: random ones
# for this run), plus the image variables of cluster/images.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

export FABRIC_E2E_PROJECT="${FABRIC_E2E_PROJECT:-fabric-e2e}"
export FABRIC_LB_PORT="${FABRIC_LB_PORT:-14433}"
export FABRIC_WEB_PORT="${FABRIC_WEB_PORT:-18080}"
export FABRIC_NET_PREFIX="${FABRIC_NET_PREFIX:-172.29.53}"
# Never the compose file's dev default: a fresh token per run.
export FABRIC_ADMIN_TOKEN="${FABRIC_ADMIN_TOKEN:-e2e-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')}"
export FABRIC_SESSION_SECRET="${FABRIC_SESSION_SECRET:-e2e-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')}"
if command -v docker-compose >/dev/null 2>&1; then
    export FABRIC_E2E_COMPOSE="docker-compose"
else
    export FABRIC_E2E_COMPOSE="docker compose"
fi
read -ra COMPOSE <<<"$FABRIC_E2E_COMPOSE"
COMPOSE+=(-p "$FABRIC_E2E_PROJECT")
LOG_DIR="$(mktemp -d)"
START=$SECONDS

say() { printf 'e2e %s\n' "$*"; }
fail() { say "FAIL $*"; exit 1; }

teardown() {
    local rc=$?
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
        say "step 11/11 FAIL teardown left containers, networks or volumes behind"
        rc=1
    else
        say "step 11/11 PASS torn down: no containers, networks or volumes left ($((SECONDS - START))s total)"
    fi
    rm -rf "$LOG_DIR"
    exit "$rc"
}
trap teardown EXIT

# Step 1: images, certificates, cluster up and healthy.
cluster/images.sh redis node lb || fail "step 1/11 could not build the images"
cargo run --quiet --release --locked --bin fabric-node -- gen-certs --certs-dir certs \
    --cert-names localhost,127.0.0.1,lb >/dev/null || fail "step 1/11 could not generate certificates"
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
"${COMPOSE[@]}" up -d >"$LOG_DIR/up.log" 2>&1 || { cat "$LOG_DIR/up.log" >&2; fail "step 1/11 compose up failed"; }
deadline=$((SECONDS + 120))
for service in node1 node2 node3; do
    id="$("${COMPOSE[@]}" ps -q "$service")"
    [[ -n "$id" ]] || fail "step 1/11 no container for $service"
    until [[ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" == healthy ]]; do
        (( SECONDS < deadline )) || fail "step 1/11 $service not healthy within 120s"
        sleep 1
    done
done
say "step 1/11 PASS images built, cluster up, node1..node3 healthy ($((SECONDS - START))s)"

# Steps 2-10: clients talk to the cluster through the LB only; the admin API
# and metrics (not published) are reached at the nodes' static IPs; the
# rolling restart uses $FABRIC_E2E_COMPOSE stop/start.
FABRIC_E2E_SERVER="127.0.0.1:$FABRIC_LB_PORT" FABRIC_E2E_CA="certs/ca.pem" \
    cargo test --locked --test e2e_cluster -- --ignored --nocapture --test-threads=1 2>&1 \
    | tee "$LOG_DIR/test.log" \
    | awk '/panicked/ { print; if ((getline line) > 0) print line; next } /e2e step|^  / { print }' || true
grep -q 'test result: ok. 1 passed' "$LOG_DIR/test.log" || fail "steps 2-10: see the messages above"
