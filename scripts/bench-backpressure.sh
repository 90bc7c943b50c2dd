#!/usr/bin/env bash
# Backpressure over time: an IdP sends user creates at RATE/s to an
# agent (open loop, `scim-edge bench`) while the broker is stopped at STOP_AT s
# and restarted at START_AT s. The agent's outbox fills to its watermark
# (OUTBOX events), the IdP then gets 503 + Retry-After, and everything drains
# once the broker is back. Samples the agent every 0.25 s; writes
# docs/backpressure.svg (IdP requests/s, accepted writes/s, 503s/s, outbox depth) and a
# summary to docs/bench-backpressure.md (OUT), and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-2000}
DURATION=${DURATION:-24}
STOP_AT=${STOP_AT:-4}
START_AT=${START_AT:-14}
OUTBOX=${OUTBOX:-10000}
OUT=${OUT:-docs/bench-backpressure.md}
SVG=${SVG:-docs/backpressure.svg}
for p in scim-edge scim-broker edge-fixture; do swift build -c release --product "$p" >/dev/null; done
bin=.build/release
. scripts/lib-processes.sh

"$bin/edge-fixture" pki "$work" de >/dev/null
bp=$(free_port); ap=$(free_port); aa=$(free_port)
start_broker() {
  "$bin/scim-broker" serve --data-dir "$work/broker" --listen "127.0.0.1:$bp" --ca "$work/ca.crt" --cert "$work/broker.crt" \
    --key "$work/broker.key" --domain "de=spiffe://bench/de/agent" --admin-listen none >>"$work/broker.log" 2>&1 &
  broker=$!; pids+=($broker)
}
start_broker
start_relay_agent agent "$ap" "127.0.0.1:$aa" "$bp" --outbox-max-events "$OUTBOX"
sleep 1

"$bin/scim-edge" bench --url "http://127.0.0.1:$ap/scim/v2" --token t --rate "$RATE" --duration "$DURATION" --connections 32 \
  --json --quiet >"$work/bench.json" &
load=$!
t0=$(date +%s%3N)
stopped=0 restarted=0
while kill -0 $load 2>/dev/null; do
  ms=$(( $(date +%s%3N) - t0 )); t=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
  m=$(curl -s "http://127.0.0.1:$aa/metrics" || true)
  printf '%s %s %s %s\n' "$t" \
    "$(awk '/^scim_edge_committed_writes_total / {print $2}' <<<"$m")" \
    "$(awk '/^scim_edge_backpressure_rejections_total / {print $2}' <<<"$m")" \
    "$(awk '/^scim_edge_outbox_events / {print $2}' <<<"$m")" >>"$work/samples.txt"
  if [ $stopped -eq 0 ] && [ $ms -ge $((STOP_AT * 1000)) ]; then kill -TERM $broker; wait $broker 2>/dev/null || true; stopped=1; fi
  if [ $restarted -eq 0 ] && [ $ms -ge $((START_AT * 1000)) ]; then start_broker; restarted=1; fi
  sleep 0.25
done
wait $load || true
for _ in $(seq 1 120); do
  depth=$(curl -s "http://127.0.0.1:$aa/metrics" | awk '/^scim_edge_outbox_events / {print $2}')
  [ "${depth:-1}" = 0 ] && break; sleep 0.5
done
ms=$(( $(date +%s%3N) - t0 )); drained=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))

applied=$("$bin/scim-broker" status --data-dir "$work/broker" 2>/dev/null | sed -nE 's/.*applied through ([0-9]+).*/\1/p' | head -1)
python3 - "$work/samples.txt" "$work/bench.json" "$SVG" "$STOP_AT" "$START_AT" "$RATE" "$OUTBOX" "$drained" "${applied:-0}" <<'PY' | tee "$OUT"
import json, sys, datetime, os
samples, bench, svg_path = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
stop, start, rate, outbox, drained = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), float(sys.argv[8])
applied = int(sys.argv[9])
rows = [tuple(float(x or 0) for x in l.split()) for l in open(samples) if len(l.split()) == 4]
pts = []
for (t0, w0, r0, _), (t1, w1, r1, d1) in zip(rows, rows[1:]):
    dt = max(1e-3, t1 - t0)
    pts.append((t1, (w1 - w0) / dt, (r1 - r0) / dt, d1))
