"""The VM base image and each VM's seed disk.

Base image: the local provider's cached Debian root file system (debootstrap: systemd, sshd,
python3, nginx-light, ...) copied, plus a kernel, systemd-networkd, acpid, booted's first-boot
files (call home) and the seed service below, with what a small server VM does not use at boot
masked; then ``mkfs.ext4 -d`` into a raw disk and ``qemu-img convert`` to qcow2. Built once per recipe and
cached next to the local base image, with the kernel (as Debian ships it, and uncompressed for VMs
without hardware virtualisation: kernel.py) and booted's own initrd (initrd.py) that VMs boot
directly; each VM is a copy-on-write overlay over it.

Seed disk: a small ext4 file system labelled ``booted-seed``, made per VM and attached read-only.
It carries the VM's identity: hostname, static address (a systemd-networkd file for its MAC, for
boots without booted's initrd, which configures it from the kernel command line),
booted's SSH public key, and the call-home config with the host's own key. The base image's
``booted-seed.service`` applies it before networking and sshd start; when the seed's identity id
differs from the one applied last (a clone's first boot), it first removes the host keys and
machine id copied from the source, so the clone makes its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fabfile.core import localcmd
from fabfile.core.errors import ProviderError
from fabfile.core.output import progress
from fabfile.core.state import locked, write_tree
from fabfile.hosts import callhome
from fabfile.hosts.provision import USER_SETUP
from fabfile.providers.libvirt import initrd, kernel
from fabfile.providers.rootfs import SSHD_OWN_KEY_CONFIG, SSHD_OWN_KEY_DROPIN, HostKey, own_host_key_config

# Bump when the recipe below changes: image-build then rebuilds the cached VM base image.
RECIPE_VERSION = "6"
SEED_LABEL = "booted-seed"
SEED_SIZE = 4 * 1024 * 1024

# Run once inside a copy of the local base image (systemd-nspawn, host network for apt).
# Fixed text; no data is interpolated.
VM_CUSTOMIZE = r"""
set -eu
export DEBIAN_FRONTEND=noninteractive
rm -f /usr/sbin/policy-rc.d
apt-get update -qq
apt-get install -y -qq --no-install-recommends linux-image-amd64 initramfs-tools busybox-static acpid >/dev/null
# VMs boot booted's own initrd (initrd.py); the image's own stays small, for booting its disk by hand
sed -i 's/^MODULES=.*/MODULES=list/' /etc/initramfs-tools/initramfs.conf
printf 'virtio_pci\nvirtio_blk\next4\n' >> /etc/initramfs-tools/modules
update-initramfs -u -k all >/dev/null
rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
printf '/dev/vda / ext4 defaults 0 1\n' > /etc/fstab
systemctl enable systemd-networkd.service systemd-networkd-wait-online.service booted-seed.service \
    booted-callhome.service acpid.service >/dev/null 2>&1
# Under TCG every process started at boot costs (3 VMs booting at once share 2 cores): mask what a
# small server VM does not use. The root is mounted read-write by booted's initrd (no remount);
# no logins on consoles (booted logs in with keys over SSH); the power button (image-stop's clean
# shutdown) is acpid's, so logind and D-Bus, the costliest to start, are not needed.
systemctl mask systemd-resolved.service e2scrub_reap.service e2scrub_all.timer apt-daily.timer \
    apt-daily-upgrade.timer man-db.timer fstrim.timer dpkg-db-backup.timer systemd-binfmt.service \
    sys-kernel-debug.mount sys-kernel-tracing.mount dev-hugepages.mount dev-mqueue.mount sys-kernel-config.mount \
    sys-fs-fuse-connections.mount getty@tty1.service systemd-logind.service dbus.service dbus.socket \
    modprobe@drm.service modprobe@efi_pstore.service modprobe@loop.service modprobe@fuse.service \
    modprobe@configfs.service modprobe@dm_mod.service kmod-static-nodes.service systemd-modules-load.service \
    systemd-network-generator.service systemd-pstore.service systemd-update-utmp.service \
    systemd-update-utmp-runlevel.service systemd-journal-flush.service systemd-sysusers.service \
    systemd-remount-fs.service >/dev/null 2>&1 || true
