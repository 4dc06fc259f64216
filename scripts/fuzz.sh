#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 600) and prints a
# summary line per target: runs, coverage, and whether it found a crash. Needs the nightly
# toolchain and cargo-fuzz (installed here when missing). A crash leaves its input in
# fuzz/artifacts/<target>/; reproduce it with `cargo +nightly fuzz run <target> <file>` from
# fuzz/, and keep it as a regression test in the normal suite.
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
failed=0
for target in $(cargo +nightly fuzz list); do
  mkdir -p "corpus/$target" "seeds/$target"
  log="$(mktemp)"
  if cargo +nightly fuzz run "${build[@]}" "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$secs" -max_len=65536 -rss_limit_mb=4096 >"$log" 2>&1; then
    result="ok"
  else
    result="CRASH (see fuzz/artifacts/$target/)"
    failed=1
  fi
  # libFuzzer's last status line: "#<runs> DONE cov: <edges> ft: <features> corp: <n>/<size> ..."
  status="$(grep -E '^#[0-9]+' "$log" | tail -1)"
  runs="$(sed -E 's/^#([0-9]+).*/\1/' <<<"$status")"
  cov="$(grep -oE 'cov: [0-9]+' <<<"$status" | head -1)"
  corp="$(grep -oE 'corp: [0-9]+' <<<"$status" | head -1)"
  printf '%-12s %ss  runs %-10s %-12s %-12s %s\n' "$target" "$secs" "${runs:-?}" "${cov:-cov: ?}" "${corp:-corp: ?}" "$result"
  if [ "$result" != ok ]; then
    grep -E 'panicked|ERROR|SUMMARY' "$log" | head -5 >&2 || true
  fi
  rm -f "$log"
done
exit "$failed"
