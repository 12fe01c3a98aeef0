"""``install: kickstart`` on libvirt, for real: a QEMU VM (TCG here) boots the installer kernel and initrd
from an install DVD, fetches booted's kickstart from booted's nginx over booted's bridge, installs to
its disk and powers off; booted then makes the domain boot from its disk.

The DVD is a stand-in built by tests/ks_standin.py (no EL9 installer can run here): laid out like a
RHEL 9 family DVD, with the real Debian kernel of booted's VM base image and a busybox installer that
checks the kickstart with pykickstart's RHEL9 rules and fails the way Anaconda fails (an error on the
console, no power-off). What it proves and what a real EL9 install adds: see that module and README.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from ks_standin import debugfs_read, make_standin_dvd
from vmlab import VmLab, cannot_run_vms, make_vm_lab

pytestmark = pytest.mark.vms

CONFIG = """\
settings:
  nginx: {{port: {port}}}
providers:
  libvirt:
    bridge: {bridge}
    subnet: {subnet}
    storage_dir: {storage}
    install: kickstart
    iso: {iso}
    memory_mb: 256
    install_memory_mb: 256
    install_timeout_s: {timeout}
environments:
  kslab:
    provider: libvirt
    images: [ks-good, ks-bad]
    roles:
      loadbalancers: [ks-good]
      workers: [ks-good, ks-bad]
    service: hello
    version: v1
    lb_port: 8080
