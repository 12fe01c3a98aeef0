"""A private lab for the real tests: its own state dir, config, bridge, subnet and nginx port.

Everything the lab starts (containers, network namespaces, the bridge, booted's nginx) is torn
down at the end of the session, also when tests fail. Nothing here touches an environment a user
left running: every name is derived from the lab's own state dir.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from fabfile.core.localcmd import process_alive  # noqa: E402
from fabfile.providers import load_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_subnet() -> str:
    """A /24 in 10.200-249.x.0 that no route on this machine overlaps."""
    routes = json.loads(subprocess.run(["ip", "-j", "route", "show", "table", "all"], capture_output=True,
                                       text=True).stdout or "[]")
    used = []
    for r in routes:
        dst = r.get("dst", "")
        if dst and dst != "default" and ":" not in dst:
            try:
                used.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
            except ValueError:
                pass
    seed = os.getpid()
    for n in range(2500):
        k = (seed + n * 7919) % 12800
        net = ipaddress.ip_network(f"10.{200 + k // 256}.{k % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free 10.x subnet for the test lab")


@dataclass
class FabResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __str__(self) -> str:
        return f"$ {' '.join(self.argv)}  -> exit {self.returncode}\n{self.stdout}\n{self.stderr}"


@dataclass
class Lab:
    root: Path
    bridge: str
    subnet: str
    port: int
    config_path: Path
    extra_env: dict = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.root / "state"

    def env(self, **extra: str) -> dict:
        env = dict(os.environ)
        env.update({
            "BOOTED_STATE_DIR": str(self.state),
            "BOOTED_CONFIG": str(self.config_path),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        for key in ("BOOTED_LOG", "BOOTED_USER", "HELLO_REPO", "BOOTED_SSH_KEY"):
            env.pop(key, None)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def fab(self, *args: str, timeout: float = 600, check: bool = False, **extra_env: str) -> FabResult:
        argv = ["fab", *args]
        proc = subprocess.run(argv, cwd=ROOT, env=self.env(**extra_env), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        result = FabResult(argv, proc.returncode, proc.stdout, proc.stderr)
        if check and not result.ok:
            raise AssertionError(str(result))
        return result

    @contextmanager
    def activated(self):
        """Point this process's booted code at the lab (for in-process checks and cleanup)."""
        # the lab's own variables too (BOOTED_IMAGE_CACHE): in-process code must use the cache the
        # lab's fab runs use, or it builds a second base image in the lab's state dir
        wanted = {**self.extra_env, "BOOTED_STATE_DIR": str(self.state), "BOOTED_CONFIG": str(self.config_path)}
        saved = {k: os.environ.get(k) for k in wanted}
        os.environ.update(wanted)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def config(self):

        return load_config(self.config_path)

    def host_address(self, image: str) -> str:
        data = json.loads((self.state / "local" / "hosts" / image / "host.json").read_text())
        return data["address"]

    def inventory(self) -> dict:
        path = self.state / "inventory.json"
        return json.loads(path.read_text())["hosts"] if path.exists() else {}

    def ssh(self, image: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a command on a lab host with OpenSSH (an independent check of what booted did)."""
        key = self.state / "ssh" / "id_ed25519"
        import shlex

        return subprocess.run(
            ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
             f"booted@{self.host_address(image)}", " ".join(shlex.quote(a) for a in argv)],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def teardown(self) -> list["Leftover"]:
        """Stop every host, namespace and nginx this lab started, and remove its bridge.

        Hosts are stopped through the provider's forced stop (it kills each host's cgroup and every
        process on its overlay, and waits). Returns what of the lab's hosts still ran after that (a
        failure of the stop), after killing it here as a last resort."""
        hosts = self.state / "local" / "hosts"
        problems = []
        with self.activated():
            from fabfile.hosts import endpoint as nginxctl
            from fabfile.providers import bridge, get_provider, load_config
            from fabfile.providers.local import network as localnet

            try:
                provider = get_provider("local", load_config(self.config_path))
            except Exception as err:  # a test may have broken the lab's config; the kill below still runs
                problems.append(f"lab config: {err}")
                provider = None
            for folder in sorted(hosts.iterdir()) if hosts.exists() else []:
                if provider is not None and (folder / "host.json").exists():
                    try:
                        provider.stop(folder.name, force=True)
                    except Exception as err:
                        problems.append(f"{folder.name}: {err}")
                localnet.host_down(localnet.HostLink.for_image(folder.name))
            bridge.remove_bridge(self.bridge)
            nginxctl.stop()
        if problems:
            print("lab teardown: " + "; ".join(problems), file=sys.stderr)
        survivors = self.leftover_processes()
        kill_processes(survivors)
        # processes the tests started on this machine (load generators, monitors) end with the session
        return survivors

    def leftover_processes(self, host: str | None = None) -> list["Leftover"]:
        """What of this lab's hosts (or of ``host``) runs (see the module-level ``leftover_processes``)."""
        return [p for p in leftover_processes(self.root) if host is None or p.host == host]

    def orphaned_processes(self) -> list["Leftover"]:
        """Processes of lab hosts whose systemd-nspawn is gone: what a stop that did not end its host leaves."""
        found = self.leftover_processes()
        supervised = {p.host for p in found if p.nspawn}
        return [p for p in found if p.host not in supervised]


