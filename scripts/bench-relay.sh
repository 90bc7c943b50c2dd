#!/usr/bin/env bash
# Relay throughput: EVENTS create events wait in an agent's outbox
# while the broker is down; the broker starts; the time until it applied
# them all gives the drain rate (agent → broker over mutual TLS, exactly once,
# durable at both ends). Writes docs/bench-relay.md (OUT) and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-200000}
OUT=${OUT:-docs/bench-relay.md}
for p in scim-edge scim-broker edge-fixture; do swift build -c release --product "$p" >/dev/null; done
bin=.build/release
. scripts/lib-processes.sh

"$bin/edge-fixture" pki "$work" de >/dev/null
fill_start=$(date +%s.%N)
"$bin/edge-fixture" fill-outbox "$work/agent" "$EVENTS" >/dev/null
fill_end=$(date +%s.%N)

bp=$(free_port); mp=$(free_port)
"$bin/scim-edge" serve --data-dir "$work/agent" --listen 127.0.0.1:0 --token t --admin-listen none \
  --broker "https://127.0.0.1:$bp" --ca "$work/ca.crt" --cert "$work/de.crt" --key "$work/de.key" --domain de \
  --outbox-max-events $((EVENTS * 2)) >"$work/agent.log" 2>&1 &
agent=$!; pids+=($agent)
track_anon $agent agent
sleep 0.5
start=$(date +%s.%N)
"$bin/scim-broker" serve --data-dir "$work/broker" --listen "127.0.0.1:$bp" --ca "$work/ca.crt" --cert "$work/broker.crt" \
  --key "$work/broker.key" --domain "de=spiffe://bench/de/agent" --admin-listen "127.0.0.1:$mp" >"$work/broker.log" 2>&1 &
broker=$!; pids+=($broker)
track_anon $broker broker
# The broker's applied sequence (read from its store) on one kept-alive connection, every 0.05 s: a status command
# per sample would open the store each time and take the CPU the drain runs on.
watched=$(DRAIN_START=$start python3 scripts/drain_watch.py metric "$broker,$agent" "$mp" 'scim_broker_agent_applied_sequence{' "$EVENTS") ||
  { echo "the drain failed" >&2; tail "$work"/*.log >&2; exit 1; }
read -r _ first_at end first_applied <<<"$watched"
kill -0 $agent 2>/dev/null || { echo "the agent died" >&2; tail "$work"/*.log >&2; exit 1; }
applied=$("$bin/scim-broker" status --data-dir "$work/broker" 2>/dev/null | sed -nE 's/.*applied through ([0-9]+).*/\1/p' | head -1)
[ "$applied" = "$EVENTS" ] || { echo "the broker's store holds $applied of $EVENTS events" >&2; exit 1; }
{
  echo "### Relay backlog drain ($(date -u +%Y-%m-%d), $(nproc) cores)"
  echo
  python3 - "$EVENTS" "$start" "$end" "$fill_start" "$fill_end" "$first_at" "$first_applied" <<PY
import sys
n, s, e, fs, fe, fa = int(sys.argv[1]), *map(float, sys.argv[2:7])
f = int(sys.argv[7])
print(f"{n} create events (~500 bytes each) waited in the agent's outbox while the broker was down (filled in {fe-fs:.1f} s).")
# (Seen whole by its first sample, a small EVENTS: the rate from the start stands in.)
print(f"Drain, from the broker's first commit to its last (sampled every 0.05 s): **{(n-f)/(e-fa) if e > fa else n/(e-s):,.0f} events/s**;")
print(f"{e-s:.2f} s from the broker's start, reconnection backoff included ({n/(e-s):,.0f} events/s).")
print("Relay batches of up to 500 events over mutual TLS, a window of 4 batches, durable apply at the broker, durable prune at the agent.")
print("Target: drain ≥ 50,000 events/s.")
PY
  echo
  echo "Peak anonymous RSS (heap, stacks; sampled every 0.2 s): agent $(peak_anon agent) MiB, broker $(peak_anon broker) MiB (target ≤ 96 MB each)."
  echo "Peak resident set with LMDB's mapped file pages (VmHWM): agent $(rss $agent VmHWM) MiB, broker $(rss $broker VmHWM) MiB; those pages"
  echo "are the kernel's page cache of the data files, shared and evictable, and grow with the data, not with the load."
} | tee "$OUT"
