#!/usr/bin/env bash
# The agent's SCIM endpoint under load: POST /Users with durable
# commit, GET by id, and filter=userName eq over a store of USERS users,
# 16 keep-alive connections on loopback, with nginx (a static response of
# the same size) and the reference scim2-server (PyPI) measured in the same
# run. Writes docs/bench-agent.md (OUT) and prints it. The agent uses every
# core (workers: auto); nginx runs with one worker and with auto, and each
# ratio uses the faster.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-16}
USERS=${USERS:-100000}
OUT=${OUT:-docs/bench-agent.md}
swift build -c release --product scim-edge >/dev/null
AGENT=.build/release/scim-edge
bash scripts/venv.sh

. scripts/lib-processes.sh
TOKEN=benchtoken

# wrk scripts: unique userNames per thread and request; lookups of users that exist.
cat >"$work/post.lua" <<'EOF'
local counter, tid = 0, 0
local threads = {}
function setup(thread) thread:set("tid", #threads); table.insert(threads, thread) end
function init(args) tid = tonumber(wrk.thread:get("tid")) or 0; prefix = args[1] or "u" end
request = function()
  counter = counter + 1
  local body = '{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"' .. prefix .. tid .. '-' .. counter ..
    '","name":{"givenName":"Bench","familyName":"User"},"emails":[{"value":"u' .. counter .. '@example.com","type":"work","primary":true}],"active":true}'
  return wrk.format("POST", nil, nil, body)
end
EOF
cat >"$work/filter.lua" <<'EOF'
math.randomseed(os.time())
request = function()
  local n = math.random(2, tonumber(os.getenv("LOADED") or "1000"))
  return wrk.format("GET", os.getenv("FILTER_PATH") .. "?filter=userName%20eq%20%22load1-0-" .. n .. "%22")
end
EOF
cat >"$work/paced.lua" <<'EOF'
-- Paces each connection so the whole run offers about RATE requests/s.
local rate = tonumber(os.getenv("RATE") or "1000")
local conns = tonumber(os.getenv("CONNS") or "16")
function delay() return conns * 1000 / rate end
EOF
cat "$work/post.lua" "$work/paced.lua" >"$work/post-paced.lua"

# The three servers.
ap=$(free_port); np=$(free_port); sp=$(free_port)
"$AGENT" serve --data-dir "$work/agent" --listen "127.0.0.1:$ap" --token "$TOKEN" --admin-listen none >"$work/agent.log" 2>&1 &
agent_pid=$!; pids+=($agent_pid)
body='{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"id":"2819c223-7f76-453a-919d-413861904646","userName":"bjensen","name":{"givenName":"Barbara","familyName":"Jensen"},"emails":[{"value":"bjensen@example.com","type":"work","primary":true}],"active":true,"meta":{"resourceType":"User","version":"W/\"1\""}}'
# nginx twice: one worker, and one per CPU (worker_processes auto). Each
# request type is compared with the faster of the two (with wrk on the same
# 2 cores, more nginx workers can be slower).
np1=$(free_port)
for variant in 1 auto; do
  port=$np; [ "$variant" = 1 ] && port=$np1
  mkdir -p "$work/nginx-$variant"
  cat >"$work/nginx-$variant/nginx.conf" <<EOF
worker_processes $variant;
pid $work/nginx-$variant/nginx.pid;
error_log $work/nginx-$variant/error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path $work/nginx-$variant;
  server {
    listen 127.0.0.1:$port;
    location / { default_type application/scim+json; return 200 '$body'; }
  }
}
EOF
  nginx -c "$work/nginx-$variant/nginx.conf" -p "$work/nginx-$variant" & pids+=($!)
done
.venv/bin/scim2-server --port "$sp" --bearer-token "$TOKEN" >"$work/s2s.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do grep -q listening "$work/agent.log" && break; sleep 0.1; done
sleep 1

H="Authorization: Bearer $TOKEN"
CT="Content-Type: application/scim+json"
run() { # label url [extra wrk args...] → "rate p50 p99"
  local label=$1 url=$2; shift 2
  # The URL goes before "$@": script arguments follow a "--".
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "$H" -H "$CT" "$url" "$@" >"$work/$label.txt" 2>&1 || true
  local rate p50 p99
  rate=$(awk '/Requests\/sec:/ {print $2}' "$work/$label.txt")
  p50=$(awk '$1=="50%" {print $2}' "$work/$label.txt")
  p99=$(awk '$1=="99%" {print $2}' "$work/$label.txt")
  local non2xx
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/$label.txt")
  echo "${rate:-0} ${p50:--} ${p99:--} ${non2xx:-0}"
}

# Load USERS users into the agent (durable POSTs), then measure. Each loading
# run has its own name prefix (loadR-); the first run's names (load1-0-N,
# N = 1...first) are the ones the filter benchmark looks up.
count_users() { "$AGENT" status --data-dir "$work/agent" | awk '/^resources/ {print $2}'; }
loaded=0; first=0; round=0
while [ "$loaded" -lt "$USERS" ]; do
  round=$((round + 1))
  wrk -t1 -c"$CONNECTIONS" -d5s -H "$H" -H "$CT" -s "$work/post.lua" "http://127.0.0.1:$ap/scim/v2/Users" -- "load$round-" >/dev/null 2>&1 || true
  loaded=$(count_users)
  [ "$first" -gt 0 ] || first=$loaded
  [ "$loaded" -gt 0 ] || { echo "loading users failed" >&2; exit 1; }
