#!/usr/bin/env python3
"""Defines COUNT domains through rvirtd's API from THREADS parallel clients (one HTTP/1.1
request per connection over the unix socket) and prints the rate in domains/s."""
import json, socket, sys, threading, time

sock_path, count, threads, kernel, disk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]

def xml(name):
    return ("<domain type='kvm'><name>%s</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type>hvm</type><kernel>%s</kernel></os><devices><disk type='file'>"
            "<source file='%s'/><target dev='vda' bus='virtio'/></disk></devices></domain>") % (name, kernel, disk)

bodies = [json.dumps({"xml": xml("api%d" % i)}).encode() for i in range(count)]
failures = []

def post(body):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.sendall(b"POST /v1/domains HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    if not data.startswith(b"HTTP/1.1 200"):
        failures.append(data[:200])

def worker(k):
    for i in range(k, count, threads):
        post(bodies[i])

t0 = time.monotonic()
ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
dt = time.monotonic() - t0
if failures:
    print("failures: %d, first: %r" % (len(failures), failures[0]), file=sys.stderr)
    sys.exit(1)
print("%.0f" % (count / dt))
