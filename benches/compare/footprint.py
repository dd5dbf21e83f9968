#!/usr/bin/env python3
"""Pillion's footprint: time from exec to `/ready`, idle RSS, and RSS with 1,000 client connections.

    footprint.py --admin 127.0.0.1:PORT --listener 127.0.0.1:PORT [--starts 5] [--conns 1000]
                 [--cpu N] --log FILE -- pillion-proxy [args]

The proxy's configuration comes from the environment (PILLION_*), as in a pod. Prints one JSON
object. Standard library only.

- exec → ready: the clock starts just before the fork/exec and stops when `GET /ready` first
  answers 200 (polled every 0.5 ms); the median of `--starts` fresh starts.
- idle RSS: VmRSS one second after the last start became ready, no traffic yet.
- 1,000 connections, no request: connections accepted and waiting in protocol detection (measured
  one second later, well inside the 10 s detect timeout).
- 1,000 keep-alive connections: the same connections after one HTTP/1.1 request each, the
  responses read and the connections left open, which is a sidecar's steady state with an app
  that keeps a connection pool (each such connection also holds its upstream connection).
"""

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time


def address(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def ready_status(admin):
    """The HTTP status of GET /ready, or None while nothing listens."""
    try:
        with socket.create_connection(admin, timeout=1) as s:
            s.sendall(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            head = s.recv(64)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def start(cmd, log, cpu):
    preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    return subprocess.Popen(cmd, stdout=log, stderr=log, preexec_fn=preexec)


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def time_to_ready(cmd, admin, log, cpu, limit=10.0):
    """Starts the proxy; returns (process, seconds from exec to the first 200 from /ready)."""
    t0 = time.perf_counter()
    proc = start(cmd, log, cpu)
    while time.perf_counter() - t0 < limit:
        if ready_status(admin) == 200:
            return proc, time.perf_counter() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode} before it was ready")
        time.sleep(0.0005)
    stop(proc)
    raise RuntimeError(f"proxy not ready after {limit:.0f} s")


def open_connections(listener, count):
    conns = []
    for _ in range(count):
        s = socket.create_connection(listener, timeout=5)
        conns.append(s)
    return conns


def one_request_each(conns):
    """Sends one keep-alive GET on every connection, then reads every response whole."""
    request = b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n"
    for s in conns:
        s.sendall(request)
    ok = 0
    for s in conns:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = s.recv(4096)
            if not chunk:
                break
            body += chunk
        if head.startswith(b"HTTP/1.1 200"):
            ok += 1
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin", type=address, required=True)
    parser.add_argument("--listener", type=address, required=True)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--cpu", type=int, default=None, help="pin the proxy to this CPU")
    parser.add_argument("--log", required=True, help="the proxy's stdout/stderr")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd

    # 1,000 client sockets here, and as many again plus upstream sockets in the proxy (inherited).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    result = {"starts": args.starts, "conns": args.conns}
    with open(args.log, "ab") as log:
        times = []
        proc = None
        for i in range(args.starts):
            proc, seconds = time_to_ready(cmd, args.admin, log, args.cpu)
            times.append(seconds * 1000)
            if i + 1 < args.starts:
                stop(proc)
        result["ready_ms_all"] = [round(t, 2) for t in times]
        result["ready_ms"] = round(statistics.median(times), 2)
        try:
            time.sleep(1)
            result["idle_rss_kb"] = status_kb(proc.pid, "VmRSS")
            conns = open_connections(args.listener, args.conns)
            time.sleep(1)
            result["conns_open_rss_kb"] = status_kb(proc.pid, "VmRSS")
            result["keepalive_ok"] = one_request_each(conns)
            time.sleep(0.5)
            result["keepalive_rss_kb"] = status_kb(proc.pid, "VmRSS")
            result["hwm_kb"] = status_kb(proc.pid, "VmHWM")
            for s in conns:
                s.close()
            result["exited_early"] = proc.poll() is not None
        finally:
            stop(proc)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
