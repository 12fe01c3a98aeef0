"""Bring-up at scale and convergence, next to plain systemd-nspawn (issue 18, items 1 and 2).

    python3 bench/bringup.py [--sizes 3,30] [--rounds 2]

Needs root and systemd-nspawn. The base image is built first, untimed, unless a current one is
cached (``BOOTED_IMAGE_CACHE=/var/cache/booted-image`` keeps it between runs). The lab is tests/lab.py's (own state dir, config, bridge, subnet, nginx port) with
one environment per N: ``uN`` = one load balancer ``uN-lb`` and N workers ``uN-wNNN``.

Per N, after a warm-up run of each case, ``--rounds`` rounds in a fresh random order of:

* **booted**: every image of ``uN`` deleted first (the base image stays cached), then the
  unmodified `fab env-start-all --env uN` until it exits: it builds each host, boots it, waits for
  the call home, deploys hello, tests it, configures the load balancer and checks a request through
  it. Correctness, checked by the harness afterwards: exit 0, a request through the load balancer
  answers 200, every worker answers ``/version`` with the environment's version.
* **converge** (right after booted, the environment up and serving): `fab env-start-all --env uN`
  again; it must exit 0 having redeployed nothing. Its floor is 1 s plus one SSH round (the
  ``ssh-round`` case: one OpenSSH `ssh host true` to every host, all at once, curve25519 key
  exchange as docs/benchmarking.md §6 says).
* **floor**: the same N+1 containers started with plain systemd-nspawn --boot from the same base
  image, each on a fresh empty overlay, in a network namespace joined to the lab's bridge the
  way booted joins its hosts (same ``ip`` plan, same bridge and subnet), all at once, until each
  answers on SSH (its banner). No provisioning, no call home, no deploy. The image makes its SSH
  host keys at first boot (`ssh-keygen -A`: RSA, ECDSA, Ed25519).
* **floor-key**: the floor with the one thing booted's hosts skip at boot done beforehand, outside
  the timing: each overlay gets an Ed25519 host key made outside and the same sshd settings booted
  writes (fabfile/providers/rootfs.py), so the containers make no keys. The stricter floor: the
  verdict is taken against it.

Printed: the table (median, min–max, paired ratio to the floor), marginal cost per host between the
two largest N, memory per host (the hosts' memory cgroups once up), and the verdicts: booted ≤ 1.5×
floor-key (and, for comparison, ÷ floor) at every N; converge ≤ 1 s + one SSH round.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import projectvenv  # noqa: E402

projectvenv.use()

import sidebyside as sbs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from lab import Lab, can_run_local_hosts, free_port, free_subnet  # noqa: E402  (tests/lab.py)

GOAL_BRINGUP = 1.5        # × floor
GOAL_CONVERGE_FIXED = 1.0  # s, plus one SSH round
VERSION = "v2"
LB_PORT = 8080


def env_name(n: int) -> str:
    return f"u{n}"


def images_of(n: int) -> tuple[str, list[str]]:
    return f"u{n}-lb", [f"u{n}-w{i:03d}" for i in range(1, n + 1)]


def lab_config(sizes: list[int], port: int, bridge: str, subnet: str) -> str:
    lines = ["# written by bench/bringup.py", "settings:", f"  nginx: {{port: {port}}}", "providers:",
             f"  local: {{bridge: {bridge}, subnet: {subnet}, boot_timeout_s: 180, stop_timeout_s: 20}}",
             "environments:"]
    for n in sizes:
        lb, workers = images_of(n)
        lines += [f"  {env_name(n)}:", "    provider: local", f"    images: [{', '.join([lb, *workers])}]",
                  "    roles:", f"      loadbalancers: [{lb}]", f"      workers: [{', '.join(workers)}]",
                  "    service: hello", f"    version: {VERSION}", f"    workers: {{min: 1, max: {n}}}",
                  f"    lb_port: {LB_PORT}"]
    return "\n".join(lines) + "\n"


def floor_addresses(subnet: str, count: int) -> list[str]:
    """The floor's hosts take addresses from the top of the subnet; booted allocates from the bottom."""
    hosts = list(ipaddress.ip_network(subnet).hosts())
    if 2 * count + 1 > len(hosts):
        raise SystemExit(f"bringup: {subnet} is too small for {count} booted hosts and {count} floor hosts")
    return [str(a) for a in reversed(hosts[-count:])]


