# pgpay-worker (and stripe-fake, for the demo stack).
# Build from the repository root: docker build -f docker/worker.Dockerfile -t pgpay-worker .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p pgpay-worker -p stripe-fake

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 pgpay
COPY --from=build /src/target/release/pgpay-worker /src/target/release/stripe-fake /usr/local/bin/
USER pgpay
ENTRYPOINT ["pgpay-worker"]
CMD ["run"]
