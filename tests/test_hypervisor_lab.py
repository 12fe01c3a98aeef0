"""Two hypervisor machines on this machine, driven over qemu+ssh: the ground issue 17's multi-hypervisor tier stands on.

Real parts only: nspawn containers from booted's base image running libvirtd and QEMU, libvirt's
SSH transport with pinned host keys, tap devices on each hypervisor's LAN bridge, and a power cut.
No VM boots here (a paused domain is enough to make QEMU and its tap); docs/multi-hypervisor-lab.md
records VMs booted this way and the times measured.
"""
from __future__ import annotations

import time

import pytest
from hypervisor_lab import HypervisorLab, hypervisor_lab, run

from fabfile.core.localcmd import process_alive

pytestmark = pytest.mark.local

# A domain that QEMU starts paused: its process and its tap on br0 exist, no guest code runs.
PROBE = """<domain type='qemu'>
  <name>probe</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <features><tcg><tb-cache unit='MiB'>16</tb-cache></tcg></features>
  <devices>
    <interface type='bridge'><source bridge='br0'/><mac address='52:54:00:be:e5:01'/><model type='virtio'/></interface>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def hvlab(lab, tmp_path_factory):
    with hypervisor_lab(lab, tmp_path_factory.mktemp("hypervisors")) as the_lab:
        yield the_lab


def qemu_pid(hvlab: HypervisorLab, name: str) -> int | None:
    for pid in hvlab.namespace_pids(name):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if cmdline.startswith(b"/usr/bin/qemu-system") and b"guest=probe" in cmdline:
            return pid
    return None


def test_two_hypervisors_answer_over_qemu_ssh_with_pinned_host_keys(hvlab):
    for name in ("hv1", "hv2"):
        started = time.monotonic()
        hvlab.start(name)
        print(f"{name}: libvirtd answering over qemu+ssh {time.monotonic() - started:.1f}s after start")
        assert hvlab.virsh(name, "hostname").stdout.strip() == name
        assert "<domain type='qemu'" in hvlab.virsh(name, "capabilities").stdout
    # The pinned key decides: hv2's address with hv1's key on file is refused.
    pinned = hvlab.known_hosts.read_text()
    hv1_key = next(ln for ln in pinned.splitlines() if ln.startswith(hvlab.hypervisors["hv1"].address + " "))
    try:
        hvlab.known_hosts.write_text(hv1_key.replace(hvlab.hypervisors["hv1"].address,
                                                     hvlab.hypervisors["hv2"].address) + "\n")
        refused = hvlab.virsh("hv2", "hostname", check=False)
        assert refused.returncode != 0 and "Host key verification failed" in refused.stderr
    finally:
        hvlab.known_hosts.write_text(pinned)


def test_vm_nics_join_each_hypervisors_bridge_and_a_power_cut_leaves_nothing(hvlab, tmp_path):
    for name in ("hv1", "hv2"):
        if hvlab.hypervisors.get(name) is None or hvlab.hypervisors[name].nspawn_pid() is None:
            hvlab.start(name)
    xml = tmp_path / "probe.xml"
    xml.write_text(PROBE)
    for name in ("hv1", "hv2"):
        hvlab.virsh(name, "define", str(xml))
        hvlab.virsh(name, "start", "--paused", "probe")
        ports = hvlab.virsh(name, "domiflist", "probe").stdout
        assert "br0" in ports and "52:54:00:be:e5:01" in ports
        # the tap really is on the hypervisor's LAN bridge, in its namespace
        on_bridge = run(["ip", "-n", hvlab.hypervisors[name].netns, "-o", "link", "show", "master", "br0"]).stdout
        assert "host0" in on_bridge and "vnet" in on_bridge
        assert qemu_pid(hvlab, name) is not None

    doomed = qemu_pid(hvlab, "hv2")
    started = time.monotonic()
    hvlab.power_cut("hv2")
    print(f"hv2: power cut in {time.monotonic() - started:.1f}s")
    assert not process_alive(doomed), "QEMU outlived its hypervisor's power cut"
    assert hvlab.hypervisors["hv2"].nspawn_pid() is None
    started = time.monotonic()
    lost = hvlab.virsh("hv2", "list", check=False, timeout=30)
    waited = time.monotonic() - started
    print(f"hv2: a new connection failed after {waited:.1f}s: {lost.stderr.strip().splitlines()[-1]}")
    assert lost.returncode != 0 and hvlab.hypervisors["hv2"].address in lost.stderr
    assert waited < 15  # ConnectTimeout=3 in the ssh command; without it this took ~15 s here
    assert hvlab.virsh("hv1", "domstate", "probe").stdout.strip() == "paused"  # the survivor is untouched

    # Power back: the hypervisor still holds the definition, shut off (booted must expect this).
    hvlab.start("hv2")
    assert "shut off" in hvlab.virsh("hv2", "domstate", "probe").stdout
    hvlab.virsh("hv1", "destroy", "probe")
    for name in ("hv1", "hv2"):
        hvlab.virsh(name, "undefine", "probe")
