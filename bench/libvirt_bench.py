"""How fast booted brings up real VMs through libvirt, next to the floor: the same VMs by hand.

For N = 1 and 3 VMs from a cached base image it prints, side by side:

* booted: wall time of ``fab env-start-all`` (N=1: one VM as load balancer and worker; N=3: one load
  balancer and two workers) until the load balancer serves the service (checked with a GET);
* floor: the same number of VMs started by hand with ``qemu-system-x86_64`` and the same settings
  (same base image, kernel, initrd, accelerator and translation cache, memory, CPUs, virtio disk and a
  seed disk), timed until every one answers with an SSH banner; no libvirt, no call home, no deploy;
* memory: the resident size of each VM's QEMU process once it is up, for both.

    python3 bench/libvirt_bench.py [--sizes 1,3] [--keep-lab]

Run as root. It starts libvirtd/virtlogd if they are not running (and stops them again), makes its own
state dir, bridge, subnet and nginx port (tests/vmlab.py), and removes every VM, volume, bridge and
process it made, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import projectvenv  # noqa: E402

if __name__ == "__main__":
    projectvenv.use()

from vmlab import VmLab, cannot_run_vms, make_vm_lab  # noqa: E402

BENCH_ENVS = """
  bench1:
    provider: libvirt
    images: [bv-solo]
    roles: {loadbalancers: [bv-solo], workers: [bv-solo]}
    service: hello
    version: v1
  bench3:
    provider: libvirt
    images: [bv-lb, bv-w1, bv-w2]
    roles: {loadbalancers: [bv-lb], workers: [bv-w1, bv-w2]}
    service: hello
    version: v1
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def qemu_pids(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, out):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"/usr/bin/qemu-system"):
                pids.append(pid)
        except OSError:
            pass
    return pids


def booted_run(lab: VmLab, n: int) -> dict:
    env = f"bench{n}"
    images = ["bv-solo"] if n == 1 else ["bv-lb", "bv-w1", "bv-w2"]
    for image in images:  # built outside the timed part: the timing starts from stopped VMs
        lab.fab("image-build", "--image", image, check=True, timeout=1800)
    started = time.monotonic()
    result = lab.fab("env-start-all", "--env", env, timeout=1800)
    wall = time.monotonic() - started
    if not result.ok:
        raise SystemExit(f"bench: env-start-all --env {env} failed:\n{result}")
    lb = lab.host_address(images[0])
    with urllib.request.urlopen(f"http://{lb}:8080/", timeout=10) as resp:
        served = resp.status == 200
    prefix = lab.owner_prefix()
    mem = [rss_mb(p) for p in qemu_pids(f"guest={prefix}")]
    lab.fab("env-stop", "--env", env, check=True, timeout=600)
    for image in images:
        lab.fab("image-del", "--image", image, "--yes", check=True)
    return {"wall_s": wall, "served": served, "rss_mb": mem}


def floor_run(lab: VmLab, n: int, work: Path) -> dict:
    """N VMs by hand: qemu-system-x86_64 with the provider's settings, user-mode network, until SSH."""
    from fabfile.providers import load_config, rootfs
    from fabfile.providers.libvirt import domainxml, image

    with lab.activated():
        prov = lab.provider()
        base = prov.base_image()
        settings = load_config(lab.config_path).provider_settings("libvirt")
        domain_type = prov.domain_type(prov.hypervisor())
    procs, ports = [], []
    try:
        for i in range(n):
            disk = work / f"floor{i}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base.disk), str(disk)],
                           check=True)
            key = rootfs.HostKey.new(f"floor{i}")
            seed = image.Seed(identity=f"floor-{i}", hostname=f"floor{i}", user="booted",
                              pubkey=key.public, address="10.0.2.15", prefixlen=24, gateway="10.0.2.2",
                              mac=f"52:54:00:fe:00:{i:02x}", callhome_conf="", host_key=key)
            seed_img = image.make_seed_disk(seed, work / f"floor{i}.seed")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            ports.append(port)
            boots = base.files_for(domain_type)  # the kernel booted's VMs of this type boot
            argv = [
                "qemu-system-x86_64", "-name", f"booted-bench-floor{i}", "-machine", "pc",
                "-accel", f"tcg,tb-size={settings['tcg_cache_mb']}" if domain_type == "qemu"
                else "kvm", "-m", str(settings["memory_mb"]), "-smp", str(settings["cpus"]),
                "-nodefaults", "-display", "none", "-serial", f"file:{work / f'floor{i}.console'}",
                "-kernel", str(boots["kernel"]), "-initrd", str(boots["initrd"]),
                "-append", domainxml.vm_cmdline(seed.address, seed.prefixlen, seed.gateway, seed.mac),
                "-drive", f"file={disk},if=virtio,format=qcow2",
                "-drive", f"file={seed_img},if=virtio,format=raw,readonly=on",
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
                "-device", f"virtio-net-pci,netdev=n0,mac={seed.mac}",
                "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0",
            ]
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        started = time.monotonic()
        pending = set(range(n))
        while pending and time.monotonic() - started < 900:
            for i in list(pending):
                if ssh_banner(ports[i]):
                    pending.discard(i)
            time.sleep(0.5)
        wall = time.monotonic() - started
        mem = [rss_mb(p.pid) for p in procs]
        return {"wall_s": wall, "served": not pending, "rss_mb": mem}
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def ssh_banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            return s.recv(16).startswith(b"SSH-")
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,3")
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab's folder (VMs are removed)")
    args = parser.parse_args()
    reason = cannot_run_vms()
    if reason:
        print(f"bench: libvirt VMs cannot run here: {reason}", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    from fabfile.providers.libvirt.hypervisor import start_daemons

    root = Path(tempfile.mkdtemp(prefix="booted-libvirt-bench-"))
    lab = make_vm_lab(root)
    lab.config_path.write_text(lab.config_path.read_text() + BENCH_ENVS)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = []
    try:
        lab.started_daemons = start_daemons()
        with lab.activated():
            lab.provider().base_image()  # cached base image: built outside the timings
            domain_type = "TCG" if lab.provider().settings["domain_type"] != "kvm" else "KVM"
        for n in sizes:
            work = root / f"floor{n}"
            work.mkdir()
            floor = floor_run(lab, n, work)
            mine = booted_run(lab, n)
            rows.append((n, mine, floor))
            print(f"N={n}: booted {mine['wall_s']:.0f}s, floor {floor['wall_s']:.0f}s", file=sys.stderr, flush=True)
    finally:
        lab.teardown()  # every VM, volume, bridge and daemon it made
        if not args.keep_lab:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nlibvirt provider, {domain_type}, VMs from a cached base image (2-core machine, shared)")
    print(f"{'VMs':>3}  {'booted env-start-all -> LB serves':>34}  {'floor: qemu by hand -> SSH':>27}  "
          f"{'ratio':>5}  {'RSS/VM booted':>13}  {'RSS/VM floor':>12}")
    for n, mine, floor in rows:
        ratio = mine["wall_s"] / floor["wall_s"] if floor["wall_s"] else float("nan")
        print(f"{n:>3}  {mine['wall_s']:>33.1f}s  {floor['wall_s']:>26.1f}s  {ratio:>5.2f}  "
              f"{_avg(mine['rss_mb']):>10.0f} MB  {_avg(floor['rss_mb']):>9.0f} MB")
    return 0


def _avg(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    sys.exit(main())
