"""Environments end to end on the local provider: one command brings one up behind a load balancer,
a worker's death is invisible to users, and a rolling deploy drops no request."""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request

import pytest
from loadgen import SteadyLoad, rolling_deploy_under_load

pytestmark = pytest.mark.local

WORKERS = ["drill-w1", "drill-w2", "drill-w3"]


@pytest.fixture(scope="module")
def drill(lab):
    result = lab.fab("env-start-all", "--env", "drill", timeout=1500)
    assert result.ok, result
    yield lab
    lab.fab("env-stop", "--env", "drill", timeout=300)


def lb_url(lab) -> str:
    return f"http://{lab.host_address('drill-lb')}:8080/"


def active_since(lab, image: str) -> str:
    return lab.ssh(image, "systemctl", "show", "-p", "ActiveEnterTimestampMonotonic", "booted-hello").stdout.strip()


def lb_log(lab) -> list[str]:
    return lab.ssh("drill-lb", "sudo", "cat", "/var/log/nginx/booted-lb.log").stdout.splitlines()


def test_env_start_all_brings_up_a_balanced_environment(drill):
    with urllib.request.urlopen(lb_url(drill), timeout=5) as resp:
        assert resp.status == 200 and resp.read().decode().strip() == "Hello World!"
    hosts = {h["image"]: h for h in json.loads(drill.fab("hosts-list", "--env", "drill", "--format", "json",
                                                           check=True).stdout)}
    assert set(hosts) == {"drill-lb", *WORKERS}
    conf = drill.ssh("drill-lb", "cat", "/etc/nginx/conf.d/booted-lb.conf").stdout
    for image in WORKERS:
        assert f"server {drill.host_address(image)}:9999" in conf


def test_running_it_again_converges_without_restarting_healthy_hosts(drill):
    before = {i: active_since(drill, i) for i in WORKERS}
    result = drill.fab("env-start-all", "--env", "drill", timeout=600)
    assert result.ok, result
    assert result.stdout.count("already running") == 4
    assert result.stdout.count("already serving v1") == 3
    assert "load balancer: http://" in result.stdout
    assert {i: active_since(drill, i) for i in WORKERS} == before


def test_a_dying_worker_is_invisible_to_users(drill):
    """Steady GETs through the load balancer while one worker's service is killed, then a worker
    host is stopped: every request returns 200 and the load balancer's log shows the retries."""
    drill.ssh("drill-lb", "sudo", "truncate", "-s", "0", "/var/log/nginx/booted-lb.log")
    with SteadyLoad(lb_url(drill), rate=25, max_seconds=60) as load:
        time.sleep(2)
        killed = drill.ssh("drill-w1", "sudo", "systemctl", "kill", "--kill-who=main", "-s", "KILL", "booted-hello")
        assert killed.returncode == 0, killed.stderr
        time.sleep(3)
        assert drill.fab("image-stop", "--image", "drill-w2", "--force").ok
        time.sleep(4)
        result = load.stop()
    assert result.count > 150
    assert result.failures == [], result.failures[:5]
    retried = [line for line in lb_log(drill) if "upstream=" in line and ", " in line.split("upstream=")[1]]
    assert retried, "the load balancer's log shows no retried request"
    drill.fab("env-start-worker", "--image", "drill-w2", "--env", "drill", check=True, timeout=600)


def test_rolling_deploy_drops_no_request_and_ends_on_the_new_version(drill):
    drill.fab("env-start-all", "--env", "drill", check=True, timeout=600)
    rolling_deploy_under_load(drill, lb_url(drill), "drill", "v1", "v2", rate=25, max_seconds=120)
    for _ in range(6):
        with urllib.request.urlopen(lb_url(drill) + "version", timeout=5) as resp:
            assert resp.read().decode().strip() == "v2"


def test_env_start_all_brings_a_serving_environment_back_to_its_version_without_dropping_requests(drill):
    """After the rolling deploy to v2, the environment's own version (v1) is restored the same way."""
    with SteadyLoad(lb_url(drill) + "version", rate=25, max_seconds=120) as load:
        result = drill.fab("env-start-all", "--env", "drill", timeout=600)
        seen = load.stop()
    assert result.ok, result
    assert result.stdout.count("drained, switched, back in") == 3
    assert seen.failures == [], seen.failures[:5]
    assert seen.bodies()[-1] == "v1"


