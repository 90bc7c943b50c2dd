#!/usr/bin/env bash
# Runs every XCTest of the package and ends with one plain summary line,
# "N passed, N failed", taken from XCTest's own count.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
swift test --skip-build --disable-swift-testing "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# "Executed 225 tests, with 0 failures …" or "Executed 225 tests, with 1 test skipped and 0 failures …".
summary=$(grep -E "^\s*Executed [0-9]+ tests?, with ([0-9]+ tests? skipped and )?[0-9]+ failures?" "$log" | tail -1)
total=$(sed -E 's/.*Executed ([0-9]+) tests?.*/\1/' <<<"$summary")
skipped=$(sed -nE 's/.*with ([0-9]+) tests? skipped.*/\1/p' <<<"$summary")
skipped=${skipped:-0}
failed=$(sed -E 's/.* ([0-9]+) failures?.*/\1/' <<<"$summary")
if [ -z "$summary" ]; then
  echo "no XCTest summary found" >&2
  exit 1
fi
if [ "$skipped" -gt 0 ]; then
  echo "$((total - failed - skipped)) passed, $failed failed, $skipped skipped"
else
  echo "$((total - failed)) passed, $failed failed"
fi
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