def marginal_cost(medians: dict[int, float | None]) -> float | None:
    """Seconds per extra host between the two largest N that have a median."""
    known = sorted(n for n, m in medians.items() if m is not None)
    if len(known) < 2:
        return None
    lo, hi = known[-2], known[-1]
    return (medians[hi] - medians[lo]) / (hi - lo)


def converge_ok(returncode: int, output: str, n: int) -> tuple[bool, str]:
    """A convergence run must exit 0 and redeploy nothing: every worker 'already serving'."""
    if returncode != 0:
        return False, f"exit {returncode}"
    serving = output.count(f"already serving {VERSION}")
    if serving < n:
        return False, f"only {serving} of {n} workers said 'already serving' (it redeployed)"
    return True, ""


# ------------------------------------------------------------------------------------ helpers
def http_ok(address: str, port: int, path: str, timeout: float = 5.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}{path}", timeout=timeout) as resp:
            return resp.status == 200, resp.read().decode(errors="replace").strip()
    except OSError as err:
        return False, str(err)


def ssh_banner(address: str, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def memory_of(cgroups: list[str | Path]) -> int | None:
    """Bytes charged to a host's memory cgroup (v1 usage_in_bytes or v2 memory.current)."""
    for folder in map(Path, cgroups):
        for name in ("memory.current", "memory.usage_in_bytes"):
            try:
                return int((folder / name).read_text())
            except (OSError, ValueError):
                continue
    return None


def cpu_idle() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


class BringupLab:
    def __init__(self, sizes: list[int], keep: bool = False):
        reason = can_run_local_hosts()
        if reason:
            raise SystemExit(f"bringup: cannot run local hosts here: {reason}")
        self.root = Path(tempfile.mkdtemp(prefix="booted-bringup-"))
        bridge = f"bbup{os.getpid() % 100000:05d}"
        self.lab = Lab(root=self.root, bridge=bridge, subnet=free_subnet(), port=free_port(),
                       config_path=self.root / "environments.yaml")
        self.lab.config_path.write_text(lab_config(sizes, self.lab.port, bridge, self.lab.subnet))
        if os.environ.get("BOOTED_IMAGE_CACHE"):
            self.lab.extra_env["BOOTED_IMAGE_CACHE"] = os.environ["BOOTED_IMAGE_CACHE"]
        self.keep = keep
        self.floor_hosts: list[dict] = []

    def env(self) -> dict:
        env = self.lab.env()
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # time booted as installed: with its bytecode cached
        return env

    def fab(self, *args: str, timeout: float = 1800) -> tuple[float, subprocess.CompletedProcess]:
        start = time.perf_counter()
        proc = subprocess.run(["fab", *args], cwd=ROOT, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        return time.perf_counter() - start, proc

    def provider(self):
        from fabfile.providers import get_provider, load_config

        return get_provider("local", load_config(self.lab.config_path))

    # -------------------------------------------------------------- booted
    def reset_env(self, n: int) -> None:
        """Stop and delete every image of uN (the base image stays): the next env-start-all builds."""
        _, proc = self.fab("env-stop", "--env", env_name(n), "--keep-nginx", timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"env-stop failed: {proc.stdout[-400:]}{proc.stderr[-400:]}")
        lb, workers = images_of(n)
        with self.lab.activated():
            prov = self.provider()
            known = {m.name for m in prov.list()}
            for image in [lb, *workers]:
                if image in known:
                    prov.delete(image)

    def check_serving(self, n: int) -> tuple[bool, str]:
        inv = self.lab.inventory()
        lb, workers = images_of(n)
        if lb not in inv:
            return False, f"{lb} not in the inventory"
        ok, body = http_ok(inv[lb]["address"], LB_PORT, "/")
        if not ok:
            return False, f"through the load balancer: {body}"
        bad = [w for w in workers if w not in inv or http_ok(inv[w]["address"], 9999, "/version") != (True, VERSION)]
        return (not bad), (f"not serving {VERSION}: {', '.join(bad[:5])}" if bad else "")

    def booted_memory(self, n: int) -> int | None:
        lb, workers = images_of(n)
        total = 0
        for image in [lb, *workers]:
            record = self.lab.state / "local" / "hosts" / image / "cgroups.json"
            try:
                used = memory_of(json.loads(record.read_text()))
            except (OSError, ValueError):
                return None
            if used is None:
                return None
            total += used
        return total

    def ssh_round(self, n: int) -> sbs.Outcome:
        inv = self.lab.inventory()
        lb, workers = images_of(n)
        key = self.lab.state / "ssh" / "id_ed25519"
        argv = ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
                "-o", "KexAlgorithms=curve25519-sha256"]
        start = time.perf_counter()
        procs = [subprocess.Popen([*argv, f"booted@{inv[i]['address']}", "true"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in [lb, *workers]]
        codes = [p.wait() for p in procs]
        seconds = time.perf_counter() - start
        failed = sum(1 for c in codes if c != 0)
        return sbs.Outcome(seconds, failed == 0, f"{failed} ssh failed" if failed else "")

    # -------------------------------------------------------------- floor
    def floor_up(self, n: int, keyed: bool = False) -> sbs.Outcome:
        """N+1 plain nspawn containers, fresh overlays, same bridge: time until every one answers SSH.
        ``keyed``: each overlay holds a host key made beforehand (untimed) and booted's sshd settings."""
        from fabfile.core.state import write_tree
        from fabfile.providers import bridge, rootfs
        from fabfile.providers.local import containment
        from fabfile.providers.local import network as localnet

        with self.lab.activated():
            prov = self.provider()
            image_root = prov.image_root()
            subnet = bridge.Subnet.parse(self.lab.subnet)
            addresses = floor_addresses(self.lab.subnet, n + 1)
            tag = f"{os.getpid() % 100000:05d}"
            hosts = []
            for i, address in enumerate(addresses):
                folder = self.root / "floor" / f"f{i:03d}"
                (folder / "upper").mkdir(parents=True, exist_ok=True)
                if keyed:
                    write_tree(folder / "upper", {**rootfs.HostKey.new(f"f{i:03d}").files(),
                                                  **rootfs.own_host_key_config("booted-host.conf")})
                link = localnet.HostLink(netns=f"bfloor-{tag}-{i:03d}", veth=f"vf{tag}{i:03d}")
                mac = f"02:fe:00:00:{i // 256:02x}:{i % 256:02x}"
                hosts.append({"folder": folder, "link": link, "address": address, "mac": mac,
                              "cgroup": f"bench-floor-{tag}-{i:03d}", "proc": None, "cgroups": []})
            self.floor_hosts = hosts

            def start(h: dict) -> None:
                localnet.host_up(h["link"], self.lab.bridge, subnet, h["address"], h["mac"])
                h["cgroups"] = containment.create_cgroups(h["cgroup"], containment.Limits())
                argv = ["systemd-nspawn", "--boot", "--quiet", "--keep-unit", "--register=no", "-D", str(image_root),
                        f"--overlay={image_root}:{h['folder'] / 'upper'}:/", f"--machine=floor{h['link'].veth}",
                        f"--network-namespace-path=/run/netns/{h['link'].netns}", "--link-journal=no",
                        "--resolv-conf=off", "--timezone=off", "--console=read-only"]
                with open(h["folder"] / "console.log", "wb") as console:
                    h["proc"] = subprocess.Popen(containment.enter_argv(h["cgroups"], argv), stdin=subprocess.DEVNULL,
                                                 stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
                deadline = time.monotonic() + 180
                while not ssh_banner(h["address"]):
                    if h["proc"].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"floor host {h['address']} did not answer on SSH")
                    time.sleep(0.1)

            bridge.ensure_bridge(self.lab.bridge, subnet)
            begin = time.perf_counter()
            problems = []
            with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
                for fut in [pool.submit(start, h) for h in hosts]:
                    try:
                        fut.result()
                    except Exception as err:  # noqa: BLE001 (reported, counted as a failed run)
                        problems.append(str(err))
            seconds = time.perf_counter() - begin
            memory = sum(memory_of(h["cgroups"]) or 0 for h in hosts)
            return sbs.Outcome(seconds, not problems, "; ".join(problems[:3]), {"memory": memory})

    def floor_down(self) -> None:
        from fabfile.providers.local import containment
        from fabfile.providers.local import network as localnet

        with self.lab.activated():
            for h in self.floor_hosts:
                if h["proc"] is not None and h["proc"].poll() is None:
                    h["proc"].send_signal(signal.SIGTERM)  # nspawn: an orderly poweroff
            for h in self.floor_hosts:
                if h["proc"] is not None:
                    try:
                        h["proc"].wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        pass
                containment.HostProcesses(h["cgroups"], h["folder"] / "upper",
                                          (h["proc"].pid,) if h["proc"] else ()).kill()
                if h["proc"] is not None:
                    h["proc"].wait()
                containment.remove_cgroups(h["cgroups"])
                localnet.host_down(h["link"])
                shutil.rmtree(h["folder"], ignore_errors=True)
            self.floor_hosts = []

    def teardown(self) -> None:
        try:
            self.floor_down()
        finally:
            left = self.lab.teardown()
            if left:
                print(f"bringup: WARNING left running after teardown: {left[:5]}", file=sys.stderr)
            elif not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)


def run_size(bl: BringupLab, n: int, rounds: int, rng, samples: list,
             memory: dict) -> None:
    """Warm-up, then ``rounds`` rounds of floor and booted (+ converge, ssh-round) in random order."""

    def booted(rnd: int) -> None:
        bl.reset_env(n)
        seconds, proc = bl.fab("env-start-all", "--env", env_name(n))
        said = (proc.stdout + proc.stderr).splitlines()
        failures = [line.strip() for line in said if "fail" in line.lower() or line.startswith("error")]
        ok, note = (proc.returncode == 0, f"exit {proc.returncode}: {' | '.join(failures[:4]) or said[-1:]}")
        if ok:
            ok, note = bl.check_serving(n)
        record(f"booted@{n}", rnd, sbs.Outcome(seconds, ok, note))
        memory.setdefault(f"booted@{n}", []).append(bl.booted_memory(n))
        if not ok:
            return
        seconds, proc = bl.fab("env-start-all", "--env", env_name(n))
        ok, note = converge_ok(proc.returncode, proc.stdout, n)
        record(f"converge@{n}", rnd, sbs.Outcome(seconds, ok, note))
        record(f"ssh-round@{n}", rnd, bl.ssh_round(n))

    def floor(rnd: int, keyed: bool = False) -> None:
        case = f"{'floor-key' if keyed else 'floor'}@{n}"
        try:
            out = bl.floor_up(n, keyed=keyed)
        finally:
            bl.floor_down()
        record(case, rnd, out)
        memory.setdefault(case, []).append(out.extra.get("memory"))

    def floor_key(rnd: int) -> None:
        floor(rnd, keyed=True)

    def record(case: str, rnd: int, out: sbs.Outcome) -> None:
        samples.append(sbs.Sample(case, rnd, out.seconds, out.ok, out.note))
        tag = "warm-up" if rnd == 0 else f"round {rnd}"
        print(f"  N={n:<3} {tag:8} {case:16} {out.seconds:8.2f} s  {'ok' if out.ok else 'FAILED: ' + out.note}  "
              f"(load {sbs.loadavg()})", flush=True)

    for rnd in range(0, rounds + 1):
        order = [booted, floor, floor_key]
        rng.shuffle(order)
        for case in order:
            case(rnd)
    bl.reset_env(n)


def main() -> int:
    import random

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,30")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-lab", action="store_true")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    start_load = sbs.loadavg()
    bl = BringupLab(sizes, keep=args.keep_lab)
    samples: list[sbs.Sample] = []
    memory: dict[str, list] = {}
    rng = random.Random(args.seed)
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        print(f"lab: {bl.root} (bridge {bl.lab.bridge}, subnet {bl.lab.subnet}, nginx {bl.lab.port})", flush=True)
        _, proc = bl.fab("restart-nginx")
        if proc.returncode != 0:
            raise SystemExit(f"restart-nginx failed: {proc.stdout}{proc.stderr}")
        with bl.lab.activated():  # untimed, before any case: the floors boot the same image
            began = time.perf_counter()
            bl.provider().ensure_image()
            print(f"base image ready ({time.perf_counter() - began:.1f} s, untimed)", flush=True)
        for n in sizes:
            run_size(bl, n, args.rounds, rng, samples, memory)
    except KeyboardInterrupt:
        print("bringup: interrupted; tearing the lab down", file=sys.stderr, flush=True)
        samples.append(sbs.Sample("interrupted", 1, 0.0, False))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        bl.teardown()
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    report(samples, memory, sizes, args.rounds, start_load)
    return 0 if all(s.ok for s in samples) else 1


def report(samples: list, memory: dict, sizes: list[int], rounds: int, start_load: str) -> None:
    print()
    print(f"Bring-up of 1 load balancer + N workers (local provider, cached image); {rounds} rounds + warm-up")
    rows = []
    for n in sizes:
        rows += [(f"floor@{n}", f"N={n} floor: plain systemd-nspawn ×{n + 1} until SSH answers", f"floor-key@{n}"),
                 (f"floor-key@{n}", f"N={n} floor-key: the same, host keys made beforehand", f"floor-key@{n}"),
                 (f"booted@{n}", f"N={n} `fab env-start-all` until serving through the LB", f"floor-key@{n}"),
                 (f"ssh-round@{n}", f"N={n} one SSH round to all {n + 1} hosts (OpenSSH)"),
                 (f"converge@{n}", f"N={n} `fab env-start-all` again (already up)", f"ssh-round@{n}")]
    print(sbs.table(samples, rows))
    for n in sizes:
        ratio = sbs.paired_ratio(samples, f"booted@{n}", f"floor-key@{n}")
        print(sbs.verdict(f"N={n} bring-up, booted ÷ floor-key (paired)", ratio, GOAL_BRINGUP, "×"))
        plain = sbs.paired_ratio(samples, f"booted@{n}", f"floor@{n}")
        print(f"N={n} bring-up, booted ÷ floor (paired; the image making its own keys): {sbs.fmt(plain, 2)}×")
        conv = sbs.cell(samples, f"converge@{n}")["median_s"]
        rnd = sbs.cell(samples, f"ssh-round@{n}")["median_s"]
        print(sbs.verdict(f"N={n} convergence", conv, None if rnd is None else GOAL_CONVERGE_FIXED + rnd, " s"))
    for case in ("booted", "floor", "floor-key"):
        slope = marginal_cost({n: sbs.cell(samples, f"{case}@{n}")["median_s"] for n in sizes})
        print(f"marginal cost per host, {case}: {sbs.fmt(slope, 2)} s" + (
            f" (between N={sizes[-2]} and N={sizes[-1]})" if len(sizes) > 1 else ""))
    for key in sorted(memory):
        values = [v for v in memory[key] if v]
        if values:
            n = int(key.split("@")[1])
            print(f"memory per host, {key}: {sbs.median(values) / (n + 1) / 2**20:.0f} MiB "
                  "(memory cgroup once up, median over runs)")
    print(f"conditions: {sbs.conditions(start_load)}")


if __name__ == "__main__":
    sys.exit(main())
