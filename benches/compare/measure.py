#!/usr/bin/env python3
"""Turns one row's raw load-generator output (one round) into a JSON summary.

benches/compare.sh runs the load and leaves, per round and row, a directory with:

    throughput.txt        wrk (HTTP/1.1) or h2load (h2c) output of the closed-loop run
    cpu.before cpu.after  utime+stime clock ticks of the proxy's processes around that run
    lat-<rate>/<n>.log    h2load --log-file of open-loop client n at a fixed rate
    lat-<rate>/<n>.txt    its stdout (request and status counts)

`measure.py row DIR` prints the summary as one JSON object. Standard library only.

Open-loop latency and coordinated omission
------------------------------------------
Each open-loop client is its own h2load process with one connection at 100 requests/s (h2load
ticks its rate timer at most every 10 ms, so 100/s is the highest rate it sends without bursts);
N = rate / 100 of them run at once, started one after another so their phases spread. h2load sends
request j of a client at s_0 + j * 10 ms, and when the previous response is late it sends the
pending request as soon as that response ends, but times it from that late start: the wait is
lost (coordinated omission). With one client per log we know the schedule, so each latency gets
back the time its send was held up by the server under test:

    corrected_j = duration_j + max(0, min(start_j, end_{j-1}) - (s_0 + j * interval))

Lateness of the load generator itself (start_j later than planned while the previous response had
already ended) is not counted: it is not the server's doing.
"""

import json
import math
import os
import re
import sys

CLIENT_RPS = 100
INTERVAL_US = 1_000_000 / CLIENT_RPS
# The first half second of every open-loop client is warm-up (connection set-up, process start).
WARMUP_REQUESTS = CLIENT_RPS // 2


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def parse_wrk(text):
    out = {"tool": "wrk"}
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", text)
    if m:
        out["requests"] = int(m.group(1))
        seconds = float(m.group(2)) * (60 if m.group(3) == "m" else 1)
        out["seconds"] = seconds
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    out["socket_errors_detail"] = m.group(0) if m else ""
    return out


def parse_h2load(text):
    out = {"tool": "h2load"}
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    if m:
        out["seconds"] = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        out["rps"] = float(m.group(3))
    else:
        out["rps"] = None
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", text)
    if m:
        total, started, done, succeeded, failed, errored, timeout = map(int, m.groups())
        out["requests"] = done
        out["failed"] = failed
        out["socket_errors"] = errored + timeout
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    out["non_2xx"] = sum(int(g) for g in m.groups()[1:]) if m else 0
    return out


def read_ticks(path):
    try:
        text = open(path).read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def client_latencies(log_path):
    """CO-corrected latencies (µs) of one client's answered requests after warm-up, and the
    client's measured span in seconds."""
    rows = []
    with open(log_path) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3:
                rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    rows.sort()
    if len(rows) <= WARMUP_REQUESTS:
        return [], None
    s0 = rows[0][0]
    latencies = []
    prev_end = None
    for j, (start, status, duration) in enumerate(rows):
        planned = s0 + j * INTERVAL_US
        held = 0 if prev_end is None else max(0, min(start, prev_end) - planned)
        prev_end = start + duration
        if j >= WARMUP_REQUESTS and status >= 0:
            latencies.append(duration + held)
    span = (rows[-1][0] - rows[WARMUP_REQUESTS][0]) / 1e6 + 1 / CLIENT_RPS
    return latencies, span


def open_loop_summary(directory, rate):
    """Pools the clients of one fixed-rate run. Error counts cover the whole run (h2load's own
    counters: `failed` = not 2xx/3xx or no answer), latencies only the measured part."""
    latencies, spans = [], []
    clients, failed, non_2xx, errors = 0, 0, 0, 0
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".log"):
            continue
        clients += 1
        lat, span = client_latencies(os.path.join(directory, name))
        latencies += lat
        if span:
            spans.append(span)
        stdout = os.path.join(directory, name[:-4] + ".txt")
        parsed = parse_h2load(open(stdout).read()) if os.path.exists(stdout) else {}
        if "requests" not in parsed:
            errors += 1  # the client did not finish: count it as at least one error
        failed += parsed.get("failed", 0)
        non_2xx += parsed.get("non_2xx", 0)
        errors += parsed.get("socket_errors", 0)
    latencies.sort()
    # Clients run side by side, so the pooled rate is the sum of the clients' rates.
    achieved = sum(1 for _ in latencies) / (sum(spans) / len(spans)) if spans else None
    ms = lambda us: None if us is None else round(us / 1000, 3)
    return {
        "rate": rate,
        "clients": clients,
        "samples": len(latencies),
        "achieved_rps": round(achieved, 1) if achieved else None,
        "p50_ms": ms(percentile(latencies, 50)),
        "p90_ms": ms(percentile(latencies, 90)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(latencies[-1] if latencies else None),
        "failed": failed,
        "non_2xx": non_2xx,
        "socket_errors": errors,
    }


def row_summary(directory):
    summary = {}
    throughput = os.path.join(directory, "throughput.txt")
    if os.path.exists(throughput):
        text = open(throughput).read()
        parsed = parse_wrk(text) if "Requests/sec" in text or "requests in" in text else parse_h2load(text)
        summary["throughput"] = parsed
        before = read_ticks(os.path.join(directory, "cpu.before"))
        after = read_ticks(os.path.join(directory, "cpu.after"))
        requests = parsed.get("requests")
        if before is not None and after is not None and requests:
            seconds = (after - before) / os.sysconf("SC_CLK_TCK")
            summary["cpu_seconds"] = round(seconds, 3)
            summary["cpu_us_per_request"] = round(seconds / requests * 1e6, 2)
    summary["latency"] = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("lat-") and os.path.isdir(os.path.join(directory, name)):
            rate = int(name[4:])
            summary["latency"][str(rate)] = open_loop_summary(os.path.join(directory, name), rate)
    return summary


def main(argv):
    if len(argv) == 3 and argv[1] == "row":
        json.dump(row_summary(argv[2]), sys.stdout)
        print()
        return 0
    print("usage: measure.py row DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
