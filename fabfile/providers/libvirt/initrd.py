"""booted's own initrd for its VMs: busybox, the drivers of the VM's devices, a short init.

Debian's initramfs-tools initrd starts udev, triggers every device and waits for it to settle
before it mounts the root file system: under QEMU's TCG (no hardware virtualization here) that
took 3.5-4 s of each VM's boot. This one loads virtio and ext4 (and the drivers of the VM's
other devices) in dependency order, gives the NIC the address on the kernel command line, mounts
the root disk named by ``root=`` there, and hands over to systemd. Booted this way, the VM runs
no udev at all (image.INITRD_DID_UNITS).

The archive is the kernel's initramfs format, cpio "newc" (kernel docs:
filesystems/ramfs-rootfs-initramfs, early-userspace/buffer-format), uncompressed. Pure: the
caller reads the files.
"""
from __future__ import annotations

import io
import stat
from collections.abc import Iterable

# What the init needs to reach an ext4 root on a virtio disk.
ROOT_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
# The drivers of the VM's other devices, which udev's coldplug loaded before (no udev runs on a boot
# of this initrd): the NIC's, the ACPI power button's with the event device acpid reads it from
# (image-stop's clean shutdown), and the random number device's (domainxml: virtio-rng), so that
# the kernel's random pool is ready when systemd starts: without it the pool filled only from
# interrupt timings, 9-10 s into a TCG boot, and journald and systemd-random-seed
# (sysinit.target) waited for it.
DEVICE_MODULES = ("virtio_rng", "virtio_net", "button", "evdev")
# All the VM initrd loads, in this order (dependencies resolved by load_order).
VM_MODULES = ROOT_MODULES + DEVICE_MODULES

# Fixed text, no data interpolated. A missing or unmountable root is said on the console (the VM's
# console log, which booted shows when a VM does not come up) and the VM powers off: no shell.
# With booted.ip= (address/prefix), booted.gw= and booted.mac= on the kernel command line
# (domainxml.vm_cmdline), it also gives the NIC with that MAC its static address, as networkd's file
# for the VM did (no IPv6 link-local address, no router advertisements); the booted system then
# starts neither networkd nor udev (image.INITRD_DID_UNITS).
INIT = r"""#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t devtmpfs devtmpfs /dev
$bb mount -t proc proc /proc
say() { echo "booted initrd: $*" > /dev/console; }
# one that does not load shows as the root disk missing or not mounting, said below
while read -r m; do $bb insmod "/lib/modules/$m.ko" 2>/dev/null; done < /etc/modules-order
root=/dev/vda ip="" gw="" mac=""
read -r cmdline < /proc/cmdline
set -f  # split the command line into words; expand no pattern in them
for arg in $cmdline; do
    case "$arg" in
        root=/dev/*) root="${arg#root=}" ;;
        booted.ip=*) ip="${arg#booted.ip=}" ;;
        booted.gw=*) gw="${arg#booted.gw=}" ;;
        booted.mac=*) mac="${arg#booted.mac=}" ;;
    esac
done
set +f
case "$ip,$gw,$mac" in
    ,,) ;;
    *[!0-9a-f.:/,]*|*,,*|,*|*,) say "ignoring a malformed booted.ip/booted.gw/booted.mac: $ip $gw $mac" ;;
    *)
        $bb mount -t sysfs sysfs /sys
        dev=""
        for d in /sys/class/net/*; do
            read -r addr < "$d/address" && [ "$addr" = "$mac" ] && dev="${d##*/}"
        done
        if [ -z "$dev" ]; then
            say "no network interface has the MAC address $mac"
        else
            echo 1 > "/proc/sys/net/ipv6/conf/$dev/addr_gen_mode"
            echo 0 > "/proc/sys/net/ipv6/conf/$dev/accept_ra"
            $bb ip link set dev "$dev" up && $bb ip addr add "$ip" dev "$dev" \
                && $bb ip route add default via "$gw" dev "$dev" || say "cannot give $dev the address $ip via $gw"
        fi
        $bb umount /sys
        ;;
esac
i=0
while [ ! -b "$root" ] && [ "$i" -lt 300 ]; do $bb usleep 100000; i=$((i + 1)); done
if ! $bb mount -t ext4 -o rw "$root" /root; then
    say "cannot mount the root file system $root (ext4)"
    $bb sleep 2
    $bb poweroff -f
fi
$bb umount /proc
$bb mount --move /dev /root/dev
exec $bb switch_root /root /sbin/init
"""


def load_order(modules_dep: str, wanted: Iterable[str]) -> list[str]:
    """Module paths (as modules.dep names them) to insmod, dependencies first, each once.

    ``modules_dep`` is the kernel's ``modules.dep`` (``path: dep dep ...``, the ones to load first
    last); ``wanted`` are module names (``-`` and ``_`` alike). A name modules.dep does not list is
    built into the kernel or missing: ValueError names it."""
    deps: dict[str, list[str]] = {}
    for line in modules_dep.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[path.strip()] = rest.split()
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []

    def add(path: str, seen: tuple[str, ...]) -> None:
        if path in order or path in seen:
            return
        for dep in reversed(deps.get(path, [])):
            add(dep, (*seen, path))
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise ValueError(f"kernel module {name} is not in modules.dep (built in, or not installed)")
        add(by_name[key], ())
    return order


def module_name(path: str) -> str:
    """``kernel/arch/x86/crypto/crc32c-intel.ko`` -> ``crc32c_intel``."""
    return path.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")


def cpio_newc(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A cpio "newc" archive of (path, mode, contents); character devices are /dev/console (5, 1)."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        rdev = (5, 1) if stat.S_ISCHR(mode) else (0, 0)
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0]
        header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
        out.write(header + encoded)
        pad(len(header) + len(encoded))
        out.write(data)
        pad(len(data))
    return out.getvalue()


# /dev/console must exist before devtmpfs is mounted: the kernel opens it for init's stdio
BASE_ENTRIES = [(d, stat.S_IFDIR | 0o755, b"") for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys",
                                                         "root", "run", "tmp", "mnt")]
CONSOLE = ("dev/console", stat.S_IFCHR | 0o600, b"")


def build(busybox: bytes, modules: list[tuple[str, bytes]], init: str = INIT,
          extra: Iterable[tuple[str, int, bytes]] = ()) -> bytes:
    """A busybox initrd: ``modules`` are (name, .ko contents) in load order (uncompressed), listed
    in /etc/modules-order for ``init``; ``extra`` entries are added as given (the kickstart tests'
    stand-in installer is such an initrd with its own init and files)."""
    f = stat.S_IFREG
    entries = [*BASE_ENTRIES, ("init", f | 0o755, init.encode()), ("bin/busybox", f | 0o755, busybox),
               ("etc/modules-order", f | 0o644, "".join(f"{name}\n" for name, _ in modules).encode()), *extra]
    entries += [(f"lib/modules/{name}.ko", f | 0o644, blob) for name, blob in modules]
    entries.append(CONSOLE)
    # Uncompressed: a few MB more for QEMU to load, but under TCG inflating it cost each VM 0.3 s.
    return cpio_newc(entries)
