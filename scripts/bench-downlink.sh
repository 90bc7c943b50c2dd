#!/usr/bin/env bash
# Backlog drains against rsyslog's RELP over mutual TLS, all in one run (issue 16, point 7):
#   RELP     a rsyslog sender holds EVENTS queued 1 KiB messages while its receiver is down; the receiver (a
#            second rsyslog, imrelp over mutual TLS, writing a file) starts: time to the last message written;
#   uplink   EVENTS create events of 1 KiB users wait in an agent's outbox while the broker is down; the broker
#            starts: time to its last durable apply (bench-relay.sh, with events the size of RELP's messages);
#   downlink the broker holds a boundary's feed of EVENTS changes (routed there from another domain) while the
#            boundary's agent is away; the agent starts: time to its last durable commit.
# Each drain as a ratio to RELP's (goal ≥ 1.2×), the best of ROUNDS rounds; the absolute rates move ±3× between runs on
# shared VMs.
# Needs rsyslog and rsyslog-relp (installed here when missing and run as root; else RELP is skipped, said so).
# Writes docs/bench-downlink.md (OUT) and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-200000}
BYTES=${BYTES:-1024}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-docs/bench-downlink.md}
. scripts/lib-processes.sh
release_federation de us

# --- the reference: rsyslog, omrelp → imrelp over mutual TLS -------------------------------------------------
relp_modules() { [ -e "$(dirname "$(dpkg -L rsyslog-relp 2>/dev/null | grep -m1 '/omrelp.so$')")/imrelp.so" ] 2>/dev/null; }
if ! command -v rsyslogd >/dev/null || ! relp_modules; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing rsyslog and rsyslog-relp for the RELP reference" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rsyslog rsyslog-relp >/dev/null
  fi
