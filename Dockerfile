# The gateway in a small image: build with the Rust toolchain, run on Debian slim.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p gateway -p simulator

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --home /var/lib/gateway gateway
COPY --from=build /src/target/release/gateway /src/target/release/simulator /usr/local/bin/
USER gateway
WORKDIR /var/lib/gateway
ENV GATEWAY_DLQ__DIR=/var/lib/gateway/dlq GATEWAY_WAL__DIR=/var/lib/gateway/wal
EXPOSE 1883 1884 9184
ENTRYPOINT ["gateway"]
CMD ["run"]
