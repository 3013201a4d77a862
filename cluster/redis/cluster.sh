#!/bin/sh
# A Redis Cluster in one container: MASTERS masters with REPLICAS replicas
# each, on consecutive ports from BASE (cluster bus: PORT+10000), every node
# announcing ANNOUNCE_IP. Prints REDIS-CLUSTER-READY (and creates /data/ready)
# once every node reports cluster_state:ok and every replica's link to its
# master is up, then keeps PID 1 alive so that a test can SIGKILL one node
# (`kill -9 $(cat /data/PORT/pid)`) and start it again (`sh /data/PORT/start`).
# On failure: REDIS-CLUSTER-FAILED: reason (and the logs' tails), exit 1.
#
# Environment (defaults):
#   REDIS_BASE_PORT      first port (7000)
#   REDIS_MASTERS        masters (3)
#   REDIS_REPLICAS       replicas per master (1)
#   REDIS_ANNOUNCE_IP    address in CLUSTER SLOTS/SHARDS/NODES (127.0.0.1)
#   REDIS_BIND           listen addresses, must include 127.0.0.1 (0.0.0.0)
#   REDIS_NODE_TIMEOUT   cluster-node-timeout in ms (2000)
#   REDIS_READY_TIMEOUT  seconds to become healthy before giving up (50)
set -eu
TAG=REDIS-CLUSTER
. "$(dirname "$0")/lib.sh"

BASE="${REDIS_BASE_PORT:-7000}"
MASTERS="${REDIS_MASTERS:-3}"
REPLICAS="${REDIS_REPLICAS:-1}"
NODE_TIMEOUT="${REDIS_NODE_TIMEOUT:-2000}"
TOTAL=$((MASTERS * (REPLICAS + 1)))
LAST=$((BASE + TOTAL - 1))
[ "$((LAST + 10000))" -le 65535 ] || fail "$TAG" "ports $BASE-$LAST leave no room for the bus ports (+10000)"

nodes=""
for port in $(seq "$BASE" "$LAST"); do
    launch_node "$port" --cluster-enabled yes --cluster-config-file nodes.conf \
        --cluster-node-timeout "$NODE_TIMEOUT" --cluster-announce-ip "$ANNOUNCE_IP"
    nodes="$nodes 127.0.0.1:$port"
done
answers() { cli "$1" ping >/dev/null; }
for port in $(seq "$BASE" "$LAST"); do
    wait_until "port $port to answer" answers "$port"
done

# shellcheck disable=SC2086 # one argument per node
redis-cli --cluster create $nodes --cluster-replicas "$REPLICAS" --cluster-yes >/data/create.log 2>&1 \
    || { cat /data/create.log; fail "$TAG" "redis-cli --cluster create failed"; }

healthy() {  # healthy PORT: state ok, knows every node; a replica is in sync
    [ "$(cli "$1" cluster info | tr -d '\r' | sed -n 's/^cluster_state://p')" = ok ] || return 1
    [ "$(cli "$1" cluster info | tr -d '\r' | sed -n 's/^cluster_known_nodes://p')" = "$TOTAL" ] || return 1
    case "$(info_field "$1" replication role)" in
        master) [ "$(info_field "$1" replication connected_slaves)" = "$REPLICAS" ] ;;
        slave) [ "$(info_field "$1" replication master_link_status)" = up ] &&
               [ "$(info_field "$1" replication master_sync_in_progress)" = 0 ] ;;
        *) return 1 ;;
    esac
}
for port in $(seq "$BASE" "$LAST"); do
    wait_until "node $port to be healthy" healthy "$port"
done

touch /data/ready  # for a healthcheck (cluster/redis-cluster.yml)
echo "REDIS-CLUSTER-READY ports $BASE-$LAST after $(($(date +%s) - STARTED))s"
keep_alive