# booted logs in without a terminal: no message of the day, which Debian's pam_motd makes afresh at
# every SSH login (run-parts over /etc/update-motd.d: four processes on the way to each deploy)
sed -i '/pam_motd\.so/d' /etc/pam.d/sshd
# generators run at every boot, one process each; only the fstab one has work here (systemd.generator(7):
# a link to /dev/null in /etc masks one)
mkdir -p /etc/systemd/system-generators
for g in cryptsetup debug getty gpt-auto hibernate-resume integritysetup rc-local run system-update sysv veritysetup; do
    ln -sf /dev/null "/etc/systemd/system-generators/systemd-$g-generator"
done
: > /etc/machine-id
"""

# Applies the seed disk (see the module docstring). Installed in the base image.
SEED_SCRIPT = r"""#!/bin/sh
# booted: apply this VM's identity from its seed disk (made by booted for this VM).
# Shell builtins where they do: under TCG every process started at boot costs a tenth of a second,
# and this one is on the way to the network and the call home.
set -eu
mnt=/run/booted-seed  # the unit's RuntimeDirectory
# booted attaches the seed as the VM's second virtio disk, which booted's initrd has probed: vdb.
# Else by label, read from the disks themselves (udev's /dev/disk/by-label links come seconds later).
dev=/dev/vdb
if mount -t ext4 -o ro "$dev" "$mnt" 2>/dev/null; then
    [ -r "$mnt/identity" ] || { umount "$mnt"; dev=""; }
else
    dev=""
fi
if [ -z "$dev" ]; then
    i=0
    until dev=$(findfs LABEL=booted-seed 2>/dev/null); do
        [ "$i" -lt 150 ] || { echo "booted-seed: no seed disk (no file system labelled booted-seed)" >&2; exit 1; }
        sleep 0.1; i=$((i + 1))
    done
    mount -o ro "$dev" "$mnt"
fi
read -r new < "$mnt/identity"
old=""
if [ -r /etc/booted/seed-identity ]; then read -r old < /etc/booted/seed-identity || true; fi
if [ "$old" != "$new" ]; then
    rm -f /etc/ssh/ssh_host_* /etc/booted/callhome.conf /etc/systemd/network/10-booted.network
    # a clone's disk carries its source's machine id; on a first boot from the base image systemd
    # has just made one from the VM's UUID
    [ -z "$old" ] || rm -f /etc/machine-id
    cp -a "$mnt/files/." /
    read -r user < "$mnt/user"
    read -r pubkey < "$mnt/pubkey"
    read -r hostname < "$mnt/hostname"
    set -- "$user" "$pubkey" "$hostname"
    . /usr/local/lib/booted/provision
    echo "$hostname" > /proc/sys/kernel/hostname
    [ -z "$old" ] || systemd-machine-id-setup >/dev/null 2>&1 || true
    [ -d /etc/booted ] || mkdir -p /etc/booted
    printf '%s\n' "$new" > /etc/booted/seed-identity
