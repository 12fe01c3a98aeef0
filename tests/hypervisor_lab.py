"""Hypervisor machines for tests: systemd-nspawn containers running libvirtd and QEMU, on one shared network.

Each hypervisor boots booted's local base image (the local provider's Debian root file system) with
one more read-only overlay layer holding libvirt and QEMU, in its own network namespace. Inside that
namespace its NIC ``host0`` is enslaved to a bridge ``br0`` that holds its address, like a real
hypervisor's LAN bridge; every ``host0`` peer sits on the lab's one bridge on this machine, so VMs
on all hypervisors share one layer-2 network with the controller. booted reaches them over
``qemu+ssh://root@ADDR/system`` with the lab's key and a pinned host key (made before first boot).

What was needed and why, with measured times: docs/multi-hypervisor-lab.md. Everything a lab
starts is removed by ``teardown``, also when a test fails.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lab import free_subnet

from fabfile.providers import get_provider, rootfs

# The layer over booted's base image. Fixed text; no data is interpolated.
LAYER_PACKAGES = ["libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-daemon-system", "libvirt-clients",
                  "qemu-system-x86", "qemu-utils", "netcat-openbsd"]
LAYER_RECIPE = r"""
set -eu
export DEBIAN_FRONTEND=noninteractive
rm -f /usr/sbin/policy-rc.d
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$@" >/dev/null
rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
# The container sees this machine's cgroup v1 hierarchies read-only: VMs run without per-VM cgroups.
printf '\n# booted hypervisor lab\ncgroup_controllers = [ ]\n' >> /etc/libvirt/qemu.conf
# root's user manager (pam_systemd starts it at each SSH login, libvirt's qemu+ssh logs in per
# connection) lingers from boot: stopping it between logins sometimes hung in this container
# ("Failed to kill control group ... Input/output error"), and the next login waited for that stop
# job, past booted's 45 s connect timeout (seen in CI: "no answer within 45s" right after
# env-start-all, the hypervisor back two minutes later)
mkdir -p /var/lib/systemd/linger
: > /var/lib/systemd/linger/root
"""

# Besides booted's usual nspawn flags: libvirt makes tap devices (the tun device and CAP_NET_ADMIN,
# which nspawn grants only with --private-network, not with --network-namespace-path).
EXTRA_NSPAWN_FLAGS = ["--bind=/dev/net/tun", "--capability=CAP_NET_ADMIN"]


def run(argv: list[str], timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc


def ensure_layer(rootfs: Path, timeout: float = 900) -> Path:
    """The libvirt/QEMU layer over ``rootfs``, built once (about 50 s) and cached next to it."""
    marker = rootfs / "etc" / "booted-image.json"  # the local provider's recipe marker, rewritten on a rebuild
    stamp = f"{marker.read_text()}{marker.stat().st_mtime_ns}" if marker.exists() else str(rootfs.stat().st_mtime_ns)
    digest = hashlib.sha256("\0".join([LAYER_RECIPE, *LAYER_PACKAGES, stamp]).encode())
    layer = rootfs.parent / f"hypervisor-layer-{digest.hexdigest()[:12]}"
    with open(rootfs.parent / ".hypervisor-layer.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if layer.is_dir():
            return layer
        build = rootfs.parent / f".hypervisor-layer-build-{os.getpid()}"
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir()
        try:
            run(["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--resolv-conf=copy-host",
                 "--timezone=off", "-D", str(rootfs), f"--overlay={rootfs}:{build}:/", "--",
                 "/bin/sh", "-c", LAYER_RECIPE, "sh", *LAYER_PACKAGES], timeout=timeout)
            build.rename(layer)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return layer


@dataclass
class Hypervisor:
    name: str
    address: str
    netns: str
    veth: str  # this machine's end of the hypervisor's NIC
    folder: Path  # upper/ (its own writes over the layers), console.log, nspawn.pid

    @property
    def upper(self) -> Path:
        return self.folder / "upper"

    def nspawn_pid(self) -> int | None:
        try:
            pid = int((self.folder / "nspawn.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"systemd-nspawn" in cmdline and str(self.upper).encode() in cmdline else None

    def init_pid(self) -> int | None:
        """The container's PID 1 (as seen from here): killing it kills everything inside."""
        pid = self.nspawn_pid()
        if pid is None:
            return None
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None


