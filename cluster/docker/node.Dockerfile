# quic-fabric node image, built from source — for machines WITH a container
# registry (needs the official Rust image). Built by `cluster/images.sh node`,
# which passes a clean copy of the working tree as the build context (only the
# files git tracks or would track: no target/, no certs/); to build by hand:
#
#   docker build -f cluster/docker/node.Dockerfile -t quic-fabric/node:latest .
#
# (from the repo root that needs a root .dockerignore excluding target/ and
# certs/, see cluster/README.md). Machines without a registry use
# node-prebuilt.Dockerfile instead.
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ------------------------------------------------------------------ builder ---
FROM ${RUST_IMAGE} AS builder
WORKDIR /src

# Dependencies first, so an edit to src/ does not re-download every crate:
# the fetch layer only depends on the manifests and Cargo.lock. The root is a
# workspace, so cargo must find every member's manifest (bench/, the
# benchmark harness); an empty bench/src/main.rs stands in for its source,
# which fabric-node does not need, so an edit to bench/ rebuilds nothing here.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/
RUN mkdir -p src bench/src && touch src/lib.rs bench/src/main.rs \
 && cargo fetch --locked \
 && rm -rf src

# Only what `cargo build --bin` needs, so edits to README/tests/cluster do not
# invalidate the build layer. (A build.rs, or targets declared in Cargo.toml
# with explicit paths outside src/, would need their own COPY line here.)
COPY src ./src
RUN cargo build --release --locked --bin fabric-node \
 && install -D -m 0755 target/release/fabric-node /out/fabric-node \
 && /out/fabric-node --version

# ------------------------------------------------------------------ runtime ---
FROM ${RUNTIME_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/fabric-node /usr/local/bin/fabric-node
RUN fabric-node --version

LABEL org.opencontainers.image.title="quic-fabric node" \
      org.opencontainers.image.description="fabric-node built from source (cluster/docker/node.Dockerfile)"
# Certificates are mounted at /certs by docker-compose.yml.
EXPOSE 4433/udp
ENTRYPOINT ["fabric-node"]
