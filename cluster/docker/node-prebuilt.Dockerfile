# quic-fabric node image from a prebuilt `fabric-node` binary — for machines
# WITHOUT a container registry. `cluster/images.sh node` runs
# `cargo build --release --locked --bin fabric-node` on the host and builds
# this file with a temp context that contains only that binary. The binary is
# dynamically linked against glibc, so the host must not be newer than the
# base image's Debian (bookworm, glibc 2.36); images.sh smoke-tests it.
ARG FABRIC_BASE_IMAGE=quic-fabric/debian:bookworm
FROM ${FABRIC_BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

# Metadata before the COPY so these steps stay cached. images.sh adds the
# label io.quic-fabric.inputs (sha256 of the binary + this Dockerfile + base
# image id, used to skip the rebuild when nothing changed) with `--label`.
LABEL org.opencontainers.image.title="quic-fabric node" \
      org.opencontainers.image.description="prebuilt fabric-node on the Debian base (cluster/docker/node-prebuilt.Dockerfile)"
# Certificates are mounted at /certs by docker-compose.yml.
EXPOSE 4433/udp
ENTRYPOINT ["fabric-node"]

COPY fabric-node /usr/local/bin/fabric-node
# Smoke test: fails here if the host's glibc is newer than the base image's.
RUN fabric-node --version
