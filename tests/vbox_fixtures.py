"""Fixtures for the VirtualBox provider tests: the VBoxManage stand-in first on PATH, a config with a
VirtualBox environment, a real (test) install ISO, and an image already built by the provider.

``VBoxLab`` is one isolated world: its own stand-in registry (VBOX_STANDIN_HOME), state dir
(BOOTED_STATE_DIR) and config (BOOTED_CONFIG). Building an image costs about a second of stand-in calls,
so one is built per module (``vbox_template``) and each test gets a copy of that world (``vbox_lab``).

``VBoxLab.fab`` runs ``fab ARGS`` in a child process with the lab's environment, cwd at the repo root and
no terminal on stdin. By default the child is forked from the test process, which has fabric and fabfile
imported already: a cold ``python -m fabric`` costs ~0.7 s of CPU, and the module must stay under 20 s.
The child still parses the command line, loads the task collection from the repo and runs the task exactly
as ``fab`` does (``fabric.main.program.run``). ``cold=True`` execs a fresh ``python -m fabric`` instead;
some tests use it so the real entry point is exercised too. Forked children see no monkeypatching of
modules, because the tests using ``fab`` do none.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.isofixture import make_test_iso
from tests.lab import free_port

REPO = Path(__file__).resolve().parent.parent
STANDIN_DIR = Path(__file__).resolve().parent / "vboxmanage"
IMAGE = "lab-web1"   # built in every lab
MUTATING = {"createvm", "modifyvm", "storagectl", "createmedium", "storageattach", "closemedium", "startvm",
            "controlvm", "clonevm", "unregistervm"}

CONFIG = """\
settings:
  nginx: {{port: {port}}}
providers:
  virtualbox:
    iso: "{iso}"
    build_timeout_s: 5
    stop_timeout_s: 0.5
    boot_timeout_s: 5
environments:
  lab:
    provider: virtualbox
    images: [lab-web1, lab-web2, lab-web3]
    roles:
      loadbalancers: [lab-web1]
      workers: [lab-web1, lab-web2, lab-web3]
    service: hello
    version: v1
