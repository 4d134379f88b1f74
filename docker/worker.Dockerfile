# syntax=docker/dockerfile:1
# pgpay-worker, and stripe-fake in its own image (never in the worker's).
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile --target worker      -t pgpay-worker .
#   docker build -f docker/worker.Dockerfile --target stripe-fake -t pgpay-stripe-fake .
# Dependencies are compiled in their own layer (cargo-chef), so a source change rebuilds only
# the workspace's crates. Cargo.lock is honoured (--locked).

FROM rust:1.95-bookworm AS chef
RUN cargo install cargo-chef --version 0.1.68 --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json -p pgpay-worker -p stripe-fake
COPY . .
RUN cargo build --release --locked -p pgpay-worker -p stripe-fake

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 pgpay
USER pgpay

# The Stripe stand-in for the demo and tests. Not for production.
FROM runtime AS stripe-fake
COPY --from=build /src/target/release/stripe-fake /usr/local/bin/
EXPOSE 12111
ENTRYPOINT ["stripe-fake"]
CMD ["--listen", "0.0.0.0:12111"]

# The production worker (the default target: last in the file).
FROM runtime AS worker
COPY --from=build /src/target/release/pgpay-worker /usr/local/bin/
# `run` serves /livez, /readyz, /metrics and the webhook relay here; `healthcheck` asks /readyz
# on the same address (no curl in the image).
ENV PGPAY_WORKER_HTTP_LISTEN=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["pgpay-worker", "healthcheck"]
ENTRYPOINT ["pgpay-worker"]
CMD ["run"]
