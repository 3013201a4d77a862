# Redis image built from Debian packages, for machines without a container
# registry. Built by cluster/images.sh (`cluster/images.sh redis`); on machines
# with a registry the official `redis:7` image is pulled instead.
#
# Behaves like the official image where it matters to us: redis-server runs in
# the foreground as PID 1, logs to stdout ("Ready to accept connections"), and
# the command is a plain CMD, so `docker run IMAGE redis-server --requirepass x`
# works as expected. redis-server-wrapper.sh makes protected-mode default to
# "no" like the official image (relevant only when CMD is overridden).
ARG BASE_IMAGE=quic-fabric/debian:bookworm
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data

# Make the default protected-mode behave like the official image (see the script).
COPY redis-server-wrapper.sh /usr/local/bin/redis-server
RUN chmod 755 /usr/local/bin/redis-server && redis-server --version

LABEL org.opencontainers.image.description="redis-server from Debian packages (quic-fabric cluster/images.sh)"
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no"]
