#!/usr/bin/env bash
# End-to-end check of the 3-node docker-compose cluster on a Redis Cluster
# (cluster/redis-cluster.yml: 3 masters + 3 replicas in the redis service)
# behind the UDP load balancer, with the `fabric` CLI only:
#   1 images, certificates, cluster up on the override, node1..node3 healthy;
#   2 listeners through the LB on two nodes or more: a direct to each (at
#     least one across nodes), a broadcast to all, each exactly once;
#   3 two channels with history (namespace h) whose slots are on different
#     masters, subscribers on two nodes or more: numbered publications on
#     both reach every subscriber once and in order;
#   4 while both channels get a publication every ~50 ms, SIGKILL of the
#     Redis master owning the first channel's slot: its replica is promoted
#     and delivery resumes by itself within FABRIC_E2E_FAILOVER_BOUND (the
#     gap is printed);
#   5 every acknowledged publication reached every subscriber exactly once
#     and in order, or the subscriber was told of the loss (a `subscribed`
#     line with recovery epoch_changed/trimmed, or a SubscriptionLost);
#   6 directs to every listener (across nodes) and a broadcast work again,
#     `list` shows every client, the killed master rejoins as a replica and
#     the redis service is healthy;
#   7 teardown leaves no container, network or volume of the project.
# One summary line per step; exits non-zero on any failure and always tears
# down.
#
#   cluster/e2e-redis-cluster.sh
#
# Environment: FABRIC_E2E_PROJECT (compose project, default fabric-e2e-rc),
# FABRIC_LB_PORT (default 14434), FABRIC_WEB_PORT (default 18081),
# FABRIC_NET_PREFIX (default 172.29.54): different from cluster/e2e.sh's,
# so it can run right after it;
# FABRIC_E2E_FAILOVER_BOUND (seconds from the kill until delivery must have
# resumed, default 30), FABRIC_ADMIN_TOKEN and FABRIC_SESSION_SECRET
# (default: random ones for this run), plus the image variables of
# cluster/images.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=cluster/e2e-common.sh
. cluster/e2e-common.sh
e2e_setup fabric-e2e-rc 14434 18081 172.29.54 docker-compose.yml cluster/redis-cluster.yml
trap 'e2e_teardown 7/7' EXIT

FAILOVER_BOUND="${FABRIC_E2E_FAILOVER_BOUND:-30}"
WAIT=15            # seconds for a message to arrive, a client to connect
LISTENERS=6
SUBSCRIBERS=4
REDIS_PORTS=(7000 7001 7002 7003 7004 7005)
RUN="$(od -An -tx1 -N3 /dev/urandom | tr -d ' \n')"   # keeps channel names fresh
[[ -n "${EPOCHREALTIME:-}" ]] || fail "bash 5 or later needed (EPOCHREALTIME)"

# ------------------------------------------------------------- helpers ---

now_us() { echo "${EPOCHREALTIME/./}"; }
secs() { awk -v us="$1" 'BEGIN { printf "%.1f", us / 1e6 }'; }  # µs -> "1.2"

# Prefixes every line read with the time it arrived (µs since the epoch).
stamp() {
    local line
    while IFS= read -r line; do
        printf '%s %s\n' "${EPOCHREALTIME/./}" "$line"
    done
}
# The JSON lines of a stamped file, without the stamps.
lines() { cut -d' ' -f2- "$1"; }

# bg FILE ARGS...: runs `fabric ARGS...` in the background, its stdout
# stamped into FILE (stderr into FILE.err); the PID is killed at teardown.
bg() {
    local file="$1"
    shift
    : >"$file"  # exists at once (stamp opens it asynchronously)
    "${FAB[@]}" "$@" > >(stamp >"$file") 2>"$file.err" &
    E2E_PIDS+=("$!")
}

# until_true SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds.
until_true() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        (( SECONDS < deadline )) || return 1
        sleep 0.2
    done
}

# The client id and node id a client file shows last (after a reconnect,
# the new ones).
client_of() {
    lines "$1" | jq -r 'select(.type == "connected" or .type == "reconnected")
        | "\(.client_id) \(.node_id)"' 2>/dev/null | tail -n 1
}
connected() { [[ -n "$(client_of "$1")" ]]; }

