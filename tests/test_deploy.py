"""Deploy, for real on the local provider: versions, rollback, failures reported per host, and the
test gate refusing a broken version before anything is uploaded."""
from __future__ import annotations

import subprocess
import urllib.request

import pytest

pytestmark = pytest.mark.local

WORKERS = ["dep-1", "dep-2", "dep-3"]


@pytest.fixture(scope="module")
def dep(lab):
    """Three workers started and in the inventory (their load balancer stays off: parallel deploys)."""
    lab.fab("restart-nginx", check=True)
    for image in WORKERS:
        lab.fab("image-build", "--image", image, check=True, timeout=1500)
        lab.fab("image-start", "--image", image, check=True)
    lab.fab("hosts-logged", check=True)  # may race the calls home: wait below
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and set(WORKERS) - set(lab.inventory()):
        time.sleep(0.5)
        lab.fab("hosts-logged", check=True)
    assert set(WORKERS) <= set(lab.inventory())
    yield lab
    for image in WORKERS:
        lab.fab("image-stop", "--image", image)


def version_of(lab, image: str) -> str:
    with urllib.request.urlopen(f"http://{lab.host_address(image)}:9999/version", timeout=5) as resp:
        return resp.read().decode().strip()


def current_release(lab, image: str) -> str:
    return lab.ssh(image, "readlink", "/opt/booted/hello/current").stdout.strip()


def test_deploy_two_versions_then_roll_back(dep):
    result = dep.fab("hello-deploy", "--env", "dep", "--version", "v1", timeout=300)
    assert result.ok, result
    assert "3 of 3 hosts ok" in result.stdout
    assert [version_of(dep, i) for i in WORKERS] == ["v1"] * 3

    result = dep.fab("hello-deploy", "--env", "dep", "--version", "v2", timeout=300)
    assert result.ok, result
    assert [version_of(dep, i) for i in WORKERS] == ["v2"] * 3
    assert {current_release(dep, i) for i in WORKERS} == {"releases/v2"}
    assert dep.fab("hello-test", "--env", "dep").ok

    result = dep.fab("hello-rollback", "--env", "dep", timeout=300)
    assert result.ok, result
    assert [version_of(dep, i) for i in WORKERS] == ["v1"] * 3
    test = dep.fab("hello-test", "--env", "dep")
    assert test.ok, test
    assert test.stdout.count("version v1") == 3


def test_service_runs_under_systemd_and_survives_stop_start(dep):
    dep.fab("hello-deploy", "--env", "dep", "--version", "v2", check=True, timeout=300)
    state = dep.ssh("dep-1", "systemctl", "is-active", "booted-hello.service")
    assert state.stdout.strip() == "active"
    assert dep.fab("hello-stop", "--env", "dep").ok
    with pytest.raises(OSError):
        version_of(dep, "dep-2")
    result = dep.fab("hello-start", "--env", "dep")
    assert result.ok, result
    assert version_of(dep, "dep-2") == "v2"


def test_a_host_gone_after_discovery_is_reported_while_the_others_succeed(dep):
    dep.fab("image-stop", "--image", "dep-3", "--force", check=True)
    try:
        result = dep.fab("hello-deploy", "--env", "dep", "--version", "v1", timeout=300)
        assert not result.ok
        lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("dep-")}
        assert "ok" in lines["dep-1"].split() and "ok" in lines["dep-2"].split()
        assert "FAILED" in lines["dep-3"]
        assert "2 of 3 hosts ok; failed: dep-3" in result.stdout
        assert "Traceback" not in result.output
        assert version_of(dep, "dep-1") == "v1"
    finally:
        dep.fab("image-start", "--image", "dep-3", check=True)


def test_keeps_the_last_five_releases(dep):
    repo = dep.root / "many.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(dep.state / "repos" / "hello.git"), str(repo)], check=True)
    for n in range(7):
        subprocess.run(["git", "--git-dir", str(repo), "tag", f"k{n}", "v2"], check=True)
    for n in range(7):
        dep.fab("hello-deploy", "--env", "dep", "--version", f"k{n}", check=True, timeout=300, HELLO_REPO=str(repo))
    kept = dep.ssh("dep-1", "ls", "/opt/booted/hello/releases").stdout.split()
    assert len(kept) == 5, kept
    assert "k6" in kept and "k0" not in kept


def test_a_version_failing_its_tests_is_refused_before_upload(dep, tmp_path):
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(dep.state / "repos" / "hello.git"), str(work)], check=True)
    app = work / "app.py"
    app.write_text(app.read_text().replace("Hello World!", "Goodbye World!"))
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "commit", "-qam", "break greeting"], check=True)
    subprocess.run([*git, "tag", "broken1"], check=True)
    result = dep.fab("hello-deploy", "--env", "dep", "--version", "broken1", timeout=300, HELLO_REPO=str(work))
    assert result.returncode != 0
    assert "failed its tests; nothing was uploaded" in result.output
    assert "Traceback" not in result.output
    for image in WORKERS:
        assert "broken1" not in dep.ssh(image, "ls", "/opt/booted/hello/releases").stdout


def test_unknown_version_and_bad_names_are_one_line_errors(dep):
    result = dep.fab("hello-deploy", "--env", "dep", "--version", "v99")
    assert result.returncode != 0 and "v99" in result.stderr and "Traceback" not in result.output
    result = dep.fab("hello-deploy", "--env", "dep", "--version", "v1;reboot")
    assert result.returncode != 0 and "invalid version" in result.stderr
    result = dep.fab("hello-deploy", "--env", "nope")
    assert result.returncode == 2 and "unknown environment" in result.stderr
