# UDP load balancer for the quic-fabric nodes: nginx with the stream module
# (Debian bookworm: package `nginx` 1.22 + `libnginx-mod-stream`; `nginx-light`
# is only `nginx` plus the http-echo module, which we do not need).
# Built by `cluster/images.sh lb` on top of the base image (the official
# debian:bookworm where a registry exists, else the debootstrap'd one).
#
# The config is baked in from cluster/nginx/nginx.conf (so `docker run` works
# standalone) and docker-compose.yml also bind-mounts the same file read-only
# over it, so editing the config only needs `docker-compose restart lb`.
ARG BASE_IMAGE=debian:bookworm
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx libnginx-mod-stream \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && rm -f /etc/nginx/sites-enabled/default \
 && ls /etc/nginx/modules-enabled/ | grep -q stream

# Metadata before the COPY so these steps stay cached (layer commits are slow
# on some storage drivers). images.sh adds the label io.quic-fabric.inputs
# (hash of this Dockerfile + nginx.conf + base image id) with `--label`.
LABEL org.opencontainers.image.title="quic-fabric lb" \
      org.opencontainers.image.description="nginx stream UDP load balancer (cluster/docker/lb.Dockerfile)"
EXPOSE 4433/udp
# Default stop signal SIGTERM = nginx fast shutdown. (SIGQUIT, graceful, would
# wait for every UDP session to go idle for proxy_timeout: docker kills it
# after 10 s anyway.)
CMD ["nginx", "-g", "daemon off;"]

COPY nginx.conf /etc/nginx/nginx.conf
# Syntax check. The upstream names (node1...) only resolve inside the compose
# network, so check a copy with the upstream hosts replaced by 127.0.0.1.
RUN sed -E 's/^([[:space:]]*server[[:space:]]+)[^[:space:]:;]+:/\1127.0.0.1:/' \
        /etc/nginx/nginx.conf >/tmp/nginx-check.conf \
 && nginx -t -q -c /tmp/nginx-check.conf \
 && rm -f /tmp/nginx-check.conf