node_name() {
    case "$1" in
        "${FABRIC_NODE1_ID:-11111111-1111-4111-8111-111111111111}") echo node1 ;;
        "${FABRIC_NODE2_ID:-22222222-2222-4222-8222-222222222222}") echo node2 ;;
        "${FABRIC_NODE3_ID:-33333333-3333-4333-8333-333333333333}") echo node3 ;;
        *) echo "${1:0:8}" ;;
    esac
}

# count FILE TYPE TEXT: lines of TYPE carrying TEXT.
count() {
    lines "$1" | jq -r --arg t "$2" --arg x "$3" 'select(.type == $t and .text == $x) | .type' \
        2>/dev/null | wc -l
}
has() { [[ "$(count "$@")" -ge 1 ]]; }
# every_has TYPE TEXT FILE...: each FILE has it.
every_has() {
    local type="$1" text="$2" file
    shift 2
    for file in "$@"; do
        has "$file" "$type" "$text" || return 1
    done
}

# Redis, inside the redis service's container.
rexec() { docker exec "$REDIS_ID" "$@"; }
rcli() {
    local port="$1"
    shift
    docker exec "$REDIS_ID" redis-cli -p "$port" "$@" 2>/dev/null | tr -d '\r'
}
live_port() {
    local p
    for p in "${REDIS_PORTS[@]}"; do
        [[ "$(rcli "$p" ping)" == PONG ]] && { echo "$p"; return 0; }
    done
    return 1
}
# `cluster nodes` as seen by a live node.
cluster_nodes() { rcli "$(live_port)" cluster nodes; }
# Ports of the masters not marked failing.
masters() {
    cluster_nodes | awk '$3 ~ /master/ && $3 !~ /fail/ { split($2, a, /[:@]/); print a[2] }' | sort
}
# role_of PORT: master, slave (or empty), from a live node's view.
role_of() {
    cluster_nodes | awk -v p="$1" '{ split($2, a, /[:@]/) }
        a[2] == p { r = $3; sub(/myself,/, "", r); sub(/,.*/, "", r); print r }'
}
# replica_of PORT: the port of MASTER's replica.
replica_of() {
    cluster_nodes | awk -v p="$1" '{ split($2, a, /[:@]/); port[$1] = a[2]; master[$1] = $4 }
        END { for (id in port) if (port[id] == p) m = id
              for (id in port) if (master[id] == m) print port[id] }'
}
# channel_master CHANNEL: "PORT SLOT KEY" of the master holding the
# channel's keys (its history; found by name, whatever the key layout);
# cross-checked against the slot map (CLUSTER KEYSLOT, CLUSTER NODES).
channel_master() {
    local channel="$1" p key found="" slot owner
    for p in $(masters); do
        key="$(rcli "$p" --scan --pattern "*${channel}*" | head -n 1)"
        [[ -n "$key" ]] || continue
        [[ -z "$found" ]] || { say "keys of $channel on :${found%% *} and :$p" >&2; return 1; }
        found="$p $key"
    done
    [[ -n "$found" ]] || { say "no key of $channel on any master" >&2; return 1; }
    p="${found%% *}"
    key="${found#* }"
    slot="$(rcli "$p" cluster keyslot "$key")"
    owner="$(cluster_nodes | awk -v s="$slot" '$3 ~ /master/ && $3 !~ /fail/ {
        split($2, a, /[:@]/)
        for (i = 9; i <= NF; i++) { n = split($i, r, "-"); if (n == 1) r[2] = r[1]
            if (s >= r[1] + 0 && s <= r[2] + 0) print a[2] } }')"
    [[ "$owner" == "$p" ]] || { say "$key (slot $slot) found on :$p but the slot map says :$owner" >&2; return 1; }
    echo "$p $slot $key"
}
redis_health() { docker inspect -f '{{.State.Health.Status}}' "$REDIS_ID"; }

# direct_to FILE TEXT: a direct to the client of FILE, acknowledged and
# delivered; sets CROSS=1 when it came from another node.
direct_to() {
    local file="$1" text="$2" id node from
    read -r id node <<<"$(client_of "$file")"
    timeout 15 "${FAB[@]}" --name rc-sender send --to "$id" "$text" >/dev/null 2>>"$LOG_DIR/send.err" \
        || return 1
    until_true "$WAIT" has "$file" direct "$text" || return 1
    from="$(lines "$file" | jq -r --arg x "$text" 'select(.type == "direct" and .text == $x) | .from.node_id' | head -n 1)"
    CROSS=0
    [[ "$from" == "$node" ]] || CROSS=1
}

