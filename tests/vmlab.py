"""A private lab for real virtual machines through libvirt: its own state dir, bridge, subnet, nginx
port and domains; the daemons started if they were not running (and stopped again if so).

Everything is torn down at the end, also when tests fail: every domain whose name carries this
lab's owner tag is destroyed and undefined, its volumes deleted (the shared base image stays, like
the shared debootstrap cache), the bridge removed, booted's nginx stopped.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from lab import ROOT, Lab, free_port, free_subnet  # noqa: F401  (ROOT: for the tests)

# Shared by test runs, like BOOTED_IMAGE_CACHE: the base image is copied into this pool once.
# VMs' own volumes carry the lab's owner tag and are removed with it.
STORAGE_DIR = "/var/lib/libvirt/images/booted-test"
SHARED_IMAGE_CACHE = "/var/cache/booted-image"

VM_CONFIG = """\
settings:
  nginx: {{port: {port}}}
  deploy: {{timeout_s: 240, parallel: 8}}
providers:
  libvirt:
    bridge: {bridge}
    subnet: {subnet}
    storage_dir: {storage}
    memory_mb: 512
    boot_timeout_s: 420
    stop_timeout_s: 60
environments:
  vmlab:
    provider: libvirt
    images: [vm-lb, vm-w1, vm-w2]
    roles:
      loadbalancers: [vm-lb]
      workers: [vm-w1, vm-w2]
    service: hello
    version: v1
    workers: {{min: 1, max: 2}}
    lb_port: 8080
    monitor:
      latency_high_ms: {high}
      latency_low_ms: {low}
      interval_s: 2
      probes: 4
      up_samples: 2
      down_window_s: 6
      up_cooldown_s: 2
      down_cooldown_s: 4
      health_failures: 2
      warmup_timeout_s: 400
"""


@dataclass
class VmLab(Lab):
    storage: str = STORAGE_DIR
    started_daemons: list = field(default_factory=list)

    def write_config(self, high: float = 5000, low: float = 4000) -> None:
        """(Re)write the lab's environments.yaml; the monitor's latency thresholds steer scaling drills."""
        self.config_path.write_text(VM_CONFIG.format(port=self.port, bridge=self.bridge, subnet=self.subnet,
                                                     storage=self.storage, high=high, low=low))

    def host_address(self, image: str) -> str:
        with self.activated():
            return self.provider().get(image).addresses[0]

    def provider_state(self, image: str) -> str:
        with self.activated():
            machine = self.provider().get(image)
        return machine.state if machine else "absent"

    def provider(self):
        from fabfile.providers import get_provider, load_config

        return get_provider("libvirt", load_config(self.config_path))

    def owner_prefix(self) -> str:
        with self.activated():
            from fabfile.providers.libvirt.provider import owner_tag

            return f"booted-{owner_tag()}-"

    def leftovers(self) -> dict[str, list[str]]:
        """What of this lab still exists on the machine: domains, tap devices, qemu processes."""
        import libvirt

        prefix = self.owner_prefix()
        conn = libvirt.open("qemu:///system")
        try:
            domains = [d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix)]
        finally:
            conn.close()
        links = json.loads(subprocess.run(["ip", "-j", "link", "show", "master", self.bridge], capture_output=True,
                                          text=True).stdout or "[]")
        qemus = subprocess.run(["pgrep", "-af", f"guest={prefix}"], capture_output=True, text=True).stdout.split("\n")
        return {"domains": domains, "taps": [link["ifname"] for link in links],
                "qemu": [q for q in qemus if q.strip() and "pgrep" not in q]}

    def teardown(self) -> None:
        import libvirt

        prefix = self.owner_prefix()
        try:
            conn = libvirt.open("qemu:///system")
        except libvirt.libvirtError:
            conn = None
        if conn is not None:
            for dom in conn.listAllDomains(0):
                if not dom.name().startswith(prefix):
                    continue
                persistent = dom.isPersistent()  # booted's run transient; an installer's is persistent
                if dom.isActive():
                    dom.destroy()
                if persistent:
                    dom.undefine()
            for pool in conn.listAllStoragePools(0):
                if pool.isActive():
                    pool.refresh(0)
                    for vol in pool.listAllVolumes(0):
                        if vol.name().startswith(prefix):
                            vol.delete(0)
            conn.close()
        for path in Path(self.storage).glob(f"{prefix}*"):
            path.unlink(missing_ok=True)
        with self.activated():
            from fabfile.hosts import endpoint
            from fabfile.providers import bridge

            bridge.remove_bridge(self.bridge)
            endpoint.stop()
        if self.started_daemons:
            from fabfile.providers.libvirt.hypervisor import stop_daemons

            stop_daemons(self.started_daemons)


def make_vm_lab(root: Path) -> VmLab:
    root.mkdir(parents=True, exist_ok=True)
    lab = VmLab(root=root, bridge=f"bvm{os.getpid() % 100000:05d}", subnet=free_subnet(), port=free_port(),
                config_path=root / "environments.yaml")
    lab.write_config()
    # The VM base image takes minutes to build (debootstrap, kernel, mkfs): share it between runs like
    # the storage dir, unless the caller names a cache of its own.
    lab.extra_env["BOOTED_IMAGE_CACHE"] = os.environ.get("BOOTED_IMAGE_CACHE") or SHARED_IMAGE_CACHE
    return lab


def cannot_run_vms() -> str | None:
    """None if QEMU VMs can run here under libvirt, else why not."""
    if os.geteuid() != 0:
        return "needs root (libvirtd, bridges, qemu:///system)"
    for tool in ("qemu-system-x86_64", "qemu-img", "libvirtd", "virtlogd", "mkfs.ext4", "debootstrap",
                 "systemd-nspawn", "ssh-keygen"):
        if not (shutil.which(tool) or Path("/usr/sbin", tool).exists()):
            return f"{tool} is not installed (see quickstart.sh)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed (pip install -e '.[test]')"
    return None