fi
# cpu PID: its CPU time so far (user + system), in seconds.
cpu() { awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / t}' "/proc/$1/stat"; }
# relp_drain NAME OMFILE-OPTIONS: one RELP drain of EVENTS messages (a sender and a receiver of their own, in $r/NAME);
# writes "rate-from-first rate-from-start first-after lines" to $r/NAME.out (for the sync variant, RELP_SYNC=0 skips it: the receiver
# syncing its file after each batch it writes, as ours sync each commit).
relp_drain() {
  local d="$r/$1" rp tp sender receiver start end first_at="" last c0 watched
  mkdir -p "$d/sender" "$d/receiver"
  rp=$(free_port); tp=$(free_port)
  # The sender: messages in over TCP, out by omrelp from a queue that holds them all while the receiver is away
  # (RELP window 1024: rsyslog's default of 128 is 20× slower here; retried every second).
  cat >"$d/sender.conf" <<EOF
global(workDirectory="$d/sender" maxMessageSize="8k")
module(load="imptcp")
module(load="omrelp" tls.tlslib="openssl")
module(load="impstats" interval="1" log.file="$d/sender.stats" log.syslog="off" format="json")
ruleset(name="relay") {
  action(type="omrelp" target="127.0.0.1" port="$rp" windowSize="1024" $(relp_tls sender receiver)
         queue.type="LinkedList" queue.size="$((EVENTS * 2))" queue.dequeueBatchSize="1024"
         action.resumeRetryCount="-1" action.resumeInterval="1")
}
input(type="imptcp" port="$tp" address="127.0.0.1" ruleset="relay")
EOF
  cat >"$d/receiver.conf" <<EOF
global(workDirectory="$d/receiver" maxMessageSize="8k")
module(load="imrelp" tls.tlslib="openssl")
input(type="imrelp" port="$rp" address="127.0.0.1" maxDataSize="8k" $(relp_tls receiver sender))
template(name="line" type="string" string="%msg%\n")
action(type="omfile" file="$d/out.log" template="line" $2)
EOF
  rsyslogd -n -f "$d/sender.conf" -i "$d/sender.pid" >"$d/sender.log" 2>&1 &
  sender=$!; pids+=($sender)
  for _ in $(seq 1 50); do python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1",int(sys.argv[1])))' "$tp" 2>/dev/null && break; sleep 0.1; done
  # EVENTS RFC 3164 lines of BYTES bytes (newline included), numbered.
  python3 - "$tp" "$EVENTS" "$BYTES" <<'PY'
import socket, sys
port, n, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
head, batch = "<13>Dec  1 00:00:00 bench relp: ", []
for k in range(n):
    line = f"{head}{k:07d} "
    batch.append((line + "x" * (size - 1 - len(line)) + "\n").encode())
    if len(batch) == 1000:
        s.sendall(b"".join(batch)); batch = []
s.sendall(b"".join(batch)); s.close()
PY
  # Queued, all of them (impstats: the action queue's size).
  for _ in $(seq 1 600); do grep -q "omrelp queue\", \"origin\": \"core.queue\", \"size\": $EVENTS," "$d/sender.stats" 2>/dev/null && break; sleep 0.1; done
  start=$(date +%s.%N) c0=$(cpu $sender)
  rsyslogd -n -f "$d/receiver.conf" -i "$d/receiver.pid" >"$d/receiver.log" 2>&1 &
  receiver=$!; pids+=($receiver)
  # The messages arrive in order: the last one's number at the file's end means all are written.
  last=" $(printf %07d $((EVENTS - 1))) "
  watched=$(python3 scripts/drain_watch.py file "$receiver,$sender" "$d/out.log" "$last") || { echo "rsyslog died" >&2; cat "$d"/*.log >&2; exit 1; }
  read -r _ first_at end _ <<<"$watched"
  python3 -c 'import sys; s,c,r=map(float,sys.argv[1:]); print(f"{s-c+r:.2f}")' "$(cpu $sender)" "$c0" "$(cpu $receiver)" >"$d.cpu"
  kill $sender $receiver 2>/dev/null || true
  # At least once: a message sent when the connection failed may be written twice; every one is there.
  [ "$(grep -o '^ [0-9]\{7\} ' "$d/out.log" | sort -u | wc -l)" -ge "$EVENTS" ] || { echo "RELP lost messages" >&2; exit 1; }
  # (Seen whole by its first sample, a small EVENTS: the rate from the start stands in for the rate from the first.)
  python3 -c 'import sys; n,s,f,e=int(sys.argv[1]),*map(float,sys.argv[2:5]); print(f"{n/(e-f) if e>f else n/(e-s):.0f} {n/(e-s):.0f} {f-s:.2f} {sys.argv[5]}")' \
    "$EVENTS" "$start" "$first_at" "$end" "$(wc -l <"$d/out.log")" >"$d.out"
  rm -rf "$d"
}
relp_available="" sync=""
if command -v rsyslogd >/dev/null && relp_modules; then
  r="$work/relp"; mkdir -p "$r"
  # A CA and one certificate each, named by DNS SAN (RELP's tls.authMode "name" checks it).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$r/ca.key" -out "$r/ca.crt" -days 2 \
    -subj "/CN=bench RELP CA" 2>/dev/null
  for n in sender receiver; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$r/$n.key" -out "$r/$n.csr" -subj "/CN=$n" 2>/dev/null
    printf 'subjectAltName=DNS:%s,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' "$n" >"$r/$n.ext"
    openssl x509 -req -in "$r/$n.csr" -CA "$r/ca.crt" -CAkey "$r/ca.key" -CAcreateserial -out "$r/$n.crt" -days 2 \
      -extfile "$r/$n.ext" 2>/dev/null
  done
  relp_tls() { echo "tls=\"on\" tls.cacert=\"$r/ca.crt\" tls.mycert=\"$r/$1.crt\" tls.myprivkey=\"$r/$1.key\" tls.authmode=\"name\" tls.permittedpeer=[\"$2\"]"; }
  relp_available=1
  relp_note="rsyslog $(rsyslogd -v | sed -n '1s/^rsyslogd *\([0-9.]*\).*/\1/p'), librelp over OpenSSL; at least once, so a message may be written twice"
else
  relp_note="RELP reference skipped: rsyslog and rsyslog-relp are not installed (apt-get install rsyslog rsyslog-relp)"
fi

broker_status() { "$bin/scim-broker" status --data-dir "$1" 2>/dev/null | sed -nE 's/.*applied through ([0-9]+).*/\1/p' | head -1; }
# metric PORT PREFIX: the value of the first metric line starting with PREFIX (empty while the process is not up).
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" 'index($0, m) == 1 && !seen {print $NF; seen = 1}' || true; }
# drain LABEL PID PORT PREFIX: watches metric PREFIX of PID's admin PORT (one process, every 0.05 s, as for RELP's file)
# until EVENTS; prints "start first end first-count", start being $drain_start (taken before the receiver started).
drain() {
  DRAIN_START=$drain_start python3 scripts/drain_watch.py metric "$2" "$3" "$4" "$EVENTS" ||
    { echo "$1 died" >&2; tail -n 20 "$work"/*.log >&2; exit 1; }
}

# uplink_drain N: an agent's outbox → the broker; writes drain's line to $work/up-N.out, and the CPU seconds the broker
# and the agent spent from the broker's start to the end of the drain to $work/up-N.cpu.
uplink_drain() {
  local bp mp broker hq c0 drain_start
  rm -rf "$work/hq"
  "$bin/edge-fixture" fill-outbox "$work/hq" "$EVENTS" "$BYTES" >/dev/null
  bp=$(free_port); mp=$(free_port)
  start_relay_agent hq "$(free_port)" none "$bp" --outbox-max-events $((EVENTS * 2))
  hq=$agent
  sleep 0.5
  c0=$(cpu $hq) drain_start=$(date +%s.%N)
  "$bin/scim-broker" serve --data-dir "$work/broker-up-$1" --listen "127.0.0.1:$bp" --ca "$work/ca.crt" --cert "$work/broker.crt" \
    --key "$work/broker.key" --domain "de=spiffe://bench/de/agent" --admin-listen "127.0.0.1:$mp" >"$work/broker-up-$1.log" 2>&1 &
  broker=$!; pids+=($broker)
  drain broker $broker "$mp" 'scim_broker_agent_applied_sequence{' >"$work/up-$1.out"
  [ "$(broker_status "$work/broker-up-$1")" = "$EVENTS" ] || { echo "the broker's store does not hold every event" >&2; exit 1; }
  echo "$(cpu $broker) $(python3 -c 'import sys; print(f"{float(sys.argv[1]) - float(sys.argv[2]):.2f}")' "$(cpu $hq)" "$c0")" >"$work/up-$1.cpu"
  kill $broker $hq; wait $broker $hq 2>/dev/null || true
  rm -rf "$work/broker-up-$1"
}

# downlink_drain N: the broker's feed for boundary "us" (filled through de's agent, which then stops) → its agent;
# writes drain's line to $work/dn-N.out, and "queued foreign committed peak-broker peak-agent" to $work/dn-N.checks.
downlink_drain() {
  local bp mp ua broker hq queued foreign committed c0 drain_start
  rm -rf "$work/hq" "$work/us"
  "$bin/edge-fixture" fill-outbox "$work/hq" "$EVENTS" "$BYTES" >/dev/null
  bp=$(free_port); mp=$(free_port); ua=$(free_port)
  boundary_broker_config "$work/broker.yaml" "$work/broker-down-$1" "$bp" "$mp"
  "$bin/scim-broker" serve --config "$work/broker.yaml" >"$work/broker-down-$1.log" 2>&1 &
  broker=$!; pids+=($broker)
  track_anon $broker "broker-$1"
  start_relay_agent hq "$(free_port)" none "$bp" --outbox-max-events $((EVENTS * 2))
  hq=$agent
  for _ in $(seq 1 1200); do [ "$(broker_status "$work/broker-down-$1")" = "$EVENTS" ] && break; sleep 0.2; done
  [ "$(broker_status "$work/broker-down-$1")" = "$EVENTS" ] || { echo "the broker did not apply the backlog" >&2; exit 1; }
  kill $hq; wait $hq 2>/dev/null || true
  # The depth is counted on the broker's thread pool at most every 10 s: the first scrape starts a count.
  for _ in $(seq 1 50); do queued=$(metric "$mp" 'scim_broker_downlink_queue_depth{'); [ "${queued:-0}" -gt 0 ] && break; sleep 0.1; done
  c0=$(cpu $broker) drain_start=$(date +%s.%N)
  start_boundary_agent us "$ua" "$bp"
  track_anon $us "agent-$1"
  drain agent $us "$ua" scim_edge_downlink_applied_sequence >"$work/dn-$1.out"
  echo "$(python3 -c 'import sys; print(f"{float(sys.argv[1]) - float(sys.argv[2]):.2f}")' "$(cpu $broker)" "$c0") $(cpu $us)" >"$work/dn-$1.cpu"
  foreign=$("$bin/scim-edge" status --data-dir "$work/us" | sed -nE 's/^foreign +([0-9]+) from de.*/\1/p')
  local accepted='scim_broker_downlink_events_committed_total{domain="us",target="us-boundary",outcome="accepted"}'
  for _ in $(seq 1 50); do committed=$(metric "$mp" "$accepted"); [ "$committed" = "$EVENTS" ] && break; sleep 0.1; done
  kill $broker $us; wait $broker $us 2>/dev/null || true
  rm -rf "$work/broker-down-$1"
  echo "$queued $foreign $committed $(peak_anon "broker-$1") $(peak_anon "agent-$1")" >"$work/dn-$1.checks"
}

# ROUNDS rounds, each RELP then the uplink then the downlink (the machine's load changes from minute to minute).
rounds=()
for round in $(seq 1 "$ROUNDS"); do
  relp="- - - -"
  if [ -n "$relp_available" ]; then
    relp_drain "plain-$round" ""
    relp=$(cat "$r/plain-$round.out")
    if [ "$round" = 1 ] && [ "${RELP_SYNC:-1}" = 1 ]; then relp_drain sync 'sync="on"'; sync=$(cat "$r/sync.out"); fi
  fi
  uplink_drain "$round"
  downlink_drain "$round"
  checks=$(cat "$work/dn-$round.checks")
  rounds+=("$relp | $(cat "$work/up-$round.out") | $(cat "$work/dn-$round.out")")
done
{
  echo "### Backlog drains vs rsyslog RELP over mutual TLS ($(date -u +%Y-%m-%d), $(nproc) cores)"
  echo
  python3 - "$EVENTS" "$BYTES" "${sync:-}" "${rounds[@]}" <<'PY'
import sys
n, size, sync = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def rate(s, f, e, fn):
    s, f, e, fn = float(s), float(f), float(e), int(fn)
    # A drain seen whole by its first sample (a small EVENTS) has no rate from its first: its rate from its start stands in.
    return ((n - fn) / (e - f) if e > f else n / (e - s)), n / (e - s), f - s
rounds = []
for r in sys.argv[4:]:
    relp, up, dn = (x.split() for x in r.split("|"))
    rounds.append({
        "relp": (float(relp[0]), float(relp[1]), float(relp[2])) if relp[0] != "-" else None,
        "up": rate(*up), "dn": rate(*dn)})
def best(k):
    got = [r[k] for r in rounds if r[k]]
    return max(got) if got else None
relp = best("relp")
def ratio(x):
    return f"**{x / relp[0]:.2f}×**" if relp else "—"
print(f"{n:,} messages of {size} bytes each way, best of {len(rounds)} rounds (each round RELP, then the uplink, then the downlink).")
print("Drain rate: from the first message (event) written at the far end to the last, sampled every 0.05 s by one watching")
print("process for all three (RELP's file; the broker's and the agent's metrics on one kept-alive connection); in brackets,")
print("from the receiver's start, reconnection included.")
print()
print("| drain | receiver | events/s | from its start | first after | vs RELP |")
print("|---|---|---:|---:|---:|---:|")
def row(name, receiver, r, vs):
    print(f"| {name} | {receiver} | {r[0]:,.0f} | ({r[1]:,.0f}) | {r[2]:.2f} s | {vs} |")
if relp:
    row("rsyslog omrelp → imrelp (reference)", "rsyslog, omfile", relp, "1.00×")
if sync:
    s = [float(x) for x in sync.split()[:3]]
    row('the same, the receiver syncing its file (omfile `sync="on"`)', "rsyslog, omfile", s, ratio(s[0]))
row("uplink: agent outbox → broker", "broker, durable apply", best("up"), ratio(best("up")[0]))
row("downlink: broker feed → boundary agent", "agent, durable commit", best("dn"), ratio(best("dn")[0]))
print()
each = lambda k: ", ".join(f"{r[k][0]:,.0f}" if r[k] else "—" for r in rounds)
print(f"Each round, events/s: RELP {each('relp')}; uplink {each('up')}; downlink {each('dn')}.")
PY
  read -r queued foreign committed peak_broker peak_agent <<<"$checks"
  echo
  echo "Reference: $relp_note. The sender held the messages in its in-memory action queue (omrelp, window 1024) while"
  echo "the receiver was down; the receiver acknowledges what it queued and writes the file without syncing (the second row"
  echo "syncs it after each batch written, for scale). Ours sync both ends: the broker applies and the agent commits durably"
  echo "before acknowledging, and each side keeps its backlog on disk."
  echo "Uplink: batches of up to 500 events over mutual TLS, a window of batches (protocol.md). Downlink (protocol 2): the agent"
  echo "polls 1,000 events at a time (\`maxEventsPerPoll\`) and asks for the next 1,000 while it commits the last with the feed"
  echo "sequence; a later poll acknowledges them with its outcomes, which the broker records as each change's last hop (\`trace\`)."
  echo "The broker turns queued changes into feed events as the agent acknowledges, the next page ahead while an answer travels (at most 5,000 unacknowledged). The agent's"
  echo "inbound policy maps each user (\`userType: Guest\`, \`userName\` user@de) and stores it with its indexes."
  echo "In the last round the broker had queued $queued changes for the boundary; the agent held $foreign foreign users after the"
  echo "drain, and the broker recorded $committed accepted commits (exactly once)."
  echo "Peak anonymous RSS during that downlink drain (sampled every 0.2 s): broker $peak_broker MiB, agent $peak_agent MiB."
  read -r ub ua_ <<<"$(cat "$work/up-$ROUNDS.cpu")"
  read -r db da <<<"$(cat "$work/dn-$ROUNDS.cpu")"
  rc=$(cat "$r/plain-$ROUNDS.cpu" 2>/dev/null || echo 0)
  python3 -c 'import sys; n=int(sys.argv[1]); ub,ua,db,da,rc=map(float,sys.argv[2:]); print(f"CPU time per event in that round (user + system, from the drain'"'"'s start, the receiving process from its own): RELP sender and receiver together {rc/n*1e6:.0f} µs; uplink broker {ub/n*1e6:.0f} µs, agent {ua/n*1e6:.0f} µs; downlink broker {db/n*1e6:.0f} µs, agent {da/n*1e6:.0f} µs.")' \
    "$EVENTS" "$ub" "$ua_" "$db" "$da" "$rc"
  echo "Goal (issue 16): each drain ≥ 1.2× RELP."
} | tee "$OUT"