# directs_round TAG: a direct to every listener (retried while refused, up
# to WAIT seconds each), until at least one crossed nodes; prints how many
# crossed.
directs_round() {
    local tag="$1" i crossed=0 tries deadline
    for i in $(seq 1 "$LISTENERS"); do
        deadline=$((SECONDS + WAIT))
        tries=0
        until direct_to "$LOG_DIR/l$i" "$tag-$i-$tries"; do
            tries=$((tries + 1))
            (( SECONDS < deadline )) || { say "direct to listener $i refused or lost for ${WAIT}s" >&2; return 1; }
            sleep 0.2
        done
        crossed=$((crossed + CROSS))
    done
    # The sender's node is the LB's choice: retry until one crossed nodes.
    for i in $(seq 1 12); do
        (( crossed == 0 )) || break
        direct_to "$LOG_DIR/l$(( (i % LISTENERS) + 1 ))" "$tag-x$i" || return 1
        crossed=$((crossed + CROSS))
    done
    (( crossed > 0 )) || { say "no direct crossed nodes" >&2; return 1; }
    # Exactly once each.
    for i in $(seq 1 "$LISTENERS"); do
        [[ "$(lines "$LOG_DIR/l$i" | jq -r --arg t "$tag-" 'select(.type == "direct" and (.text | startswith($t))) | .text' | sort | uniq -d)" == "" ]] \
            || { say "listener $i got a direct twice" >&2; return 1; }
    done
    echo "$crossed"
}

# broadcast_once TEXT: acknowledged, then every listener has it exactly once.
broadcast_once() {
    local text="$1" file
    timeout 15 "${FAB[@]}" --name rc-sender broadcast "$text" >/dev/null || return 1
    # shellcheck disable=SC2046 # one argument per file
    until_true "$WAIT" every_has broadcast "$text" $(listener_files) || return 1
    sleep 0.5
    for file in $(listener_files); do
        [[ "$(count "$file" broadcast "$text")" == 1 ]] || return 1
    done
}
listener_files() { for i in $(seq 1 "$LISTENERS"); do echo "$LOG_DIR/l$i"; done; }
sub_files() { for i in $(seq 1 "$SUBS"); do echo "$LOG_DIR/s$i"; done; }

# spread FILE...: "node1 x2, node3 x1" (the nodes the clients are on).
spread() {
    local file
    for file in "$@"; do
        node_name "$(client_of "$file" | cut -d' ' -f2)"
    done | sort | uniq -c | awk '{ printf "%s%s x%s", sep, $2, $1; sep = ", " }'
}
distinct_nodes() {
    local file
    for file in "$@"; do client_of "$file" | cut -d' ' -f2; done | sort -u | wc -l
}

# publisher CHANNEL FIRST LOG STOP: publishes FIRST, FIRST+1, ... to
# CHANNEL one at a time (one `fabric pub` each, ~50 ms apart) until the file
# STOP exists; one line per publication in LOG: "N START_US END_US EXIT".
publisher() {
    local channel="$1" n="$2" log="$3" stop="$4" started rc
    while [[ ! -e "$stop" ]]; do
        started="$(now_us)"
        rc=0
        timeout 12 "${FAB[@]}" --name rc-pub pub "$channel" "$n" >/dev/null 2>>"$log.err" || rc=$?
        printf '%s %s %s %s\n' "$n" "$started" "$(now_us)" "$rc" >>"$log"
        n=$((n + 1))
        sleep 0.05
    done
}

# received FILE CHANNEL: the numbers of CHANNEL's publications in FILE,
# with the time each arrived: "N US" per line, in arrival order.
received() {
    awk '{ us = $1; $1 = ""; print us "\t" $0 }' "$1" \
        | jq -Rr --arg ch "$2" 'split("\t") | (.[1] | fromjson? // {}) as $l
            | select($l.type == "publication" and $l.channel == $ch) | "\($l.text) \(.[0])"'
}

