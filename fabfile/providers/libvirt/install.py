"""Installing a libvirt VM from an EL9 ISO with booted's kickstart (``providers.libvirt.install: kickstart``).

Done the way virt-install installs a RHEL 9 family tree (``--location``): the ISO's installer kernel and
initrd (``images/pxeboot/``, read from the ISO with pycdlib: no mount, no root) are booted directly, the
ISO is attached as a CD-ROM (``inst.repo=cdrom``), and the kernel command line carries ``inst.ks=`` (booted's
nginx on the bridge) and the VM's static address in dracut's ``ip=`` / ``ifname=`` syntax (dracut.cmdline(7)),
so the installer reaches booted before anything else exists on the bridge. The kickstart is the one
VirtualBox installs from (``fabfile.providers.kickstart``), with one network line: the same static address.
The kickstart ends with ``poweroff``; booted waits for it (progress, ``install_timeout_s``), then redefines
the domain to boot from its disk with its normal memory. A failed install keeps the serial console
and libvirt's log under ``<state>/diagnostics/`` and removes everything else it made.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fabfile.core import names
from fabfile.core.errors import BootedError, ProviderError
from fabfile.core.output import progress, wait_until
from fabfile.core.state import locked, state_path
from fabfile.hosts import callhome
from fabfile.providers import kickstart
from fabfile.providers.libvirt import domainxml
from fabfile.providers.libvirt.domainxml import DomainPlan, HostRecord, check_ipv4, check_mac, check_prefixlen
from fabfile.providers.libvirt.hypervisor import Hypervisor, bindings
from fabfile.providers.libvirt.records import Placed, Vm

if TYPE_CHECKING:
    from fabfile.providers.base import Machine
    from fabfile.providers.libvirt.provider import LibvirtProvider

# The interface name the installer gives the VM's NIC (dracut's ifname=<name>:<mac>).
BOOT_NIC = "bootnet"
LIBVIRT_QEMU_LOGS = Path("/var/log/libvirt/qemu")
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


# --------------------------------------------------------------------------- plans (pure)
def _hostname(value: str) -> str:
    if not _HOSTNAME.fullmatch(value):
        raise ValueError(f"not a host name: {value!r}")
    return value


def netmask(prefixlen: int) -> str:
    return str(ipaddress.IPv4Network(f"0.0.0.0/{check_prefixlen(prefixlen)}").netmask)


def installer_cmdline(ks_url: str, address: str, prefixlen: int, gateway: str, hostname: str, mac: str) -> str:
    """The installer kernel's command line; every value is checked (no spaces, no quotes can get in)."""
    parts = [
        f"inst.ks={kickstart.check_ks_url(ks_url)}",
        "inst.repo=cdrom",
        "inst.text",
        # dracut: ip=<client>::<gateway>:<netmask>:<hostname>:<interface>:none, and name the NIC by its MAC
        f"ip={check_ipv4(address, 'address')}::{check_ipv4(gateway, 'gateway')}:{netmask(prefixlen)}:{_hostname(hostname)}"
        f":{BOOT_NIC}:none",
        f"ifname={BOOT_NIC}:{check_mac(mac)}",
        "console=ttyS0,115200n8",
    ]
    return " ".join(parts)


def network_line(mac: str, address: str, prefixlen: int, gateway: str, hostname: str) -> str:
    """The kickstart's network command: the installed system keeps the address the installer had."""
    return (f"network --device={check_mac(mac)} --bootproto=static --ip={check_ipv4(address, 'address')} "
            f"--netmask={netmask(prefixlen)} --gateway={check_ipv4(gateway, 'gateway')} --onboot=on --activate "
            f"--hostname={_hostname(hostname)}")


def install_plan(plan: DomainPlan, *, kernel: str, initrd: str, cmdline: str, cdrom: str, memory_mb: int) -> DomainPlan:
    """The domain while installing: the installer's kernel, the ISO as CD-ROM, a reboot ends the domain."""
    return replace(plan, kernel=kernel, initrd=initrd, cmdline=cmdline, cdrom=cdrom, memory_mb=memory_mb,
                   on_reboot="destroy")


def disk_boot_plan(plan: DomainPlan) -> DomainPlan:
    """The domain once installed: boots the disk's boot loader; no installer, no ISO."""
    return replace(plan, kernel="", initrd="", cmdline="", cdrom="", on_reboot="restart")


def disk_booted(domain_xml: str) -> bool:
    """Whether a domain boots from its disk (installed by kickstart) rather than booted's base kernel."""
    os_el = ET.fromstring(domain_xml).find("./os")
    return os_el is not None and os_el.find("./kernel") is None