W, H, P = 760, 300, 56
tmax = max(p[0] for p in pts)
def x(t): return P + t / tmax * (W - 2 * P)
rmax = max(max(p[1] for p in pts), max(p[2] for p in pts), rate) * 1.1
dmax = max(max(p[3] for p in pts), outbox) * 1.1
def yr(v): return H - P / 2 - v / rmax * (H - P)
def yd(v): return H - P / 2 - v / dmax * (H - P)
def line(vals, f, color, dash=""):
    return '<polyline fill="none" stroke="%s" stroke-width="1.5" %s points="%s"/>' % (
        color, 'stroke-dasharray="%s"' % dash if dash else "", " ".join("%.1f,%.1f" % (x(t), f(v)) for t, v in vals))
out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">' % (W, H + 20),
       '<rect width="100%" height="100%" fill="white"/>',
       '<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#f3e5e5"/>' % (x(stop), P // 2, x(start) - x(stop), H - P),
       '<text x="%.1f" y="%d">broker stopped</text>' % (x(stop) + 4, P // 2 + 14),
       '<text x="%d" y="16" font-size="13">IdP writes to an agent at %d/s while the broker is away (outbox watermark %d events)</text>' % (P, rate, outbox),
       '<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="dimgray"/>' % (P, yr(0), W - P, yr(0))]
for k in range(0, 5):
    v = rmax * k / 4; out.append('<text x="%d" y="%.1f" text-anchor="end">%d/s</text>' % (P - 4, yr(v) + 4, v))
    d = dmax * k / 4; out.append('<text x="%d" y="%.1f">%d</text>' % (W - P + 4, yd(d) + 4, d))
for s in range(0, int(tmax) + 1, 2):
    out.append('<text x="%.1f" y="%.1f" text-anchor="middle">%d s</text>' % (x(s), yr(0) + 14, s))
out.append(line([(p[0], p[1] + p[2]) for p in pts], yr, "#7f7f7f", "2 2"))
out.append(line([(p[0], p[1]) for p in pts], yr, "#2ca02c"))
out.append(line([(p[0], p[2]) for p in pts], yr, "#d62728"))
out.append(line([(p[0], p[3]) for p in pts], yd, "#1f77b4", "4 2"))
for i, (name, color) in enumerate([("IdP requests/s (left)", "#7f7f7f"), ("accepted writes/s (left)", "#2ca02c"), ("503 Retry-After /s (left)", "#d62728"), ("outbox events (right)", "#1f77b4")]):
    out.append('<text x="%d" y="%d" fill="%s">%s</text>' % (W - P - 190, P // 2 + 14 + 14 * i, color, name))
out.append("</svg>")
open(svg_path, "w").write("\n".join(out) + "\n")
away = [p for p in pts if stop + 1 < p[0] < start]
peak_depth = max(p[3] for p in pts)
rejected = bench["status"].get("503", 0)
print("### Backpressure while the broker is away (%s, %d cores)" % (datetime.date.today(), os.cpu_count()))
print()
print("![accepted writes, 503s and outbox depth over time](%s)" % os.path.basename(svg_path))
print()
print("An IdP sends %d creates/s (open loop, `scim-edge bench --rate`) for %d s; the broker is stopped at %g s and restarted at %g s." % (rate, len(bench["timeline"]), stop, start))
print("The agent accepted %d writes (201) and answered %d with 503 + Retry-After; the outbox peaked at %d events (watermark %d)," % (
    bench["status"].get("201", 0), rejected, peak_depth, outbox))
accepted = bench["status"].get("201", 0)
print("so nothing was accepted beyond what it could hold. The outbox was empty again %.1f s after the start, and the broker had applied" % drained)
print("%d events for %d accepted writes: %s." % (applied, accepted, "nothing lost, nothing twice" if applied == accepted else "A MISMATCH"))
print("While the broker was away the agent accepted %.0f writes/s on average (the relay's outbox absorbs them until the watermark)." % (
    sum(p[1] for p in away) / max(1, len(away))))
PY