"""


@dataclass
class VBoxLab:
    root: Path

    @property
    def home(self) -> Path:
        return self.root / "vbox"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def config(self) -> Path:
        return self.root / "environments.yaml"

    @property
    def iso(self) -> Path:
        return self.root / "install.iso"

    @property
    def env(self) -> dict[str, str]:
        """The environment for booted and the stand-in; nothing of the user's BOOTED_*/VBOX_* settings."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("BOOTED_", "VBOX_"))}
        base.update({
            "PATH": f"{STANDIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
            "VBOX_STANDIN_HOME": str(self.home),
            "BOOTED_STATE_DIR": str(self.state),
            "BOOTED_CONFIG": str(self.config),
            "BOOTED_PXELINUX_DIR": str(self.root / "pxelinux"),
            "BOOTED_VBOX_RETRY_DELAY": "0.01",
            "BOOTED_VBOX_RETRY_WINDOW": "0.3",
            "VBOX_STANDIN_INSTALL_SECONDS": "0.1",
        })
        return base

    # ------------------------------------------------------------------ running things
    def fab(self, *args: str, env: dict[str, str] | None = None, cold: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """``fab ARGS`` from the repo root, as a user runs it (no terminal on stdin); see the module doc."""
        full_env = {**self.env, **(env or {})}
        if cold:
            return subprocess.run([sys.executable, "-m", "fabric", *args], cwd=REPO, env=full_env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        return _forked_fab(list(args), full_env, timeout)

    def vboxmanage(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Call the stand-in directly (to set a scene, or to test the stand-in itself)."""
        return subprocess.run(["VBoxManage", *args], env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=30)

    def calls(self) -> list[list[str]]:
        """Every VBoxManage invocation since the last ``clear_calls()``, as argument lists."""
        log = self.home / "invocations.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    def changes(self) -> list[list[str]]:
        """The calls that change something (what a build or clone *does*), in order."""
        return [c for c in self.calls() if c and (c[0] in MUTATING or c[:1] == ["snapshot"] and "take" in c)]

    def clear_calls(self) -> None:
        (self.home / "invocations.jsonl").unlink(missing_ok=True)

    def registry(self) -> dict:
        return json.loads((self.home / "state.json").read_text())

    def vm(self, name: str) -> dict | None:
        return next((vm for vm in self.registry()["vms"].values() if vm["name"] == name), None)

    def medium_paths(self) -> list[str]:
        return sorted(m["path"] for m in self.registry()["media"].values())


def _forked_fab(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    from fabric.main import program

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: become `fab ARGS` and never return into pytest
            code = 1
            try:
                os.chdir(REPO)
                os.environ.clear()
                os.environ.update(env)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdin = open(0, closefd=False)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                try:
                    program.run(["fab", *args], exit=True)
                    code = 0
                except SystemExit as done:
                    code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done_pid, status = os.waitpid(pid, os.WNOHANG)
            if done_pid:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(["fab", *args], timeout)
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["fab", *args], os.waitstatus_to_exitcode(status),
                                           out.read().decode(), err.read().decode())


def make_world(root: Path) -> VBoxLab:
    """A lab with config, test ISO and PXE loader files, but no images yet."""
    lab = VBoxLab(root)
    root.mkdir(parents=True, exist_ok=True)
    make_test_iso(lab.iso)
    pxe = root / "pxelinux"
    pxe.mkdir(exist_ok=True)
    (pxe / "pxelinux.0").write_bytes(b"test pxelinux.0\n")
    (pxe / "ldlinux.c32").write_bytes(b"test ldlinux.c32\n")
    lab.config.write_text(CONFIG.format(iso=lab.iso, port=free_port()))
    return lab


def stop_nginx(lab: VBoxLab) -> None:
    """Stop the booted nginx this lab's state dir runs (a build starts one), if any."""
    pid_file = lab.state / "nginx" / "nginx.pid"
    try:
        pid = int(pid_file.read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return
    if b"nginx" in command and str(lab.state).encode() in command:
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.02)
    pid_file.unlink(missing_ok=True)


def start_nginx(lab: VBoxLab) -> None:
    """booted's nginx for this lab, started in this process (for provider calls made in-process)."""
    from fabfile.hosts import endpoint as nginxctl
    from fabfile.providers import load_config

    nginxctl.restart(load_config(lab.config), rotate=False)


def provider_in(lab: VBoxLab, monkeypatch):
    """A VirtualBoxProvider in this process, seeing ``lab``'s environment."""
    from fabfile.providers import load_config
    from fabfile.providers.virtualbox.provider import VirtualBoxProvider

    for key in [k for k in os.environ if k.startswith(("BOOTED_", "VBOX_"))]:
        monkeypatch.delenv(key)
    for key, value in lab.env.items():
        if key.startswith(("BOOTED_", "VBOX_")) or key == "PATH":
            monkeypatch.setenv(key, value)
    return VirtualBoxProvider(load_config(lab.config))


def world_root(prefix: str) -> Path:
    """A folder for a world that booted's nginx workers (user nobody) can reach, as they must to serve a
    kickstart: pytest's own temporary folders are 0700. The caller removes it."""
    root = Path(tempfile.mkdtemp(prefix=f"booted-{prefix}-"))
    root.chmod(0o711)
    return root


@pytest.fixture(scope="module")
def vbox_template() -> VBoxLab:
    """A world in which the provider has built ``lab-web1`` (powered off, installed, DVD removed)."""
    root = world_root("vbox-template")
    try:
        yield _built_template(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _built_template(root: Path) -> VBoxLab:
    lab = make_world(root / "world")
    try:
        with pytest.MonkeyPatch.context() as mp:
            provider = provider_in(lab, mp)
            start_nginx(lab)
            provider.build(IMAGE, _lab_env(lab))
    finally:
        stop_nginx(lab)
    lab.clear_calls()
    return lab


def _lab_env(lab: VBoxLab):
    from fabfile.providers import load_config

    return load_config(lab.config).environments["lab"]


@pytest.fixture
def vbox_lab(vbox_template) -> VBoxLab:
    """A private copy of the template world (absolute paths rewritten), with an empty invocation log."""
    root = world_root("vbox-lab")
    lab = VBoxLab(root / "world")
    shutil.copytree(vbox_template.root, lab.root, symlinks=True)
    old, new = str(vbox_template.root), str(lab.root)
    for path in (lab.home / "state.json", lab.config, lab.state / "pxeboot" / "digests.json",
                 lab.state / "virtualbox.json"):
        if path.exists():
            path.write_text(path.read_text().replace(old, new))
    lab.clear_calls()
    try:
        yield lab
    finally:
        stop_nginx(lab)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def vbox_provider(vbox_lab, monkeypatch):
    """The provider, in this process, in ``vbox_lab``'s world, with the lab's booted nginx running."""
    provider = provider_in(vbox_lab, monkeypatch)
    start_nginx(vbox_lab)
    return provider
