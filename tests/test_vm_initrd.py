"""booted's VM initrd: module load order, the archive as the real cpio reads it, the base image's part.

The VMs that boot it are the libvirt tiers' (tests/test_libvirt_vms.py, tests/test_hypervisors.py).
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from fabfile.core.errors import ProviderError
from fabfile.providers.libvirt import image, initrd

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
needs_busybox = pytest.mark.skipif(not Path(BUSYBOX).exists(), reason="busybox-static is not installed")

MODULES_DEP = """\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/crypto/crc32c_generic.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/acpi/button.ko:
kernel/drivers/input/evdev.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
"""


@pytest.mark.parametrize("wanted, expected", [
    (["ext4"], ["kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko", "kernel/fs/ext4/ext4.ko"]),
    (["virtio_blk", "virtio_pci"],  # shared dependencies load once, before the first that needs them
     ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/block/virtio_blk.ko",
      "kernel/drivers/virtio/virtio_pci_modern_dev.ko", "kernel/drivers/virtio/virtio_pci.ko"]),
    (["crc32c-intel"], ["kernel/arch/x86/crypto/crc32c-intel.ko"]),  # '-' and '_' name one module
    (["jbd2", "ext4"], ["kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko", "kernel/fs/ext4/ext4.ko"]),
])
def test_load_order_puts_dependencies_first_and_each_module_once(wanted, expected):
    assert initrd.load_order(MODULES_DEP, wanted) == expected


def test_a_module_modules_dep_does_not_list_is_named():
    with pytest.raises(ValueError, match="kernel module virtio_console is not in modules.dep"):
        initrd.load_order(MODULES_DEP, ["ext4", "virtio_console"])


@needs_busybox
def test_the_init_script_is_valid_busybox_shell():
    checked = subprocess.run([BUSYBOX, "sh", "-n", "-c", initrd.INIT], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


@needs_busybox
def test_busybox_cpio_reads_the_archive_as_built(tmp_path):
    archive = initrd.build(b"#!fake busybox\n", [("virtio", b"\x7fELF one"), ("ext4", b"\x7fELF two" * 1001)])
    raw = archive  # uncompressed: the kernel copies it, no inflating under TCG
    listing = subprocess.run([BUSYBOX, "cpio", "-t"], input=raw, capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    names = listing.stdout.decode().split()
    assert {"init", "bin/busybox", "dev/console", "etc/modules-order", "lib/modules/virtio.ko",
            "lib/modules/ext4.ko", "proc", "root"} <= set(names)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run([BUSYBOX, "cpio", "-i", "-d"], input=raw, cwd=out, capture_output=True, timeout=30, check=True)
    assert (out / "init").read_text() == initrd.INIT and (out / "init").stat().st_mode & 0o111
    assert (out / "etc/modules-order").read_text() == "virtio\next4\n"  # the init loads them in this order
    assert (out / "lib/modules/ext4.ko").read_bytes() == b"\x7fELF two" * 1001


def _image_root(tmp_path: Path, dep: str, busybox: bool = True) -> Path:
    root = tmp_path / "root"
    moddir = root / "lib/modules/6.1.0-test-amd64"
    for line in dep.splitlines():
        path = moddir / line.partition(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x7fELF " + path.name.encode())
    (moddir / "modules.dep").write_text(dep)
    if busybox:
        (root / "bin").mkdir(parents=True)
        (root / "bin/busybox").write_bytes(b"busybox")
    return root


@needs_busybox
def test_the_base_image_initrd_carries_the_root_and_device_modules_in_order(tmp_path):
    root = _image_root(tmp_path, MODULES_DEP)
    raw = image._own_initrd(root, "6.1.0-test-amd64")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run([BUSYBOX, "cpio", "-i", "-d"], input=raw, cwd=out, capture_output=True, timeout=30, check=True)
    assert (out / "etc/modules-order").read_text().split() == [
        "virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk", "crc32c_generic", "jbd2",
        "mbcache", "crc16", "ext4", "virtio_rng", "failover", "net_failover", "virtio_net", "button", "evdev"]
    assert (out / "lib/modules/ext4.ko").read_bytes() == b"\x7fELF ext4.ko"


@pytest.mark.parametrize("dep, busybox, message", [
    (MODULES_DEP.replace("ext4.ko:", "ext4.ko.xz:"), True, "uncompressed kernel modules only"),
    (MODULES_DEP.replace("kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n",
                         ""), True, "kernel module ext4 is not in modules.dep"),
    (MODULES_DEP, False, "cannot make the VM initrd from the image: .*busybox"),
])
def test_an_image_the_initrd_cannot_be_made_from_is_a_one_line_error(tmp_path, dep, busybox, message):
    root = _image_root(tmp_path, dep, busybox=busybox)
    with pytest.raises(ProviderError, match=message):
        image._own_initrd(root, "6.1.0-test-amd64")


# The init's own network step, run for real under busybox in a chroot. /bin/busybox there is a
# process-boundary fake: it records every call and does nothing for the ones that would touch the
# machine (mount, insmod, ip, switch_root...); the rest (the shell, read, echo, test) is busybox's.
FAKE_BUSYBOX = """#!/real/busybox sh
echo "$*" >> /calls
case "$1" in
    mount|umount|insmod|ip|switch_root|poweroff|usleep|sleep) exit 0 ;;