# account FILE CHANNEL ACKED: checks that FILE (a subscriber) got every
# number in ACKED (one per line) of CHANNEL exactly once and in order, or
# was told of a loss: a `subscribed` line for CHANNEL whose recovery is
# neither recovered nor not_requested, a subscription_lost frame, or a
# failed resubscription. A missing number counts as told when a telling
# came before the first number that arrived after it. Prints
# "got=N lost=N told=N untold=N dup=N disorder=N recoveries=..." and
# returns non-zero when something is wrong.
account() {
    lines "$1" | jq -r --arg ch "$2" '
        if .type == "publication" and .channel == $ch then "P \(.text)"
        elif .type == "subscribed" and .channel == $ch then "S \(.recovery)"
        elif .type == "subscription_lost" and .channel == $ch then "T subscription_lost"
        elif .type == "resubscribed" and ([.failed[]?.channel] | index($ch)) != null then "T resubscribe_failed"
        else empty end' 2>/dev/null \
    | awk -v acked="$3" '
        BEGIN { while ((getline a < acked) > 0) ack[++na] = a + 0 }
        $1 == "P" { n = $2 + 0; if (n in seen) dup++; seen[n] = 1
                    if (ng && n <= got[ng]) disorder++; got[++ng] = n; next }
        $1 == "S" && ($2 == "not_requested" || $2 == "recovered") { rec[$2]++; next }
        { tells++; last_tell = ng; rec[$2]++ }
        END {
            told_by = (tells && last_tell < ng) ? got[last_tell + 1] : 1e18
            for (i = 1; i <= na; i++) if (!(ack[i] in seen)) {
                lost++
                if (!tells || ack[i] > told_by) untold++
            }
            for (r in rec) { recs = recs sep r ":" rec[r]; sep = "," }
            printf "got=%d lost=%d told=%d untold=%d dup=%d disorder=%d recoveries=%s\n",
                ng, lost, tells, untold, dup, disorder, recs
            exit (untold || dup || disorder) ? 1 : 0
        }'
}

# ------------------------------------------------------------- step 1 ---

