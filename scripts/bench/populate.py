#!/usr/bin/env python3
"""Fills a registry for the listing benchmarks, over keep-alive connections.

  populate.py HOST:PORT tags REPO COUNT     COUNT tags of one manifest in REPO
  populate.py HOST:PORT repos PREFIX COUNT  COUNT repositories PREFIX/NNNNN, each
                                            with the manifest (its blobs mounted)

The manifest and its blobs must already be in bench/app (the benchmark pushes
them first). Eight threads; any answer but 201 stops it with an error.
"""
import http.client
import json
import sys
import threading

host, mode, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
MT = "application/vnd.oci.image.manifest.v1+json"


def conn():
    h, p = host.rsplit(":", 1)
    return http.client.HTTPConnection(h, int(p), timeout=120)


def req(c, method, path, body=b"", headers=None):
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    return r.status, data


c = conn()
status, manifest = req(c, "GET", "/v2/bench/app/manifests/v1", headers={"Accept": MT})
assert status == 200, status
m = json.loads(manifest)
blobs = [m["config"]["digest"]] + [l["digest"] for l in m["layers"]]
errors = []
if mode == "tags":
    for b in blobs:
        s, _ = req(c, "POST", "/v2/%s/blobs/uploads/?mount=%s&from=bench/app" % (name, b))
        assert s == 201, "mount %s into %s: %d" % (b, name, s)


def work(ids):
    c = conn()
    try:
        for i in ids:
            if mode == "tags":
                repo, tag = name, "t%05d" % i
            else:
                repo, tag = "%s/%05d" % (name, i), "v1"
                for b in blobs:
                    s, _ = req(c, "POST", "/v2/%s/blobs/uploads/?mount=%s&from=bench/app" % (repo, b))
                    if s != 201:
                        raise RuntimeError("mount %s into %s: %d" % (b, repo, s))
            s, body = req(c, "PUT", "/v2/%s/manifests/%s" % (repo, tag), manifest, {"Content-Type": MT})
            if s != 201:
                raise RuntimeError("put %s:%s: %d %s" % (repo, tag, s, body[:200]))
    except Exception as e:  # noqa: BLE001 - reported below
        errors.append(e)


threads = [threading.Thread(target=work, args=(range(k, count, 8),)) for k in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    sys.exit("populate failed: %s" % errors[0])
