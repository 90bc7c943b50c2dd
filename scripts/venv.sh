#!/usr/bin/env bash
# The Python tools the tests and benchmarks run against, from PyPI, in .venv:
# scim2-server (the reference SCIM server: a downstream app, a benchmark
# reference) and scim2-tester / scim2-cli (the compliance suite).
# Idempotent: a warm run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
if [ -x "$venv/bin/scim2-server" ] && [ -x "$venv/bin/scim2" ] && "$venv/bin/python" -c 'import scim2_tester' 2>/dev/null; then
  exit 0
fi
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv" || { echo "python3 -m venv failed: install python3-venv" >&2; exit 1; }
"$venv/bin/pip" install -q --disable-pip-version-check scim2-server scim2-cli scim2-tester