fi
umount "$mnt"
"""

# Drivers for hardware a booted VM does not have or need; udev would load them all at boot.
MODPROBE_BLACKLIST = "".join(
    f"blacklist {m}\ninstall {m} /bin/true\n"
    for m in ("floppy", "pcspkr", "cfg80211", "kvm", "kvm_amd", "kvm_intel", "ccp", "drm", "psmouse",
              "serio_raw", "i2c_piix4", "ata_piix", "ata_generic", "efi_pstore", "binfmt_misc", "virtio_balloon")
)

# image-stop's clean shutdown presses the ACPI power button (acpid(8): event regex, action).
ACPI_POWER_BUTTON = "event=button[ /]power\naction=/bin/systemctl poweroff\n"

# Debian's ssh.service checks the configuration (sshd -t) in a process of its own before sshd reads
# it again: one process less at every boot; a bad configuration still fails sshd's start.
SSH_UNIT_DROPIN = "[Service]\nExecStartPre=\n"

# udev's coldplug at boot replays every device's "add" (hundreds: ACPI, PCI, CPUs, memory blocks,
# 90 ttys), each through udev's rules: seconds of a TCG VM's one CPU while its services start.
# Where udev runs at all (a boot without booted's initrd: INITRD_DID_UNITS), the VM needs only
# disks (systemd's device units) and the NIC (networkd waits for udev to have named it); the modules coldplug loaded for other devices are in booted's initrd
# (initrd.DEVICE_MODULES). Debian's unit runs `udevadm trigger --type=all --action=add`.
UDEV_TRIGGER_DROPIN = ("[Service]\nExecStart=\n"
                       "ExecStart=-udevadm trigger --type=devices --action=add --subsystem-match=block "
                       "--subsystem-match=net\n")

# What booted's initrd does for a VM that boots it with its address on the kernel command line
# (domainxml.vm_cmdline): the drivers of the VM's devices loaded, its NIC given the static address.
# Then neither udev nor networkd start (with their sockets, coldplug and wait-online): on a TCG VM
# they took 2.5 s of CPU and sat on the way to sysinit.target and the network. A VM booted another
# way (its disk with its own initrd, as a Vagrant box of this image is) runs both, and networkd
# gives it the address from the seed's file.
INITRD_DID_DROPIN = "[Unit]\nConditionKernelCommandLine=!booted.ip\n"
INITRD_DID_UNITS = ("systemd-networkd.service", "systemd-networkd.socket", "systemd-networkd-wait-online.service",
                    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
                    "systemd-udev-trigger.service")

SEED_UNIT = """[Unit]
Description=booted: apply this VM's identity from its seed disk
DefaultDependencies=no
After=local-fs.target
Wants=network-pre.target
Before=network-pre.target systemd-networkd.service ssh.service booted-callhome.service sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
RuntimeDirectory=booted-seed
ExecStart=/usr/local/sbin/booted-seed

[Install]
WantedBy=sysinit.target
"""


@dataclass(frozen=True)
class BaseImage:
    """The files of one built base image (on this machine)."""

    digest: str
    disk: Path
    kernel: Path  # as the distribution ships it (compressed): VMs under KVM boot it
    initrd: Path
    kernel_tcg: Path  # what VMs under TCG boot: uncompressed if it could be (kernel.py), else the same kernel

    @property
    def names(self) -> dict[str, Path]:
        """Volume name -> local file, for copying into a hypervisor's storage."""
        return {f.name: f for f in (self.disk, self.kernel, self.initrd, self.kernel_tcg)}

    def files_for(self, domain_type: str) -> dict[str, Path]:
        """Role (disk, kernel, initrd) -> the file VMs of this libvirt domain type boot."""
        booted_kernel = self.kernel_tcg if kernel.boots_uncompressed(domain_type) else self.kernel
        return {"disk": self.disk, "kernel": booted_kernel, "initrd": self.initrd}


# The VM's user and key, applied by booted-seed at first boot with the seed's values as arguments
# (user, public key, hostname), sourced (no shell of its own). The libvirt provider's own (the local
# provider provisions its hosts from files in their overlay, a different interface: sharing its
# script broke VMs once).
VM_PROVISION = r"""
set -eu
user="$1"; pubkey="$2"; hostname="$3"
echo "$hostname" > /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$hostname" > /etc/hosts
""" + USER_SETUP


