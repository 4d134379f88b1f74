# PostgreSQL 15 with the pgpay extension installed.
# Build from the repository root: docker build -f docker/postgres.Dockerfile -t pgpay-postgres .
FROM postgres:15-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential clang libclang-dev \
        postgresql-server-dev-15 pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
WORKDIR /src
COPY . .
RUN cargo install cargo-pgrx --version "$(sed -n 's/^pgrx *= *{ *version *= *"=\([0-9.]*\)".*/\1/p' Cargo.toml)" --locked \
 && cargo pgrx init --pg15 /usr/lib/postgresql/15/bin/pg_config \
 && cd extension && cargo pgrx package --pg-config /usr/lib/postgresql/15/bin/pg_config

FROM postgres:15-bookworm
COPY --from=build /src/target/release/pgpay-pg15/usr/share/postgresql/15/extension/ /usr/share/postgresql/15/extension/
COPY --from=build /src/target/release/pgpay-pg15/usr/lib/postgresql/15/lib/ /usr/lib/postgresql/15/lib/
COPY docker/initdb/ /docker-entrypoint-initdb.d/
