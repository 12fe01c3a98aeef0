"""A stand-in EL9 install DVD for the libvirt kickstart tests: real kernel, busybox installer.

No real EL9 installer can run here (the Debian mirror serves no installer, no EL9 media can be
fetched). So the tests build an ISO laid out like a RHEL 9 family DVD (productmd ``.treeinfo`` with
``[images-x86_64]``, ``.discinfo``, ``media.repo``, ``images/pxeboot/{vmlinuz,initrd.img}``,
``isolinux/``, ``EFI/BOOT/``, ``BaseOS/`` and ``AppStream/``; as on AlmaLinux / Rocky 9 DVDs) whose
installer kernel is the real Debian kernel of booted's libvirt base image and whose initrd is busybox
(``busybox-static``) with the kernel's virtio, AHCI/CD-ROM, iso9660 and ext4 modules and
tests/standin/installer-init as /init. That installer (see its header) does what booted relies on:

* network from ``ip=`` / ``ifname=`` (dracut's syntax), kickstart from ``inst.ks=`` over HTTP;
* the kickstart checked with the rules of pykickstart's RHEL9 handler, which Anaconda parses it with:
  the command set and each command's options, removed commands, the section names and their header
  options, every section closed by ``%end`` (its messages are pykickstart's); and what Anaconda's hub
  waits for in a kickstart install (an installation source, storage, root password or wheel user);
* the install source: the CD-ROM must carry an installation tree (``inst.repo=cdrom``);
* the disk: an ext2 file system on /dev/vda holding the kickstart (/root/original-ks.cfg, as Anaconda
  keeps it), the sshkey's authorized_keys, and what the kickstart's %post scripts wrote, run in a
  chroot of the new system with busybox plus stubs for systemctl (enable needs the unit file),
  visudo (-cf checks mode 0440 and a NOPASSWD line) and restorecon; ``--erroronfail`` honoured;
* the end: ``poweroff`` powers off; any error stays on the console (no power-off), as Anaconda does.

What a real EL9 install adds is everything behind those checks: packages from the DVD, partitioning,
SELinux labels, a boot loader on the disk (so the disk boot step boots a system).
"""
from __future__ import annotations

import hashlib
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from isofixture import make_test_iso

from fabfile.providers.libvirt import initrd

HERE = Path(__file__).resolve().parent / "standin"
BUSYBOX = Path("/bin/busybox")
# The modules the installer loads, with their dependencies from modules.dep (virtio disk and NIC,
# the SATA CD-ROM, its iso9660 file system, and ext4 (with the crc32c it asks the crypto API for),
# which mounts the ext2 the installer makes).
TOP_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ahci", "sr_mod", "isofs", "crc32c_generic", "ext4")

STUBS = {
    "systemctl": r"""#!/bin/sh
# stand-in systemctl: `enable` links a unit that must exist (as systemctl does); every call is logged
echo "systemctl $*" >> /var/log/standin-stubs.log
[ "$1" = enable ] || exit 0
shift
for unit in "$@"; do
    found=""
    for dir in /etc/systemd/system /usr/lib/systemd/system; do
        [ -f "$dir/$unit" ] && found="$dir/$unit"
    done
    [ -n "$found" ] || { echo "Failed to enable unit: Unit file $unit does not exist." >&2; exit 1; }
    ln -sf "$found" "/etc/systemd/system/multi-user.target.wants/$unit"
done
""",
    "visudo": r"""#!/bin/sh
# stand-in visudo -cf FILE: the file exists, has mode 0440 and a NOPASSWD rule line
echo "visudo $*" >> /var/log/standin-stubs.log
[ "$1" = -cf ] || exit 0
[ -f "$2" ] || { echo "visudo: unable to open $2: No such file or directory" >&2; exit 1; }
[ "$(stat -c %a "$2")" = 440 ] || { echo "visudo: $2: bad permissions, should be mode 0440" >&2; exit 1; }
grep -Eq '^[a-z_][a-z0-9_-]* ALL=\(ALL\) NOPASSWD: ALL$' "$2" || { echo ">>> $2: syntax error <<<" >&2; exit 1; }
echo "$2: parsed OK"
""",
    "restorecon": """#!/bin/sh
echo "restorecon $*" >> /var/log/standin-stubs.log
""",
}


