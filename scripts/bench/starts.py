"""Times container starts until the first successful HTTP response, for several
ways of starting the same container. They take turns, in a shuffled order each
round, so that neither drift of a shared machine nor the aftermath of the previous
trial (another tool's cleanup) favours one way.

    starts.py N PORT VARIANTS.json

VARIANTS.json is a list of {"name": ..., "start": [argv...], "stop": "shell command"};
a start of ["POST", URL, JSON] sends that one request from this process instead of
running a command (the daemon's own path, without a client process).

Prints "NAME MILLISECONDS" per trial.
"""
import json
import random
import socket
import subprocess
import sys
import time
import urllib.request


def http_ok(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def start(argv):
    if argv[0] == "POST":
        req = urllib.request.Request(argv[1], data=argv[2].encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req).read()
    else:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def trial(variant, port):
    t0 = time.perf_counter()
    start(variant["start"])
    deadline = t0 + 30
    while not http_ok(port):
        if time.perf_counter() > deadline:
            sys.exit(f"{variant['name']}: no answer on port {port} within 30 s")
        time.sleep(0.0005)
    ms = (time.perf_counter() - t0) * 1000
    subprocess.run(variant["stop"], shell=True, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The port must be free again before the next trial.
    deadline = time.perf_counter() + 30
    while http_ok(port):
        if time.perf_counter() > deadline:
            sys.exit(f"{variant['name']}: still answering on port {port} after stop")
        time.sleep(0.005)
    return ms


n, port = int(sys.argv[1]), int(sys.argv[2])
variants = json.load(open(sys.argv[3]))
rng = random.Random(42)
for _ in range(n):
    rng.shuffle(variants)
    for v in variants:
        print(f"{v['name']} {trial(v, port):.1f}", flush=True)