"""


def write_config(lab: VmLab, timeout: float) -> None:
    lab.config_path.write_text(CONFIG.format(port=lab.port, bridge=lab.bridge, subnet=lab.subnet, storage=lab.storage,
                                             iso=lab.root / "standin-dvd.iso", timeout=timeout))


@pytest.fixture(scope="module")
def kslab(tmp_path_factory):
    reason = cannot_run_vms() or (None if Path("/bin/busybox").exists() else "busybox-static is not installed")
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the libvirt kickstart tier cannot run here: {reason}")
        pytest.skip(f"libvirt kickstart VMs: {reason}")
    from fabfile.providers.libvirt.hypervisor import start_daemons

    lab = make_vm_lab(tmp_path_factory.mktemp("kslab"))
    write_config(lab, timeout=180)
    try:
        lab.started_daemons = start_daemons()
        started = time.monotonic()
        # The stand-in's kernel and modules are those of booted's VM base image (built once, cached; the
        # default disk_mb keeps its digest the one the real-VM tier uses, so neither rebuilds it).
        with lab.activated():  # (with the lab's BOOTED_IMAGE_CACHE)
            from fabfile.providers import get_provider, load_config

            base = get_provider("libvirt", load_config(lab.config_path)).base_image()
        make_standin_dvd(lab.root / "standin-dvd.iso", base.kernel, base.disk)
        print(f"\nstand-in DVD built in {time.monotonic() - started:.0f}s")
        yield lab
    finally:
        try:
            _remove_installer_volumes(lab)
        finally:
            lab.teardown()


def _remove_installer_volumes(lab: VmLab) -> None:
    """The DVD's volumes (named by its digest, shared like the base image): this test's DVD is its own."""
    import hashlib

    import libvirt

    iso = lab.root / "standin-dvd.iso"
    if not iso.exists():
        return
    stem = "booted-installer-" + hashlib.sha256(iso.read_bytes()).hexdigest()[:16]
    conn = libvirt.open("qemu:///system")
    try:
        for pool in conn.listAllStoragePools(0):
            if pool.isActive():
                pool.refresh(0)
                for vol in pool.listAllVolumes(0):
                    if vol.name().startswith(stem):
                        vol.delete(0)
    finally:
        conn.close()


def _domain(lab: VmLab, image: str):
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        return conn.lookupByName(lab.owner_prefix() + image).XMLDesc(0), conn.lookupByName(lab.owner_prefix() + image).state()
    except libvirt.libvirtError:
        return None, None
    finally:
        conn.close()


def test_image_build_installs_a_vm_by_kickstart_then_boots_it_from_disk(kslab):
    started = time.monotonic()
    result = kslab.fab("image-build", "--image", "ks-good", timeout=600)
    print(f"\nkickstart install of ks-good (stand-in, TCG): {time.monotonic() - started:.0f}s")
    assert result.ok, result
    with kslab.activated():
        from fabfile.hosts import callhome, endpoint
        from fabfile.providers import get_provider, load_config
        from fabfile.providers.libvirt import domainxml

        prov = get_provider("libvirt", load_config(kslab.config_path))
        machine = prov.get("ks-good")
        gateway = prov.subnet.gateway
        expected_conf = callhome.host_config("kslab", "ks-good", prov.callhome_url())
        xml = prov._require("ks-good").domain
        ks_log = endpoint.kickstart_log_path().read_text()
        kickstarts = sorted(p.name for p in endpoint.kickstart_dir().glob("*")) if endpoint.kickstart_dir().exists() else []
    address, mac = machine.addresses[0], machine.macs[0]
    out = result.stdout + result.stderr
    assert re.search(rf"booted's nginx serves its kickstart at http://{re.escape(gateway)}:{kslab.port}/ks/", out), out
    assert "ks-good: installed; it boots from its disk from now on" in out
    # powered off by the installer (booted checked it was a power-off), its domain dropped: booted starts
    # it from its record, booting its disk, no installer kernel, no DVD
    assert _domain(kslab, "ks-good") == (None, None)
    facts = domainxml.parse_domain(xml)
    assert "<kernel>" not in xml and '<boot dev="hd" />' in xml and facts.cdroms == [] and facts.memory_kib == 262144
    # booted checked nginx served it (from the bridge's gateway: this machine), then the installer fetched
    # it from its own address, whole
    fetches = [line.split() for line in ks_log.splitlines()]
    assert [(f[1], f[3], f[4]) for f in fetches] == [(gateway, "200", fetches[0][4]), (address, "200", fetches[0][4])], ks_log
    # it is no longer served: it holds the host's call-home key
    assert kickstarts == []
    # the disk holds what the kickstart asked for (written by the installer, %post run in the new system)
    disk = Path(kslab.storage) / f"{kslab.owner_prefix()}ks-good.qcow2"
    files = debugfs_read(disk, ["/etc/booted/callhome.conf", "/etc/systemd/system/multi-user.target.wants/booted-callhome.service",
                                "/root/ks-post.log", "/etc/hostname", "/home/booted/.ssh/authorized_keys",
                                "/root/original-ks.cfg", "/etc/sudoers.d/booted"], kslab.root)
    assert files["/etc/booted/callhome.conf"].decode() == expected_conf
    assert files["/etc/systemd/system/multi-user.target.wants/booted-callhome.service"] == \
        b"/etc/systemd/system/booted-callhome.service"
    assert files["/root/ks-post.log"] == b"/etc/sudoers.d/booted: parsed OK\n"
    assert files["/etc/hostname"] == b"ks-good\n"
    pubkey = " ".join((kslab.state / "ssh" / "id_ed25519.pub").read_text().split()[:2])
    assert files["/home/booted/.ssh/authorized_keys"] == f"{pubkey} booted\n".encode()
    original = files["/root/original-ks.cfg"].decode()
    assert f"network --device={mac} --bootproto=static --ip={address} " in original
    assert "booted ALL=(ALL) NOPASSWD: ALL" in files["/etc/sudoers.d/booted"].decode()
    assert kslab.leftovers()["qemu"] == []


def test_a_kickstart_the_installer_rejects_fails_the_build_in_one_line_with_its_console_kept(kslab, monkeypatch, tmp_path):
    """A kickstart Anaconda refuses (here: %packages not closed by %end) stops the installer on its console
    without powering off: booted times out, keeps the console, removes the half-built VM, one line."""
    from fabfile.core.errors import ProviderError
    from fabfile.flows import environment
    from fabfile.providers import get_provider, kickstart, load_config

    broken = tmp_path / "el9.ks.in"
    text = kickstart.TEMPLATE.read_text()
    broken.write_text(text.replace("sudo\n%end\n", "sudo\n", 1))
    assert broken.read_text() != text
    monkeypatch.setattr(kickstart, "TEMPLATE", broken)
    write_config(kslab, timeout=60)
    try:
        started = time.monotonic()
        with kslab.activated():
            cfg = load_config(kslab.config_path)
            with pytest.raises(ProviderError) as caught:
                environment.build_image(cfg, get_provider("libvirt", cfg), "ks-bad", cfg.environments["kslab"])
        print(f"\nfailed kickstart install of ks-bad: {time.monotonic() - started:.0f}s")
    finally:
        write_config(kslab, timeout=180)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("ks-bad: kickstart install failed: timed out after 60s waiting for ks-bad to finish "
                              "installing (the kickstart powers it off)"), message
    assert "removed the half-built VM" in message
    kept = Path(re.search(r"logs kept in (\S+)$", message).group(1))
    console = (kept / "console.log").read_text(errors="replace")
    assert "An error occurred during reading the kickstart file:" in console
    assert "Section %packages does not end with %end." in console and "The installer will now terminate." in console
    assert "powering off" not in console
    assert (kept / "libvirt-qemu.log").is_file()
    # nothing of ks-bad is left: no domain, no volume, no qemu, its kickstart no longer served
    assert _domain(kslab, "ks-bad") == (None, None)
    assert list(Path(kslab.storage).glob(f"{kslab.owner_prefix()}ks-bad*")) == []
    assert kslab.leftovers()["qemu"] == []
    assert not (kslab.state / "kickstart" / "ks-bad.token").exists()
