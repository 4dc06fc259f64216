#!/usr/bin/env bash
# The benchmark in one command: the sink's raw rate, the gateway end to end at rising rates
# (embedded and external mode, 1 and 100 readings per message), latency at half the best rate,
# external mode under overload, and RSS per connection at scale. Writes bench-results.json;
# BENCHMARKS.md explains the figures. `--quick` is a smoke run of a minute or two.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --locked --release -p gateway --bin gateway -p simulator --bin simulator -p e2e --bin fault-proxy
exec python3 scripts/bench.py "$@"
