#!/usr/bin/env bash
# Runs the SCIM compliance suite (scim2-tester, PyPI) against a real agent:
# every check must be SUCCESS. Installs the suite into .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
bash scripts/venv.sh
bin=${SCIM_EDGE:-.build/debug/scim-edge}
[ -x "$bin" ] || swift build --product scim-edge >/dev/null
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
"$bin" serve --data-dir "$work/data" --listen "127.0.0.1:$port" --token "$token" --admin-listen none >"$work/agent.log" 2>&1 &
agent=$!
trap 'kill $agent 2>/dev/null || true; wait $agent 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do grep -q listening "$work/agent.log" && break; sleep 0.1; done
status=0
SCIM_CLI_HEADERS="Authorization: Bearer $token" timeout 600 "$venv/bin/scim2" --url "http://127.0.0.1:$port/scim/v2" test \
  >"$work/report.txt" 2>&1 || status=$?
results=$(grep -cE '^(SUCCESS|COMPLIANT|ACCEPTABLE|DEVIATION|ERROR|CRITICAL|SKIPPED) ' "$work/report.txt" || true)
success=$(grep -cE '^SUCCESS ' "$work/report.txt" || true)
echo "scim2-tester: $success of $results checks SUCCESS"
if [ "$status" -ne 0 ] || [ "$results" -lt 100 ] || [ "$success" -ne "$results" ]; then
  grep -vE '^SUCCESS ' "$work/report.txt" | head -60
  echo "compliance: not every check succeeded (exit $status)" >&2
  exit 1
fi
