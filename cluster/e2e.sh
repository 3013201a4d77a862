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

# shellcheck source=cluster/e2e-common.sh
. cluster/e2e-common.sh
e2e_setup fabric-e2e 14433 18080 172.29.53
trap 'e2e_teardown 11/11' EXIT

# Step 1: images, certificates, cluster up and healthy.
e2e_up 1/11 redis node lb

# Steps 2-10: clients talk to the cluster through the LB only; the admin API
# and metrics (not published) are reached at the nodes' static IPs; the
# rolling restart uses $FABRIC_E2E_COMPOSE stop/start.
FABRIC_E2E_SERVER="127.0.0.1:$FABRIC_LB_PORT" FABRIC_E2E_CA="certs/ca.pem" \
    cargo test --locked --test e2e_cluster -- --ignored --nocapture --test-threads=1 2>&1 \
    | tee "$LOG_DIR/test.log" \
    | awk '/panicked/ { print; if ((getline line) > 0) print line; next } /e2e step|^  / { print }' || true
grep -q 'test result: ok. 1 passed' "$LOG_DIR/test.log" || fail "steps 2-10: see the messages above"
