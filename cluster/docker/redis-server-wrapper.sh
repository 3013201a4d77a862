#!/bin/sh
# Installed as /usr/local/bin/redis-server (ahead of /usr/bin on PATH).
#
# The official redis image compiles protected-mode's default to "no", so
# `docker run redis:7 redis-server --appendonly yes` accepts connections from
# outside the container without a password. Debian's binary keeps the upstream
# default ("yes"). To behave like the official image, when redis-server is
# started WITHOUT a config file we prepend `--protected-mode no`; options given
# later on the command line (including an explicit --protected-mode yes) still
# win, and config files are left alone.
case "${1-}" in
    -v|--version|-h|--help|--test-memory|--check-system|-)
        exec /usr/bin/redis-server "$@" ;;
    ""|-*)
        exec /usr/bin/redis-server --protected-mode no "$@" ;;
    *)
        exec /usr/bin/redis-server "$@" ;;
esac
