#!/usr/bin/env bash
# Bulk vs serial POSTs on one kept-alive connection, against a release agent
# (durable commits): N creates as one /Bulk request vs N POST /Users one after
# the other, for N = 10, 100, 1,000 (the curve), best of 3 runs each. Writes
# a markdown section to $OUT (default: stdout).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib-processes.sh
swift build -c release --product scim-edge >/dev/null
bin=.build/release
port=$(free_port)
"$bin/scim-edge" serve --data-dir "$work/data" --listen "127.0.0.1:$port" --token t --admin-listen none >"$work/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q listening "$work/agent.log" && break; sleep 0.1; done
python3 - "$port" >"${OUT:-/dev/stdout}" <<'PY'
import http.client, json, sys, time
port = int(sys.argv[1])
H = {"Authorization": "Bearer t", "Content-Type": "application/scim+json"}
run = 0
def user(name):
    return {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": name,
            "name": {"givenName": "Bulk", "familyName": name}, "emails": [{"value": name + "@example.com", "type": "work"}]}
def serial(n):
    global run; run += 1
    c = http.client.HTTPConnection("127.0.0.1", port)
    t = time.perf_counter()
    for k in range(n):
        c.request("POST", "/scim/v2/Users", json.dumps(user(f"s{run}-{k}")), H)
        r = c.getresponse(); r.read()
        assert r.status == 201, r.status
    return time.perf_counter() - t
def bulk(n):
    global run; run += 1
    ops = [{"method": "POST", "path": "/Users", "bulkId": f"b{k}", "data": user(f"b{run}-{k}")} for k in range(n)]
    body = json.dumps({"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"], "Operations": ops})
    c = http.client.HTTPConnection("127.0.0.1", port)
    t = time.perf_counter()
    c.request("POST", "/scim/v2/Bulk", body, H)
    r = c.getresponse(); doc = json.loads(r.read())
    elapsed = time.perf_counter() - t
    assert r.status == 200 and all(o["status"] == "201" for o in doc["Operations"]), r.status
    return elapsed
print("## Bulk: one request, one commit\n")
print("N creates as one `/Bulk` request vs N `POST /Users` one after the other on one kept-alive")
print("connection, every answer after a durable commit; best of 3 runs (time includes the client).\n")
print("| N | serial POSTs | one Bulk | ratio | per create, Bulk |")
print("|---:|---:|---:|---:|---:|")
for n in (10, 100, 1000):
    s = min(serial(n) for _ in range(3))
    b = min(bulk(n) for _ in range(3))
    print(f"| {n:,} | {s*1000:.1f} ms | {b*1000:.1f} ms | **{s/b:.1f}×** | {b/n*1e6:.0f} µs |")
print("\nGoal: a Bulk of 1,000 creates ≥ 10× faster than 1,000 serial POSTs.")
PY