def kickstart_rules() -> str:
    """The RHEL9 handler's commands (with options), removed commands and sections (with header options)."""
    from pykickstart.base import RemovedCommand
    from pykickstart.parser import KickstartParser
    from pykickstart.version import RHEL9, makeVersion

    handler = makeVersion(RHEL9)
    lines = []
    for name, command in sorted(handler.commands.items()):
        if isinstance(command, RemovedCommand):
            lines.append(f"removed {name}")
            continue
        try:
            options = sorted({o for a in command._getParser()._actions for o in a.option_strings})
        except AttributeError:
            options = []
        lines.append(" ".join(["command", name, *options]))
    for name, section in sorted(KickstartParser(handler)._sections.items()):
        try:
            options = sorted({o for a in section._getParser()._actions for o in a.option_strings})
        except AttributeError:  # %addon, %anaconda: their headers are not parsed by pykickstart
            options = []
        lines.append(" ".join(["section", name, *options]))
    return "\n".join(lines) + "\n"


def _debugfs(image: Path, commands: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".cmds") as cmds:
        cmds.write("\n".join(commands) + "\n")
        cmds.flush()
        subprocess.run(["debugfs", "-f", cmds.name, str(image)], check=True, capture_output=True, timeout=120)


def kernel_modules(base_disk: Path, work: Path) -> tuple[list[str], dict[str, bytes]]:
    """(load order, {name: .ko bytes}) for TOP_MODULES and their dependencies, read from the base image."""
    raw = work / "base.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(base_disk), str(raw)], check=True, timeout=300)
    try:
        out = work / "mods"
        out.mkdir()
        listing = subprocess.run(["debugfs", "-R", "ls -p /lib/modules", str(raw)], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
        versions = [f.split("/")[5] for f in listing.splitlines() if f.count("/") >= 6 and f.split("/")[5] not in (".", "..")]
        assert versions, f"no kernel modules in {base_disk}"
        root = f"/lib/modules/{versions[-1]}"
        _debugfs(raw, [f"dump {root}/modules.dep {out}/modules.dep", f"dump {root}/modules.builtin {out}/modules.builtin"])
        order = initrd.load_order((out / "modules.dep").read_text(), TOP_MODULES)
        assert all(p.endswith(".ko") for p in order), f"compressed modules are not handled: {order}"
        _debugfs(raw, [f"dump {root}/{p} {out}/{Path(p).name}" for p in order])
        return [Path(p).name[:-3] for p in order], {Path(p).name[:-3]: (out / Path(p).name).read_bytes() for p in order}
    finally:
        raw.unlink(missing_ok=True)


def make_initrd(modules: tuple[list[str], dict[str, bytes]]) -> bytes:
    """booted's busybox initrd (initrd.build) with the stand-in installer as its init."""
    order, blobs = modules
    d, f = stat.S_IFDIR | 0o755, stat.S_IFREG
    extra = [("etc/standin", d, b""), ("etc/standin/stubs", d, b""),
             ("etc/standin/kscheck.awk", f | 0o644, (HERE / "kscheck.awk").read_bytes()),
             ("etc/standin/ks-rules", f | 0o644, kickstart_rules().encode())]
    extra += [(f"etc/standin/stubs/{name}", f | 0o755, text.encode()) for name, text in STUBS.items()]
    return initrd.build(BUSYBOX.read_bytes(), [(name, blobs[name]) for name in order],
                        init=(HERE / "installer-init").read_text(), extra=extra)


def treeinfo(files: dict[str, bytes]) -> str:
    """A productmd 1.2 .treeinfo as RHEL 9 family DVDs carry it, with real checksums."""
    sums = "".join(f"{p} = sha256:{hashlib.sha256(files[p]).hexdigest()}\n"
                   for p in ("images/install.img", "images/pxeboot/initrd.img", "images/pxeboot/vmlinuz"))
    return f"""[checksums]
{sums}
[general]
arch = x86_64
family = booted stand-in EL
name = booted stand-in EL 9
packagedir = AppStream/Packages
platforms = x86_64,xen
repository = AppStream
timestamp = 1700000000
variant = AppStream
variants = AppStream,BaseOS
version = 9

[header]
type = productmd.treeinfo
version = 1.2

[images-x86_64]
initrd = images/pxeboot/initrd.img
kernel = images/pxeboot/vmlinuz

[media]
discnum = 1
totaldiscs = 1

[release]
name = booted stand-in EL
short = standin
version = 9

[stage2]
mainimage = images/install.img

[tree]
arch = x86_64
build_timestamp = 1700000000
platforms = x86_64,xen
variants = AppStream,BaseOS

[variant-AppStream]
id = AppStream
name = AppStream
packages = AppStream/Packages
repository = AppStream
type = variant
uid = AppStream

[variant-BaseOS]
id = BaseOS
name = BaseOS
packages = BaseOS/Packages
repository = BaseOS
type = variant
uid = BaseOS
"""


def make_standin_dvd(dest: Path, kernel: Path, base_disk: Path) -> Path:
    """Write the stand-in DVD at ``dest`` (kernel: the base image's vmlinuz; modules from its disk)."""
    with tempfile.TemporaryDirectory(prefix="ks-standin-", dir=dest.parent) as tmp:
        initrd = make_initrd(kernel_modules(base_disk, Path(tmp)))
    vmlinuz = kernel.read_bytes()
    isolinux_cfg = (b"default linux\ntimeout 600\nlabel linux\n  kernel vmlinuz\n"
                    b"  append initrd=initrd.img inst.stage2=hd:LABEL=STANDIN-9 quiet\n")
    files = {
        "images/pxeboot/vmlinuz": vmlinuz,
        "images/pxeboot/initrd.img": initrd,
        "images/install.img": b"stand-in: no stage2 image (the busybox initrd is the whole installer)\n",
        "isolinux/vmlinuz": vmlinuz,
        "isolinux/initrd.img": initrd,
        "isolinux/isolinux.cfg": isolinux_cfg,
        "EFI/BOOT/grub.cfg": b"set default=0\nmenuentry 'Install' {\n  linuxefi /images/pxeboot/vmlinuz inst.stage2=hd:LABEL=STANDIN-9\n  initrdefi /images/pxeboot/initrd.img\n}\n",
        ".discinfo": b"1700000000.000000\nbooted stand-in EL 9\nx86_64\nALL\n",
        "media.repo": b"[InstallMedia]\nname=booted stand-in EL 9\nmediaid=None\nmetadata_expire=-1\ngpgcheck=0\ncost=500\n",
        "BaseOS/repodata/repomd.xml": b"<?xml version=\"1.0\"?>\n<repomd/>\n",
        "AppStream/repodata/repomd.xml": b"<?xml version=\"1.0\"?>\n<repomd/>\n",
    }
    files[".treeinfo"] = treeinfo(files).encode()
    return make_test_iso(dest, files, volume="STANDIN-9")


def debugfs_read(disk_qcow2: Path, paths: list[str], work: Path) -> dict[str, bytes | None]:
    """Files from the ext2 file system the stand-in wrote on a VM's qcow2 disk: contents, a symlink's
    target, or None if the path is not there."""
    raw = work / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk_qcow2), str(raw)], check=True, timeout=300)
    try:
        out = work / "read"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        found: dict[str, bytes | None] = {}
        for i, path in enumerate(paths):
            info = subprocess.run(["debugfs", "-R", f"stat {path}", str(raw)], capture_output=True, text=True,
                                  timeout=60)
            if "Inode:" not in info.stdout:
                found[path] = None
            elif "Type: symlink" in info.stdout:
                found[path] = info.stdout.split('Fast link dest: "', 1)[1].split('"', 1)[0].encode()
            else:
                _debugfs(raw, [f"dump {path} {out}/{i}"])
                found[path] = (out / str(i)).read_bytes()
        return found
    finally:
        raw.unlink(missing_ok=True)
