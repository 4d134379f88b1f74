# syntax=docker/dockerfile:1
# PostgreSQL with the pgpay extension, for a chosen major (14–18):
#   docker build -f docker/postgres.Dockerfile --build-arg PG_MAJOR=17 -t pgpay-postgres:17 .
# Dependencies (pgrx and the rest) are compiled in their own layer (cargo-chef); Cargo.lock is
# honoured (--locked).
ARG PG_MAJOR=15

FROM postgres:${PG_MAJOR}-bookworm AS build
ARG PG_MAJOR
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential clang libclang-dev \
        postgresql-server-dev-${PG_MAJOR} pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
WORKDIR /src
# The pgrx pin (Cargo.toml's one `pgrx = { version = "=X" }` line) decides cargo-pgrx's version.
COPY Cargo.toml Cargo.lock ./
RUN cargo install cargo-chef --version 0.1.68 --locked \
 && cargo install cargo-pgrx --locked \
        --version "$(sed -n 's/^pgrx *= *{ *version *= *"=\([0-9.]*\)".*/\1/p' Cargo.toml)" \
 && cargo pgrx init --pg${PG_MAJOR} /usr/lib/postgresql/${PG_MAJOR}/bin/pg_config
ENV PGRX_PG_CONFIG_PATH=/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config

FROM build AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM build AS extension
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json -p pgpay \
        --no-default-features --features pg${PG_MAJOR}
COPY . .
RUN cd extension \
 && cargo pgrx package --pg-config /usr/lib/postgresql/${PG_MAJOR}/bin/pg_config \
        --no-default-features --features pg${PG_MAJOR} \
 && cp sql/pgpay--*.sql /src/target/release/pgpay-pg${PG_MAJOR}/usr/share/postgresql/${PG_MAJOR}/extension/

FROM postgres:${PG_MAJOR}-bookworm
ARG PG_MAJOR
COPY --from=extension /src/target/release/pgpay-pg${PG_MAJOR}/usr/share/postgresql/${PG_MAJOR}/extension/ /usr/share/postgresql/${PG_MAJOR}/extension/
COPY --from=extension /src/target/release/pgpay-pg${PG_MAJOR}/usr/lib/postgresql/${PG_MAJOR}/lib/ /usr/lib/postgresql/${PG_MAJOR}/lib/
COPY docker/initdb/ /docker-entrypoint-initdb.d/
# Ask over TCP: during initdb the entrypoint's temporary server listens on the socket only,
# so a socket check would report healthy before the real server is up.
HEALTHCHECK --interval=2s --timeout=3s --start-period=10s --retries=15 CMD ["pg_isready", "-h", "127.0.0.1", "-U", "postgres"]