@dataclass(frozen=True)
class Leftover:
    pid: int
    host: str  # the host folder the process belongs to
    command: str
    nspawn: bool = False  # the host's systemd-nspawn itself (its root is the machine's)

    def __str__(self) -> str:
        return f"{self.host}: pid {self.pid} {self.command}"


def _root_upperdir(pid: str) -> str | None:
    """The overlay upper directory of a process's root file system (None: not an overlay, or gone)."""
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return None
    upper = None
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if len(fields) > 4 and fields[4] == "/" and after[:1] == ["overlay"] and len(after) > 2:
            for option in after[2].split(","):
                if option.startswith("upperdir="):
                    upper = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), option[9:])
    return upper


def leftover_processes(under: Path) -> list[Leftover]:
    """Every live process on this machine that belongs to a host whose folder is below ``under``:
    its root file system is that host's overlay, or it is a systemd-nspawn naming that folder.

    Found by the process's root, not by its name: a host whose nspawn died keeps running as
    systemd, sshd and the service. Read straight from /proc, independently of booted's own
    containment code, so a test can hold that code to it."""
    under_text = str(Path(under).resolve())
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid() or not process_alive(int(pid)):
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        command = b" ".join(argv).decode(errors="replace").strip()[:120]
        upper = _root_upperdir(pid)
        if upper and (upper + "/").startswith(under_text + "/"):
            found.append(Leftover(int(pid), Path(upper).parent.name, command))
        elif argv and argv[0].endswith(b"systemd-nspawn") and under_text.encode() in b" ".join(argv):
            host = next((Path(a.decode(errors="replace")).parent.name for a in argv
                         if a.startswith(b"--overlay=")), "?")
            found.append(Leftover(int(pid), host, command, nspawn=True))
    return found


def kill_processes(leftovers: list[Leftover], timeout: float = 10) -> None:
    """SIGKILL ``leftovers`` and wait until they are gone."""
    for item in leftovers:
        try:
            os.kill(item.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(process_alive(item.pid) for item in leftovers) and time.monotonic() < deadline:
        time.sleep(0.05)


LAB_CONFIG = """\
settings:
  nginx: {{port: {port}}}
  deploy: {{timeout_s: 60, parallel: 16}}
providers:
  local: {{bridge: {bridge}, subnet: {subnet}, boot_timeout_s: 60, stop_timeout_s: 20, memory_max: 768M, pids_max: 1024}}
environments:
  lab:
    provider: local
    images: [lab-lb, lab-w1, lab-w2, lab-w3]
    roles:
      loadbalancers: [lab-lb]
      workers: [lab-w1, lab-w2, lab-w3]
    service: hello
    version: v1
    workers: {{min: 1, max: 3}}
    lb_port: 8080
    monitor:
      latency_high_ms: 150
      latency_low_ms: 40
      interval_s: 1
      probes: 6
      up_samples: 2
      down_window_s: 4
      up_cooldown_s: 2
      down_cooldown_s: 4
      health_failures: 2
      warmup_timeout_s: 90
  dep:
    provider: local
    images: [dep-lb, dep-1, dep-2, dep-3]
    roles:
      loadbalancers: [dep-lb]
      workers: [dep-1, dep-2, dep-3]
    service: hello
    version: v1
  drill:
    provider: local
    images: [drill-lb, drill-w1, drill-w2, drill-w3]
    roles:
      loadbalancers: [drill-lb]
      workers: [drill-w1, drill-w2, drill-w3]
    service: hello
    version: v1
  sat:
    provider: local
    images: [sat-lb, sat-w1, sat-w2, sat-w3]
    roles:
      loadbalancers: [sat-lb]
      workers: [sat-w1, sat-w2, sat-w3]
    service: hello
    version: v1
  solo:
    provider: local
    images: [solo-box]
    roles:
      loadbalancers: [solo-box]
      workers: [solo-box]
    service: hello
    version: v2
  cli:
    provider: local
    images: [cli-box]
    roles:
      loadbalancers: [cli-box]
      workers: [cli-box]
    service: hello
    version: v1
  disco:
    provider: local
    images: [disco-1, disco-2, disco-3]
    roles:
      loadbalancers: [disco-1]
      workers: [disco-1, disco-2, disco-3]
    service: hello
    version: v1
"""


def make_lab(root: Path) -> Lab:
    root.mkdir(parents=True, exist_ok=True)
    bridge = f"btst{os.getpid() % 100000:05d}"
    lab = Lab(root=root, bridge=bridge, subnet=free_subnet(), port=free_port(), config_path=root / "environments.yaml")
    lab.config_path.write_text(LAB_CONFIG.format(port=lab.port, bridge=lab.bridge, subnet=lab.subnet))
    if os.environ.get("BOOTED_IMAGE_CACHE"):
        lab.extra_env["BOOTED_IMAGE_CACHE"] = os.environ["BOOTED_IMAGE_CACHE"]
    return lab


def can_run_local_hosts() -> str | None:
    """None if this machine can run the lab, else why not."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, network namespaces)"
    import shutil

    for tool in ("systemd-nspawn", "debootstrap", "ip", "ssh"):
        if not shutil.which(tool):
            return f"{tool} is not installed (see .ci/run)"
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        return "nginx is not installed (see .ci/run)"
    return None


if __name__ == "__main__":  # python3 tests/lab.py: print a lab config for manual runs
    print(LAB_CONFIG.format(port=free_port(), bridge="btstmanual", subnet=free_subnet()), file=sys.stdout)
