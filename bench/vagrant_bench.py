#!/usr/bin/env python3
"""booted next to Vagrant: 1 load balancer + 2 worker VMs, from cold domains to the load balancer serving.

    python3 bench/vagrant_bench.py [--keep-lab]      # as root; about 15 minutes under TCG

Same machine, same run, same base image, same VM settings (kernel, initrd, memory, CPUs, virtio
disk, virtio random number device, libvirt driver):

* booted: the three images built beforehand (stopped: volumes and booted's records), then ``fab env-start-all`` timed
  until it returns with the load balancer serving (it checks that itself; the bench checks again).
* Vagrant 2.3 with vagrant-libvirt 0.11 (Debian's packages): the base image packaged as a local box
  (``bench/peers/vagrant/``: the box is the same file system plus what a Vagrant box needs: DHCP on
  any NIC, a login key for root, host keys made at first boot, booted's own seed and call-home units
  off; booted's kernel command line without the VM's address, so udev and networkd run and DHCP
  configures the NIC: vagrant-libvirt learns a VM's address from its DHCP lease),
  ``vagrant up --no-provision`` then ``vagrant halt`` beforehand (domains defined, box volume in
  the pool, stopped), then ``vagrant up --provision`` timed until a GET through the load balancer
  answers 200 from both workers. Its shell provisioner installs the same hello release booted
  deploys and points nginx at the workers.

Vagrant's domains keep QEMU's default TCG translation cache (vagrant-libvirt cannot set libvirt's
``<tcg>`` feature); memory per VM is printed for both. Everything made here (domains, volumes, the
box, the libvirt network and pool, the lab's bridge, daemons it started) is removed at the end,
also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
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

from lab import free_subnet  # noqa: E402
from libvirt_bench import qemu_pids, rss_mb  # noqa: E402
from vmlab import VmLab, cannot_run_vms, make_vm_lab  # noqa: E402

PEER = ROOT / "bench" / "peers" / "vagrant"
BOX = "booted-bench-base"
IMAGES = ["bv-lb", "bv-w1", "bv-w2"]
ENV_CONFIG = """
  benchkvm:
    provider: libvirt
    images: [bv-lb, bv-w1, bv-w2]
    roles: {loadbalancers: [bv-lb], workers: [bv-w1, bv-w2]}
    service: hello
    version: v1
"""
# What a Vagrant box needs on top of booted's base file system (debugfs requests, one per line;
# paths are fixed, the key file is the bench's own).
HOSTKEYS_UNIT = """\
[Unit]
Description=Vagrant box: SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""
DHCP_NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n"


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, check=True, **kwargs)


