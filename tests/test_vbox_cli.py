"""Issue 15 through `fab`, as a new user meets it, against the VirtualBox stand-in (tests/vbox_fixtures.py):
image-build serves its own kickstart, a failed build keeps its logs, builds survive a 30% session-lock error
rate, images outside any environment are found by asking the providers, and booted's nginx can be stopped."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time

import pytest

from fabfile.providers.virtualbox.vboxmanage import VBoxManage
from tests.vbox_fixtures import (  # noqa: F401  (fixtures used by name)
    IMAGE,
    provider_in,
    start_nginx,
    stop_nginx,
    vbox_lab,
    vbox_provider,
    vbox_template,
)


def nginx_pid(lab) -> int | None:
    try:
        pid = int((lab.state / "nginx" / "nginx.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None


def last_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------- item 1
def test_image_build_starts_nginx_and_the_installer_gets_its_kickstart(vbox_lab):
    stop_nginx(vbox_lab)
    proc = vbox_lab.fab("image-build", "--image", "lab-web2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "built lab-web2 (virtualbox): poweroff"
    assert "booted nginx started on port" in proc.stderr
    assert "lab-web2: booted's nginx serves its kickstart at http://10.0.2.2:" in proc.stderr
    # The stand-in's installer fetched inst.ks= through NAT and installed (its disk is marked installed).
    vm = vbox_lab.vm("lab-web2")
    assert vbox_lab.registry()["media"][vm["attachments"]["SATA-0-0"]["medium"]]["installed"]


def test_build_refuses_when_something_else_answers_the_kickstart_url(vbox_lab, tmp_path):
    """A foreign server on booted's port (here: a plain HTTP server) does not serve the kickstart: the
    build stops before any VM exists instead of waiting for an installer that can never start."""
    stop_nginx(vbox_lab)
    port = re.search(r"port: (\d+)", vbox_lab.config.read_text()).group(1)
    (tmp_path / "ks").mkdir()
    server = subprocess.Popen([sys.executable, "-m", "http.server", port, "--bind", "127.0.0.1",
                               "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        proc = vbox_lab.fab("image-build", "--image", "lab-web2")
    finally:
        server.terminate()
        server.wait(10)
    assert proc.returncode == 1
    assert last_line(proc) == (f"error: port {port} is in use by pid {server.pid} ({sys.executable} -m http.server "
                               f"{port} --bind 127.0.0.1 --directory {tmp_path}"[:80 + len(f"error: port {port} is in use by pid {server.pid} (")]
                               + f"); stop it, or give this booted another port (settings.nginx.port in "
                               f"{vbox_lab.config})")
    assert vbox_lab.vm("lab-web2") is None and vbox_lab.changes() == []


# ----------------------------------------------------------------------------- item 2
def test_timed_out_build_keeps_logs_and_console_and_names_the_copy(vbox_lab):
    proc = vbox_lab.fab("image-build", "--image", "lab-web2", env={"VBOX_STANDIN_INSTALL_SECONDS": "60"})
    assert proc.returncode == 1
    line = last_line(proc)
    match = re.fullmatch(r"error: lab-web2: build failed: timed out after 5s waiting for lab-web2 to finish "
                         r"installing \(the kickstart powers it off\).*; removed the half-built VM; its logs and "
                         r"console output are kept in (\S+)", line)
    assert match, line
    kept = match.group(1)
    from pathlib import Path

    kept = Path(kept)
    assert kept.parent == vbox_lab.state.resolve() / "diagnostics"
    assert "stand-in VBox.log: started" in (kept / "Logs" / "VBox.log").read_text()
    console = (kept / "console.log").read_text()
    assert "PXE boot: pxelinux.0" in console and "kickstart fetched" in console
    assert vbox_lab.vm("lab-web2") is None
    assert not (vbox_lab.state / "virtualbox" / "lab-web2").exists()


def test_build_without_the_kickstart_answering_keeps_the_installer_console(vbox_lab, vbox_provider, monkeypatch):
    """nginx dies after the check: the stand-in's installer cannot fetch inst.ks and hangs; the console copy says so."""
    import fabfile.providers.virtualbox.media as media

    def check_then_stop(config, image, timeout=5.0):
        url = real_check(config, image, timeout)
        stop_nginx(vbox_lab)
        return url

    real_check = media.check_kickstart_served
    monkeypatch.setattr(media, "check_kickstart_served", check_then_stop)
    monkeypatch.setitem(vbox_provider.settings, "build_timeout_s", 1)
    with pytest.raises(Exception) as err:
        vbox_provider.build("lab-web2", vbox_provider.config.environments["lab"])
    kept = re.search(r"kept in (\S+)$", str(err.value)).group(1)
    from pathlib import Path

    assert "failed to fetch kickstart from http://10.0.2.2:" in (Path(kept) / "console.log").read_text()