FABRIC="$(cargo build --release --locked --bin fabric --message-format=json-render-diagnostics \
    2>"$LOG_DIR/cargo.log" | grep -o '"executable":"[^"]*/fabric"' | tail -n 1 | cut -d'"' -f4)" \
    || { tail -n 30 "$LOG_DIR/cargo.log" >&2; fail "step 1/7 could not build the fabric CLI"; }
[[ -x "$FABRIC" ]] || fail "step 1/7 the fabric CLI was not found after the build"
FAB=("$FABRIC" --server "127.0.0.1:$FABRIC_LB_PORT" --ca certs/ca.pem --server-name localhost)
e2e_up 1/7 redis-ha node lb
REDIS_ID="$("${COMPOSE[@]}" ps -q redis)"

# ------------------------------------------------------------- step 2 ---
# Listeners through the LB (each connection hashes anew), on 2+ nodes.

t=$SECONDS
for i in $(seq 1 "$LISTENERS"); do
    bg "$LOG_DIR/l$i" --name "rc-l$i" listen
done
for file in $(listener_files); do
    until_true "$WAIT" connected "$file" || fail "step 2/7 a listener did not connect: $(cat "$file.err")"
done
# shellcheck disable=SC2046
(( $(distinct_nodes $(listener_files)) >= 2 )) \
    || fail "step 2/7 all $LISTENERS listeners landed on one node ($(spread $(listener_files)))"
crossed="$(directs_round "d1-$RUN")" || fail "step 2/7 directs"
broadcast_once "b1-$RUN" || fail "step 2/7 the broadcast did not reach every listener exactly once"
# shellcheck disable=SC2046
say "step 2/7 PASS $LISTENERS listeners through the LB ($(spread $(listener_files))): a direct to each acknowledged and delivered once ($crossed across nodes), a broadcast reached all exactly once ($((SECONDS - t))s)"

# ------------------------------------------------------------- step 3 ---
# Two channels with history on different masters; subscribers on 2+ nodes.

t=$SECONDS
A="" B="" A_AT="" B_AT=""
for i in $(seq 1 8); do
    channel="h:rc$RUN-$i"
    timeout 15 "${FAB[@]}" --name rc-pub pub "$channel" probe >/dev/null \
        || fail "step 3/7 publication to $channel not acknowledged"
    until_true 5 channel_master "$channel" >/dev/null 2>&1 || true
    at="$(channel_master "$channel")" || fail "step 3/7 cannot find the master of $channel"
    if [[ -z "$A" ]]; then
        A="$channel" A_AT="$at"
    elif [[ "${at%% *}" != "${A_AT%% *}" ]]; then
        B="$channel" B_AT="$at"
        break
    fi
done
[[ -n "$B" ]] || fail "step 3/7 8 channels, all on master :${A_AT%% *}"
read -r A_MASTER A_SLOT A_KEY <<<"$A_AT"
read -r B_MASTER B_SLOT _ <<<"$B_AT"
subscribed() { [[ "$(lines "$1" | jq -r 'select(.type == "subscribed") | .channel' | wc -l)" -ge 2 ]]; }
SUBS=0
# shellcheck disable=SC2046 # one argument per file
while (( SUBS < SUBSCRIBERS )) || (( SUBS < 8 && $(distinct_nodes $(sub_files)) < 2 )); do
    SUBS=$((SUBS + 1))
    bg "$LOG_DIR/s$SUBS" --name "rc-s$SUBS" sub "$A" "$B"
    until_true "$WAIT" subscribed "$LOG_DIR/s$SUBS" \
        || fail "step 3/7 subscriber $SUBS did not subscribe: $(cat "$LOG_DIR/s$SUBS.err")"
done
# shellcheck disable=SC2046
(( $(distinct_nodes $(sub_files)) >= 2 )) || fail "step 3/7 all $SUBS subscribers on one node"
for n in 1 2 3 4 5; do
    for channel in "$A" "$B"; do
        timeout 15 "${FAB[@]}" --name rc-pub pub "$channel" "$n" >/dev/null \
            || fail "step 3/7 publication $n to $channel not acknowledged"
    done
done
seq 1 5 >"$LOG_DIR/first5"
last_is() { [[ "$(received "$1" "$2" | tail -n 1 | cut -d' ' -f1)" == "$3" ]]; }
for file in $(sub_files); do
    for channel in "$A" "$B"; do
        until_true "$WAIT" last_is "$file" "$channel" 5 || fail "step 3/7 $file lacks publication 5 of $channel"
        [[ "$(received "$file" "$channel" | cut -d' ' -f1 | tr '\n' ' ')" == "1 2 3 4 5 " ]] \
            || fail "step 3/7 $file got $channel's publications as $(received "$file" "$channel" | cut -d' ' -f1 | tr '\n' ' ')"
    done
done
# shellcheck disable=SC2046
say "step 3/7 PASS channels $A (key $A_KEY, slot $A_SLOT, master :$A_MASTER) and $B (slot $B_SLOT, master :$B_MASTER), $SUBS subscribers to both ($(spread $(sub_files))): publications 1-5 on each reached every subscriber once and in order ($((SECONDS - t))s)"

# ------------------------------------------------------------- step 4 ---
# Publications on both channels every ~50 ms; SIGKILL of A's master.

t=$SECONDS
STOP="$LOG_DIR/stop"
publisher "$A" 6 "$LOG_DIR/pub-a" "$STOP" &
E2E_PIDS+=("$!")
PUB_A=$!
publisher "$B" 6 "$LOG_DIR/pub-b" "$STOP" &
E2E_PIDS+=("$!")
PUB_B=$!
acked_any() { awk '$4 == 0' "$1" 2>/dev/null | grep -q .; }
until_true "$WAIT" acked_any "$LOG_DIR/pub-a" || fail "step 4/7 no publication acknowledged before the kill"
sleep 2
[[ "$(role_of "$A_MASTER")" == master ]] || fail "step 4/7 :$A_MASTER is no longer a master"
REPLICA="$(replica_of "$A_MASTER")"
[[ -n "$REPLICA" ]] || fail "step 4/7 :$A_MASTER has no replica"
rexec sh -c "kill -9 \$(cat /data/$A_MASTER/pid)" || fail "step 4/7 could not kill :$A_MASTER"
KILLED="$(now_us)"
# The service's health from the kill on (checked every 2 s, so a short
# failover may fall between two checks): when it turned unhealthy, and
# healthy again.
UNHEALTHY="" HEALTHY_AGAIN=""
sample_health() {
    if [[ -z "$UNHEALTHY" ]]; then
        [[ "$(redis_health)" != unhealthy ]] || UNHEALTHY="$(now_us)"
    elif [[ -z "$HEALTHY_AGAIN" && "$(redis_health)" == healthy ]]; then
        HEALTHY_AGAIN="$(now_us)"
    fi
}
# Promotion, as the surviving nodes see it.
deadline=$((SECONDS + FAILOVER_BOUND))
until [[ "$(role_of "$REPLICA")" == master ]]; do
    sample_health
    (( SECONDS < deadline )) || fail "step 4/7 replica :$REPLICA not promoted within ${FAILOVER_BOUND}s"
    sleep 0.2
done
PROMOTED="$(now_us)"
# Delivery resumed: every subscriber got an A publication sent after the
# kill (numbers from the publisher's log).
first_after() { awk -v k="$KILLED" '$2 > k { print $1; exit }' "$LOG_DIR/pub-a"; }
resumed_at() {  # FILE: when the first A publication sent after the kill arrived
    local after
    after="$(first_after)"
    [[ -n "$after" ]] || return 1
    received "$1" "$A" | awk -v n="$after" '$1 >= n { print $2; found = 1; exit } END { exit !found }'
}
all_resumed() {
    local file
    sample_health
    for file in $(sub_files); do resumed_at "$file" >/dev/null || return 1; done
}
left=$(( FAILOVER_BOUND - (($(now_us) - KILLED) / 1000000) ))
(( left > 0 )) || left=1
until_true "$left" all_resumed \
    || fail "step 4/7 delivery on $A did not resume within ${FAILOVER_BOUND}s of the kill"
gaps="" max_gap=0 max_silence=0
for file in $(sub_files); do
    gap=$(( $(resumed_at "$file") - KILLED ))
    if (( gap > max_gap )); then max_gap=$gap; fi
    gaps+="${gaps:+/}$(secs "$gap")"
    # The longest time without an A publication around the kill.
    silence="$(received "$file" "$A" | awk -v k="$KILLED" 'prev && $2 > k && $2 - prev > m { m = $2 - prev }
        { prev = $2 } END { print m + 0 }')"
    if (( silence > max_silence )); then max_silence=$silence; fi
done
(( max_gap <= FAILOVER_BOUND * 1000000 )) || fail "step 4/7 delivery resumed only after $(secs "$max_gap")s"
# A few more seconds of traffic after the recovery, then stop.
for _ in $(seq 1 15); do
    sample_health
    sleep 0.2
done
touch "$STOP"
wait "$PUB_A" "$PUB_B" || true
refused() {  # LOG: "N acknowledged (slowest X s), N refused (first..last s after the kill)"
    awk -v k="$KILLED" '$4 == 0 { a++; d = ($3 - $2) / 1e6; if (d > slow) slow = d }
        $4 != 0 { n++; s = ($2 - k) / 1e6; if (n == 1) f = s; l = s }
        END { printf "%d acknowledged (slowest in %.1fs), ", a, slow
              if (n) printf "%d refused (sent %.1fs..%.1fs after the kill)", n, f, l; else printf "0 refused" }' "$1"
}
health_note="the redis healthcheck did not run while the cluster was not ok"
if [[ -n "$UNHEALTHY" && -n "$HEALTHY_AGAIN" ]]; then
    health_note="the redis service unhealthy from $(secs $((UNHEALTHY - KILLED)))s to $(secs $((HEALTHY_AGAIN - KILLED)))s"
elif [[ -n "$UNHEALTHY" ]]; then
    health_note="the redis service unhealthy from $(secs $((UNHEALTHY - KILLED)))s"
fi
say "step 4/7 PASS SIGKILL of master :$A_MASTER ($A's slot $A_SLOT): replica :$REPLICA promoted after $(secs $((PROMOTED - KILLED)))s ($health_note); delivery on $A resumed by itself after $gaps s (per subscriber; bound ${FAILOVER_BOUND}s), longest silence $(secs "$max_silence")s; publications meanwhile: $A $(refused "$LOG_DIR/pub-a"), $B $(refused "$LOG_DIR/pub-b") ($((SECONDS - t))s)"

# ------------------------------------------------------------- step 5 ---
# Every acknowledged publication arrived once and in order, or the loss
# was told.

t=$SECONDS
awk '$4 == 0 { print $1 }' "$LOG_DIR/pub-a" | cat "$LOG_DIR/first5" - >"$LOG_DIR/acked-a"
awk '$4 == 0 { print $1 }' "$LOG_DIR/pub-b" | cat "$LOG_DIR/first5" - >"$LOG_DIR/acked-b"
last_a="$(tail -n 1 "$LOG_DIR/acked-a")"
last_b="$(tail -n 1 "$LOG_DIR/acked-b")"
reached() {  # FILE CHANNEL N: N or a later one arrived
    received "$1" "$2" | awk -v n="$3" '$1 >= n { found = 1 } END { exit !found }'
}
declare -A LOST=() TOLD=() RECOVERIES=()
for i in $(seq 1 "$SUBS"); do
    file="$LOG_DIR/s$i"
    until_true "$WAIT" reached "$file" "$A" "$last_a" || true
    until_true "$WAIT" reached "$file" "$B" "$last_b" || true
    for pair in "A $A acked-a" "B $B acked-b"; do
        read -r name channel acked <<<"$pair"
        result="$(account "$file" "$channel" "$LOG_DIR/$acked")" \
            || fail "step 5/7 subscriber $i, $channel: $result"
        lost="$(sed -n 's/.* lost=\([0-9]*\).*/\1/p' <<<"$result")"
        told="$(sed -n 's/.* told=\([0-9]*\).*/\1/p' <<<"$result")"
        LOST[$name]=$(( ${LOST[$name]:-0} + lost ))
        TOLD[$name]=$(( ${TOLD[$name]:-0} + told ))
        RECOVERIES[$name]+=" ${result##*recoveries=}"
        if [[ "$name" == B && "$lost" != 0 ]]; then
            fail "step 5/7 subscriber $i lost publications of $B, on a master that never failed: $result"
        fi
    done
done
# "epoch_changed x4" for the tellings of a channel, over all subscribers.
tellings() {
    tr ' ,' '\n' <<<"$1" | awk -F : '$1 != "" && $1 != "not_requested" && $1 != "recovered" { n[$1] += $2 }
        END { for (r in n) { printf "%s%s x%d", sep, r, n[r]; sep = ", " } }'
}
told_of() {  # NAME: "told: epoch_changed x4" or "never told of a loss"
    local what
    what="$(tellings "${RECOVERIES[$1]}")"
    if [[ -n "$what" ]]; then echo "told: $what"; else echo "never told of a loss"; fi
}
say "step 5/7 PASS every acknowledged publication reached all $SUBS subscribers exactly once and in order, or they were told: $A $(wc -l <"$LOG_DIR/acked-a") acknowledged, ${LOST[A]} (subscriber x publication) lost, $(told_of A); $B $(wc -l <"$LOG_DIR/acked-b") acknowledged, ${LOST[B]} lost, $(told_of B) ($((SECONDS - t))s)"

# ------------------------------------------------------------- step 6 ---
# Directs across nodes and a broadcast again; list; the old master back.

t=$SECONDS
crossed="$(directs_round "d2-$RUN")" || fail "step 6/7 directs after the failover"
broadcast_once "b2-$RUN" || fail "step 6/7 the broadcast after the failover did not reach every listener exactly once"
all_listed() {
    local ids file
    ids="$(timeout 15 "${FAB[@]}" --name rc-list list 2>/dev/null | jq -r '.clients[].client_id')" || return 1
    # shellcheck disable=SC2046
    for file in $(listener_files) $(sub_files); do
        grep -qx "$(client_of "$file" | cut -d' ' -f1)" <<<"$ids" || return 1
    done
}
until_true "$WAIT" all_listed || fail "step 6/7 list does not show every listener and subscriber"
rexec sh "/data/$A_MASTER/start" || fail "step 6/7 could not start :$A_MASTER again"
back() {
    [[ "$(role_of "$A_MASTER")" == slave ]] \
        && [[ "$(rcli "$A_MASTER" info replication | sed -n 's/^master_link_status://p')" == up ]] \
        && [[ "$(redis_health)" == healthy ]]
}
until_true 60 back || fail "step 6/7 :$A_MASTER did not rejoin as an in-sync replica with the service healthy"
say "step 6/7 PASS after the failover: directs to all $LISTENERS listeners acknowledged and delivered once ($crossed across nodes), a broadcast reached all exactly once, list shows all $((LISTENERS + SUBS)) clients; :$A_MASTER restarted and rejoined as a replica of :$REPLICA, redis healthy ($((SECONDS - t))s)"

# Step 7: teardown (e2e_teardown, on exit).
