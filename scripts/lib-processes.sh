# Sourced by the benchmark scripts: a scratch directory ($work), background
# processes to stop on exit (append their pids to $pids), and free_port.
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# start_relay_agent NAME PORT ADMIN BROKER-PORT [FLAG...]: a release agent of domain "de" (edge-fixture pki
# certificates in $work) relaying to the broker; sets $agent and appends it to $pids.
start_relay_agent() {
  local name=$1 port=$2 admin=$3 broker_port=$4; shift 4
  "$bin/scim-edge" serve --data-dir "$work/$name" --listen "127.0.0.1:$port" --token t --admin-listen "$admin" \
    --broker "https://127.0.0.1:$broker_port" --ca "$work/ca.crt" --cert "$work/de.crt" --key "$work/de.key" --domain de \
    "$@" >"$work/$name.log" 2>&1 &
  agent=$!; pids+=($agent)
}
