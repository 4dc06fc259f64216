#!/usr/bin/env bash
# The whole test suite: unit tests, property tests, and the end-to-end tests that start real
# VictoriaMetrics, InfluxDB 1.6 and MQTT clients against the gateway binary.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh

# The end-to-end tests run the gateway and simulator binaries, which `cargo test` alone does
# not build. The gateway is built with its test failpoints (FAILPOINTS, inert unless
# set), which the crash tests use; release builds never have them.
cargo build --locked -p gateway --bin gateway --features gateway/failpoints -p simulator --bin simulator
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast "$@"
else
  cargo test --locked --workspace --no-fail-fast "$@"
fi
