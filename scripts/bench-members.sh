#!/usr/bin/env bash
# Adding and removing one member of a group of N members vs of 100, at a
# release agent (standalone: no relay events, durable commits), for
# N = 100, 10,000, 100,000 and 1,000,000 (MEMBERS_SIZES overrides). Users are
# created through /Bulk, each group grown by PATCH in chunks of 5,000; then
# one spare user is added and removed R times (PATCH as Entra and Okta send
# it: path "members" with a value list, and members[value eq "…"]). Reports
# the median latency and its ratio to the 100-member group's in the same
# run (the sizes alternate sample by sample; MEMBERS_SAMPLES, 60). Writes a markdown section to $OUT (default: stdout).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib-processes.sh
${SWIFT_BUILD_LOCK:+flock "$SWIFT_BUILD_LOCK"} swift build -c release --product scim-edge >/dev/null
bin=.build/release
port=$(free_port)
"$bin/scim-edge" serve --data-dir "$work/data" --listen "127.0.0.1:$port" --token t --admin-listen none >"$work/agent.log" 2>&1 &
pids+=($!)
agent=$!
for _ in $(seq 1 100); do grep -q listening "$work/agent.log" && break; sleep 0.1; done
PYTHONPATH=scripts python3 - "$port" "${MEMBERS_SIZES:-100 10000 100000 1000000}" "$agent" "${MEMBERS_SAMPLES:-60}" >"${OUT:-/dev/stdout}" <<'PY'
from bench_scim import bulk_users
import http.client, json, statistics, sys, time
port, sizes, pid = int(sys.argv[1]), [int(s) for s in sys.argv[2].split()], sys.argv[3]
H = {"Authorization": "Bearer t", "Content-Type": "application/scim+json"}
c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
def call(method, path, body=None):
    c.request(method, "/scim/v2" + path, None if body is None else json.dumps(body), H)
    r = c.getresponse(); data = r.read()
    return r.status, data
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
def patch(gid, *ops):
    s, d = call("PATCH", f"/Groups/{gid}", {"schemas": [PATCH], "Operations": list(ops)})
    assert s in (200, 204), (s, d[:300])
R = int(sys.argv[4]) if len(sys.argv) > 4 else 60
made = time.perf_counter()
need = max(sizes) + R
users = bulk_users(lambda b: call("POST", "/Bulk", b), need, "m")
made = time.perf_counter() - made
spares, rows, base, gids, grown = users[-R:], [], None, [], {}
# Every group is grown first; then the sizes alternate sample by sample (one
# spare added to and removed from each group in turn), so each size is
# measured with the same store, the same page cache and the same moment of
# a shared machine: what differs is the group's size alone.
for n in sizes:
    s, d = call("POST", "/Groups", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": f"g{n}"})
    assert s == 201, s
    gid = json.loads(d)["id"]
    t = time.perf_counter()
    for k in range(0, n, 5000):
        patch(gid, {"op": "add", "path": "members", "value": [{"value": u} for u in users[k:min(n, k + 5000)]]})
    grown[n] = time.perf_counter() - t
    gids.append((n, gid))
add = {n: [] for n in sizes}; remove = {n: [] for n in sizes}
for u in spares:
    for n, gid in gids:
        t = time.perf_counter(); patch(gid, {"op": "add", "path": "members", "value": [{"value": u}]}); add[n].append(time.perf_counter() - t)
        t = time.perf_counter(); patch(gid, {"op": "remove", "path": f'members[value eq "{u}"]'}); remove[n].append(time.perf_counter() - t)
for n in sizes:
    a, r = statistics.median(add[n]), statistics.median(remove[n])
    if base is None: base = (a, r)
    rows.append((n, grown[n], a, r))
def status(field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"): return int(line.split()[1]) // 1024
    return 0
# The whole group read back: streamed (chunked) above 1,000 members, so the
# agent's heap during the GET (anonymous RSS, sampled every 2 ms by a thread;
# the LMDB map's pages are file-backed and not counted) stays near its
# resting size whatever the group's size.
import threading
reads = []
for n, gid in gids:
    resting, peak, done = status("RssAnon"), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], status("RssAnon")); time.sleep(0.002)
    sampler = threading.Thread(target=sample); sampler.start()
    t = time.perf_counter(); s, d = call("GET", f"/Groups/{gid}"); t = time.perf_counter() - t
    done.set(); sampler.join()
    assert s == 200 and d.count(b'"value"') >= n, (s, len(d))
    peak = peak[0]
    t2 = time.perf_counter(); s2, d2 = call("GET", f"/Groups/{gid}?excludedAttributes=members"); t2 = time.perf_counter() - t2
    assert s2 == 200 and b'"members"' not in d2
    reads.append((n, t, len(d), max(0, peak - resting), t2))
rss = 0
for line in open(f"/proc/{pid}/status"):
    if line.startswith("RssAnon:"): rss = int(line.split()[1]) // 1024
print("## Group membership: one member at N vs at 100\n")
print("A release agent (standalone, durable commits) on one kept-alive connection: a group grown by")
print(f"PATCH in chunks of 5,000 to N members, then one member added (`path: members`, a value list) and")
print(f"removed (`members[value eq \"…\"]`) {R} times; median latency (the client included) and its ratio")
print("to the 100-member group's in the same run. Every group is grown first, then the sizes alternate sample by")
print("sample, so each is measured with the same store at the same moment. The 100-member PATCH answers 200 with")
print("the group, a group over 1,000 members 204 (docs/scim.md).\n")
print("| N members | growing it (5,000 per PATCH) | add one | ratio | remove one | ratio |")
print("|---:|---:|---:|---:|---:|---:|")
for n, g, a, r in rows:
    print(f"| {n:,} | {g:.1f} s | {a*1000:.2f} ms | **{a/base[0]:.2f}×** | {r*1000:.2f} ms | **{r/base[1]:.2f}×** |")
print(f"\n{len(users):,} users created first through /Bulk ({made:.0f} s); agent heap (anonymous RSS) at the end: {rss} MiB.")
print("Goal (issue 15): ≤ 2× the 100-member cost at 1,000,000 members.\n")
print("Reading the group back: `GET /Groups/{id}` (streamed with the chunked coding above 1,000 members),")
print("the agent's peak heap (anonymous RSS, sampled every 2 ms) during that GET above its heap just before, and")
print("`excludedAttributes=members` (never reads the members), against the 100-member group's.\n")
print("| N members | GET whole group | body | agent heap above resting | GET without members | ratio |")
print("|---:|---:|---:|---:|---:|---:|")
for n, t, size, extra, t2 in reads:
    print(f"| {n:,} | {t*1000:.0f} ms | {size/1e6:.1f} MB | {extra} MiB | {t2*1000:.2f} ms | **{t2/reads[0][4]:.2f}×** |")
PY
