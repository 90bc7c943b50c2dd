#!/usr/bin/env python3
"""Watches a drain until it is done, at the same small cost for every kind of receiver (bench-downlink.sh).

  drain_watch.py metric PID PORT PREFIX EVENTS   the first line of http://127.0.0.1:PORT/metrics starting with PREFIX
                                                 (one kept-alive connection) counts up to EVENTS
  drain_watch.py file PID PATH MARKER            PATH (a file written in order) grows, and its last 4 KiB hold a line
                                                 starting with MARKER

Samples every 0.05 s, from one process: a drain's rate is not paid for by a process started per sample (curl, a status
command opening the store), which would take CPU from the receiver and not from RELP's. Prints
"start first end first-count": when it started, the first sample that saw anything, the first that saw it all, and what
that first sample counted (0 for a file). PID may list several (comma-separated: the receiver and the sender); exits 1
if any dies first, or after DRAIN_TIMEOUT seconds (default 900). DRAIN_START (Unix seconds, as `date +%s.%N` prints)
is the start to report: the caller's time just before it started the receiver, as RELP's drain takes it; without it,
this process's own start, which comes 20-50 ms after the receiver's (Python starting) and would flatter the rate.
"""

import http.client
import os
import sys
import time

INTERVAL = 0.05


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def metric_counter(port, prefix):
    conn = None

    def count():
        nonlocal conn
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/metrics")
            body = conn.getresponse().read().decode()
        except (OSError, http.client.HTTPException):
            # Not listening yet, or the connection closed: a new one next time.
            if conn is not None:
                conn.close()
            conn = None
            return 0
        for line in body.splitlines():
            if line.startswith(prefix):
                try:
                    return int(float(line.split()[-1]))
                except ValueError:
                    return 0
        return 0

    return count


def file_state(path, marker):
    def state():
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size == 0:
                    return 0, False
                f.seek(max(0, size - 4096))
                tail = f.read()
        except OSError:
            return 0, False
        return size, any(line.startswith(marker) for line in tail.split(b"\n"))

    return state


def main():
    kind, pids = sys.argv[1], [int(p) for p in sys.argv[2].split(",")]
    try:
        start = float(os.environ.get("DRAIN_START") or time.time())
    except ValueError:
        print(f"DRAIN_START must be Unix seconds (date +%s.%N), not {os.environ['DRAIN_START']!r}", file=sys.stderr)
        return 2
    deadline = time.time() + float(os.environ.get("DRAIN_TIMEOUT", "900"))
    first, first_count = None, 0
    if kind == "metric":
        port, prefix, events = int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        count = metric_counter(port, prefix)

        def sample():
            n = count()
            return n, n >= events

    else:
        sample = file_state(sys.argv[3], sys.argv[4].encode())
    while True:
        time.sleep(INTERVAL)
        n, done = sample()
        now = time.time()
        if first is None and n > 0:
            first, first_count = now, (n if kind == "metric" else 0)
        if done:
            print(f"{start:.6f} {first or now:.6f} {now:.6f} {first_count}")
            return 0
        dead = [p for p in pids if not alive(p)]
        if dead:
            print(f"pid {dead[0]} died before the drain was done", file=sys.stderr)
            return 1
        if now > deadline:
            print(f"the drain was not done after {now - start:.0f} s (last count {n})", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