def test_env_start_worker_and_env_stop(drill):
    result = drill.fab("env-start-worker", "--image", "drill-lb", "--env", "drill")
    assert result.returncode != 0 and "not a worker" in result.stderr
    result = drill.fab("env-stop", "--env", "drill", timeout=300)
    assert result.ok, result
    listed = json.loads(drill.fab("hosts-list", "--env", "drill", "--format", "json", check=True).stdout)
    assert listed == []
    out = drill.fab("image-list", "--provider", "local", check=True).stdout
    assert all("poweroff" in line for line in out.splitlines() if line.startswith("drill-"))


# A drop-in that makes the service start 4 s late, as python does at a TCG VM's boot.
SLOW_START = "mkdir -p /etc/systemd/system/booted-hello.service.d && " \
             "printf '[Service]\\nExecStartPre=/bin/sleep 4\\n' > /etc/systemd/system/booted-hello.service.d/slow.conf"


def test_a_stopped_environment_comes_back_without_redeploying(drill):
    """After env-stop, its workers start the version they had by themselves, here later than they
    call home: env-start-all waits for them instead of shipping it again (behind a load balancer
    that answered first, that was one worker at a time)."""
    drill.fab("env-start-all", "--env", "drill", timeout=900, check=True)
    try:
        for image in WORKERS:
            drill.ssh(image, "sudo", "sh", "-c", SLOW_START, timeout=30).check_returncode()
        drill.fab("env-stop", "--env", "drill", timeout=300, check=True)
        result = drill.fab("env-start-all", "--env", "drill", timeout=900)
        assert result.ok, result
        assert result.stdout.count("already serving v1") == 3, result.stdout
        assert "drained" not in result.stdout
        assert not re.search(r"v1 \([0-9a-f]{8}\)", result.stdout), result.stdout  # a deploy's line: version (commit)
        with urllib.request.urlopen(lb_url(drill) + "version", timeout=5) as resp:
            assert resp.read().decode().strip() == "v1"
    finally:
        for image in WORKERS:
            drill.ssh(image, "sudo", "sh", "-c", "rm -rf /etc/systemd/system/booted-hello.service.d && "
                      "systemctl daemon-reload", timeout=30)


def test_one_image_as_load_balancer_and_worker(lab):
    """dev and test environments put both roles on one image: nginx and the service side by side."""
    try:
        result = lab.fab("env-start-all", "--env", "solo", timeout=900)
        assert result.ok, result
        url = f"http://{lab.host_address('solo-box')}:8080/"
        with urllib.request.urlopen(url + "version", timeout=5) as resp:
            assert resp.read().decode().strip() == "v2"
        req = urllib.request.Request(url, data=b"name=Ada", method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.read().decode().strip() == "Hello Ada World!"
    finally:
        lab.fab("env-stop", "--env", "solo", timeout=300)


def test_env_start_all_of_a_version_failing_its_tests_uploads_nothing(lab, tmp_path):
    """The release is packed and tested while the hosts boot: a failing test gate still stops the
    bring-up before anything reaches a worker, with the gate's one-line reason."""
    from fabfile.services import repo

    with lab.activated():
        bare = repo.ensure_local_repo("hello")
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(bare), str(work)], check=True)
    app = work / "app.py"
    app.write_text(app.read_text().replace("Hello World!", "Goodbye World!"))
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "commit", "-qam", "break greeting"], check=True)
    subprocess.run([*git, "tag", "-f", "v2"], check=True, capture_output=True)  # solo's version
    try:
        result = lab.fab("env-start-all", "--env", "solo", timeout=900, HELLO_REPO=str(work))
        assert result.returncode != 0
        assert "hello v2 failed its tests; nothing was uploaded" in result.output
        assert "Traceback" not in result.output
        broken = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        shipped = lab.ssh("solo-box", "sh", "-c", "cat /opt/booted/hello/releases/*/.booted-commit 2>/dev/null; true")
        assert shipped.returncode == 0 and broken not in shipped.stdout, shipped
    finally:
        lab.fab("env-stop", "--env", "solo", timeout=300)
