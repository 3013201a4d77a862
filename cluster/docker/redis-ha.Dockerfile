# Redis Cluster and Sentinel topologies for the tests (issue 17): the redis
# image (`cluster/images.sh redis`: the official redis:7 where a registry
# exists, else redis-server from Debian packages) plus the start scripts in
# cluster/redis/. Built by `cluster/images.sh redis-ha`; nothing is
# downloaded, so it builds offline.
#
#   docker run --network host IMAGE sh /opt/redis-ha/cluster.sh    (3+3 nodes, 7000-7005)
#   docker run --network host IMAGE sh /opt/redis-ha/sentinel.sh   (master 7100, replica 7101,
#                                                                  sentinels 7102-7104)
# Settings are environment variables, documented at the top of each script.
ARG REDIS_IMAGE=redis:7
FROM ${REDIS_IMAGE}

# Metadata before the COPY so these steps stay cached. images.sh adds the
# label io.quic-fabric.inputs (hash of this Dockerfile, the scripts and the
# redis image id) with `--label`.
LABEL org.opencontainers.image.title="quic-fabric redis-ha" \
      org.opencontainers.image.description="Redis Cluster / Sentinel test topologies (cluster/docker/redis-ha.Dockerfile)"
CMD ["sh", "/opt/redis-ha/cluster.sh"]

COPY lib.sh cluster.sh sentinel.sh /opt/redis-ha/
RUN command -v redis-server redis-cli seq >/dev/null && sh -n /opt/redis-ha/cluster.sh \
 && sh -n /opt/redis-ha/sentinel.sh
