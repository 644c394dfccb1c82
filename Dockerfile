# One Dockerfile for the three services; pick one with a build argument:
#
#   docker build --build-arg SERVICE=stock   -t fleet/stock   .
#   docker build --build-arg SERVICE=payment -t fleet/payment .
#   docker build --build-arg SERVICE=order   -t fleet/order   .
#
# Only the last stage reads SERVICE, so the three builds share every builder layer:
# BuildKit (and `docker compose build`) compiles the workspace once for all three images.
#
# Layers, from the slowest to change to the fastest:
#   recipe  - the Cargo manifests and lock file, each build target replaced by a stand-in
#   builder - dependencies compiled from the recipe (cached until a manifest changes),
#             then the real sources and the three service binaries
#   runtime - debian slim, tini, a non-root user, one binary and the health probe

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS recipe
WORKDIR /src
COPY . .
# The output only changes when a Cargo.toml, Cargo.lock or the set of target files changes,
# so the COPY --from=recipe below keeps its cache across source edits.
RUN sh deploy/docker/recipe.sh /src /recipe

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY --from=recipe /recipe/ ./
RUN cargo build --release --locked -p stock -p payment -p order
COPY . .
# COPY keeps the mtimes of the build context, which may be older than the stand-ins the
# dependency layer was built from: touch the sources so cargo rebuilds the workspace crates.
RUN find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p stock -p payment -p order --bins \
    && mkdir -p /out \
    && cp target/release/stock target/release/payment target/release/order /out/

FROM ${RUNTIME_IMAGE} AS runtime
ARG SERVICE
RUN case "${SERVICE}" in stock|payment|order) ;; \
      *) echo "build with --build-arg SERVICE=stock|payment|order (got '${SERVICE}')" >&2; exit 1 ;; \
    esac \
    && apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fleet \
    && useradd --system --uid 10001 --gid fleet --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin fleet
COPY --from=builder /out/${SERVICE} /usr/local/bin/service
COPY deploy/docker/healthcheck.sh /usr/local/bin/healthcheck
LABEL org.opencontainers.image.title="fleet-${SERVICE}" \
      org.opencontainers.image.description="${SERVICE} service of the checkout fleet"
# The services default to 127.0.0.1:8080 (a laptop); a container must listen on all interfaces.
ENV BIND_ADDR=0.0.0.0:8080
EXPOSE 8080
USER 10001:10001
# Liveness only: /ready also depends on Redis and RabbitMQ (compose probes /ready itself).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/healthcheck", "/health"]
# tini as PID 1 forwards SIGTERM to the service and reaps zombies.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/service"]
