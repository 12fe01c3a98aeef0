"""Issue 15 against a real local host (tests/lab.py): the Ansible export works with Ansible as it is, host keys
checked against booted's pins, and git over ssh never waits for a host-key answer nobody can give."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ANSIBLE = Path(sys.executable).parent / "ansible"


@pytest.fixture(scope="module")
def cli_host(lab):
    """cli-box built, started, called home, in the inventory, its host key pinned by booted."""
    lab.fab("image-build", "--image", "cli-box", check=True, timeout=1500)
    try:
        lab.fab("image-start", "--image", "cli-box", check=True)
        lab.fab("restart-nginx", check=True)
        deadline_output = ""
        for _ in range(60):
            result = lab.fab("hosts-logged", check=True)
            deadline_output = result.stdout
            if "cli-box" in lab.inventory().get(lab.host_address("cli-box"), {}).get("image", "") or any(
                    h.get("image") == "cli-box" for h in lab.inventory().values()):
                break
            import time

            time.sleep(1)
        else:
            raise AssertionError(f"cli-box never called home: {deadline_output}")
        with lab.activated():
            from fabfile.core import ssh

            with ssh.connect(lab.host_address("cli-box"), lab.config()) as conn:  # booted pins the key here
                conn.run("true", hide=True, in_stream=False)
        yield lab
    finally:
        lab.fab("image-stop", "--image", "cli-box", "--force")
        lab.fab("image-del", "--image", "cli-box", "--yes")
        lab.fab("hosts-clear", "--yes")


def ansible_ping(lab, inventory: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    import tempfile

    # a fresh home per run: no ~/.ssh/known_hosts, no ansible config of the user's, no ssh master to reuse
    home = Path(tempfile.mkdtemp(prefix="bh-"))  # short: ssh's control socket lives under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(HOME=str(home), ANSIBLE_LOCAL_TEMP=str(home / "ansible-tmp"))
    try:
        return subprocess.run([str(ANSIBLE), "-i", str(inventory), "all", "-m", "ping", "-o"], env=env,
                              capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    finally:
        # its ssh master (ControlPersist) would outlive the test: tell it to exit, then remove the home
        for sock in (home / ".ansible" / "cp").glob("*") if (home / ".ansible" / "cp").exists() else []:
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True, timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def test_exported_inventory_pings_every_host_with_host_keys_checked(cli_host, tmp_path):
    inventory = tmp_path / "inv.yml"
    inventory.write_text(cli_host.fab("hosts-list", "--format", "ansible", "--env", "cli", check=True).stdout)
    proc = ansible_ping(cli_host, inventory, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cli-box | SUCCESS" in proc.stdout and '"ping": "pong"' in proc.stdout

    # The same export against a wrong pin fails: Ansible checks booted's known_hosts, not nothing.
    known = cli_host.state / "ssh" / "known_hosts"
    saved = known.read_text()
    address = cli_host.host_address("cli-box")
    try:
        other = tmp_path / "other"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
        known.write_text(f"{address} {' '.join((other.with_suffix('.pub')).read_text().split()[:2])}\n")
        proc = ansible_ping(cli_host, inventory, tmp_path)
        assert proc.returncode != 0
        assert "UNREACHABLE" in proc.stdout and "REMOTE HOST IDENTIFICATION HAS CHANGED" in proc.stdout + proc.stderr
    finally:
        known.write_text(saved)


def test_git_over_ssh_to_an_unknown_host_fails_at_once_saying_why(cli_host, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    url = f"ssh://booted@{cli_host.host_address('cli-box')}/srv/none.git"
    proc = cli_host.fab("hello-deploy", "--env", "cli", "--version", "v1", timeout=120, HOME=str(home), HELLO_REPO=url)
    assert proc.returncode == 1
    line = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert line.startswith(f"error: cannot clone {url}: Host key verification failed.; "
                           "fatal: Could not read from remote repository."), line
    assert "BOOTED_GIT_ACCEPT_NEW_HOSTKEY=1" in line and "Traceback" not in proc.stderr
