#!/usr/bin/env bash
# Relay bytes of a one-member change: a release agent relaying to a release
# broker (mutual TLS, relay protocol 2) holds groups of N members (N = 100,
# 10,000, 100,000; RELAY_MEMBER_SIZES overrides); with the broker paused
# (SIGSTOP, so the events stay in the outbox), one member is added to each
# group and the event the agent queued is measured, against the whole group
# (what relay protocol 1 sends for the same change). Writes a markdown
# section to $OUT (default: stdout).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-processes.sh
release_federation
bp=$(free_port)
"$bin/scim-broker" serve --data-dir "$work/broker" --listen "127.0.0.1:$bp" --ca "$work/ca.crt" --cert "$work/broker.crt" \
  --key "$work/broker.key" --domain "de=spiffe://bench/de/agent" --admin-listen none >"$work/broker.log" 2>&1 &
broker=$!; pids+=($broker)
ap=$(free_port)
start_relay_agent agent "$ap" none "$bp" --outbox-max-events 10000000
for _ in $(seq 1 100); do grep -q listening "$work/agent.log" && grep -q listening "$work/broker.log" && break; sleep 0.1; done

PYTHONPATH=scripts python3 - "$ap" "${RELAY_MEMBER_SIZES:-100 10000 100000}" "$bin/scim-edge" "$work/agent" "$broker" >"${OUT:-/dev/stdout}" <<'PY'
from bench_scim import bulk_users
import http.client, json, os, signal, subprocess, sys, time
port, sizes, cli, data, broker = int(sys.argv[1]), [int(s) for s in sys.argv[2].split()], sys.argv[3], sys.argv[4], int(sys.argv[5])
H = {"Authorization": "Bearer t", "Content-Type": "application/scim+json"}
c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
def call(method, path, body=None):
    c.request(method, "/scim/v2" + path, None if body is None else json.dumps(body), H)
    r = c.getresponse(); d = r.read()
    return r.status, d
def outbox():
    out = subprocess.run([cli, "outbox", "list", "--data-dir", data, "--limit", "1000000"], capture_output=True, text=True, check=True).stdout
    return [l.split("\t") for l in out.splitlines() if l]
def drained(deadline=600):
    end = time.time() + deadline
    while outbox():
        assert time.time() < end, "the relay did not drain"
        time.sleep(0.2)
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
need = max(sizes) + len(sizes)
users = bulk_users(lambda b: call("POST", "/Bulk", b), need, "r")
groups = {}
for n in sizes:
    s, d = call("POST", "/Groups", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": f"g{n}"})
    assert s == 201, s
    gid = json.loads(d)["id"]
    for k in range(0, n, 5000):
        s, _ = call("PATCH", f"/Groups/{gid}", {"schemas": [PATCH], "Operations": [
            {"op": "add", "path": "members", "value": [{"value": u} for u in users[k:min(n, k + 5000)]]}]})
        assert s in (200, 204), s
    groups[n] = gid
drained()
status = subprocess.run([cli, "status", "--data-dir", data], capture_output=True, text=True).stdout
protocol = next((l.split()[2] for l in status.splitlines() if l.startswith("relay protocol")), "?")
os.kill(broker, signal.SIGSTOP)
rows = []
try:
    for i, n in enumerate(sizes):
        before = {e[0] for e in outbox()}
        s, _ = call("PATCH", f"/Groups/{groups[n]}", {"schemas": [PATCH], "Operations": [
            {"op": "add", "path": "members", "value": [{"value": users[max(sizes) + i]}]}]})
        assert s in (200, 204), s
        new = [e for e in outbox() if e[0] not in before]
        assert len(new) == 1, new
        event = subprocess.run([cli, "outbox", "show", new[0][0], "--data-dir", data], capture_output=True, check=True).stdout.strip()
        s, whole = call("GET", f"/Groups/{groups[n]}")
        rows.append((n, new[0][1], len(event), len(whole)))
finally:
    os.kill(broker, signal.SIGCONT)
print("## Relay bytes of a one-member change\n")
print(f"A release agent relaying to a release broker (relay protocol {protocol}, learnt from the broker's answers): one")
print("member added to a group of N members; the bytes of the relay event the agent queued (the outbox entry as sent,")
print("envelope fields included), against the whole group as `GET /Groups/{id}` returns it, which is what relay")
print("protocol 1 sends for the same change.\n")
print("| N members | event | event bytes | whole group (protocol 1) | ratio |")
print("|---:|---|---:|---:|---:|")
for n, kind, b, w in rows:
    print(f"| {n:,} | `{kind.rsplit(':', 2)[-2] + ':' + kind.rsplit(':', 1)[-1]}` | {b:,} | {w:,} | {w / b:,.0f}× smaller |")
print("\nGoal (issue 15): under 1 KiB for one member, whatever the group's size.")
PY
