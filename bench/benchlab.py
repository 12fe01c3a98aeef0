"""The benchmarks' private lab: local hosts that booted itself builds and starts, and versions to ship.

One environment per host count N (``b1``, ``b10``, ``b30``: 41 hosts in all), so every timed
command is the unmodified ``fab hello-deploy --env bN --version V``. The lab reuses tests/lab.py's
``Lab`` (own state dir, config, bridge, subnet and nginx port; ``teardown``) with a config of its
own, and a bench-owned copy of the hello repo (``HELLO_REPO``) in which each timed run tags the
same commit under a new name, so booted packs the same bytes and every tool does a full deploy.

``open_lab`` is a context manager: the lab is torn down when the block ends, also on Ctrl-C or
SIGTERM, and no systemd-nspawn process of it is left behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from lab import Lab, can_run_local_hosts, free_port, free_subnet  # noqa: E402  (tests/lab.py)

SERVICE = "hello"
BASE_VERSION = "v2"       # the commit every run's version name points at
REMOTE_ROOT = "/opt/booted"


def env_name(n: int) -> str:
    return f"b{n}"


def image_names(n: int) -> list[str]:
    return [f"bn{n}-{i:02d}" for i in range(1, n + 1)]


def lab_config(sizes: list[int], port: int, bridge: str, subnet: str) -> str:
    """environments.yaml for the lab: settings as shipped except the lab's port, bridge and subnet."""
    lines = [
        "# written by bench/benchlab.py for one benchmark lab",
        "settings:",
        f"  nginx: {{port: {port}}}",
        "providers:",
        f"  local: {{bridge: {bridge}, subnet: {subnet}, boot_timeout_s: 90, stop_timeout_s: 20}}",
        "environments:",
    ]
    for n in sizes:
        images = image_names(n)
        lines += [
            f"  {env_name(n)}:",
            "    provider: local",
            f"    images: [{', '.join(images)}]",
            "    roles:",
            f"      loadbalancers: [{images[0]}]",
            f"      workers: [{', '.join(images)}]",
            f"    service: {SERVICE}",
            f"    version: {BASE_VERSION}",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class BenchLab:
    lab: Lab
    sizes: list[int]
    hello_repo: Path
    commit: str = ""
    addresses: dict[int, list[str]] = field(default_factory=dict)   # N -> worker addresses
    uppers: dict[str, Path] = field(default_factory=dict)           # address -> overlay upper dir

    @property
    def state(self) -> Path:
        return self.lab.state

    def booted_paths(self) -> dict[str, str]:
        """What points booted at the lab: its state dir and config, and the bench's hello repo."""
        return {"BOOTED_STATE_DIR": str(self.state), "BOOTED_CONFIG": str(self.lab.config_path),
                "HELLO_REPO": str(self.hello_repo)}

    def booted_env(self) -> dict[str, str]:
        """Environment for set-up fab commands (tests/lab.py's, plus the bench's hello repo)."""
        return self.lab.env(HELLO_REPO=str(self.hello_repo))

    def fab(self, *args: str, timeout: float = 900) -> None:
        """A set-up fab command; its output streams to the terminal; raises on failure."""
        argv = ["fab", *args]
        print(f"$ {' '.join(argv)}", flush=True)
        proc = subprocess.run(argv, cwd=ROOT, env=self.booted_env(), timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` failed (exit {proc.returncode})")

    # ------------------------------------------------------------------ versions
    def new_version(self, label: str) -> str:
        """A new tag on the base commit (a new release name; the same packed bytes)."""
        name = f"{label}-{time.time_ns() % 10**12:012d}"
        git(["-C", str(self.hello_repo), "tag", name, self.commit])
        return name

    # ------------------------------------------------------------------ checks
    def current_release(self, address: str) -> str | None:
        """Where ``current`` points on the host, read from its overlay (no SSH involved)."""
        try:
            return os.readlink(self.uppers[address] / REMOTE_ROOT.lstrip("/") / SERVICE / "current")
        except OSError:
            return None


def git(args: list[str]) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
                               "LC_ALL": "C"})
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _make_hello_repo(lab: Lab, dest: Path) -> str:
    """A bare copy of the hello repo booted builds (v1, v2); returns v2's commit."""
    with lab.activated():
        from fabfile.services import manifest as services
        from fabfile.services import repo as servicerepo

        source = servicerepo.ensure_local_repo(services.get(SERVICE))
    git(["clone", "--quiet", "--bare", str(source), str(dest)])
    return git(["-C", str(dest), "rev-parse", f"{BASE_VERSION}^{{commit}}"])


def _nspawn_pids(state: Path) -> list[int]:
    """systemd-nspawn processes whose command line names this lab's state dir."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"systemd-nspawn" in cmd.split(b"\0", 1)[0] and str(state).encode() in cmd:
            found.append(int(proc.name))
    return found


def _start_hosts(bench: BenchLab, workers: int = 4) -> None:
    """Build and start every host with booted (image-build, image-start), record them, first deploy.

    No load balancer is configured: with a live one, hello-deploy does a rolling deploy (one
    worker at a time, by design), and the benchmark measures booted's parallel deploy.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    bench.fab("restart-nginx")
    images = [i for n in bench.sizes for i in image_names(n)]
    # The first host alone, its output shown: it builds the base image if none is cached (debootstrap).
    bench.fab("image-build", "--image", images[0], "image-start", "--image", images[0])
    rest = images[1:]
    chunks = [rest[k:k + 3] for k in range(0, len(rest), 3)]   # a few hosts per fab call: fewer start-ups

    def build_and_start(chunk: list[str]) -> None:
        args = []
        for image in chunk:
            args += ["image-build", "--image", image, "image-start", "--image", image]
        proc = subprocess.run(["fab", *args], cwd=ROOT, env=bench.booted_env(), capture_output=True, text=True,
                              timeout=900, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            said = (proc.stderr or proc.stdout).strip()
            raise RuntimeError(f"starting {', '.join(chunk)} failed: {said[-500:]}{_console_tail(said)}")

    print(f"lab: building and starting {len(rest)} more hosts, {workers} at a time", flush=True)
    done = 1
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(build_and_start, c): c for c in chunks}
        for future in as_completed(futures):
            future.result()
            done += len(futures[future])
            print(f"lab: {done}/{len(images)} hosts started ({', '.join(futures[future])})", flush=True)
    deadline = time.monotonic() + 180
    while True:
        proc = subprocess.run(["fab", "hosts-logged"], cwd=ROOT, env=bench.booted_env(), capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
        missing = sorted(set(images) - set(bench.lab.inventory()))
        if not missing:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no call home from {', '.join(missing)} within 180s: {proc.stdout.strip()[-300:]}")
        print(f"lab: waiting for {len(missing)} hosts to call home", flush=True)
        time.sleep(2)
    for n in bench.sizes:
        bench.fab("hello-deploy", "--env", env_name(n))


def _console_tail(message: str) -> str:
    """The end of the console log an error names (the lab's files go at teardown)."""
    import re

    found = re.search(r"see (\S+console\.log)", message)
    if not found:
        return ""
    try:
        lines = Path(found.group(1)).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n  console: " + "\n  console: ".join(lines[-8:])


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: unwind through open_lab's teardown."""


@contextlib.contextmanager
def open_lab(sizes: list[int], root: Path | None = None, keep: bool = False):
    """Build and start the lab's hosts with booted; always tear everything down afterwards."""
    reason = can_run_local_hosts()
    if reason:
        raise SystemExit(f"cannot run local hosts here: {reason}")
    root = Path(root) if root else Path(tempfile.mkdtemp(prefix="booted-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    bridge = f"bbch{os.getpid() % 100000:05d}"
    lab = Lab(root=root, bridge=bridge, subnet=free_subnet(), port=free_port(),
              config_path=root / "environments.yaml")
    lab.config_path.write_text(lab_config(sizes, lab.port, lab.bridge, lab.subnet))
    if os.environ.get("BOOTED_IMAGE_CACHE"):
        lab.extra_env["BOOTED_IMAGE_CACHE"] = os.environ["BOOTED_IMAGE_CACHE"]

    def on_term(signum, frame):
        raise _Terminated(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    bench = BenchLab(lab=lab, sizes=sizes, hello_repo=root / "hello.git")
    try:
        print(f"lab: {root} (bridge {lab.bridge}, subnet {lab.subnet}, nginx port {lab.port})", flush=True)
        bench.commit = _make_hello_repo(lab, bench.hello_repo)
        started = time.monotonic()
        _start_hosts(bench)
        print(f"lab: {sum(sizes)} hosts up and serving {SERVICE} {BASE_VERSION} in "
              f"{time.monotonic() - started:.0f}s", flush=True)
        inventory = lab.inventory()
        for n in sizes:
            bench.addresses[n] = [inventory[i]["address"] for i in image_names(n)]
            for image in image_names(n):
                bench.uppers[inventory[image]["address"]] = lab.state / "local" / "hosts" / image / "upper"
        yield bench
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut the teardown short
        try:
            print("lab: tearing down", flush=True)
            lab.teardown()
            left = _nspawn_pids(lab.state)
            if left:
                print(f"lab: WARNING systemd-nspawn still running: {left}", file=sys.stderr, flush=True)
            elif not keep:
                shutil.rmtree(root, ignore_errors=True)
        finally:
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, signal.default_int_handler)
