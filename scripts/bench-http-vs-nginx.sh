#!/usr/bin/env bash
# HTTP/1.1 keep-alive request rate of EdgeHTTP vs nginx, same machine, same
# client (wrk), same certificate, same tiny response, measured in one run.
# Writes the table to docs/bench-http.md and prints it.
#
#   DURATION=5 CONNECTIONS=16 bash scripts/bench-http-vs-nginx.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-16}
FIXTURE=${FIXTURE:-.build/release/edge-fixture}
OUT=${OUT:-docs/bench-http.md}
[ -x "$FIXTURE" ] || { echo "build first: swift build -c release --product edge-fixture" >&2; exit 1; }

. scripts/lib-processes.sh

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

start_nginx() { # $1 = workers, $2 = plain port, $3 = tls port, $4 = name
  mkdir -p "$work/$4"
  cat >"$work/$4/nginx.conf" <<EOF
worker_processes $1;
pid $work/$4/nginx.pid;
error_log $work/$4/error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  client_body_temp_path $work/$4;
  server {
    listen 127.0.0.1:$2;
    listen 127.0.0.1:$3 ssl;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.3;
    location / { default_type text/plain; return 200 "ok\n"; }
  }
}
EOF
  nginx -c "$work/$4/nginx.conf" -p "$work/$4" &
  pids+=($!)
}

rate() { # $1 = url → requests/s
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$1" >"$work/wrk.txt" 2>&1 || true
  awk '/Requests\/sec:/ {print $2}' "$work/wrk.txt"
}
p99() { awk '$1=="99%" {print $2}' "$work/wrk.txt"; }

n1p=$(free_port); n1t=$(free_port); n2p=$(free_port); n2t=$(free_port); ep=$(free_port); et=$(free_port)
start_nginx 1 "$n1p" "$n1t" nginx1
start_nginx auto "$n2p" "$n2t" nginx2
"$FIXTURE" http-serve --port "$ep" >/dev/null & pids+=($!)
"$FIXTURE" http-serve --port "$et" --cert "$work/cert.pem" --key "$work/key.pem" >/dev/null & pids+=($!)
sleep 1
rss_of() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

declare -A R L
for name in edge-plain:"http://127.0.0.1:$ep/" nginx1-plain:"http://127.0.0.1:$n1p/" nginx2-plain:"http://127.0.0.1:$n2p/" \
            edge-tls:"https://127.0.0.1:$et/" nginx1-tls:"https://127.0.0.1:$n1t/" nginx2-tls:"https://127.0.0.1:$n2t/"; do
  key=${name%%:*}; url=${name#*:}
  R[$key]=$(rate "$url"); L[$key]=$(p99)
done
edge_rss=$(rss_of "${pids[-1]}")

ratio() { python3 -c "print(f'{float($1)/float($2):.2f}')" ; }
{
  echo "### HTTP/1.1 keep-alive, ${CONNECTIONS} connections, wrk -t1, ${DURATION}s each ($(date -u +%Y-%m-%d), $(nproc) cores)"
  echo
  echo "| server | plain req/s | TLS 1.3 req/s | p99 plain | p99 TLS | TLS ratio vs nginx (1 worker) |"
  echo "|---|---:|---:|---:|---:|---:|"
  echo "| EdgeHTTP (edge-fixture, 1 loop thread) | ${R[edge-plain]} | ${R[edge-tls]} | ${L[edge-plain]} | ${L[edge-tls]} | $(ratio "${R[edge-tls]}" "${R[nginx1-tls]}") |"
  echo "| nginx 1 worker | ${R[nginx1-plain]} | ${R[nginx1-tls]} | ${L[nginx1-plain]} | ${L[nginx1-tls]} | 1.00 |"
  echo "| nginx auto workers | ${R[nginx2-plain]} | ${R[nginx2-tls]} | ${L[nginx2-plain]} | ${L[nginx2-tls]} | $(ratio "${R[nginx2-tls]}" "${R[nginx1-tls]}") |"
  echo
  echo "EdgeHTTP plain vs nginx 1 worker: $(ratio "${R[edge-plain]}" "${R[nginx1-plain]}"); TLS vs nginx auto workers: $(ratio "${R[edge-tls]}" "${R[nginx2-tls]}")."
  echo "EdgeHTTP TLS server RSS after the run: ${edge_rss} KiB. Target: TLS ≥ 0.50 of nginx."
} | tee "$OUT"
