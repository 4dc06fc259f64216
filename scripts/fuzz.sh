#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 600) and prints a
# summary line per target: runs, coverage, and whether it found a crash. Needs the nightly
# toolchain and cargo-fuzz (installed here when missing). A crash leaves its input in
# fuzz/artifacts/<target>/; reproduce it with `cargo +nightly fuzz run <target> <file>` from
# fuzz/, and keep it as a regression test in the normal suite.
#
# FUZZ_JOBS (default 2) targets run side by side, each for SECONDS.
#
# --quick builds without optimisation or AddressSanitizer: a cold build in about 3 minutes
# instead of 8, for the short smoke runs of CI (`./scripts/fuzz.sh --quick 30`); it finds
# fewer bugs per second, so real runs leave it off.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
build=(-O)
if [ "${1:-}" = "--quick" ]; then
  build=(--dev -s none)
  shift
fi
secs="${1:-600}"
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "the nightly toolchain is missing: rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
cargo +nightly fuzz build "${build[@]}"
# Two targets at a time, one per core: the runs are CPU-bound and independent.
jobs="${FUZZ_JOBS:-2}"
summaries="$(mktemp -d)"
trap 'rm -rf "$summaries"' EXIT
run_target() {
  local target="$1" log="$summaries/$1.log" result
  mkdir -p "corpus/$target" "seeds/$target"
  if cargo +nightly fuzz run "${build[@]}" "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$secs" -max_len=65536 -rss_limit_mb=4096 >"$log" 2>&1; then
    result="ok"
  else
    result="CRASH (see fuzz/artifacts/$target/)"
  fi
  # libFuzzer's last status line: "#<runs> DONE cov: <edges> ft: <features> corp: <n>/<size> ..."
  local status runs cov corp
  status="$(grep -E '^#[0-9]+' "$log" | tail -1 || true)"
  runs="$(sed -E 's/^#([0-9]+).*/\1/' <<<"$status")"
  cov="$(grep -oE 'cov: [0-9]+' <<<"$status" | head -1 || true)"
  corp="$(grep -oE 'corp: [0-9]+' <<<"$status" | head -1 || true)"
  printf '%-12s %ss  runs %-10s %-12s %-12s %s\n' "$target" "$secs" "${runs:-?}" "${cov:-cov: ?}" "${corp:-corp: ?}" "$result" >"$summaries/$target.line"
  if [ "$result" != ok ]; then
    grep -E 'panicked|ERROR|SUMMARY' "$log" | head -5 >"$summaries/$target.why" || true
  fi
}
targets=($(cargo +nightly fuzz list))
for target in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
    wait -n || true
  done
  run_target "$target" &
done
wait
failed=0
for target in "${targets[@]}"; do
  cat "$summaries/$target.line"
  if [ -s "$summaries/$target.why" ]; then
    cat "$summaries/$target.why" >&2
  fi
  grep -q ' ok$' "$summaries/$target.line" || failed=1
done
exit "$failed"
