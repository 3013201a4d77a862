# Helpers shared by cluster.sh and sentinel.sh (sourced, POSIX sh).
#
# Every redis-server (or sentinel) gets /data/PORT with its pidfile, logfile
# and an executable `start` script holding the exact command line, so a
# process killed by a test can be started again with `sh /data/PORT/start`
# (a cluster node keeps its nodes.conf there and rejoins with its identity).

READY_TIMEOUT="${REDIS_READY_TIMEOUT:-50}"
ANNOUNCE_IP="${REDIS_ANNOUNCE_IP:-127.0.0.1}"
# Must include 127.0.0.1: the scripts talk to their processes through it.
BIND="${REDIS_BIND:-0.0.0.0}"

# fail TAG MESSAGE: prints TAG-FAILED with the reason and the logs' tails, exits.
fail() {
    echo "$1-FAILED: $2"
    for log in /data/*/log; do
        [ -f "$log" ] || continue
        echo "--- $log"
        tail -n 15 "$log"
    done
    exit 1
}

# launch PORT ARGS...: writes /data/PORT/start (redis-server ARGS...,
# daemonized, pidfile and logfile under /data/PORT) and runs it.
launch() {
    port="$1"
    shift
    mkdir -p "/data/$port"
    {
        echo '#!/bin/sh'
        echo "# Starts the process on port $port again (written by ${0##*/})."
        printf 'exec redis-server'
        for arg in "$@"; do
            printf " '%s'" "$arg"
        done
        echo
    } >"/data/$port/start"
    chmod 755 "/data/$port/start"
    sh "/data/$port/start" || fail "$TAG" "redis-server on port $port did not start"
}

# launch_node PORT ARGS...: a data node (not a sentinel) on PORT with
# persistence off, plus ARGS.
launch_node() {
    port="$1"
    shift
    # shellcheck disable=SC2086 # BIND may name several addresses
    launch "$port" --port "$port" --bind $BIND --protected-mode no --daemonize yes \
        --dir "/data/$port" --pidfile "/data/$port/pid" --logfile "/data/$port/log" \
        --save '' --appendonly no "$@"
}

cli() {  # cli PORT ARGS...
    port="$1"
    shift
    redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null
}

# info_field PORT SECTION FIELD: FIELD's value in `INFO SECTION` (no CR).
info_field() {
    cli "$1" info "$2" | tr -d '\r' | sed -n "s/^$3://p"
}

# wait_until WHAT COMMAND...: runs COMMAND every 100 ms until it succeeds;
# fails after READY_TIMEOUT seconds (counted from the script's start).
wait_until() {
    what="$1"
    shift
    until "$@"; do
        [ "$(($(date +%s) - STARTED))" -lt "$READY_TIMEOUT" ] \
            || fail "$TAG" "timed out after ${READY_TIMEOUT}s waiting for $what"
        sleep 0.1
    done
}

# Keeps PID 1 alive after the ready line (killing one redis process must not
# end the container) and exits at once on docker stop.
keep_alive() {
    trap 'exit 0' TERM INT
    while :; do
        sleep 3600 &
        wait $!
    done
}

STARTED="$(date +%s)"
