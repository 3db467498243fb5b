#!/usr/bin/env python3
"""Round-trip latency of single API requests (new connection each, as the CLI does):
GET /v1/domains/NAME and GET /v1/domains. Prints p50 and p99 in ms."""
import socket, sys, time

sock_path, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def get(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.sendall(b"GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % path.encode())
    data = b""
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:100]

def measure(path):
    get(path)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        get(path)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99) - 1]

one = measure("/v1/domains/" + name)
all_ = measure("/v1/domains")
print("%.2f %.2f %.2f %.2f" % (one[0], one[1], all_[0], all_[1]))