done
# wrk builds one request before the run and drops it: load1-0-1 was never sent.
id=$(curl -s -H "$H" "http://127.0.0.1:$ap/scim/v2/Users?filter=userName%20eq%20%22load1-0-2%22" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Resources"][0]["id"])')
sid=$(curl -s -H "$H" -H "$CT" -X POST "http://127.0.0.1:$sp/v2/Users" -d '{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"load0-1"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

read -r a_post a_post50 a_post99 a_post_bad <<<"$(run agent-post "http://127.0.0.1:$ap/scim/v2/Users" -s "$work/post.lua" -- bench)"
read -r n_post n_post50 n_post99 _ <<<"$(run nginx-post "http://127.0.0.1:$np/Users" -s "$work/post.lua" -- bench)"
read -r n1_post _ _ _ <<<"$(run nginx1-post "http://127.0.0.1:$np1/Users" -s "$work/post.lua" -- bench)"
read -r s_post s_post50 s_post99 _ <<<"$(run s2s-post "http://127.0.0.1:$sp/v2/Users" -s "$work/post.lua" -- bench)"
read -r a_get a_get50 a_get99 _ <<<"$(run agent-get "http://127.0.0.1:$ap/scim/v2/Users/$id")"
read -r n_get n_get50 n_get99 _ <<<"$(run nginx-get "http://127.0.0.1:$np/Users/$id")"
read -r n1_get _ _ _ <<<"$(run nginx1-get "http://127.0.0.1:$np1/Users/$id")"
# The reference: the faster nginx for each request type.
n_post_auto=$n_post n_get_auto=$n_get
n_post=$(python3 -c "print(max(float('$n_post'), float('$n1_post')))")
n_get=$(python3 -c "print(max(float('$n_get'), float('$n1_get')))")
read -r s_get s_get50 s_get99 _ <<<"$(run s2s-get "http://127.0.0.1:$sp/v2/Users/$sid")"
read -r a_flt a_flt50 a_flt99 a_flt_bad <<<"$(LOADED=$first FILTER_PATH=/scim/v2/Users run agent-filter "http://127.0.0.1:$ap" -s "$work/filter.lua")"
half=$(python3 -c "print(max(1, int(float('$a_post') / 2)))")
read -r a_half a_half50 a_half99 _ <<<"$(RATE=$half CONNS=$CONNECTIONS run agent-post-half "http://127.0.0.1:$ap/scim/v2/Users" -s "$work/post-paced.lua" -- half)"
rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$agent_pid/status")
anon_kib=$(awk '/RssAnon/ {print $2}' "/proc/$agent_pid/status")

ratio() { python3 -c "print(f'{float(\"$1\")/max(float(\"$2\"),1e-9):.2f}')"; }
{
  echo "### Agent SCIM endpoint, $CONNECTIONS keep-alive connections, wrk -t1, ${DURATION}s each ($(date -u +%Y-%m-%d), $(nproc) cores)"
  echo
  echo "Store: $loaded users. POST bodies ~300 bytes with unique userNames; every 201 followed a durable LMDB commit."
  echo "The agent uses one serving loop per CPU (workers: auto). nginx was measured with worker_processes 1"
  echo "(POST $n1_post, GET $n1_get req/s) and auto (POST $n_post_auto, GET $n_get_auto req/s); the table compares with the faster."
  echo
  echo "| request | scim-edge req/s | p50 | p99 | nginx req/s | scim2-server req/s | vs nginx | vs scim2-server |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  echo "| POST /Users (durable) | $a_post | $a_post50 | $a_post99 | $n_post | $s_post | $(ratio "$a_post" "$n_post") | $(ratio "$a_post" "$s_post") |"
  echo "| GET /Users/{id} | $a_get | $a_get50 | $a_get99 | $n_get | $s_get | $(ratio "$a_get" "$n_get") | $(ratio "$a_get" "$s_get") |"
  echo "| GET /Users?filter=userName eq … (index) | $a_flt | $a_flt50 | $a_flt99 | | | | |"
  echo
  echo "POST paced at half the peak rate (~$half req/s, wrk think-time pacing): p50 $a_half50, p99 $a_half99 (target p99 < 10 ms)."
  echo "Agent memory after the run: peak RSS (VmHWM) $((rss_kib / 1024)) MiB, of which LMDB's file-backed map pages are most; anonymous (heap) RSS $((anon_kib / 1024)) MiB (target ≤ 64 MB)."
  echo "Non-2xx answers: ${a_post_bad} to the measured POSTs, ${a_flt_bad} to the filters."
  echo "Targets: POST ≥ 0.25× nginx and ≥ 30× scim2-server; GET ≥ 0.50× nginx."
} | tee "$OUT"
