"""The contestants: one deploy of one release to N hosts, done by booted, pyinfra, Ansible and OpenSSH.

Every tool ships the same packed release (booted's own release.prepare output, the same file)
and runs the same remote work, booted's DEPLOY_SCRIPT with the same arguments: unpack into
/opt/booted/hello/releases/<V>, switch ``current`` atomically, install/keep the systemd unit,
restart booted-hello.service, prune old releases; then the controller checks /version == V.

* ``booted``  ``fab hello-deploy --env bN --version V`` from the repo root, as shipped.
* ``pyinfra`` ``pyinfra -y --parallel N inventory.py deploy.py`` (files.put, server.shell, python.call).
* ``ansible`` ``ansible-playbook -f N`` with the fair settings of docs/benchmarking.md §2: no facts, pipelining,
  interpreter_python fixed, ControlPersist per run, host key checking off (copy, shell, one check).
* ``floor``   one OpenSSH ``ssh`` per host in parallel, the tarball streamed into the same remote
  command on stdin, then the same HTTP polling; run from the harness (no interpreter start-up).

All tools log in as booted's user with booted's key and become root with sudo, as booted does.
Both OpenSSH users (Ansible, floor) get curve25519 key exchange, as paramiko uses; OpenSSH 9.2's
default (sntrup761x25519) costs ~75 ms more client CPU per connection (docs/benchmarking.md §6).
"""
from __future__ import annotations

import http.client
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = BENCH / ".venv"
PEERS = BENCH / "peers"
TOOLS = ("booted", "pyinfra", "ansible", "floor")
OPENSSH_OPTIONS = [
    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "IdentitiesOnly=yes", "-o", "KexAlgorithms=curve25519-sha256", "-o", "LogLevel=ERROR",
]


@dataclass
class Shipment:
    """What every tool ships in one run."""

    service: str
    version: str
    commit: str
    tarball: Path
    unit: str
    script: str
    keep: int
    port: int
    user: str
    key: Path

    def remote_argv(self) -> list[str]:
        return ["sh", "-c", self.script, "deploy", self.service, self.version, self.commit, self.unit, str(self.keep)]

    def as_json(self) -> dict:
        return {
            "service": self.service, "version": self.version, "commit": self.commit,
            "tarball": str(self.tarball), "unit": self.unit, "deploy_script": self.script,
            "keep": self.keep, "port": self.port, "check_script": str(PEERS / "check_versions.py"),
        }


@dataclass
class Outcome:
    returncode: int
    stderr: str