def base_digest(rootfs_marker: str, disk_mb: int) -> str:
    """Names the base image: changes when the local base, this recipe or the disk size change."""
    text = json.dumps({"rootfs": rootfs_marker, "recipe": RECIPE_VERSION, "customize": VM_CUSTOMIZE,
                       "seed": SEED_SCRIPT + SEED_UNIT + VM_PROVISION, "disk_mb": disk_mb,
                       "vm": SSHD_OWN_KEY_DROPIN + SSHD_OWN_KEY_CONFIG + MODPROBE_BLACKLIST + ACPI_POWER_BUTTON + SSH_UNIT_DROPIN
                       + UDEV_TRIGGER_DROPIN + INITRD_DID_DROPIN + ",".join(INITRD_DID_UNITS),
                       "initrd": initrd.INIT + ",".join(initrd.VM_MODULES),
                       "firstboot": callhome.SCRIPT.read_text() + callhome.UNIT.read_text()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_files(cache: Path, digest: str) -> BaseImage:
    stem = f"booted-base-{digest}"
    return BaseImage(digest, cache / f"{stem}.qcow2", cache / f"{stem}.vmlinuz", cache / f"{stem}.initrd",
                     cache / f"{stem}.vmlinux")


# A cached base of another recipe that nobody used for this long is deleted by the next build.
UNUSED_BASE_S = 2 * 86400


def _unused(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime > UNUSED_BASE_S
    except OSError:
        return False


# The longest a base build may take: its steps' own limits (copy, customise, mkfs, convert) added up.
BUILD_TIMEOUT_S = 600 + 900 + 900 + 600


def ensure_base(rootfs: Path, rootfs_marker: str, cache: Path, disk_mb: int, provision_script: str) -> BaseImage:
    """Build the VM base image from the local provider's root file system unless it is cached."""
    base = base_files(cache, base_digest(rootfs_marker, disk_mb))
    cache.mkdir(parents=True, exist_ok=True)
    # parallel builds of one environment wait here while one of them builds it (minutes, loaded)
    with locked("libvirt-base-image", timeout=BUILD_TIMEOUT_S):
        if all(p.exists() for p in base.names.values()):
            for f in base.names.values():
                os.utime(f)  # in use: see UNUSED_BASE_S
            return base
        for tool in ("mkfs.ext4", "qemu-img", "systemd-nspawn"):
            if localcmd.which(tool) is None and not Path("/usr/sbin", tool).exists():
                raise ProviderError(f"{tool} is missing: apt-get install e2fsprogs qemu-utils systemd-container")
        work = Path(tempfile.mkdtemp(prefix=".vm-build-", dir=cache))
        try:
            progress("libvirt: building the VM base image (kernel, initrd, qcow2); about two minutes")
            started = time.monotonic()
            root = work / "rootfs"
            localcmd.run(["cp", "-a", "--reflink=auto", "--", str(rootfs), str(root)], timeout=600)
            _install_files(root, provision_script)
            localcmd.run_logged(["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--resolv-conf=copy-host",
                         "--timezone=off", "-D", str(root), "--", "/bin/sh", "-c", VM_CUSTOMIZE],
                        work / "customize.log", timeout=900, what="VM image customisation (apt, kernel, initrd)")
            kernels = sorted((root / "boot").glob("vmlinuz-*"))
            if not kernels:
                raise ProviderError(f"the VM image has no kernel in /boot (log: {work / 'customize.log'})")
            shutil.copyfile(kernels[-1], work / "vmlinuz")
            (work / "vmlinux").write_bytes(_tcg_kernel((work / "vmlinuz").read_bytes()))
            (work / "initrd").write_bytes(_own_initrd(root, kernels[-1].name.removeprefix("vmlinuz-")))
            raw = work / "disk.raw"
            localcmd.run_logged(["mkfs.ext4", "-q", "-F", "-L", "booted-root", "-d", str(root), str(raw), f"{disk_mb}M"],
                        work / "mkfs.log", timeout=900, what="mkfs.ext4 of the VM image")
            localcmd.run_logged(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "disk.qcow2")],
                        work / "convert.log", timeout=600, what="qemu-img convert")
            for src, dest in ((work / "disk.qcow2", base.disk), (work / "vmlinuz", base.kernel),
                              (work / "initrd", base.initrd), (work / "vmlinux", base.kernel_tcg)):
                os.chmod(src, 0o644)
                os.replace(src, dest)
            progress(f"libvirt: VM base image ready in {time.monotonic() - started:.0f}s: {base.disk}")
            # other recipes' files: pools hold their own copies (or hard links), so nothing boots from these;
            # but the cache is shared (BOOTED_IMAGE_CACHE) by booteds of other versions, which use theirs:
            # only bases none of them has used for UNUSED_BASE_S go
            for old in cache.glob("booted-base-*"):
                if old.name.split(".")[0] != f"booted-base-{base.digest}" and _unused(old):
                    old.unlink(missing_ok=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return base


def _tcg_kernel(bzimage: bytes) -> bytes:
    """The kernel VMs boot under TCG: uncompressed (kernel.py), or as shipped if it cannot be."""
    try:
        return kernel.uncompressed(bzimage)
    except ValueError as err:
        progress(f"libvirt: VMs without hardware virtualisation boot the compressed kernel ({err}): "
                 "about 3 s more per boot")
        return bzimage


def _own_initrd(root: Path, kernel_version: str) -> bytes:
    """booted's initrd (initrd.py) from the image's busybox and kernel modules."""
    moddir = root / "lib" / "modules" / kernel_version
    try:
        order = initrd.load_order((moddir / "modules.dep").read_text(), initrd.VM_MODULES)
        busybox = (root / "bin" / "busybox").read_bytes()
    except (OSError, ValueError) as err:
        raise ProviderError(f"cannot make the VM initrd from the image: {err}") from err
    if any(not path.endswith(".ko") for path in order):
        raise ProviderError(f"the VM initrd takes uncompressed kernel modules only; the image has {', '.join(order)}")
    return initrd.build(busybox, [(initrd.module_name(path), (moddir / path).read_bytes()) for path in order])


def _install_files(root: Path, provision_script: str) -> None:
    """booted's files inside the base image: call home, the seed service, the provisioning script."""
    files = dict(callhome.firstboot_files())
    files["/usr/local/sbin/booted-seed"] = (SEED_SCRIPT, 0o755)
    files["/etc/systemd/system/booted-seed.service"] = (SEED_UNIT, 0o644)
    files["/usr/local/lib/booted/provision"] = (provision_script, 0o755)
    # the VM's host key comes from its seed (see Seed): sshd makes none at boot
    files.update(own_host_key_config("booted-vm.conf"))
    files["/etc/modprobe.d/booted-vm.conf"] = (MODPROBE_BLACKLIST, 0o644)
    files["/etc/acpi/events/booted-power-button"] = (ACPI_POWER_BUTTON, 0o644)
    files["/etc/systemd/system/ssh.service.d/booted-vm.conf"] = (SSH_UNIT_DROPIN, 0o644)
    files["/etc/systemd/system/systemd-udev-trigger.service.d/booted-vm.conf"] = (UDEV_TRIGGER_DROPIN, 0o644)
    for unit in INITRD_DID_UNITS:
        files[f"/etc/systemd/system/{unit}.d/booted-initrd.conf"] = (INITRD_DID_DROPIN, 0o644)
    write_tree(root, files)


@dataclass(frozen=True)
class Seed:
    """One VM's identity, as files on its seed disk."""

    identity: str
    hostname: str
    user: str
    pubkey: str
    address: str
    prefixlen: int
    gateway: str
    mac: str
    callhome_conf: str  # empty: the VM does not call home (built outside an environment)
    host_key: HostKey  # booted made it and pinned it before the first connection

    def network_file(self) -> str:
        return (
            "# written by booted: this VM's static address on booted's bridge\n"
            f"[Match]\nMACAddress={self.mac}\n\n[Network]\nAddress={self.address}/{self.prefixlen}\n"
            f"Gateway={self.gateway}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"
        )

    def tree(self) -> dict[str, tuple[str, int]]:
        """Relative path on the seed disk -> (contents, mode)."""
        files = {
            "identity": (self.identity + "\n", 0o644),
            "hostname": (self.hostname + "\n", 0o644),
            "user": (self.user + "\n", 0o644),
            "pubkey": (self.pubkey + "\n", 0o644),
            "files/etc/hostname": (self.hostname + "\n", 0o644),
            "files/etc/systemd/network/10-booted.network": (self.network_file(), 0o644),
        }
        files.update({f"files{path}": content for path, content in self.host_key.files().items()})
        if self.callhome_conf:
            files["files/etc/booted/callhome.conf"] = (self.callhome_conf, 0o600)
        return files


def make_seed_disk(seed: Seed, dest: Path) -> Path:
    """Write ``seed`` as a small ext4 image at ``dest`` (mode 0600: it holds the host's call-home key)."""
    with tempfile.TemporaryDirectory(prefix="booted-seed-") as tmp:
        tree = Path(tmp) / "tree"
        write_tree(tree, seed.tree())
        os.chmod(tree, 0o755)
        out = Path(tmp) / "seed.img"
        localcmd.run(["mkfs.ext4", "-q", "-F", "-L", SEED_LABEL, "-E", "root_owner=0:0", "-d", str(tree), str(out),
                      f"{SEED_SIZE // 1024}k"], timeout=60)
        os.chmod(out, 0o600)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out), str(dest))
    return dest
