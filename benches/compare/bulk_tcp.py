"""Bulk opaque-TCP throughput: 2 GiB through a proxy listener vs straight to a sink, on loopback.

Usage (a proxy forwarding its outbound listener to the sink as opaque TCP):
    PILLION_OUTBOUND_TARGET=127.0.0.1:19500 PILLION_OPAQUE_PORTS=19500 target/release/pillion-proxy &
    python3 benches/compare/bulk_tcp.py [proxy_port=4140]
"""
import socket
import sys
import threading
import time

SINK_PORT = 19500
TOTAL = 2 * 1024**3


def sink():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", SINK_PORT))
    listener.listen(8)
    while True:
        conn, _ = listener.accept()
        view = memoryview(bytearray(1 << 20))
        while conn.recv_into(view):
            pass
        conn.close()


def gbit_per_s(port):
    conn = socket.create_connection(("127.0.0.1", port))
    chunk = b"\0" * (1 << 20)
    sent, start = 0, time.time()
    while sent < TOTAL:
        conn.sendall(chunk)
        sent += len(chunk)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
    conn.close()
    return TOTAL * 8 / (time.time() - start) / 1e9


def main():
    proxy_port = int(sys.argv[1]) if len(sys.argv) > 1 else 4140
    threading.Thread(target=sink, daemon=True).start()
    time.sleep(0.3)
    for _ in range(3):
        print(f"direct {gbit_per_s(SINK_PORT):.1f} Gbit/s   through the proxy {gbit_per_s(proxy_port):.1f} Gbit/s")


if __name__ == "__main__":
    main()
