"""Zero downtime at full load: wrk drives the load balancer flat out (16 and 64 connections) while a
worker's service is SIGKILLed, a worker host is powered off and another stopped, workers are added
and removed, and the service is rolled forward and back under GET and POST load. Each drill asserts
from wrk's own report that no request failed: no non-2xx answer, no socket error.

The light-load drills in test_environments.py stay; these add saturation. Times: about 5 minutes
on an idle 2-core machine (the environment's start included).
"""
from __future__ import annotations

import os
import urllib.request

import drills
import pytest
import wrkload

pytestmark = pytest.mark.local

ENV = "sat"
WORKERS = [f"{ENV}-w1", f"{ENV}-w2", f"{ENV}-w3"]
CONNECTIONS = [16, 64]


@pytest.fixture(scope="module")
def sat(lab):
    reason = wrkload.available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        result = lab.fab("env-start-all", "--env", ENV, timeout=1500)
        assert result.ok, result
        yield lab
    finally:
        lab.fab("env-stop", "--env", ENV, timeout=300)


def worker_version(lab, image: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{lab.host_address(image)}:9999/version", timeout=3) as resp:
            return resp.read().decode().strip()
    except OSError:
        return None


def ensure_serving(lab) -> None:
    """Three serving workers behind the load balancer (a drill before may have left one down)."""
    if any(worker_version(lab, image) is None for image in WORKERS):
        lab.fab("env-start-all", "--env", ENV, check=True, timeout=900)


@pytest.fixture
def serving(sat):
    """Every drill starts from three serving workers behind the load balancer."""
    ensure_serving(sat)
    sat.ssh(f"{ENV}-lb", "sudo", "truncate", "-s", "0", "/var/log/nginx/error.log")
    return sat


def assert_no_request_failed(lab, drill: drills.DrillResult) -> None:
    assert not drill.failed_steps, "\n".join(drill.failed_steps)
    report = drill.report
    assert report.requests > 20 * report.seconds, f"wrk hardly loaded the load balancer: {drill}"
    assert report.non_2xx == 0, str(drill)
    assert report.socket_errors == 0, str(drill)
    errors = lab.ssh(f"{ENV}-lb", "sudo", "cat", "/var/log/nginx/error.log").stdout
    assert "no live upstreams" not in errors, errors[-2000:]


def stop_two_workers(lab) -> None:
    """As the power-off drill leaves the environment: w2 and w3 stopped (for a second scale drill)."""
    for image in WORKERS[1:]:
        lab.fab("env-stop-worker", "--image", image, "--env", ENV, check=True, timeout=300)


def through_lb(lab, path: str) -> str:
    with urllib.request.urlopen(drills.lb_url(lab, ENV) + path.lstrip("/"), timeout=5) as resp:
        return resp.read().decode().strip()


def service_show(lab, image: str) -> dict[str, str]:
    out = lab.ssh(image, "systemctl", "show", "-p", "MainPID,ActiveState,NRestarts", "booted-hello").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.parametrize("connections", CONNECTIONS)
def test_a_sigkilled_service_is_restarted_and_costs_no_request(serving, connections):
    before = service_show(serving, f"{ENV}-w1")
    drill = drills.again_if_machine_stalled(lambda: drills.kill_service(serving, ENV, connections))
    assert_no_request_failed(serving, drill)
    after = service_show(serving, f"{ENV}-w1")
    assert after["ActiveState"] == "active" and after["MainPID"] != before["MainPID"], (before, after)
    assert int(after["NRestarts"]) > int(before["NRestarts"]), (before, after)


@pytest.mark.parametrize("connections", CONNECTIONS)
def test_power_off_and_stop_then_scale_back_cost_no_request(serving, connections):
    """w2 powered off and w3 stopped cleanly under load; then, still under load, both added back
    (env-start-worker), w3 removed (env-stop-worker: drained, stopped) and added again."""
    refused = serving.fab("env-stop-worker", "--image", f"{ENV}-lb", "--env", ENV)
    assert refused.returncode == 2 and "not a worker" in refused.stderr, refused
    stopped = drills.again_if_machine_stalled(lambda: drills.power_off_and_stop(serving, ENV, connections),
                                              restore=lambda: ensure_serving(serving))
    left = {image: [str(p) for p in serving.leftover_processes(image)] for image in WORKERS[1:]}
    scaled = drills.again_if_machine_stalled(lambda: drills.scale_up_and_down(serving, ENV, connections),
                                             restore=lambda: stop_two_workers(serving))
    assert_no_request_failed(serving, stopped)
    assert_no_request_failed(serving, scaled)
    assert sorted(worker_version(serving, image) for image in WORKERS) == ["v1"] * 3
    conf = serving.ssh(f"{ENV}-lb", "cat", "/etc/nginx/conf.d/booted-lb.conf").stdout
    for image in WORKERS:
        assert f"server {serving.host_address(image)}:9999 max_fails" in conf
    # a stop ends the host: nothing whose root is its file system survives (checked right after
    # the stops, before the scale drill started the hosts again)
    assert left == {image: [] for image in WORKERS[1:]}, f"a stopped host left processes: {left}"


# (connections, load, what): each of deploy and rollback under GET and under POST, each load level
ROLLING = [
    (16, "GET", ("hello-deploy", "--version", "v2"), "v2"),
    (16, "POST", ("hello-rollback",), "v1"),
    (64, "POST", ("hello-deploy", "--version", "v2"), "v2"),
    (64, "GET", ("hello-rollback",), "v1"),
]


@pytest.mark.parametrize("connections,method,action,version", ROLLING,
                         ids=[f"{a[0]}-{m}-c{c}" for c, m, a, _ in ROLLING])
def test_rolling_deploy_and_rollback_cost_no_request(serving, connections, method, action, version):
    before = worker_version(serving, WORKERS[0])
    drill = drills.again_if_machine_stalled(
        lambda: drills.rolling(serving, ENV, connections, method, action),
        # as before the drill: the same release current, the drill's target the one before it
        restore=lambda: serving.fab("hello-deploy", "--env", ENV, "--version", before, check=True, timeout=600))
    assert_no_request_failed(serving, drill)
    assert [worker_version(serving, image) for image in WORKERS] == [version] * 3
    assert {through_lb(serving, "/version") for _ in range(6)} == {version}
    # the reloads' closing flag is gone: clients keep their connections again
    assert serving.ssh(f"{ENV}-lb", "test", "-e", "/run/booted-lb.closing").returncode == 1