def make_box(base_disk: Path, pubkey: str, work: Path) -> Path:
    """booted's base image as a libvirt Vagrant box (box.img + metadata.json in a tar)."""
    raw = work / "box.raw"
    run(["qemu-img", "convert", "-O", "raw", str(base_disk), str(raw)])
    files = {"hostkeys.service": HOSTKEYS_UNIT, "dhcp.network": DHCP_NETWORK, "authorized_keys": pubkey + "\n"}
    for name, text in files.items():
        (work / name).write_text(text)
    requests = [
        "rm /etc/systemd/system/sysinit.target.wants/booted-seed.service",
        "rm /etc/systemd/system/multi-user.target.wants/booted-callhome.service",
        f"write {work / 'hostkeys.service'} /etc/systemd/system/vagrant-hostkeys.service",
        "symlink /etc/systemd/system/multi-user.target.wants/vagrant-hostkeys.service "
        "/etc/systemd/system/vagrant-hostkeys.service",
        f"write {work / 'dhcp.network'} /etc/systemd/network/50-vagrant.network",
        "mkdir /root/.ssh",
        "set_inode_field /root/.ssh mode 040700",
        f"write {work / 'authorized_keys'} /root/.ssh/authorized_keys",
        "set_inode_field /root/.ssh/authorized_keys mode 0100600",
    ]
    script = work / "box.debugfs"
    script.write_text("\n".join(requests) + "\n")
    run(["debugfs", "-w", "-f", str(script), str(raw)], capture_output=True)
    box_dir = work / "box"
    box_dir.mkdir()
    run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(box_dir / "box.img")])
    raw.unlink()
    size_gb = -(-int(json.loads(run(["qemu-img", "info", "--output=json", str(box_dir / "box.img")],
                                    capture_output=True, text=True).stdout)["virtual-size"]) // 2**30)
    (box_dir / "metadata.json").write_text(json.dumps({"provider": "libvirt", "format": "qcow2",
                                                        "virtual_size": size_gb}))
    box = work / "booted-base.box"
    with tarfile.open(box, "w") as tar:
        for name in ("metadata.json", "box.img"):
            tar.add(box_dir / name, arcname=name)
    shutil.rmtree(box_dir)
    return box


class VagrantPeer:
    """Vagrant's side: its own VAGRANT_HOME, box, libvirt network and pool, and project folder."""

    def __init__(self, lab: VmLab, work: Path):
        self.lab, self.work = lab, work
        self.home = work / "vagrant-home"
        self.project = work / "project"
        self.tag = f"bvg{os.getpid() % 100000:05d}"
        net = ipaddress.ip_network(free_subnet())
        self.gateway = str(net.network_address + 1)
        self.dhcp_range = (str(net.network_address + 100), str(net.network_address + 200))
        self.vms = [{"name": name, "role": "lb" if name == "lb" else "worker",
                     "mac": f"52:54:00:be:{os.getpid() % 256:02x}:{i:02x}", "ip": str(net.network_address + 10 + i)}
                    for i, name in enumerate(["lb", "w1", "w2"])]
        self.network_address = str(net)
        self.pool_dir = Path(f"/var/lib/libvirt/images/{self.tag}")
        self.env = dict(os.environ, VAGRANT_HOME=str(self.home), VAGRANT_CHECKPOINT_DISABLE="1",
                        VAGRANT_DEFAULT_PROVIDER="libvirt", BOOTED_VAGRANT_SETTINGS=str(work / "settings.json"))

    def vagrant(self, *args: str, timeout: float = 1800) -> None:
        log = self.work / "vagrant.log"
        with open(log, "a") as out:
            out.write(f"\n$ vagrant {' '.join(args)}\n")
            out.flush()
            proc = subprocess.run(["vagrant", *args], cwd=self.project, env=self.env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-25:]
            raise SystemExit(f"bench: vagrant {' '.join(args)} failed (exit {proc.returncode}); log {log}:\n"
                             + "\n".join(tail))

    def prepare(self, base, hello_tarball: Path, settings: dict) -> None:
        import libvirt

        from fabfile.providers.libvirt import domainxml

        key = self.work / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "booted-vagrant-bench", "-f", str(key)])
        box = make_box(base.disk, (self.work / "id_ed25519.pub").read_text().strip(), self.work)
        self.home.mkdir()
        self.project.mkdir()
        # direct kernel boot: QEMU runs as libvirt-qemu and reads kernel and initrd from the pool's folder
        self.pool_dir.mkdir(mode=0o711, exist_ok=True)
        boot = {}
        # the kernel booted's VMs of this domain type boot (uncompressed under TCG: kernel.py)
        boots = base.files_for(settings["driver"])
        for role, src in (("kernel", boots["kernel"]), ("initrd", boots["initrd"])):
            boot[role] = self.pool_dir / src.name
            shutil.copyfile(src, boot[role])
            boot[role].chmod(0o644)
        shutil.copy(PEER / "Vagrantfile", self.project / "Vagrantfile")
        conn = libvirt.open("qemu:///system")
        try:
            hosts = "".join(f"<host mac='{vm['mac']}' ip='{vm['ip']}'/>" for vm in self.vms)
            prefixlen = ipaddress.ip_network(self.network_address).prefixlen
            net = conn.networkDefineXML(
                f"<network><name>{self.tag}</name><bridge name='{self.tag}'/>"
                f"<ip address='{self.gateway}' prefix='{prefixlen}'><dhcp>"
                f"<range start='{self.dhcp_range[0]}' end='{self.dhcp_range[1]}'/>{hosts}"
                "</dhcp></ip></network>")
            net.create()
            pool = conn.storagePoolDefineXML(
                f"<pool type='dir'><name>{self.tag}</name><target><path>{self.pool_dir}</path></target></pool>")
            pool.create()
        finally:
            conn.close()
        (self.work / "settings.json").write_text(json.dumps({
            "box": BOX, "boot_timeout_s": 900, "ssh_key": str(key), "driver": settings["driver"],
            "memory_mb": settings["memory_mb"], "cpus": settings["cpus"], "kernel": str(boot["kernel"]),
            "initrd": str(boot["initrd"]), "cmdline": domainxml.BASE_CMDLINE, "pool": self.tag,
            "network": self.tag, "network_address": self.network_address, "prefix": f"{self.tag}-",
            "vms": self.vms, "hello_tarball": str(hello_tarball)}))
        run(["vagrant", "box", "add", "--name", BOX, str(box)], env=self.env, capture_output=True)
        box.unlink()

    def serving(self) -> bool:
        """The load balancer answers a greeting and every worker answers its health check (the
        same test booted's env-start-all passes before it returns)."""
        lb = next(vm["ip"] for vm in self.vms if vm["role"] == "lb")
        urls = [f"http://{lb}:8080/"] + [f"http://{vm['ip']}:9999/healthz" for vm in self.vms if vm["role"] == "worker"]
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=3) as resp:
                    if resp.status != 200:
                        return False
            except OSError:
                return False
        return True

    def teardown(self) -> None:
        import libvirt

        if self.project.exists():
            subprocess.run(["vagrant", "destroy", "-f"], cwd=self.project, env=self.env, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=600)
        try:
            conn = libvirt.open("qemu:///system")
        except libvirt.libvirtError:
            return
        try:
            for dom in conn.listAllDomains():
                if dom.name().startswith(self.tag):
                    if dom.isActive():
                        dom.destroy()
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM if hasattr(libvirt, "VIR_DOMAIN_UNDEFINE_NVRAM")
                                      else 0)
            for pool in conn.listAllStoragePools():
                if pool.name() == self.tag:
                    for vol in pool.listAllVolumes():
                        vol.delete()
                    if pool.isActive():
                        pool.destroy()
                    pool.undefine()
            for net in conn.listAllNetworks():
                if net.name() == self.tag:
                    if net.isActive():
                        net.destroy()
                    net.undefine()
        finally:
            conn.close()
        shutil.rmtree(self.pool_dir, ignore_errors=True)


