"""Push and pull an artifact with the oras client using credentials. Usage:

    oras_login.py HOST:PORT REPO USER PASSWORD WORKDIR

Exits 0 when push and pull worked, 3 when the registry refused the credentials.
"""
import os
import sys

import oras.client

host, repo, user, password, workdir = sys.argv[1:6]
os.chdir(workdir)
with open("note.txt", "w") as f:
    f.write("hello from oras\n")

client = oras.client.OrasClient(hostname=host, insecure=True)
try:
    if user:
        client.login(
            username=user,
            password=password,
            hostname=host,
            tls_verify=False,
            config_path=os.path.join(workdir, "docker-config.json"),
        )
    resp = client.push(
        target=f"{host}/{repo}:note",
        files=["note.txt:text/plain"],
        disable_path_validation=True,
        quiet=True,
    )
except Exception as e:  # oras raises on 401/403
    print(f"refused: {e}")
    sys.exit(3)
if resp.status_code not in (200, 201):
    print(f"refused: {resp.status_code}")
    sys.exit(3)
os.makedirs("out", exist_ok=True)
files = client.pull(target=f"{host}/{repo}:note", outdir="out")
with open(files[0]) as f:
    assert f.read() == "hello from oras\n"
print("ok")