def last_console_line(path: Path, limit: int = 160) -> str:
    """The console's last non-empty line, printable characters only (it goes into a one-line error)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 8192))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    for line in reversed(tail.splitlines()):
        text = "".join(c for c in line if c.isprintable()).strip()
        if text:
            return text[:limit]
    return ""


# --------------------------------------------------------------------------- the install
def build(provider: "LibvirtProvider", image: str, env, owner: str) -> "Machine":
    """Install ``image`` from the configured ISO with booted's kickstart; return it, powered off.

    ``owner``: the state dir's tag the provider puts in its records."""
    lv = bindings()
    image = names.check("image", image)
    settings = provider.settings
    if provider._find(image):
        raise ProviderError("already exists; delete it first (fab image-del --image NAME)", image=image)
    iso = kickstart.check_iso(kickstart.resolve_iso(settings["iso"]), settings["iso_sha256"], "providers.libvirt",
                              provider.config.path)
    if env is None:
        raise ProviderError("a kickstart install needs the image's environment (its service and call home)",
                            image=image)
    with locked("libvirt-hosts"):
        hv = provider._place(image)  # the environment's placement, as for a VM from the base image
    installer = _installer_volumes(provider, hv, iso)
    dom_name = provider.domain_name(image)
    console = provider.storage_dir / f"{dom_name}.console.log"
    made: list = []  # "kickstart" and volumes, for the undo
    dom = None
    with locked(f"libvirt-install-{image}"):
        try:
            with locked("libvirt-hosts"):
                placed = provider.records.load().get(image)
                if placed and placed.domain:
                    raise ProviderError("already exists; delete it first (fab image-del --image NAME)", image=image)
                # placed without a domain: an install cut short (this one holds the install lock)
                address, mac = (placed.record.address, placed.record.mac) if placed else provider._allocate(image)
                record = HostRecord(image=image, owner=owner, address=address, mac=mac, env=env.name)
                provider.records.put(Placed(hv.name, record))  # placed: parallel builds see it
                made += ["record", "kickstart"]
                plan = replace(_publish_kickstart(provider, hv, record, env), console_log=str(console))
                made.append(_target_disk(provider, hv, dom_name))
                plan = replace(plan, disk=made[-1].path())
                # persistent while it installs: its state after power-off says whether it powered off
                dom = hv.conn.defineXML(domainxml.render_domain(install_plan(
                    plan, kernel=installer["kernel"], initrd=installer["initrd"], cdrom=installer["iso"],
                    memory_mb=int(settings["install_memory_mb"]),
                    cmdline=installer_cmdline(plan.extra["ks_url"], address, provider.subnet.prefixlen,
                                              provider.subnet.gateway, names.hostname_for(image), mac))))
            # The installer waits forever for a kickstart it cannot fetch: check nginx serves it first.
            provider.endpoint_ready()
            url = kickstart.check_kickstart_served(image, provider.callhome_address_on(hv),
                                                   int(provider.config.nginx["port"]))
            progress(f"{image}: booted's nginx serves its kickstart at {url}")
            console.unlink(missing_ok=True)
            dom.create()
            _wait_for_poweroff(provider, dom, image, console)
            domain = domainxml.render_domain(replace(disk_boot_plan(plan), uuid=dom.UUIDString()))
            dom.undefine()  # from now on it runs as a transient domain (provider.start), booting its disk
            dom = None
            with locked("libvirt-hosts"):
                provider.records.put(Placed(hv.name, record, domain))
        except (BootedError, ValueError, KeyboardInterrupt, lv.libvirtError) as err:
            note = _undo(provider, hv, image, dom, made, console)
            if isinstance(err, KeyboardInterrupt):
                raise
            reason = err.get_error_message() if isinstance(err, lv.libvirtError) else str(err)
            if reason.startswith(f"{image}: "):
                reason = reason[len(image) + 2:]
            raise ProviderError(f"kickstart install failed: {reason}; {note}", image=image) from None
        # The kickstart holds the host's call-home key: it must not stay downloadable once installed.
        kickstart.withdraw_kickstart(image)
    progress(f"{image}: installed; it boots from its disk from now on")
    return provider._machine(Vm(hv, record, domain))


def _publish_kickstart(provider: "LibvirtProvider", hv: Hypervisor, record: HostRecord, env) -> DomainPlan:
    """Render and serve the image's kickstart at a fresh random path; the domain plan, ks URL in ``extra``."""
    image = record.image
    kickstart.withdraw_kickstart(image)  # a previous build's
    kickstart.kickstart_token(image, new=True)
    callhome.new_host_key(env.name, image)  # a rebuilt image must not keep its old key
    subnet, hostname = provider.subnet, names.hostname_for(image)
    booted_there = provider.callhome_address_on(hv)  # booted's nginx as the VMs on ``hv`` reach it
    ks_url = f"http://{booted_there}:{int(provider.config.nginx['port'])}{kickstart.kickstart_url_path(image)}"
    text = kickstart.render_kickstart(
        provider.config, env, image, ks_url=ks_url,
        callhome_url=callhome.callhome_url(booted_there, provider.config.nginx["port"]),
        network=[network_line(record.mac, record.address, subnet.prefixlen, subnet.gateway, hostname)])
    kickstart.publish_kickstart(image, text)
    dom_name = provider.domain_name(image)
    return DomainPlan(
        name=dom_name, domain_type=provider.domain_type(hv),
        memory_mb=int(provider.settings["memory_mb"]), cpus=int(provider.settings["cpus"]), kernel="", initrd="",
        disk="", seed="", bridge=provider.bridge_on(hv), mac=record.mac,
        console_log="", record=record,
        tcg_cache_mb=int(provider.settings["tcg_cache_mb"]), cmdline="", extra={"ks_url": ks_url})


