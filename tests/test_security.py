"""Hostile hosts, hostile tags and other local users get nothing (issue 14).

One test (at least) per finding of the security review; each fails on the code before the fix.
Black-box where it can be: `fab` as a user runs it, a real second user (`runuser -u nobody`), a
real nginx with booted's own rendered config, a real git tag.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from fabfile import bootlog, callhome
from fabfile import config as config_mod
from fabfile.bootlog import BootedLog

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
environments:
  prod:
    provider: virtualbox
    images: [prod-lb1, prod-web1, prod-web2]
    roles: {loadbalancers: [prod-lb1], workers: [prod-web1, prod-web2]}
    service: hello
    version: v1
  test:
    provider: virtualbox
    images: [test-box]
    roles: {loadbalancers: [test-box], workers: [test-box]}
    service: hello
    version: v1
"""
MACS = {"prod-web1": "08:00:27:00:00:11", "prod-web3": "08:00:27:00:00:13", "test-box": "08:00:27:00:00:20"}


def fab(state: Path, config: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, BOOTED_STATE_DIR=str(state), BOOTED_CONFIG=str(config), **env)
    for key in ("BOOTED_LOG", "HELLO_REPO"):
        full.pop(key, None)
    full.update(env)
    fab_exe = shutil.which("fab") or str(Path(sys.executable).with_name("fab"))
    return subprocess.run([fab_exe, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def world(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # as an older booted (or a checkout) left it
    monkeypatch.setenv("BOOTED_STATE_DIR", str(state))
    path = tmp_path / "environments.yaml"
    path.write_text(CONFIG)
    monkeypatch.setenv("BOOTED_CONFIG", str(path))
    return state, path, config_mod.load(path)


def call_line(env, name, mac, addr, *, ts=None, key=None, msec=None) -> str:
    """A call home as nginx logs it, signed as booted-callhome signs it."""
    ts = str(int(time.time()) if ts is None else ts)
    key = key if key is not None else callhome.host_key(env, name)
    sig = callhome.signature(key, env, name, mac, addr, ts)
    query = urllib.parse.urlencode({"env": env, "name": name, "mac": mac, "addr": addr, "ts": ts, "sig": sig})
    msec = f"{time.time():.3f}" if msec is None else msec
    return f'booted1 {addr} {msec} "{query}"\n'


def inventory(state: Path) -> dict:
    path = state / "inventory.json"
    return json.loads(path.read_text())["hosts"] if path.exists() else {}


# --------------------------------------------------------------------------- 1: identity
def test_a_host_cannot_take_over_another_image_by_claiming_its_mac(world, tmp_path):
    """Finding 1: test-box's own key with prod-web1's MAC (and a recorded clone's MAC) stays test-box."""
    state, config, _ = world
    # booted made prod-web3 as a clone of prod-web1 and recorded the MAC it gave it
    (state / "virtualbox.json").write_text(json.dumps({"images": {"prod-web3": {
        "uuid": "u3", "clone_of": {"image": "prod-web1", "uuid": "u1", "snapshot": "booted-base"},
        "macs": [MACS["prod-web3"]]}}}))
    log = tmp_path / "booted.log"
    log.write_text(
        call_line("test", "test-box", MACS["prod-web1"], "192.168.56.50")
        + call_line("test", "test-box", MACS["prod-web3"], "192.168.56.51")
        + call_line("prod", "prod-web1", MACS["prod-web3"], "192.168.56.53")  # the real clone
    )
    result = fab(state, config, "hosts-logged", "--booted-log", str(log))
    assert result.returncode == 0, result.stderr
    hosts = inventory(state)
    assert "prod-web1" not in hosts, hosts
    assert (hosts["test-box"]["env"], hosts["test-box"]["roles"]) == ("test", ["loadbalancers", "workers"])
    assert (hosts["prod-web3"]["name"], hosts["prod-web3"]["env"], hosts["prod-web3"]["address"]) == \
        ("prod-web1", "prod", "192.168.56.53")


def test_a_clone_is_never_sent_a_key_without_its_recorded_mac(world, monkeypatch):
    """Finding 1: the rename (which sends the image's key) refuses a host booted did not make as that clone."""
    state, config, cfg = world
    from fabfile import discovery, ssh
    from fabfile.errors import BootedError
    from fabfile.inventory import HostEntry

    sent = []
    monkeypatch.setattr(ssh, "connect", lambda *a, **k: sent.append(a) or pytest.fail("connected to an unproven host"))
    entry = HostEntry("prod-web3", "prod-web1", "192.168.56.53", MACS["prod-web3"], "prod")
    with pytest.raises(BootedError, match="no record of prod-web3 as a clone of prod-web1"):
        discovery.rename_host(cfg, entry)
    assert sent == []


# --------------------------------------------------------------------------- 6: time window, replay, rebuild
def test_calls_outside_the_time_window_replays_and_old_keys_are_refused(world, tmp_path):
    state, config, cfg = world
    addr, mac = "192.168.56.60", MACS["prod-web1"]
    now = int(time.time())
    log = tmp_path / "booted.log"
    log.write_text(call_line("prod", "prod-web1", mac, addr, ts=0) + call_line("prod", "prod-web1", mac, addr, ts=999999999999))
    result = BootedLog(log, cfg, control=()).read_all()
    assert result.calls == [] and result.skipped[bootlog.TS_WINDOW] == 2

    # a genuine call, then the same call replayed later: recorded once, the replay refused
    genuine = call_line("prod", "prod-web1", mac, addr, ts=now)
    log.write_text(genuine)
    assert fab(state, config, "hosts-logged", "--booted-log", str(log)).returncode == 0
    replay = genuine.replace(f" {genuine.split()[2]} ", f" {time.time() + 5:.3f} ")
    with open(log, "a") as fh:
        fh.write(replay.replace(addr, "192.168.56.61").replace(f"booted1 {addr}", "booted1 192.168.56.61"))
    fab(state, config, "hosts-logged", "--booted-log", str(log))
    assert inventory(state)["prod-web1"]["address"] == addr

    # rebuilding an image changes its key: calls signed with the old one stop counting
    old_key = callhome.host_key("prod", "prod-web1")
    callhome.new_host_key("prod", "prod-web1")
    assert callhome.host_key("prod", "prod-web1") != old_key
    stale = call_line("prod", "prod-web1", mac, addr, key=old_key)
    assert bootlog.parse_line(stale, cfg) == bootlog.BAD_SIGNATURE


# --------------------------------------------------------------------------- 15: state dir and locks
def test_state_dir_is_private_and_a_held_lock_times_out_naming_its_holder(world, tmp_path):
    state, config, cfg = world
    (tmp_path / "booted.log").write_text("")
    assert fab(state, config, "hosts-logged", "--booted-log", str(tmp_path / "booted.log")).returncode == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    if os.geteuid() == 0 and shutil.which("runuser"):
        # another local user can neither read the secrets nor open (so hold) booted's locks
        other = subprocess.run(["runuser", "-u", "nobody", "--", "flock", "-n", str(state / "locks" / "bootlog.lock"),
                                "true"], capture_output=True, text=True, timeout=30)
        assert other.returncode != 0
        other = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(state / "secrets" / "prod.key")],
                               capture_output=True, text=True, timeout=30)
        assert other.returncode != 0 and "Permission denied" in other.stderr
    # a booted process holding the lock: the next one gives up with a message naming it
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; sys.argv = ['fab', 'hosts-logged']\n"
        "from fabfile.state import locked\n"
        "with locked('bootlog'):\n    print('held', flush=True); time.sleep(60)\n")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, BOOTED_STATE_DIR=str(state)))
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = fab(state, config, "hosts-logged", "--booted-log", str(tmp_path / "booted.log"),
                     BOOTED_LOCK_TIMEOUT_S="2")
        assert result.returncode == 1 and time.monotonic() - started < 30
        assert f"held by pid {holder.pid}: fab hosts-logged" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- 11: the operator's ssh config
def test_booted_ssh_ignores_the_operators_ssh_config(world, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_personal").write_text("not booted's key\n")
    (home / ".ssh" / "config").write_text(
        "Host *\n  ForwardAgent yes\n  Port 2222\n  User operator\n  IdentityFile ~/.ssh/id_personal\n"
        "  ProxyJump jump.example\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))
    from fabfile import ssh

    conn = ssh.connect("192.168.56.70", world[2])
    assert (conn.port, conn.forward_agent, conn.gateway, conn.user) == (22, False, None, "booted")
    assert conn.connect_kwargs["key_filename"] == [ssh.keypair(world[2])[0]]
    assert conn.connect_kwargs["allow_agent"] is False and conn.connect_kwargs["look_for_keys"] is False
