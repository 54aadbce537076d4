"""Times N sequential container starts until the first successful HTTP response.

    starts.py N PORT -- START_CMD...   (START_CMD may contain {i} for the trial number;
                                        `POST URL JSON` sends one request instead)
    with STOP_CMD given in the STOP environment variable (also formatted with {i}).

Prints one duration in milliseconds per line.
"""
import os
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


n, port = int(sys.argv[1]), int(sys.argv[2])
cmd = sys.argv[sys.argv.index("--") + 1:]
stop = os.environ["STOP"]
for i in range(n):
    argv = [a.replace("{i}", str(i)) for a in cmd]
    t0 = time.perf_counter()
    if argv[0] == "POST":
        # `POST URL JSON`: the start is one HTTP request from this process (no client
        # process to spawn), to measure the daemon's own path.
        req = urllib.request.Request(argv[1], data=argv[2].encode(), method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req).read()
    else:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = t0 + 30
    while not http_ok(port):
        if time.perf_counter() > deadline:
            sys.exit(f"trial {i}: no answer on port {port} within 30 s")
        time.sleep(0.001)
    print(f"{(time.perf_counter() - t0) * 1000:.1f}", flush=True)
    subprocess.run(stop.replace("{i}", str(i)), shell=True, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Wait for the port to be free again before the next trial.
    while http_ok(port):
        time.sleep(0.005)
