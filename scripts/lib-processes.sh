# Sourced by the benchmark scripts: a scratch directory ($work), background
# processes to stop on exit (append their pids to $pids), and free_port.
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# release_federation [DOMAIN...]: release builds of the agent, the broker and the fixture (under $SWIFT_BUILD_LOCK
# when set), $bin, and the fixture's PKI in $work (a CA, the broker's certificate, and an agent certificate
# $work/DOMAIN.{crt,key} with the identity spiffe://bench/DOMAIN/agent for each domain; "de" when none is named).
release_federation() {
  for p in scim-edge scim-broker edge-fixture; do
    ${SWIFT_BUILD_LOCK:+flock "$SWIFT_BUILD_LOCK"} swift build -c release --product "$p" >/dev/null
  done
  bin=.build/release
  "$bin/edge-fixture" pki "$work" "${@:-de}" >/dev/null
}
# start_relay_agent NAME PORT ADMIN BROKER-PORT [FLAG...]: a release agent of domain "de" (edge-fixture pki
# certificates in $work) relaying to the broker; sets $agent and appends it to $pids.
start_relay_agent() {
  local name=$1 port=$2 admin=$3 broker_port=$4; shift 4
  "$bin/scim-edge" serve --data-dir "$work/$name" --listen "127.0.0.1:$port" --token t --admin-listen "$admin" \
    --broker "https://127.0.0.1:$broker_port" --ca "$work/ca.crt" --cert "$work/de.crt" --key "$work/de.key" --domain de \
    "$@" >"$work/$name.log" 2>&1 &
  agent=$!; pids+=($agent)
}
# track_anon PID NAME: records the peak anonymous RSS (heap and stacks, MiB) of PID in $work/NAME.anon while it
# runs; peak_anon NAME prints it. LMDB's mapped file pages are page cache, not counted here (see docs/benchmarks.md).
track_anon() {
  ( peak=0; while kill -0 "$1" 2>/dev/null; do
      a=$(awk '$1=="RssAnon:" {print int($2/1024)}' "/proc/$1/status" 2>/dev/null || echo 0)
      if [ "${a:-0}" -gt "$peak" ]; then peak=$a; echo "$peak" >"$work/$2.anon"; fi
      sleep 0.2
    done ) &
  pids+=($!)
}
peak_anon() { cat "$work/$1.anon" 2>/dev/null || echo 0; }
# rss PID FIELD: a /proc/PID/status field in MiB (VmHWM: peak resident, LMDB's mapped pages included).
rss() { awk -v k="$2" '$1==k":" {print int($2/1024)}' "/proc/$1/status"; }
# boundary_broker_config FILE DATA-DIR PORT ADMIN-PORT: a broker configuration for the downlink benchmarks (edge-fixture
# pki certificates in $work for domains "de" and "us"): target us-boundary is boundary "us", taking de's users.
boundary_broker_config() {
  cat >"$1" <<YAML
dataDir: $2
listen: 127.0.0.1:$3
tls: {ca: $work/ca.crt, cert: $work/broker.crt, key: $work/broker.key}
domains:
  de: spiffe://bench/de/agent
  us: spiffe://bench/us/agent
admin: {listen: "127.0.0.1:$4"}
targets:
  - name: us-boundary
    domain: us
    routes:
      - domains: [de]
        types: [User]
YAML
}
# start_boundary_agent NAME ADMIN-PORT BROKER-PORT [YAML]: boundary "us"'s agent (data in $work/NAME), fetching its feed
# from the broker and taking de's users as guests named user@de, 1,000 events a poll; YAML is appended to its
# configuration (its local `targets:`); sets $us and appends it to $pids.
start_boundary_agent() {
  cat >"$work/$1.yaml" <<YAML
dataDir: $work/$1
listen: 127.0.0.1:0
admin: {listen: "127.0.0.1:$2"}
broker: {url: "https://127.0.0.1:$3", ca: $work/ca.crt, cert: $work/us.crt, key: $work/us.key, domain: us, agent: $1}
inbound:
  accept:
    - domains: [de]
      types: [User]
  map:
    set: {userType: Guest}
    userName: "{userName}@{domain}"
  maxEventsPerPoll: 1000
${4:-}
YAML
  "$bin/scim-edge" serve --config "$work/$1.yaml" --token t >"$work/$1.log" 2>&1 &
  us=$!; pids+=($us)
}
