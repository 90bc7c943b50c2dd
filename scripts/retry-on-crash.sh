#!/usr/bin/env bash
# Runs a command; if it dies from a signal (exit status > 128: seen from
# swift-build itself crashing in libdispatch while resolving packages), runs
# it once more. Ordinary failures (compile errors, failing tests) are returned
# as they are, never retried.
"$@"
status=$?
if [ "$status" -gt 128 ]; then
  echo "retry-on-crash: '$*' died with status $status; running it once more" >&2
  "$@"
  status=$?
fi
exit "$status"
