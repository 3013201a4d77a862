#!/usr/bin/env bash
# Small-message latency and bulk goodput across a lossy, long-RTT link, per
# congestion controller, beside a raw quinn floor (BENCHMARKS.md, "Lossy
# links"). Not part of the test command: it needs root (network namespaces)
# and takes a few minutes.
#
# The link is made in user space by the impairment tool (two network
# namespaces, 25 ms each way, independent loss per direction); the node and
# a raw quinn echo server run in one namespace, the bench in the other.
#
#   bench/lossy.sh                      # cubic new-reno bbr x 0 1 2 % loss
#   CCS=bbr LOSSES="0.01" DURATION=10s bench/lossy.sh
#
# Environment: IMPAIR (path of impair.sh, default ../shared/tools/impair/
# impair.sh from the repository root), CCS, LOSSES (fractions), DELAY_MS
# (each way, default 25), DURATION (per measurement, default 20s),
# BULK_WINDOW (64 KiB messages in flight, default 16), OUT (JSON results,
# default target/lossy).
set -euo pipefail
cd "$(dirname "$0")/.."

IMPAIR=${IMPAIR:-../shared/tools/impair/impair.sh}
CCS=${CCS:-"cubic new-reno bbr"}
LOSSES=${LOSSES:-"0 0.01 0.02"}
DELAY_MS=${DELAY_MS:-25}
DURATION=${DURATION:-20s}
OUT=${OUT:-target/lossy}
SRV=10.77.0.2

[ -x "$IMPAIR" ] || { echo "impairment tool not found at $IMPAIR (set IMPAIR)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 2; }

cargo build --release -q
mkdir -p "$OUT"
certs=$(mktemp -d)
./target/release/fabric-node gen-certs --certs-dir "$certs" >/dev/null

pids=()
stop_servers() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}
cleanup() {
    stop_servers
    "$IMPAIR" down >/dev/null 2>&1 || true
    rm -rf "$certs"
}
trap cleanup EXIT

"$IMPAIR" up --delay-ms "$DELAY_MS" --loss 0 >/dev/null

for cc in $CCS; do
    # Bulk for oneself fills the node's queue for the client up to the
    # bench's window (16 x 64 KiB): within the default limits.
    "$IMPAIR" exec srv ./target/release/fabric-node --listen "$SRV:4433" \
        --certs-dir "$certs" --congestion-controller "$cc" --log-format text \
        2>"$OUT/node-$cc.log" &
    pids+=($!)
    "$IMPAIR" exec srv ./target/release/fabric-bench raw-server echo "$SRV:4434" "$certs" "$cc" &
    pids+=($!)
    for _ in $(seq 50); do
        "$IMPAIR" exec cli ./target/release/fabric-node health --server "$SRV:4433" \
            --ca "$certs/ca.pem" --server-name localhost >/dev/null 2>&1 && break
        sleep 0.2
    done
    for loss in $LOSSES; do
        "$IMPAIR" set --delay-ms "$DELAY_MS" --loss "$loss" >/dev/null
        echo "== $cc, ${DELAY_MS} ms each way, loss $loss per direction"
        "$IMPAIR" exec cli ./target/release/fabric-bench lossy --server "$SRV:4433" \
            --raw-server "$SRV:4434" --ca "$certs/ca.pem" --congestion "$cc" \
            --duration "$DURATION" --bulk-window "${BULK_WINDOW:-16}" --json "$OUT/$cc-$loss.json"
    done
    stop_servers
done

python3 - "$OUT" $CCS -- $LOSSES <<'EOF'
import json, sys
out = sys.argv[1]
rest = sys.argv[2:]
ccs, losses = rest[:rest.index("--")], rest[rest.index("--") + 1:]
print("\n| congestion | loss | small alone p50/p99 ms | small with bulk p50/p99 ms | bulk Mbit/s | floor small p50/p99 ms | floor bulk Mbit/s |")
print("|---|---|---|---|---|---|---|")
for cc in ccs:
    for loss in losses:
        try:
            r = json.load(open(f"{out}/{cc}-{loss}.json"))["results"]["Lossy"]
        except (OSError, KeyError):
            continue
        ms = lambda h: f"{h['p50_us'] / 1000:.1f} / {h['p99_us'] / 1000:.1f}"
        f = r["floor_raw_quinn"] or {}
        print(f"| {cc} | {float(loss) * 100:g} % | {ms(r['small_alone'])} | {ms(r['small_with_bulk'])} "
              f"| {r['bulk_mbit_s']:.1f} | {ms(f['small']) if f else '-'} | {f.get('bulk_mbit_s', 0):.1f} |")
EOF