def _target_disk(provider: "LibvirtProvider", hv: Hypervisor, dom_name: str):
    """The empty disk the installer partitions (``disk_mb``)."""
    capacity = int(provider.settings["disk_mb"]) * 2**20
    return provider.pool(hv).createXML(domainxml.render_disk_volume(f"{dom_name}.qcow2", capacity), 0)


def _installer_volumes(provider: "LibvirtProvider", hv: Hypervisor, iso: Path) -> dict[str, str]:
    """The ISO and its installer kernel and initrd as volumes on ``hv`` (named by the ISO's digest, shared
    by installs like the base image): role -> path there."""
    digest = kickstart.iso_digest(iso)[:16]
    stem = f"booted-installer-{digest}"
    paths = {}
    with locked("libvirt-installer-volumes", timeout=1800):  # one copies a DVD (GBs) while the others wait
        vmlinuz, initrd = kickstart.extract_pxeboot(iso, state_path("pxeboot", "libvirt", stem))
        for role, src, name in (("kernel", vmlinuz, f"{stem}.vmlinuz"), ("initrd", initrd, f"{stem}.initrd"),
                                ("iso", iso, f"{stem}.iso")):
            vol = provider._volume(hv, name)
            if vol is None:  # the name carries the digest: a present volume is this ISO's
                progress(f"libvirt: copying {name} to the storage pool on {hv.uri}")
                # never a hard link to the user's ISO: libvirt gives pool files to the qemu user
                vol = provider._store_file(hv, src, name, link=role != "iso")
            paths[role] = vol.path()
        shutil.rmtree(state_path("pxeboot", "libvirt", stem), ignore_errors=True)
    return paths


def _wait_for_poweroff(provider: "LibvirtProvider", dom, image: str, console: Path) -> None:
    lv = bindings()
    timeout = float(provider.settings["install_timeout_s"])
    progress(f"{image}: installing (installer from the ISO, booted's kickstart); waiting up to {timeout:g}s "
             f"for it to power off (console: {console})")

    def off() -> bool:
        try:
            return not dom.isActive()
        except lv.libvirtError:
            return True  # gone: the state check below says how

    def report(line: str) -> None:
        last = last_console_line(console)
        progress(f"{line}; console: {last}" if last else line)

    wait_until(off, timeout=timeout, what=f"{image} to finish installing (the kickstart powers it off)",
               interval=1.0, report=report, hint="raise providers.libvirt.install_timeout_s if the install is only slow")
    state, reason = dom.state()
    if state != lv.VIR_DOMAIN_SHUTOFF or reason != lv.VIR_DOMAIN_SHUTOFF_SHUTDOWN:
        raise ProviderError(f"the installer VM stopped without powering off (libvirt state {state}, reason {reason})",
                            image=image)


def _undo(provider: "LibvirtProvider", hv: Hypervisor, image: str, dom, made: list, console: Path) -> str:
    """Remove what a failed install made, after keeping its logs; say where they are and what is left."""
    lv = bindings()
    left = []
    last = last_console_line(console)
    if dom is not None:
        try:
            if dom.isActive():
                dom.destroy()
        except lv.libvirtError as err:
            left.append(f"domain {dom.name()} ({err.get_error_message()})")
    kept = _keep_logs(image, [console, LIBVIRT_QEMU_LOGS / f"{provider.domain_name(image)}.log"] if hv.local else [])
    if dom is not None:
        try:
            dom.undefine()
        except lv.libvirtError as err:
            left.append(f"domain {dom.name()} ({err.get_error_message()})")
    for thing in made:
        if thing == "kickstart":
            kickstart.withdraw_kickstart(image)
            continue
        if thing == "record":
            with locked("libvirt-hosts"):
                provider.records.drop(image)  # not installed: not placed
            continue
        try:
            thing.delete(0)
        except lv.libvirtError as err:
            left.append(f"volume {thing.name()} ({err.get_error_message()})")
    if hv.local:
        console.unlink(missing_ok=True)
    note = "could not remove all of the half-built VM; left: " + "; ".join(left) if left \
        else "removed the half-built VM"
    if last:
        note += f"; its console's last line: {last!r}"
    return f"{note}; logs kept in {kept}" if kept else note


def _keep_logs(image: str, paths: list[Path]) -> Path | None:
    """Copy the install's logs into ``<state>/diagnostics/<image>-<time>-<pid>/``; None if there were none."""
    found = [p for p in paths if p.is_file()]
    if not found:
        return None
    dest = state_path("diagnostics", f"{image}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", ".keep").parent
    for path in found:
        try:
            shutil.copyfile(path, dest / ("console.log" if path.name.endswith(".console.log") else "libvirt-qemu.log"))
        except OSError:
            continue
    return dest