class HypervisorLab:
    """Hypervisor machines on one bridge of this machine; ``uri(name)`` is booted's way in."""

    def __init__(self, root: Path, rootfs: Path, layer: Path, subnet: str):
        self.root, self.rootfs, self.layer = root, rootfs, layer
        self.network = ipaddress.IPv4Network(subnet)
        tag = hashlib.sha1(str(root).encode()).hexdigest()[:6]
        self.tag = tag
        self.bridge = f"bhv{tag}"
        self.gateway = str(next(self.network.hosts()))
        self.key = root / "id_ed25519"
        self.known_hosts = root / "known_hosts"
        self.ssh_command = root / "ssh-pinned"
        self.hypervisors: dict[str, Hypervisor] = {}
        root.mkdir(parents=True, exist_ok=True)
        if not self.key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "booted-hypervisor-lab", "-f", str(self.key)])
        # libvirt's ssh transport runs the ssh binary named by `command=`: this one checks host keys
        # against the lab's own known_hosts only, and gives up on an unreachable host after 3 s.
        self.ssh_command.write_text(
            "#!/bin/sh\nexec ssh -o ConnectTimeout=3 -o BatchMode=yes -o StrictHostKeyChecking=yes "
            f"-o UserKnownHostsFile={shlex.quote(str(self.known_hosts))} \"$@\"\n")
        self.ssh_command.chmod(0o755)

    # ------------------------------------------------------------------ network
    def net_up(self) -> None:
        if run(["ip", "link", "show", self.bridge], check=False).returncode != 0:
            run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "replace", f"{self.gateway}/{self.network.prefixlen}", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])

    def _hypervisor(self, name: str) -> Hypervisor:
        if name not in self.hypervisors:
            index = len(self.hypervisors) + 1
            address = str(self.network.network_address + 10 + index)
            digest = hashlib.sha1(f"{self.root}\0{name}".encode()).hexdigest()
            self.hypervisors[name] = Hypervisor(name, address, f"bhv-{digest[:12]}", f"bh{digest[:12]}",
                                                self.root / name)
        return self.hypervisors[name]

    def plan_link_up(self, hv: Hypervisor) -> list[list[str]]:
        ns = hv.netns
        return [
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", hv.veth, "type", "veth", "peer", "name", "host0", "netns", ns],
            ["ip", "link", "set", hv.veth, "master", self.bridge],
            ["ip", "link", "set", hv.veth, "up"],
            ["ip", "-n", ns, "link", "add", "br0", "type", "bridge"],
            ["ip", "-n", ns, "link", "set", "host0", "master", "br0"],
            ["ip", "-n", ns, "addr", "add", f"{hv.address}/{self.network.prefixlen}", "dev", "br0"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "link", "set", "host0", "up"],
            ["ip", "-n", ns, "link", "set", "br0", "up"],
            ["ip", "-n", ns, "route", "add", "default", "via", self.gateway],
        ]

    # ------------------------------------------------------------------ lifecycle
    def start(self, name: str, timeout: float = 90) -> Hypervisor:
        """Boot hypervisor ``name``; returns once libvirtd answers over qemu+ssh."""
        hv = self._hypervisor(name)
        self._provision(hv)
        self._link_down(hv)
        for argv in self.plan_link_up(hv):
            run(argv)
        argv = ["systemd-nspawn", "--boot", "--quiet", "--keep-unit", "--register=no",
                "-D", str(self.rootfs), f"--overlay={self.rootfs}:{self.layer}:{hv.upper}:/",
                f"--machine=hv-{self.tag}-{name}", f"--hostname={name}",
                f"--network-namespace-path=/run/netns/{hv.netns}", "--link-journal=no", "--resolv-conf=off",
                "--timezone=off", "--console=read-only", *EXTRA_NSPAWN_FLAGS]
        with open(hv.folder / "console.log", "wb") as console:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        (hv.folder / "nspawn.pid").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"hypervisor {name}: systemd-nspawn exited {proc.returncode} "
                                   f"(see {hv.folder / 'console.log'})")
            if self.virsh(name, "version", timeout=15, check=False).returncode == 0:
                return hv
            if time.monotonic() > deadline:
                raise RuntimeError(f"hypervisor {name}: libvirtd did not answer over ssh within {timeout:g}s")
            time.sleep(0.5)

    def _provision(self, hv: Hypervisor) -> None:
        """The hypervisor's own files before first boot: root's authorized key, hostname, host key."""
        ssh_dir = hv.upper / "root" / ".ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (ssh_dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        (hv.upper / "etc").mkdir(parents=True, exist_ok=True)
        for path, content in rootfs.name_files(hv.name).items():  # as booted names its own hosts
            (hv.upper / path.lstrip("/")).write_text(content)
        # No nameserver it cannot reach, as on an installed hypervisor: the base image's resolv.conf
        # names this machine's resolver, unreachable from the lab network (every lookup waited 20 s).
        (hv.upper / "etc" / "resolv.conf").write_text("# booted hypervisor lab: no DNS on the lab network\n")
        host_key = hv.upper / "etc" / "ssh" / "ssh_host_ed25519_key"
        if not host_key.exists():
            host_key.parent.mkdir(parents=True, exist_ok=True)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", hv.name, "-f", str(host_key)])
        algo, blob = host_key.with_suffix(".pub").read_text().split()[:2]
        lines = [ln for ln in (self.known_hosts.read_text().splitlines() if self.known_hosts.exists() else [])
                 if not ln.startswith(f"{hv.address} ")]
        self.known_hosts.write_text("".join(f"{ln}\n" for ln in lines + [f"{hv.address} {algo} {blob}"]))

    def uri(self, name: str) -> str:
        hv = self._hypervisor(name)
        return (f"qemu+ssh://root@{hv.address}/system?keyfile={self.key}&no_tty=1"
                f"&command={self.ssh_command}")

    def virsh(self, name: str, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return run(["virsh", "-q", "-c", self.uri(name), *args], timeout=timeout, check=check)

    def journal_tail(self, name: str, lines: int = 60) -> str:
        """What sshd, logind and libvirtd on hypervisor ``name`` logged last (for a failed test's report);
        read from its journal files directly, so it works also when the hypervisor no longer answers."""
        journal = self.hypervisors[name].upper / "var" / "log" / "journal"
        if not journal.is_dir():
            return f"(no journal of {name} at {journal})"
        proc = run(["journalctl", f"--directory={journal}", "--no-pager", "-o", "short-precise", "-n", str(lines),
                    "-u", "ssh", "-u", "systemd-logind", "-u", "libvirtd", "-u", "user@0"], check=False, timeout=30)
        return (proc.stdout or proc.stderr).strip()

    def namespace_pids(self, name: str) -> list[int]:
        """Processes still running inside hypervisor ``name`` (its PID namespace), seen from here."""
        hv = self.hypervisors[name]
        init = hv.init_pid()
        if init is None:
            return []
        try:
            ns = os.readlink(f"/proc/{init}/ns/pid")
        except OSError:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "pid") == ns:
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def power_cut(self, name: str) -> None:
        """Pull the hypervisor's cable, then kill its PID 1 (the kernel kills all else inside)."""
        hv = self.hypervisors[name]
        run(["ip", "link", "del", hv.veth], check=False)
        init, nspawn = hv.init_pid(), hv.nspawn_pid()
        if init is not None:
            os.kill(init, signal.SIGKILL)
        self._reap(hv, nspawn, 20)
        self._link_down(hv)

    def stop(self, name: str, timeout: float = 30) -> None:
        """Orderly power-off (nspawn asks the container's systemd), then the network goes."""
        hv = self.hypervisors[name]
        nspawn = hv.nspawn_pid()
        if nspawn is not None:
            os.kill(nspawn, signal.SIGTERM)
        self._reap(hv, nspawn, timeout)
        self._link_down(hv)

    def _reap(self, hv: Hypervisor, nspawn: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while nspawn is not None and hv.nspawn_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if hv.nspawn_pid() is not None:
            init = hv.init_pid()
            for pid in (init, nspawn):
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        (hv.folder / "nspawn.pid").unlink(missing_ok=True)

    def _link_down(self, hv: Hypervisor) -> None:
        run(["ip", "link", "del", hv.veth], check=False)
        run(["ip", "netns", "del", hv.netns], check=False)

    def leftovers(self) -> list[str]:
        """What of this lab still exists on the machine (empty after teardown)."""
        found = []
        netns = run(["ip", "netns", "list"], check=False).stdout
        links = run(["ip", "-o", "link", "show"], check=False).stdout
        for hv in self.hypervisors.values():
            if hv.nspawn_pid() is not None:
                found.append(f"systemd-nspawn of {hv.name}")
            if hv.netns in netns:
                found.append(f"network namespace {hv.netns}")
            if f" {hv.veth}@" in links or f" {hv.veth}:" in links:
                found.append(f"link {hv.veth}")
        if f" {self.bridge}:" in links:
            found.append(f"bridge {self.bridge}")
        return found

    def teardown(self) -> None:
        for name in list(self.hypervisors):
            self.power_cut(name)
        run(["ip", "link", "del", self.bridge], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def can_run_hypervisors() -> str | None:
    """None if this machine can run the hypervisor lab, else why not."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, network namespaces)"
    for tool in ("systemd-nspawn", "virsh", "ssh", "ssh-keygen", "ip"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install systemd-container libvirt-clients openssh-client iproute2)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing"
    return None


@contextlib.contextmanager
def hypervisor_lab(host_lab, root: Path) -> Iterator[HypervisorLab]:
    """A HypervisorLab on a subnet of its own, over the host lab's base image; always torn down.

    Skips (fails on CI) where it cannot run. ``host_lab`` is tests/lab.py's session lab."""
    reason = can_run_hypervisors()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the hypervisor lab cannot run here: {reason}")
        pytest.skip(f"hypervisor lab: {reason}")
    with host_lab.activated():
        rootfs = get_provider("local", host_lab.config()).ensure_image()
    layer = ensure_layer(rootfs)
    subnet = ipaddress.ip_network(free_subnet())
    if str(subnet) == host_lab.subnet:  # free_subnet is seeded by the pid: step past the host lab's
        subnet = ipaddress.ip_network(f"{subnet.network_address + 256}/24")
    the_lab = HypervisorLab(root, rootfs, layer, str(subnet))
    try:
        the_lab.net_up()
        yield the_lab
    finally:
        the_lab.teardown()
        assert the_lab.leftovers() == []
