"""Install media for VirtualBox images: the kickstart, the install ISO, and a per-VM PXE folder.

A VirtualBox image is installed like this: the VM PXE-boots from VirtualBox's built-in NAT TFTP
server, which serves ``state/tftp/<image>/`` (the provider points ``--nat-tftp-prefix1`` at it);
pxelinux loads the installer kernel and initrd taken from the ISO; the installer fetches
``http://10.0.2.2:<nginx port>/ks/<random>.cfg`` (booted's nginx serves it at a path drawn per build) and
installs from the DVD attached to the VM (``cdrom``). Each VM has its own TFTP folder, so two
builds can run at once, and nothing is copied by hand.

The kickstart itself, the ISO check and the extraction of its installer kernel and initrd are shared
with the libvirt provider (``fabfile.providers.kickstart``); this module adds VirtualBox's parts.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fabfile.core import names, state
from fabfile.core.errors import BootedError, UsageError
from fabfile.hosts import callhome
from fabfile.providers import kickstart
from fabfile.providers.kickstart import (  # noqa: F401  (the shared kickstart, as media.* for the tests)
    SUDOERS_PATH,
    TEMPLATE,
    extract_pxeboot,
    kickstart_path,
    kickstart_token,
    root_password_hash,
)

# From inside a NAT guest VirtualBox's host is 10.0.2.2 (its built-in TFTP server is 10.0.2.4).
NAT_HOST = "10.0.2.2"
# The file the NAT DHCP server offers as boot file (the provider's --nat-tftp-file1), inside the TFTP folder.
BOOT_FILE = "pxelinux.0"
# VirtualBox puts NIC 1 at PCI 00:03.0 and NIC 2 at 00:08.0, which systemd names enp0s3 / enp0s8.
NIC_DEVICES = ("enp0s3", "enp0s8")
# (pxelinux.0, ldlinux.c32) pairs, first found wins; both must come from the same syslinux version.
PXELINUX_SEARCH: list[tuple[str, str]] = [
    ("/usr/lib/PXELINUX/pxelinux.0", "/usr/lib/syslinux/modules/bios/ldlinux.c32"),  # Debian, Ubuntu
    ("/usr/share/syslinux/pxelinux.0", "/usr/share/syslinux/ldlinux.c32"),  # Fedora, RHEL
    ("/usr/lib/syslinux/bios/pxelinux.0", "/usr/lib/syslinux/bios/ldlinux.c32"),  # Arch
    ("/usr/share/syslinux/bios/pxelinux.0", "/usr/share/syslinux/bios/ldlinux.c32"),
]
PXELINUX_PACKAGES = "pxelinux and syslinux-common (Debian/Ubuntu) or syslinux-tftpboot / syslinux (Fedora/RHEL)"

_NIC = re.compile(r"[A-Za-z0-9_.-]{1,15}|([0-9a-f]{2}:){5}[0-9a-f]{2}")


# --------------------------------------------------------------------------- kickstart (VirtualBox's parts)
def kickstart_url(config, image: str) -> str:
    """Where the installer fetches the image's kickstart: booted's nginx, through VirtualBox NAT, at
    the random path of the image's current build (``kickstart.kickstart_token``)."""
    return f"http://{NAT_HOST}:{config.nginx['port']}{kickstart.kickstart_url_path(image)}"


def check_kickstart_served(config, image: str, timeout: float = 5.0) -> str:
    """Fetch the image's kickstart the way its installer will, and check it is the file booted wrote.

    From the guest, NAT's 10.0.2.2 is this machine's loopback (``--nat-localhostreachable1``), so the URL
    the VM uses is asked at 127.0.0.1 on the same port and path. Returns that URL; raises a one-line
    BootedError saying what answered instead.
    """
    port = int(config.nginx["port"])
    kickstart.check_kickstart_served(image, "127.0.0.1", port, timeout=timeout,
                                     shown_url=f"http://127.0.0.1:{port}{kickstart.kickstart_url_path(image)}")
    return kickstart_url(config, image)


def _network_lines(image: str, nics: Sequence[str]) -> list[str]:
    if len(nics) != 2 or len(set(nics)) != 2:
        raise UsageError(f"two different NICs are needed (NAT, host-only), not {list(nics)!r}")
    for nic in nics:
        if not _NIC.fullmatch(nic):
            raise UsageError(f"invalid NIC {nic!r}: give an interface name or a lower-case MAC address")
    nat, hostonly = nics
    return [
        f"network --device={nat} --bootproto=dhcp --onboot=on --activate --hostname={names.hostname_for(image)}",
        f"network --device={hostonly} --bootproto=dhcp --onboot=on --activate --nodefroute",
    ]


def render_kickstart(config, env, image: str, *, nics: Sequence[str] = NIC_DEVICES) -> str:
    """The kickstart for ``image`` of ``env`` on VirtualBox (two NICs, call home over host-only)."""
    image = names.check("image", image)
    vbox = config.provider_settings("virtualbox")
    return kickstart.render_kickstart(
        config, env, image, ks_url=kickstart_url(config, image),
        callhome_url=callhome.callhome_url(vbox["host_address"], config.nginx["port"]),
        network=_network_lines(image, nics))


