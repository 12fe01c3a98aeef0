"""The benchmark's deploy, written for pyinfra: the same work as booted's hello-deploy.

Upload the packed release, run booted's own deploy script on it (unpack into
/opt/booted/hello/releases/<version>, switch `current` atomically, install/keep the systemd unit,
restart booted-hello.service, prune old releases), then check /version from the controller.
Run as ``pyinfra -y --parallel N inventory.py deploy.py`` with BENCH_RUN naming the run file
deploy_bench.py writes.
"""
import http.client
import json
import os
import shlex
import time

from pyinfra import host
from pyinfra.operations import files, python, server

run = json.load(open(os.environ["BENCH_RUN"]))
remote_tar = f"/tmp/booted-bench-{run['version']}.tar.gz"

files.put(name="upload the release", src=run["tarball"], dest=remote_tar)

server.shell(
    name="unpack, switch current, install the unit, restart",
    commands=[
        " ".join(shlex.quote(str(a)) for a in ["sh", "-c", run["deploy_script"], "deploy", run["service"],
                                                run["version"], run["commit"], run["unit"], run["keep"]])
        + f" < {shlex.quote(remote_tar)} && rm -f {shlex.quote(remote_tar)}"
    ],
    _sudo=True,
)


def wait_for_version(address, port, version, timeout=60.0):
    """Poll /version every 50 ms until it names the new version (as booted's wait_for_version)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(address, port, timeout=2)
            try:
                conn.request("GET", "/version")
                resp = conn.getresponse()
                body = resp.read().decode(errors="replace").strip()
            finally:
                conn.close()
            if resp.status == 200 and body == version:
                return
            last = f"{resp.status} {body[:40]!r}"
        except OSError as err:
            last = str(err)
        time.sleep(0.05)
    raise RuntimeError(f"{address} did not serve {version} within {timeout:g}s ({last})")


python.call(
    name="the host answers /version with the new version (from the controller)",
    function=wait_for_version,
    address=host.name,
    port=run["port"],
    version=run["version"],
)
