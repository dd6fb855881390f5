# The nym-node image: build with the official Rust image, run on Debian slim.
#
#   docker build -t nym-node .
#   docker run --rm nym-node --help
#
# The operator's image is the `operator` target of this same file (BuildKit builds only the
# stages a target needs, so the node image never waits for the operator):
#
#   DOCKER_BUILDKIT=1 docker build --target operator -t nym-operator .
#
# Build arguments: VERSION and REVISION become OCI labels; REVISION is also the commit the
# binary reports in /api/v1/build-information (the build context has no .git).
# Machines that cannot pull base images: run scripts/base-images.sh first, which creates
# these same two tags locally.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
ARG REVISION=unknown
ENV NYM_BUILD_COMMIT=${REVISION}
# The registry and target caches persist between builds (BuildKit); the binaries are copied
# out of the cached target directory within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin nym-node --bin nym-client \
 && mkdir -p /out \
 && cp target/release/nym-node target/release/nym-client /out/ \
 && strip /out/nym-node /out/nym-client

FROM ${RUST_IMAGE} AS operator-build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nym-operator --bin nym-operator --bin crdgen \
 && mkdir -p /out \
 && cp target/release/nym-operator target/release/crdgen /out/ \
 && strip /out/nym-operator /out/crdgen

# The operator: a static-enough binary on Debian slim, non-root, no shell needed.
FROM ${RUNTIME_IMAGE} AS operator
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log /usr/share/doc/* /usr/share/man/* \
 && useradd --system --uid 10001 --user-group --no-create-home nym
COPY --from=operator-build /out/nym-operator /out/crdgen /usr/local/bin/
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="nym-operator" \
      org.opencontainers.image.description="Kubernetes operator for nym-node networks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/nym-node-rs/nym-node" \
      org.opencontainers.image.licenses="Apache-2.0"
USER nym
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "nym-operator"]
CMD ["run"]

FROM ${RUNTIME_IMAGE} AS runtime
# tini forwards SIGTERM to the node (which then drains) and reaps zombies; ca-certificates
# lets the node fetch a topology over https.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini ca-certificates nftables \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log /usr/share/doc/* /usr/share/man/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/nym-node --create-home nym
COPY --from=build /out/nym-node /out/nym-client /usr/local/bin/
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="nym-node" \
      org.opencontainers.image.description="Sphinx mixnet node: mix node, entry gateway or exit gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/nym-node-rs/nym-node" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV NYM_NODE_KEYS_DIR=/var/lib/nym-node/keys \
    NYM_NODE_DATA_DIR=/var/lib/nym-node/data
USER nym
WORKDIR /var/lib/nym-node
# mixnet, HTTP (health, metrics, description), client API (gateways)
EXPOSE 1789 8080 9000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["nym-node", "health", "--path", "/livez"]
STOPSIGNAL SIGTERM
# -s: stay a subreaper when an outer init (compose's `init: true`) is PID 1.
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "nym-node"]
CMD ["run"]