# ----------------------------------------------------------------------------- item 3
def test_builds_survive_a_30_percent_session_lock_error_rate(vbox_lab, monkeypatch):
    """Ten builds in a row, every session-locking VBoxManage call failing 30% of the time, with the shipped
    retry window (60 s) on a clock that advances only when the provider sleeps: every build succeeds."""
    provider = provider_in(vbox_lab, monkeypatch)
    monkeypatch.delenv("BOOTED_VBOX_RETRY_DELAY")
    monkeypatch.delenv("BOOTED_VBOX_RETRY_WINDOW")
    monkeypatch.setenv("VBOX_STANDIN_LOCKED_RATE", "0.3")
    fake_now = [0.0]
    provider.vbox = VBoxManage(sleep=lambda s: fake_now.__setitem__(0, fake_now[0] + s),
                               clock=lambda: fake_now[0], rng=random.Random(15))
    start_nginx(vbox_lab)
    env = provider.config.environments["lab"]
    for _ in range(10):
        provider.build("lab-web2", env)
        provider.delete("lab-web2")
    calls = vbox_lab.calls()
    locked_calls = sum(1 for c in calls if c[0] in ("createvm", "modifyvm", "storagectl", "storageattach", "startvm",
                                                     "unregistervm"))
    retried = len(calls) - len({json.dumps(c) for c in calls})
    assert locked_calls > 100 and retried > 10  # the faults really happened and were retried


# ----------------------------------------------------------------------------- item 4
def test_a_clone_outside_any_environment_is_found_without_provider(vbox_lab):
    proc = vbox_lab.fab("image-clone", "--image", IMAGE, "--name", "lab-web9")
    assert proc.returncode == 0, proc.stderr
    for argv in (["image-start", "--image", "lab-web9"], ["image-stop", "lab-web9", "--force"],
                 ["image-del", "--image", "lab-web9", "--yes"]):
        proc = vbox_lab.fab(*argv)
        assert proc.returncode == 0, (argv, proc.stderr)
    assert vbox_lab.vm("lab-web9") is None


def test_provider_is_needed_only_when_two_providers_hold_the_name(vbox_lab):
    assert vbox_lab.fab("image-clone", "--image", IMAGE, "--name", "lab-web9").returncode == 0
    # a local host of the same name (its record is all the local provider needs to list it)
    folder = vbox_lab.state / "local" / "hosts" / "lab-web9"
    folder.mkdir(parents=True)
    (folder / "host.json").write_text(json.dumps({"name": "lab-web9", "address": "10.77.0.9", "mac": "02:00:00:00:00:09",
                                                  "uuid": "u", "env": None, "created": 0}))
    proc = vbox_lab.fab("image-start", "--image", "lab-web9")
    assert proc.returncode == 2
    assert last_line(proc) == ("error: image 'lab-web9' exists in providers virtualbox and local; "
                               "pass --provider (virtualbox or local) to say which one")
    proc = vbox_lab.fab("image-start", "--image", "lab-web9", "--provider", "virtualbox")
    assert proc.returncode == 0, proc.stderr


def test_an_image_no_provider_holds_is_one_line(vbox_lab):
    proc = vbox_lab.fab("image-start", "--image", "nowhere")
    assert proc.returncode == 2
    line = last_line(proc)
    # a provider that cannot answer here (libvirt with no daemon running) is named in the same line
    assert line.startswith("error: no provider holds an image 'nowhere'") and line.endswith("see `fab image-list`"), line
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


# ----------------------------------------------------------------------------- item 7
def test_nginx_stop_is_refused_during_a_build_and_stops_after(vbox_lab, vbox_provider):
    from fabfile.hosts import endpoint as nginxctl

    with nginxctl.serving("lab-web2"):
        proc = vbox_lab.fab("nginx-stop")
        assert proc.returncode == 1
        assert last_line(proc) == ("error: booted's nginx is serving the install of lab-web2; not stopped "
                                   "(wait for the build, or pass --force)")
    proc = vbox_lab.fab("nginx-stop")
    assert (proc.returncode, proc.stdout.strip()) == (0, "booted nginx stopped")
    assert nginx_pid(vbox_lab) is None
    assert vbox_lab.fab("nginx-stop").stdout.strip() == "booted nginx was not running"
