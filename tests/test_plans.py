"""Planning kept apart from doing: the exact commands and files booted would use, as tables."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from fabfile.core import templates
from fabfile.core.errors import BootedError, UsageError
from fabfile.core.fanout import HostResult, fan_out, summary
from fabfile.core.names import check
from fabfile.providers import bridge, load_config
from fabfile.providers.local import network as localnet
from fabfile.services import release

SUBNET = bridge.Subnet.parse("10.77.0.0/24")
LINK = localnet.HostLink(netns="booted-abc", veth="vbabc")


@pytest.mark.parametrize("present,has_address,expected", [
    (False, False, [["ip", "link", "add", "br0", "type", "bridge"],
                    ["ip", "addr", "add", "10.77.0.1/24", "dev", "br0"],
                    ["ip", "link", "set", "br0", "up"]]),
    (True, False, [["ip", "addr", "add", "10.77.0.1/24", "dev", "br0"], ["ip", "link", "set", "br0", "up"]]),
    (True, True, [["ip", "link", "set", "br0", "up"]]),
])
def test_bridge_plan(present, has_address, expected):
    assert bridge.plan_bridge("br0", SUBNET, present, has_address) == expected


def test_host_plan_gives_each_host_its_own_namespace_address_and_mac():
    plan = localnet.plan_host_up(LINK, "br0", SUBNET, "10.77.0.5", "02:00:00:00:00:05")
    assert plan[0] == ["ip", "netns", "add", "booted-abc"]
    assert ["ip", "-n", "booted-abc", "link", "set", "host0", "address", "02:00:00:00:00:05"] in plan
    assert ["ip", "-n", "booted-abc", "addr", "add", "10.77.0.5/24", "dev", "host0"] in plan
    assert plan[-1] == ["ip", "-n", "booted-abc", "route", "add", "default", "via", "10.77.0.1"]
    assert localnet.plan_host_down(LINK) == [["ip", "link", "del", "vbabc"], ["ip", "netns", "del", "booted-abc"]]


def test_subnet_reserves_the_gateway():
    assert SUBNET.gateway == "10.77.0.1"
    assert SUBNET.host_addresses()[0] == "10.77.0.2" and "10.77.0.1" not in SUBNET.host_addresses()


def test_host_link_names_fit_interface_limits_and_differ_per_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BOOTED_STATE_DIR", str(tmp_path / "a"))
    a = localnet.HostLink.for_image("web1")
    monkeypatch.setenv("BOOTED_STATE_DIR", str(tmp_path / "b"))
    b = localnet.HostLink.for_image("web1")
    assert a != b and len(a.veth) <= 15


@pytest.mark.parametrize("kind,value,ok", [
    ("image", "web-1.a_b", True), ("image", "-rf", False), ("image", "a b", False), ("image", "", False),
    ("image", "x" * 64, False), ("version", "v1.2.3", True), ("version", "v1;reboot", False),
    ("version", "../x", False), ("version", "feature/x", False), ("environment", "Prod", False),
    ("service", "hello", True), ("service", "hello-world", False),
])
def test_names(kind, value, ok):
    if ok:
        assert check(kind, value) == value
    else:
        with pytest.raises(UsageError):
            check(kind, value)


def test_templates_refuse_missing_and_unused_values():
    assert templates.render("a {{ x }} $b", {"x": 1}) == "a 1 $b"
    with pytest.raises(KeyError):
        templates.render("{{ x }}", {})
    with pytest.raises(KeyError):
        templates.render("{{ x }}", {"x": 1, "y": 2})


def test_unit_text_runs_the_release_under_a_dynamic_user():
    from fabfile.services import manifest as services

    unit = release.unit_text(services.get("hello"))
    assert "WorkingDirectory=/opt/booted/hello/current" in unit
    assert 'ExecStart="python3" "app.py"' in unit
    assert "DynamicUser=yes" in unit and "HELLO_PORT=9999" in unit


def test_fan_out_reports_every_host_and_keeps_order(capsys):
    def work(item):
        if item == "b":
            raise BootedError("b: disk full")
        if item == "c":
            raise RuntimeError("boom")
        return f"did {item}"

    results = fan_out(["a", "b", "c"], work, label=str, parallel=2)
    assert [r.host for r in results] == ["a", "b", "c"]
    assert [r.ok for r in results] == [True, False, False]
    assert results[1].detail == "disk full" and "RuntimeError: boom" in results[2].detail
    out = capsys.readouterr().out
    assert out.count("\n") == 3
    assert summary("x", results) == "x: 1 of 3 hosts ok; failed: b, c"
    assert summary("x", [HostResult("a", True)]) == "x: 1 of 1 hosts ok"


def test_load_balancer_config_marks_drained_workers_down_and_changes_its_id():
    from fabfile.balancing import loadbalancer

    env = load_config().env("local")
    a, b = loadbalancer.Upstream("10.77.0.2", 9999), loadbalancer.Upstream("10.77.0.3", 9999)
    text, cid = loadbalancer.render(env, [a, b])
    assert "server 10.77.0.2:9999 max_fails=1 fail_timeout=3s;" in text
    assert "server 10.77.0.2:9999 backup max_fails=0;" in text
    assert f'return 200 "{cid}\\n";' in text
    drained, cid2 = loadbalancer.render(env, [loadbalancer.Upstream("10.77.0.2", 9999, down=True), b])
    assert "server 10.77.0.2:9999 max_fails=1 fail_timeout=3s down;" in drained
    assert "server 10.77.0.2:9999 backup" not in drained   # a drained worker is no backup either
    assert "server 10.77.0.3:9999 backup max_fails=0;" in drained
    assert cid2 != cid
    assert loadbalancer.render(env, [b, a]) == (text, cid)  # order does not matter
    empty, _ = loadbalancer.render(env, [])
    assert "server 127.0.0.1:9 down;" in empty


@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed")
@pytest.mark.parametrize("workers, drained", [(1, 0), (32, 0), (33, 0), (76, 5), (100, 0), (101, 1), (400, 0)])
def test_nginx_accepts_the_load_balancer_config_for_any_number_of_workers(tmp_path, workers, drained):
    """The upstream zone holds every server line: at 100 workers a fixed 64k made `nginx -t` fail
    ("no memory in upstream zone") and the bring-up with it."""
    from fabfile.balancing import loadbalancer

    env = load_config().env("local")
    ups = [loadbalancer.Upstream(f"10.{77 + i // 250}.0.{i % 250 + 1}", 9999, down=i < drained) for i in range(workers)]
    text, _ = loadbalancer.render(env, ups)
    (tmp_path / "lb.conf").write_text(text)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; events {{}}\n"
        f"http {{ access_log off; include {tmp_path}/lb.conf; }}\n")
    test = subprocess.run(["nginx", "-t", "-q", "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
