#!/usr/bin/env bash
# The broker's cost of N destination boundaries (issue 16, point 7), N = 1, 10, 50 (BOUNDARIES): a broker whose
# routes send domain "de"'s users to N boundaries; de's agent takes RATE creates/s for SECONDS s (`scim-edge bench`,
# open loop); N simulated boundary agents (scripts/bench_feed_clients.py: one long poll each over mutual TLS with
# its own certificate, acknowledging with outcomes, storing nothing) fetch every change. Per N: the broker's CPU
# time (user + system) per change and per change delivered, its peak heap (anonymous RSS) and the feed latency
# (source agent acceptance → the boundary's receipt). Writes docs/bench-boundaries.md (OUT) and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
BOUNDARIES=${BOUNDARIES:-"1 10 50"}
RATE=${RATE:-200}
SECONDS_LOAD=${SECONDS_LOAD:-10}
OUT=${OUT:-docs/bench-boundaries.md}
. scripts/lib-processes.sh
max=0; for n in $BOUNDARIES; do [ "$n" -gt "$max" ] && max=$n; done
names() { for k in $(seq 1 "$1"); do printf 'b%d ' "$k"; done; }
# shellcheck disable=SC2046
release_federation de $(names "$max")
clk=$(getconf CLK_TCK)
cpu() { awk -v t="$clk" '{printf "%.3f", ($14 + $15) / t}' "/proc/$1/stat"; }

rows=()
for n in $BOUNDARIES; do
  bp=$(free_port); mp=$(free_port); ap=$(free_port)
  {
    echo "dataDir: $work/broker-$n"
    echo "listen: 127.0.0.1:$bp"
    echo "tls: {ca: $work/ca.crt, cert: $work/broker.crt, key: $work/broker.key}"
    echo "admin: {listen: \"127.0.0.1:$mp\"}"
    echo "domains:"
    echo "  de: spiffe://bench/de/agent"
    for b in $(names "$n"); do echo "  $b: spiffe://bench/$b/agent"; done
    echo "targets:"
    for b in $(names "$n"); do printf '  - name: %s\n    domain: %s\n    routes: [{domains: [de], types: [User]}]\n' "to-$b" "$b"; done
  } >"$work/broker-$n.yaml"
  "$bin/scim-broker" serve --config "$work/broker-$n.yaml" >"$work/broker-$n.log" 2>&1 &
  broker=$!; pids+=($broker)
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$mp/readyz" >/dev/null && break; sleep 0.1; done
  start_relay_agent "de-$n" "$ap" none "$bp"
  # shellcheck disable=SC2046
  python3 scripts/bench_feed_clients.py "$bp" "$work/ca.crt" "$work" $(names "$n") --status "$work/feed-$n.status" \
    --out "$work/feed-$n.json" &
  clients=$!; pids+=($clients)
  for _ in $(seq 1 100); do [ "$(curl -s "http://127.0.0.1:$mp/metrics" | grep -c '^scim_broker_downlink_polls_waiting{.*} 1$')" = "$n" ] && break; sleep 0.1; done
  track_anon $broker "broker-$n"
  cpu0=$(cpu $broker)
  "$bin/scim-edge" bench --url "http://127.0.0.1:$ap/scim/v2" --token t --connections 8 --duration "$SECONDS_LOAD" \
    --rate "$RATE" --json --quiet >"$work/load-$n.json" || true
  changes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["status"].get("201", 0))' "$work/load-$n.json")
  # Until every boundary has every change (and a moment for the last acknowledgements).
  for _ in $(seq 1 600); do
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if min(d.values()) >= int(sys.argv[2]) else 1)' \
      "$work/feed-$n.status" "$changes" 2>/dev/null && break
    sleep 0.1
  done
  sleep 1
  cpu1=$(cpu $broker)
  hwm=$(rss $broker VmHWM)
  kill $clients; wait $clients 2>/dev/null || true
  rows+=("$(python3 - "$n" "$changes" "$cpu0" "$cpu1" "$(peak_anon "broker-$n")" "$hwm" "$work/feed-$n.json" <<'PY'
import json, sys
n, changes, c0, c1, anon, hwm, feed = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
d = json.load(open(feed))
got = sum(d["received"].values())
lat = sorted(x for v in d["latencies"].values() for x in v)
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
cpu = c1 - c0
complete = "" if got >= n * changes else f" (only {got} of {n * changes} received)"
print(f"| {n} | {changes} | {cpu:.2f} s | {cpu / changes * 1e6:,.0f} µs | {cpu / max(1, got) * 1e6:,.0f} µs | {anon} MiB ({hwm}) | "
      f"{q(0.5):.1f} ms | {q(0.99):.1f} ms{complete} |")
PY
)")
  kill $broker $agent; wait $broker $agent 2>/dev/null || true
done
{
  echo "### Broker cost of N destination boundaries ($(date -u +%Y-%m-%d), $(nproc) cores)"
  echo
  echo "| boundaries | changes | broker CPU | per change | per change delivered | broker heap (VmHWM) | feed latency p50 | p99 |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
  for r in "${rows[@]}"; do echo "$r"; done
  echo
  echo "Load: domain de's agent takes $RATE creates/s for ${SECONDS_LOAD} s (\`scim-edge bench\`, open loop); the broker's routes send each"
  echo "to every boundary, whose simulated agent (\`scripts/bench_feed_clients.py\`: a long poll over mutual TLS with its own"
  echo "certificate, \`maxEvents\` 1,000, acknowledging with outcomes in the next poll, storing nothing) receives it. CPU: the"
  echo "broker's user + system time from the load's start until every boundary had every change; heap: peak anonymous RSS"
  echo "(sampled every 0.2 s; VmHWM in MiB includes LMDB's mapped pages). Feed latency: from de's agent accepting the change"
  echo "(its 2xx follows the durable commit) to the boundary's receipt of the poll's answer, over all boundaries' events."
} | tee "$OUT"
