"""Push an artifact whose subject is an image with the oras client, then list the
image's referrers through oras's own HTTP session. Usage:

    oras_referrers.py HOST:PORT REPO SUBJECT_DIGEST SUBJECT_SIZE WORKDIR

Prints the referrers index as JSON on stdout; exits non-zero on any failure.
"""
import json
import os
import sys

import oras.client
import oras.oci

host, repo, digest, size, workdir = sys.argv[1:6]
os.chdir(workdir)
with open("sbom.json", "w") as f:
    json.dump({"packages": ["busybox"]}, f)

client = oras.client.OrasClient(hostname=host, insecure=True)
subject = oras.oci.Subject(
    mediaType="application/vnd.oci.image.manifest.v1+json",
    digest=digest,
    size=int(size),
)
with open("config.json", "w") as f:
    f.write("{}")
resp = client.push(
    target=f"{host}/{repo}:sbom",
    files=["sbom.json:application/vnd.example.sbom.v1+json"],
    manifest_config="config.json:application/vnd.example.sbom.config",
    subject=subject,
    disable_path_validation=True,
    quiet=True,
)
if resp.status_code != 201:
    sys.exit(f"push answered {resp.status_code}: {resp.text}")
if resp.headers.get("OCI-Subject") != digest:
    sys.exit(f"push did not return OCI-Subject {digest}: {dict(resp.headers)}")

listing = client.do_request(f"http://{host}/v2/{repo}/referrers/{digest}", "GET")
if listing.status_code != 200:
    sys.exit(f"referrers answered {listing.status_code}: {listing.text}")
filtered = client.do_request(
    f"http://{host}/v2/{repo}/referrers/{digest}?artifactType=application/vnd.example.sbom.config",
    "GET",
)
print(json.dumps({
    "all": listing.json(),
    "filtered": filtered.json(),
    "filters_applied": filtered.headers.get("OCI-Filters-Applied"),
}))
