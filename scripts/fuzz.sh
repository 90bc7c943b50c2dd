#!/usr/bin/env bash
# Builds the libFuzzer targets (Fuzz/ package) and runs each for
# FUZZ_SECONDS on a scratch copy of the committed seed corpus. Fails on any
# crash, sanitizer report or timeout. Crash inputs are kept in Fuzz/findings/.
set -euo pipefail
cd "$(dirname "$0")/../Fuzz"
seconds=${FUZZ_SECONDS:-20}
flags=(-c debug --sanitize=fuzzer -Xswiftc -sanitize=fuzzer,address -Xswiftc -use-ld=lld)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p findings
for pair in json:FuzzJSON filter:FuzzFilter patch:FuzzPatch; do
  dir=${pair%%:*}; target=${pair#*:}
  bash ../scripts/retry-on-crash.sh swift build "${flags[@]}" --product "$target" >/dev/null
  mkdir -p "$work/$dir"
  echo "fuzzing $target for ${seconds}s"
  if ! SWIFT_BACKTRACE=enable=no ".build/debug/$target" "$work/$dir" "corpus/$dir" \
       -max_total_time="$seconds" -max_len=4096 -timeout=5 -artifact_prefix=findings/ >"$work/$target.log" 2>&1; then
    tail -40 "$work/$target.log"
    echo "$target: fuzzing found a problem (input saved in Fuzz/findings/)" >&2
    exit 1
  fi
  grep -E "^Done" "$work/$target.log"
done