def write_kickstart(config, env, image: str, *, nics: Sequence[str] = NIC_DEVICES) -> Path:
    """Render the kickstart and write it atomically where nginx serves it (mode 0640)."""
    return kickstart.publish_kickstart(image, render_kickstart(config, env, image, nics=nics))


# --------------------------------------------------------------------------- the ISO
def iso_path(config) -> Path:
    """The configured install ISO; a relative path is relative to the project root."""
    return kickstart.resolve_iso(config.provider_settings("virtualbox")["iso"])


def check_iso(config) -> Path:
    """The configured install ISO, checked: it exists, and matches iso_sha256 when that is set."""
    return kickstart.check_iso(iso_path(config), config.provider_settings("virtualbox").get("iso_sha256", ""),
                               "providers.virtualbox", config.path)


# --------------------------------------------------------------------------- PXE staging
def find_pxelinux() -> tuple[Path, Path]:
    """(pxelinux.0, ldlinux.c32) for a BIOS PXE boot: BOOTED_PXELINUX_DIR, else the system's syslinux."""
    candidates = list(PXELINUX_SEARCH)
    override = os.environ.get("BOOTED_PXELINUX_DIR")
    if override:
        candidates.insert(0, (f"{override}/pxelinux.0", f"{override}/ldlinux.c32"))
    for loader, module in candidates:
        if Path(loader).is_file() and Path(module).is_file():
            return Path(loader), Path(module)
    raise BootedError(f"no pxelinux.0 + ldlinux.c32 found (BIOS PXE boot loader); install {PXELINUX_PACKAGES}, "
                      "or set BOOTED_PXELINUX_DIR to a folder holding both")


def pxelinux_config(config, image: str) -> str:
    """pxelinux.cfg/default: boot the installer at once with the image's kickstart; no menu, no password."""
    # console=ttyS0 last: the kernel's and the installer's output goes to the serial port, which the VM
    # writes to a file on this machine (the build keeps it when an install fails).
    args = (f"initrd=el9/initrd.img ip=dhcp inst.repo=cdrom inst.ks={kickstart_url(config, image)} inst.text "
            "console=tty0 console=ttyS0,115200n8")
    return (
        f"# written by booted for {image}: install it with its kickstart\n"
        "DEFAULT install\n"
        "PROMPT 0\n"
        "TIMEOUT 1\n"
        "LABEL install\n"
        "  KERNEL el9/vmlinuz\n"
        f"  APPEND {args}\n"
        # BOOTIF=<mac of the PXE NIC> on the kernel line: the installer uses the NAT NIC, which
        # reaches booted's nginx at 10.0.2.2, instead of trying DHCP on every NIC.
        "  IPAPPEND 2\n"
    )


def tftp_dir(image: str) -> Path:
    return state.state_path("tftp", names.check("image", image))


def stage_install(config, env, image: str, *, nics: Sequence[str] = NIC_DEVICES) -> Path:
    """Everything the VM needs to install ``image``; returns its TFTP folder (state/tftp/<image>).

    Checks the ISO, writes the kickstart, and builds the TFTP folder (pxelinux.0, ldlinux.c32,
    pxelinux.cfg/default, el9/vmlinuz, el9/initrd.img) in a temporary folder renamed into place,
    so a failure leaves the previous folder (or none), never half of one.
    """
    image = names.check("image", image)
    iso = check_iso(config)
    loader, module = find_pxelinux()
    final = tftp_dir(image)
    with state.locked(f"stage-{image}"):
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{image}."))
        try:
            os.chmod(tmp, 0o755)
            shutil.copyfile(loader, tmp / BOOT_FILE)
            shutil.copyfile(module, tmp / "ldlinux.c32")
            extract_pxeboot(iso, tmp / "el9")
            (tmp / "pxelinux.cfg").mkdir()
            with contextlib.suppress(FileNotFoundError):
                kickstart_path(image).unlink()  # a previous build's kickstart
            kickstart_token(image, new=True)  # this build's own kickstart path
            state.atomic_write(tmp / "pxelinux.cfg" / "default", pxelinux_config(config, image))
            if env is not None:
                callhome.new_host_key(env.name, image)  # a rebuilt image must not keep its old key
            write_kickstart(config, env, image, nics=nics)
            # A folder cannot be renamed over a non-empty one: move the old one aside first.
            old = None
            if final.exists():
                old = final.with_name(f".{image}.old-{os.getpid()}")
                os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                if old is not None:
                    os.rename(old, final)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def unstage_install(image: str) -> None:
    """Remove the image's kickstart and TFTP folder (after its install, or when it is deleted).

    The kickstart holds the host's call-home key, so it should not stay downloadable.
    """
    image = names.check("image", image)
    with state.locked(f"stage-{image}"):
        kickstart.withdraw_kickstart(image)
        shutil.rmtree(tftp_dir(image), ignore_errors=True)