def booted_side(lab: VmLab) -> dict:
    for image in IMAGES:  # built outside the timing: the timing starts from stopped VMs
        lab.fab("image-build", "--image", image, check=True, timeout=1800)
    started = time.monotonic()
    result = lab.fab("env-start-all", "--env", "benchkvm", timeout=1800)
    wall = time.monotonic() - started
    if not result.ok:
        raise SystemExit(f"bench: env-start-all --env benchkvm failed:\n{result}")
    with urllib.request.urlopen(f"http://{lab.host_address('bv-lb')}:8080/", timeout=10) as resp:
        served = resp.status == 200
    mem = [rss_mb(p) for p in qemu_pids(f"guest={lab.owner_prefix()}")]
    lab.fab("env-stop", "--env", "benchkvm", check=True, timeout=600)
    for image in IMAGES:
        lab.fab("image-del", "--image", image, "--yes", check=True)
    return {"wall_s": wall, "served": served, "rss_mb": mem}


def vagrant_side(peer: VagrantPeer) -> dict:
    peer.vagrant("up", "--no-provision")   # defines the domains and copies the box into the pool
    peer.vagrant("halt")
    started = time.monotonic()
    peer.vagrant("up", "--provision")
    deadline = time.monotonic() + 600
    while not peer.serving():
        if time.monotonic() > deadline:
            raise SystemExit("bench: Vagrant's load balancer did not serve both workers within 600 s")
        time.sleep(0.5)
    wall = time.monotonic() - started
    mem = [rss_mb(p) for p in qemu_pids(f"guest={peer.tag}")]
    peer.vagrant("halt")
    return {"wall_s": wall, "served": True, "rss_mb": mem}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab's folder (VMs are removed)")
    args = parser.parse_args()
    # vagrant-libvirt's management network needs libvirt to start dnsmasq
    missing = [tool for tool in ("vagrant", "debugfs", "dnsmasq") if not shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")]
    reason = cannot_run_vms() or (f"not installed: {', '.join(missing)} (apt-get install vagrant vagrant-libvirt "
                                  "dnsmasq-base e2fsprogs)" if missing else None)
    if reason:
        print(f"bench: cannot run: {reason}", file=sys.stderr)
        return 2
    from fabfile.providers import load_config
    from fabfile.providers.libvirt.hypervisor import start_daemons
    from fabfile.services import repo

    root = Path(tempfile.mkdtemp(prefix="booted-vagrant-bench-"))
    lab = make_vm_lab(root)
    lab.config_path.write_text(lab.config_path.read_text() + ENV_CONFIG)
    peer = VagrantPeer(lab, root)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        lab.started_daemons = start_daemons()
        with lab.activated():
            prov = lab.provider()
            base = prov.base_image()  # cached base image: built outside the timings
            settings = dict(load_config(lab.config_path).provider_settings("libvirt"))
            settings["driver"] = prov.domain_type(prov.hypervisor())
            tarball = repo.pack("hello", "v1", root / "hello-v1.tar.gz")
        peer.prepare(base, tarball, settings)
        print("bench: Vagrant: up, halt, then up --provision (timed)", file=sys.stderr, flush=True)
        theirs = vagrant_side(peer)
        peer.teardown()
        print(f"bench: Vagrant {theirs['wall_s']:.0f}s; booted: image-build x3, then env-start-all (timed)",
              file=sys.stderr, flush=True)
        mine = booted_side(lab)
    finally:
        peer.teardown()
        lab.teardown()
        if not args.keep_lab:
            shutil.rmtree(root, ignore_errors=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"\n1 load balancer + 2 workers, libvirt driver {settings['driver']}, {settings['memory_mb']} MiB, "
          f"{settings['cpus']} CPU per VM, from built, stopped VMs; load {load}")
    print(f"{'':<34}{'wall until the LB serves':>26}  {'RSS per VM':>10}")
    for name, r in (("booted  fab env-start-all", mine), ("Vagrant vagrant up --provision", theirs)):
        rss = sum(r["rss_mb"]) / len(r["rss_mb"]) if r["rss_mb"] else float("nan")
        print(f"{name:<34}{r['wall_s']:>25.1f}s  {rss:>7.0f} MB")
    print(f"booted / Vagrant: {mine['wall_s'] / theirs['wall_s']:.2f} (goal <= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