def timing_env(lab_root: Path) -> dict[str, str]:
    """The environment every timed tool runs in: bytecode cached (in the lab), nothing else special.

    This machine exports PYTHONDONTWRITEBYTECODE=1, which would make every ``fab`` recompile
    fabfile/ (a user's machine caches bytecode); the cache goes to the lab, not into the repo.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "BOOTED_LOG", "BOOTED_USER", "BOOTED_SSH_KEY", "HELLO_REPO")}
    env["PYTHONPYCACHEPREFIX"] = str(lab_root / "pycache")
    return env


def fab_executable() -> str:
    """The real ``fab`` next to this Python (not a pyenv shim: a bash script that costs ~50 ms a call)."""
    here = Path(sys.executable).parent / "fab"
    if here.exists():
        return str(here)
    import shutil

    found = shutil.which("fab")
    if not found:
        raise SystemExit("fab is not installed (pip install fabric==3.2.3)")
    return found


class Runner:
    """Runs one tool's deploy of a Shipment to the hosts of one N; returns an Outcome."""

    def __init__(self, lab, work: Path, env: dict[str, str], ship: Shipment, booted_repo: Path = ROOT):
        self.lab = lab           # benchlab.BenchLab
        self.user, self.key = ship.user, ship.key
        self.work = work         # scratch files for the peers (inventories, run files)
        self.env = env
        self.booted_repo = booted_repo
        self.fab = fab_executable()
        work.mkdir(parents=True, exist_ok=True)
        self._write_inventories()
        self._write_ansible_cfg()

    # ------------------------------------------------------------------ generated files
    def _write_inventories(self) -> None:
        from benchlab import image_names

        for n, addresses in self.lab.addresses.items():
            hostvars = {
                "ssh_user": self.user, "ssh_key": str(self.key), "ssh_known_hosts_file": "/dev/null",
                "ssh_strict_host_key_checking": "off", "ssh_allow_agent": False, "ssh_look_for_keys": False,
            }
            hosts = [(a, hostvars) for a in addresses]
            (self.work / f"pyinfra_inventory_{n}.py").write_text(f"web = {hosts!r}\n")
            lines = ["[web]"] + [f"{image} ansible_host={a}" for image, a in zip(image_names(n), addresses)]
            lines += ["", "[web:vars]", f"ansible_user={self.user}", f"ansible_ssh_private_key_file={self.key}"]
            (self.work / f"ansible_inventory_{n}.ini").write_text("\n".join(lines) + "\n")

    def _write_ansible_cfg(self) -> None:
        ssh_args = " ".join(["-o ControlMaster=auto", "-o ControlPersist=120s", *[
            f"{a} {b}" for a, b in zip(OPENSSH_OPTIONS[::2], OPENSSH_OPTIONS[1::2]) if "BatchMode" not in b]])
        (self.work / "ansible.cfg").write_text(
            "# the fair profile of docs/benchmarking.md §2 (forks = N is passed as -f N)\n"
            "[defaults]\n"
            "gathering = explicit\n"
            "host_key_checking = False\n"
            "interpreter_python = /usr/bin/python3\n"
            "retry_files_enabled = False\n"
            f"local_tmp = {self.work / 'ansible-local'}\n"
            "[ssh_connection]\n"
            "pipelining = True\n"
            f"ssh_args = {ssh_args}\n"
        )

    # ------------------------------------------------------------------ one run
    def run(self, tool: str, n: int, ship: Shipment, log: Path) -> Outcome:
        return getattr(self, f"_run_{tool}")(n, ship, log)

    def _subprocess(self, argv: list[str], env: dict, log: Path, cwd: Path = ROOT) -> Outcome:
        with open(log, "wb") as out:
            proc = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=600)
        return Outcome(proc.returncode, _tail(log))

    def _run_booted(self, n: int, ship: Shipment, log: Path) -> Outcome:
        from benchlab import env_name

        env = {**self.env, **self.lab.booted_paths()}
        return self._subprocess([self.fab, "hello-deploy", "--env", env_name(n), "--version", ship.version],
                                env, log, cwd=self.booted_repo)

    def _run_file(self, ship: Shipment) -> Path:
        path = self.work / f"run-{ship.version}.json"
        path.write_text(json.dumps(ship.as_json()))
        return path

    def _run_pyinfra(self, n: int, ship: Shipment, log: Path) -> Outcome:
        env = {**self.env, "BENCH_RUN": str(self._run_file(ship))}
        argv = [str(VENV / "bin" / "pyinfra"), "-y", "--parallel", str(n),
                str(self.work / f"pyinfra_inventory_{n}.py"), str(PEERS / "pyinfra" / "deploy.py")]
        return self._subprocess(argv, env, log, cwd=self.work)

    def _run_ansible(self, n: int, ship: Shipment, log: Path) -> Outcome:
        control = self.work / f"cp-{ship.version}"    # a fresh ControlPersist dir: every run starts cold
        control.mkdir()
        env = {**self.env, "ANSIBLE_CONFIG": str(self.work / "ansible.cfg"),
               "ANSIBLE_HOME": str(self.work / "ansible-home"), "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control)}
        argv = [str(VENV / "bin" / "ansible-playbook"), "-f", str(n), "-i",
                str(self.work / f"ansible_inventory_{n}.ini"), str(PEERS / "ansible" / "deploy.yml"),
                "-e", f"@{self._run_file(ship)}"]
        try:
            return self._subprocess(argv, env, log, cwd=self.work)
        finally:
            close_control_masters(control)

    def _run_floor(self, n: int, ship: Shipment, log: Path) -> Outcome:
        """One ssh per host, all at once; each streams the tarball into the command, then polls HTTP."""
        command = shlex.join(ship.remote_argv())
        if ship.user != "root":
            command = "sudo -n -- " + command
        errors: list[str] = []

        def one(address: str) -> None:
            with open(ship.tarball, "rb") as data:
                proc = subprocess.run(["ssh", "-i", str(ship.key), *OPENSSH_OPTIONS, f"{ship.user}@{address}", command],
                                      stdin=data, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
            if proc.returncode != 0:
                errors.append(f"{address}: ssh exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-200:]}")
                return
            problem = wait_for_version(address, ship.port, ship.version)
            if problem:
                errors.append(problem)

        threads = [threading.Thread(target=one, args=(a,)) for a in self.lab.addresses[n]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        log.write_text("\n".join(errors))
        return Outcome(1 if errors else 0, "; ".join(errors)[-500:])


def wait_for_version(address: str, port: int, version: str, timeout: float = 60.0) -> str | None:
    """Poll /version every 50 ms (booted's interval) until it is ``version``; None, or what went wrong."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = http_get(address, port, "/version")
            if status == 200 and body == version:
                return None
            last = f"{status} {body[:40]!r}"
        except OSError as err:
            last = str(err)
        time.sleep(0.05)
    return f"{address}: not serving {version} after {timeout:g}s ({last})"


def http_get(address: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace").strip()
    finally:
        conn.close()


def close_control_masters(control: Path) -> None:
    """End the ControlPersist masters Ansible left in ``control`` (they outlive ansible-playbook)."""
    for sock in control.iterdir() if control.exists() else []:
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "bench"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    for leftover in control.iterdir() if control.exists() else []:
        leftover.unlink(missing_ok=True)
    control.rmdir() if control.exists() else None


def _tail(log: Path, lines: int = 6) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-800:]


def versions(peers: bool) -> dict[str, str]:
    """Tool versions, for the results file."""
    out = {}
    probes = {
        "fabric (booted)": [sys.executable, "-c", "import importlib.metadata as m; print(m.version('fabric'))"],
        "paramiko (booted)": [sys.executable, "-c", "import paramiko; print(paramiko.__version__)"],
    }
    if peers:
        probes.update({
            "ansible-core": [str(VENV / "bin" / "python"), "-c", "import ansible.release as r; print(r.__version__)"],
            "pyinfra": [str(VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('pyinfra'))"],
            "paramiko (peers)": [str(VENV / "bin" / "python"), "-c", "import paramiko; print(paramiko.__version__)"],
            "openssh": ["ssh", "-V"],
        })
    for name, argv in probes.items():
        proc = subprocess.run(argv, capture_output=True, text=True)
        out[name] = (proc.stdout or proc.stderr).strip()
    return out
