#!/bin/sh
# A Sentinel set in one container: a master on BASE, REPLICAS replicas on the
# next ports, then SENTINELS sentinels on the ports after those, all
# announcing ANNOUNCE_IP. Prints REDIS-SENTINEL-READY once every sentinel's
# `SENTINEL MASTER NAME` shows every replica and every other sentinel, then
# keeps PID 1 alive so that a test can SIGKILL the master (`kill -9 $(cat
# /data/PORT/pid)`) and start it again (`sh /data/PORT/start`: it comes back
# as a master and Sentinel turns it into a replica of the new one).
# On failure: REDIS-SENTINEL-FAILED: reason (and the logs' tails), exit 1.
#
# Environment (defaults):
#   REDIS_BASE_PORT         the first master's port (7100)
#   REDIS_REPLICAS          replicas (1)
#   REDIS_SENTINELS         sentinels (3)
#   REDIS_QUORUM            sentinels that must agree the master is down (2)
#   REDIS_MASTER_NAME       the name the master is monitored under (fabric)
#   REDIS_DOWN_AFTER        down-after-milliseconds (2000)
#   REDIS_FAILOVER_TIMEOUT  failover-timeout in ms (10000)
#   REDIS_ANNOUNCE_IP       address Sentinel reports for every process (127.0.0.1)
#   REDIS_BIND              listen addresses, must include 127.0.0.1 (0.0.0.0)
#   REDIS_READY_TIMEOUT     seconds to become healthy before giving up (50)
set -eu
TAG=REDIS-SENTINEL
. "$(dirname "$0")/lib.sh"

BASE="${REDIS_BASE_PORT:-7100}"
REPLICAS="${REDIS_REPLICAS:-1}"
SENTINELS="${REDIS_SENTINELS:-3}"
QUORUM="${REDIS_QUORUM:-2}"
NAME="${REDIS_MASTER_NAME:-fabric}"
DOWN_AFTER="${REDIS_DOWN_AFTER:-2000}"
FAILOVER_TIMEOUT="${REDIS_FAILOVER_TIMEOUT:-10000}"
LAST_REPLICA=$((BASE + REPLICAS))
FIRST_SENTINEL=$((LAST_REPLICA + 1))
LAST_SENTINEL=$((LAST_REPLICA + SENTINELS))

launch_node "$BASE" --replica-announce-ip "$ANNOUNCE_IP"
for port in $(seq "$((BASE + 1))" "$LAST_REPLICA"); do
    launch_node "$port" --replica-announce-ip "$ANNOUNCE_IP" --replicaof 127.0.0.1 "$BASE"
done

# Sentinels learn replicas from the master's INFO, which they ask at once and
# then every 10 s: start them only when the replicas are attached and synced,
# so the first answer already lists them.
synced() {
    [ "$(info_field "$BASE" replication connected_slaves)" = "$REPLICAS" ] || return 1
    for port in $(seq "$((BASE + 1))" "$LAST_REPLICA"); do
        [ "$(info_field "$port" replication master_link_status)" = up ] || return 1
        [ "$(info_field "$port" replication master_sync_in_progress)" = 0 ] || return 1
    done
}
wait_until "the replicas to sync" synced

for port in $(seq "$FIRST_SENTINEL" "$LAST_SENTINEL"); do
    mkdir -p "/data/$port"
    # Sentinel rewrites this file (known replicas, sentinels, epochs).
    cat >"/data/$port/sentinel.conf" <<CONF
port $port
bind $BIND
protected-mode no
daemonize yes
dir /data/$port
pidfile /data/$port/pid
logfile /data/$port/log
sentinel announce-ip $ANNOUNCE_IP
sentinel monitor $NAME $ANNOUNCE_IP $BASE $QUORUM
sentinel down-after-milliseconds $NAME $DOWN_AFTER
sentinel failover-timeout $NAME $FAILOVER_TIMEOUT
sentinel parallel-syncs $NAME 1
CONF
    launch "$port" "/data/$port/sentinel.conf" --sentinel
done

# sentinel_field PORT FIELD: FIELD in `SENTINEL MASTER NAME` (a flat list).
sentinel_field() {
    cli "$1" sentinel master "$NAME" | tr -d '\r' | sed -n "/^$2\$/{n;p;}"
}
watching() {  # watching PORT: the sentinel sees every replica and every other sentinel
    [ "$(sentinel_field "$1" num-slaves)" = "$REPLICAS" ] &&
        [ "$(sentinel_field "$1" num-other-sentinels)" = "$((SENTINELS - 1))" ] &&
        [ "$(sentinel_field "$1" flags)" = master ]
}
for port in $(seq "$FIRST_SENTINEL" "$LAST_SENTINEL"); do
    wait_until "sentinel $port to see the whole set" watching "$port"
done

touch /data/ready  # for a healthcheck (cluster/redis-sentinel.yml)
echo "REDIS-SENTINEL-READY master $NAME on $BASE, sentinels $FIRST_SENTINEL-$LAST_SENTINEL after $(($(date +%s) - STARTED))s"
keep_alive
