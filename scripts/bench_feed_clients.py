#!/usr/bin/env python3
"""Simulated boundary agents for scripts/bench-boundaries.sh: one thread per
destination polls the broker's downlink (POST /federation/v1/feed) over mutual
TLS with that destination's own certificate, acknowledging each answer (with
its outcomes, downlink protocol 2, as a real agent does) in the next poll. It
stores nothing: the broker's cost is what is measured.

usage: bench_feed_clients.py PORT CA CERTDIR DOMAIN... --status FILE --out FILE

Every 0.2 s FILE (status) holds {domain: events received}. On SIGTERM the
feed latencies (from the source agent's acceptance, `ts`, to the receipt
here, in ms) go to --out as JSON, with the counts.
"""
import argparse
import http.client
import json
import os
import signal
import ssl
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("port", type=int)
parser.add_argument("ca")
parser.add_argument("certdir")
parser.add_argument("domains", nargs="+")
parser.add_argument("--status", required=True)
parser.add_argument("--out", required=True)
a = parser.parse_args()
port, ca, certdir, domains, status_file, out_file = a.port, a.ca, a.certdir, a.domains, a.status, a.out

stop = threading.Event()
received = {d: 0 for d in domains}
latencies = {d: [] for d in domains}
errors = {d: 0 for d in domains}


def client(domain):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(f"{certdir}/{domain}.crt", f"{certdir}/{domain}.key")
    epoch = os.urandom(16).hex()
    acked, report, conn = 0, None, None
    while not stop.is_set():
        try:
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=40)
            body = {"ackedThrough": acked, "maxEvents": 1000, "timeoutMs": 25000, "epoch": epoch}
            if report:
                body["outcomes"] = report
            conn.request("POST", "/federation/v1/feed", json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                errors[domain] += 1
                if r.status == 503 and b"resync" in data:
                    acked, report = 0, None
                time.sleep(float(r.getheader("Retry-After", "1")))
                continue
            events = json.loads(data)["events"]
            now = time.time() * 1000
            if not events:
                continue
            for e in events:
                if e["seq"] <= acked:
                    continue
                if e.get("ts"):
                    latencies[domain].append(now - e["ts"])
                received[domain] += 1
            first = acked + 1
            acked = max(acked, events[-1]["seq"])
            # Committed at once (nothing stored): every event accepted.
            report = {"from": first, "through": acked, "committed": int(time.time() * 1000)}
        except (OSError, http.client.HTTPException, ValueError):
            errors[domain] += 1
            conn = None
            time.sleep(0.2)


def finish(*_):
    stop.set()


signal.signal(signal.SIGTERM, finish)
threads = [threading.Thread(target=client, args=(d,), daemon=True) for d in domains]
for t in threads:
    t.start()
while not stop.is_set():
    with open(status_file + ".tmp", "w") as f:
        json.dump(received, f)
    os.replace(status_file + ".tmp", status_file)
    stop.wait(0.2)
with open(out_file, "w") as f:
    json.dump({"received": received, "errors": errors, "latencies": latencies}, f)