esac
exec /real/busybox "$@"
"""
MAC = "52:54:00:12:34:56"
NET = ["ip link set dev eth0 up", "ip addr add 10.9.0.5/24 dev eth0", "ip route add default via 10.9.0.1 dev eth0"]


def _run_init(tmp_path: Path, cmdline: str) -> tuple[list[str], str, Path]:
    root = tmp_path / "initrd"
    for d in ("bin", "real", "etc", "dev", "root", "proc/sys/net/ipv6/conf/eth0", "proc/sys/net/ipv6/conf/lo",
              "sys/class/net/eth0", "sys/class/net/lo"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "real/busybox")  # busybox picks its applet by its own name
    (root / "bin/busybox").write_text(FAKE_BUSYBOX)
    (root / "bin/busybox").chmod(0o755)
    (root / "init").write_text(initrd.INIT)
    (root / "etc/modules-order").write_text("")
    (root / "proc/cmdline").write_text(cmdline + "\n")
    (root / "sys/class/net/eth0/address").write_text(MAC + "\n")
    (root / "sys/class/net/lo/address").write_text("00:00:00:00:00:00\n")
    for conf in ("eth0", "lo"):
        for name, value in (("addr_gen_mode", "0"), ("accept_ra", "1")):
            (root / f"proc/sys/net/ipv6/conf/{conf}/{name}").write_text(value + "\n")
    (root / "dev/console").write_text("")
    (root / "booted.gw=10.9.0.1").write_text("")
    os.mknod(root / "dev/vda", stat.S_IFBLK | 0o600, os.makedev(254, 0))
    done = subprocess.run(["chroot", str(root), "/real/busybox", "sh", "/init"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    calls = (root / "calls").read_text().splitlines()
    assert calls[-1] == "switch_root /root /sbin/init"  # whatever the network step said, the VM boots on
    return [c for c in calls if c.startswith("ip ")], (root / "dev/console").read_text(), root


needs_root_and_busybox = pytest.mark.skipif(not Path(BUSYBOX).exists() or os.geteuid() != 0,
                                            reason="needs busybox-static and root (chroot, mknod)")


@needs_root_and_busybox
@pytest.mark.parametrize("cmdline, expected_ip, console", [
    (f"root=/dev/vda rw quiet net.ifnames=0 booted.ip=10.9.0.5/24 booted.gw=10.9.0.1 booted.mac={MAC}", NET, ""),
    ("root=/dev/vda rw console=ttyS0 quiet", [], ""),  # no address given: networkd's job, from the seed
    ("root=/dev/vda booted.ip=10.9.0.5/24 booted.gw=10.9.0.1 booted.mac=52:54:00:00:00:99", [],
     "booted initrd: no network interface has the MAC address 52:54:00:00:00:99\n"),
    (f"root=/dev/vda booted.ip=10.9.0.5/24;poweroff booted.gw=10.9.0.1 booted.mac={MAC}", [],
     f"booted initrd: ignoring a malformed booted.ip/booted.gw/booted.mac: 10.9.0.5/24;poweroff 10.9.0.1 {MAC}\n"),
    # a pattern is not expanded: the init's folder holds a file the pattern would match
    (f"root=/dev/vda booted.ip=10.9.0.5/24 booted.gw=10.9.0.? booted.mac={MAC}", [],
     f"booted initrd: ignoring a malformed booted.ip/booted.gw/booted.mac: 10.9.0.5/24 10.9.0.? {MAC}\n"),
    (f"root=/dev/vda booted.ip=10.9.0.5/24 booted.mac={MAC}", [],
     f"booted initrd: ignoring a malformed booted.ip/booted.gw/booted.mac: 10.9.0.5/24  {MAC}\n"),
], ids=["address", "none", "no-such-mac", "injection", "pattern", "no-gateway"])
def test_the_init_gives_the_nic_with_that_mac_its_address_or_says_why_not(tmp_path, cmdline, expected_ip, console):
    ip_calls, said, root = _run_init(tmp_path, cmdline)
    assert ip_calls == expected_ip and said == console
    configured = bool(expected_ip)
    # as networkd's file did: no IPv6 link-local address, no router advertisements
    assert (root / "proc/sys/net/ipv6/conf/eth0/addr_gen_mode").read_text().strip() == ("1" if configured else "0")
    assert (root / "proc/sys/net/ipv6/conf/eth0/accept_ra").read_text().strip() == ("0" if configured else "1")
