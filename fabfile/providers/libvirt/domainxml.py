"""libvirt domain and volume XML: rendered from a plan, parsed back into what booted needs.

Pure functions (no connection): the XML is built with ElementTree, so every value is escaped for
XML, and every value that reaches it was validated first (image names, addresses, MACs, paths).
Element and attribute names follow libvirt's "Domain XML format" and "Storage volume XML format"
manuals (libvirt.org/formatdomain.html, libvirt.org/formatstorage.html).
"""
from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

# booted's own element in a domain's <metadata>: a running domain says which host it is.
NAMESPACE = "urn:booted:libvirt:host:1"
METADATA_KEY = "booted"
ET.register_namespace(METADATA_KEY, NAMESPACE)

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

# The kernel command line of VMs that boot booted's initrd (initrd.INIT).
BASE_CMDLINE = "root=/dev/vda rw console=ttyS0 quiet"


def vm_cmdline(address: str, prefixlen: int, gateway: str, mac: str) -> str:
    """BASE_CMDLINE plus the VM's static address, which booted's initrd configures. ValueError if
    a value is not an IPv4 address, prefix length, gateway on that subnet or MAC address: they go
    into the domain XML and are read by the initrd's shell. net.ifnames=0: the NIC keeps the
    kernel's name, already configured (udev cannot rename an interface that is up)."""
    ip = ipaddress.IPv4Interface(f"{check_ipv4(address, 'address')}/{check_prefixlen(prefixlen)}")
    gw = ipaddress.IPv4Address(check_ipv4(gateway, "gateway"))
    if gw not in ip.network or gw == ip.ip:
        raise ValueError(f"gateway {gw} is not another address on {ip.network}")
    return f"{BASE_CMDLINE} net.ifnames=0 booted.ip={ip} booted.gw={gw} booted.mac={check_mac(mac)}"


def check_ipv4(value: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{what} is not an IPv4 address: {value!r}") from None


def check_prefixlen(prefixlen: int) -> int:
    if not isinstance(prefixlen, int) or not 8 <= prefixlen <= 30:
        raise ValueError(f"prefix length {prefixlen} is not one booted gives a VM subnet (8-30)")
    return prefixlen


@dataclass(frozen=True)
class HostRecord:
    """What booted keeps about one VM, inside its domain's metadata."""

    image: str
    owner: str  # a tag of the state dir that made it: one controller's VMs never mix with another's
    address: str
    mac: str
    env: str = ""
    seed_id: str = ""

    def to_xml(self) -> str:
        el = ET.Element("host", {k: v for k, v in self.__dict__.items()})
        return ET.tostring(el, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> "HostRecord | None":
        try:
            el = ET.fromstring(text)
        except ET.ParseError:
            return None
        try:
            return cls(**{k: el.attrib.get(k, "") for k in cls.__dataclass_fields__})
        except TypeError:
            return None


@dataclass(frozen=True)
class DomainPlan:
    """Everything a booted VM's domain XML says, decided before any XML is written."""

    name: str
    domain_type: str  # "kvm", "qemu" (TCG) or whatever the connection offers ("test")
    memory_mb: int
    cpus: int
    kernel: str  # "" (and initrd ""): boot from the disk (a kickstart-installed VM)
    initrd: str
    disk: str  # the VM's own qcow2 overlay
    seed: str  # the small read-only disk with the VM's identity ("": none)
    bridge: str
    mac: str
    console_log: str
    record: HostRecord
    tcg_cache_mb: int = 64
    uuid: str = ""  # the VM's, kept from build to build ("": libvirt makes one)
    cmdline: str = BASE_CMDLINE  # with the VM's address: vm_cmdline
    extra: dict = field(default_factory=dict)
    cdrom: str = ""  # an ISO attached as a CD-ROM (the install DVD while a kickstart install runs)
    on_reboot: str = "restart"  # "destroy" while installing: a reboot ends the install instead of rerunning it


def check_mac(mac: str) -> str:
    if not _MAC.fullmatch(mac):
        raise ValueError(f"not a MAC address: {mac!r}")
    return mac


def render_domain(plan: DomainPlan) -> str:
    check_mac(plan.mac)
    dom = ET.Element("domain", {"type": plan.domain_type})
    ET.SubElement(dom, "name").text = plan.name
    if plan.uuid:
        ET.SubElement(dom, "uuid").text = plan.uuid
    meta = ET.SubElement(dom, "metadata")
    host = ET.fromstring(plan.record.to_xml())
    host.tag = f"{{{NAMESPACE}}}host"
    meta.append(host)
    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(plan.memory_mb)
    ET.SubElement(dom, "vcpu").text = str(plan.cpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64"}).text = "hvm"
    if plan.kernel:
        # Direct kernel boot: no bootloader, no firmware menu; the kernel comes with the base image
        # (or, while a kickstart install runs, the installer's, from the ISO).
        ET.SubElement(os_el, "kernel").text = plan.kernel
        ET.SubElement(os_el, "initrd").text = plan.initrd
        ET.SubElement(os_el, "cmdline").text = plan.cmdline
    else:
        ET.SubElement(os_el, "boot", {"dev": "hd"})  # the boot loader the installer put on the disk
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")  # image-stop's clean shutdown is an ACPI power-button press
    if plan.domain_type == "qemu":
        # TCG's translation cache defaults to 1 GiB per VM; 64 MiB keeps a VM near 350 MB.
        tcg = ET.SubElement(features, "tcg")
        ET.SubElement(tcg, "tb-cache", {"unit": "MiB"}).text = str(plan.tcg_cache_mb)
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = plan.on_reboot
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    for target, path, fmt, readonly in (("vda", plan.disk, "qcow2", False), ("vdb", plan.seed, "raw", True)):
        if not path:
            continue
        disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(disk, "driver", {"name": "qemu", "type": fmt})
        ET.SubElement(disk, "source", {"file": path})
        ET.SubElement(disk, "target", {"dev": target, "bus": "virtio"})
        if readonly:
            ET.SubElement(disk, "readonly")
    if plan.cdrom:
        cd = ET.SubElement(devices, "disk", {"type": "file", "device": "cdrom"})
        ET.SubElement(cd, "driver", {"name": "qemu", "type": "raw"})
        ET.SubElement(cd, "source", {"file": plan.cdrom})
        ET.SubElement(cd, "target", {"dev": "sda", "bus": "sata"})  # SATA: i440fx and q35 machines alike
        ET.SubElement(cd, "readonly")
    # No USB controller and no balloon: libvirt adds both by default, and each is a driver to load
    # and a device to emulate for nothing.
    ET.SubElement(devices, "controller", {"type": "usb", "model": "none"})
    ET.SubElement(devices, "memballoon", {"model": "none"})
    # Randomness from the host's /dev/urandom: a VM's kernel otherwise gathers it from interrupt
    # timings, 9-10 s into a TCG boot, and journald and sysinit.target wait for it (initrd.py).
    rng = ET.SubElement(devices, "rng", {"model": "virtio"})
    ET.SubElement(rng, "backend", {"model": "random"}).text = "/dev/urandom"
    nic = ET.SubElement(devices, "interface", {"type": "bridge"})
    ET.SubElement(nic, "source", {"bridge": plan.bridge})
    ET.SubElement(nic, "mac", {"address": plan.mac})
    ET.SubElement(nic, "model", {"type": "virtio"})
    # The serial console goes to a log file written by virtlogd (kept after the VM stops).
    serial = ET.SubElement(devices, "serial", {"type": "pty"})
    ET.SubElement(serial, "log", {"file": plan.console_log, "append": "off"})
    ET.SubElement(serial, "target", {"port": "0"})
    return ET.tostring(dom, encoding="unicode")


@dataclass(frozen=True)
class DomainFacts:
    """What booted reads back from domain XML (its own, or a running domain's)."""

    macs: list[str]
    disks: list[str]
    taps: list[str]
    console_log: str
    memory_kib: int
    cpus: int
    domain_type: str
    record: HostRecord | None
    name: str = ""
    uuid: str = ""
    cdroms: list[str] = field(default_factory=list)  # an installer's ISO (install.py)


def parse_domain(text: str) -> DomainFacts:
    dom = ET.fromstring(text)
    macs = [m.get("address", "").lower() for m in dom.findall("./devices/interface/mac")]
    taps = [t.get("dev", "") for t in dom.findall("./devices/interface/target") if t.get("dev")]
    disks = [s.get("file", "") for s in dom.findall("./devices/disk/source") if s.get("file")]
    console = dom.find("./devices/serial/log")
    record_el = dom.find(f"./metadata/{{{NAMESPACE}}}host")
    record = None
    if record_el is not None:
        record_el.tag = "host"
        record = HostRecord.from_xml(ET.tostring(record_el, encoding="unicode"))
    memory = dom.find("./memory")
    mem_kib = int(memory.text or 0) if memory is not None else 0
    if memory is not None and memory.get("unit", "KiB") in ("MiB", "M"):
        mem_kib *= 1024
    vcpu = dom.find("./vcpu")
    return DomainFacts(macs, disks, taps, console.get("file", "") if console is not None else "", mem_kib,
                       int(vcpu.text) if vcpu is not None and vcpu.text else 1, dom.get("type", ""), record,
                       dom.findtext("name") or "", dom.findtext("uuid") or "",
                       [s.get("file", "") for s in dom.findall("./devices/disk[@device='cdrom']/source")])


def render_overlay_volume(name: str, capacity_bytes: int, backing_path: str) -> str:
    """A qcow2 volume whose backing file is the base image (copy-on-write, a few MB per VM)."""
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", {"unit": "bytes"}).text = str(capacity_bytes)
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", {"type": "qcow2"})
    ET.SubElement(target, "permissions").append(_text("mode", "0600"))
    backing = ET.SubElement(vol, "backingStore")
    ET.SubElement(backing, "path").text = backing_path
    ET.SubElement(backing, "format", {"type": "qcow2"})
    return ET.tostring(vol, encoding="unicode")


def render_disk_volume(name: str, capacity_bytes: int) -> str:
    """An empty qcow2 volume (a disk an installer partitions and fills)."""
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", {"unit": "bytes"}).text = str(capacity_bytes)
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", {"type": "qcow2"})
    ET.SubElement(target, "permissions").append(_text("mode", "0600"))
    return ET.tostring(vol, encoding="unicode")


def render_raw_volume(name: str, capacity_bytes: int) -> str:
    """A plain file volume, sparse until written (an upload fills it)."""
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", {"unit": "bytes"}).text = str(capacity_bytes)
    ET.SubElement(vol, "allocation", {"unit": "bytes"}).text = "0"
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", {"type": "raw"})
    ET.SubElement(target, "permissions").append(_text("mode", "0600"))
    return ET.tostring(vol, encoding="unicode")


def render_dir_pool(name: str, path: str) -> str:
    pool = ET.Element("pool", {"type": "dir"})
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = path
    return ET.tostring(pool, encoding="unicode")


def _text(tag: str, text: str) -> ET.Element:
    el = ET.Element(tag)
    el.text = text
    return el


def offered_domain_types(capabilities: str) -> list[str]:
    """Domain types the connection offers for x86_64 guests, from its capabilities XML."""
    caps = ET.fromstring(capabilities)
    types: list[str] = []
    for guest in caps.findall("./guest"):
        arch = guest.find("./arch")
        if arch is None or arch.get("name") not in ("x86_64", "i686"):
            continue
        for dom in arch.findall("./domain"):
            kind = dom.get("type", "")
            if kind and kind not in types:
                types.append(kind)
    return types


def host_has_hw_virt(capabilities: str) -> bool:
    """True if the hypervisor's CPU has hardware virtualisation (vmx/svm): KVM can run guests at speed.

    A /dev/kvm alone proves nothing: a PVM host offers one that only runs kernels built for it.
    """
    caps = ET.fromstring(capabilities)
    return any(f.get("name") in ("vmx", "svm") for f in caps.findall("./host/cpu/feature"))


def choose_domain_type(setting: str, capabilities: str) -> str:
    """The domain type to define: the configured one, or for ``auto`` kvm where it really runs guests."""
    offered = offered_domain_types(capabilities)
    if setting != "auto":
        if setting not in offered:
            raise ValueError(f"domain_type {setting!r} is not offered by this hypervisor (offers: {', '.join(offered) or 'none'})")
        return setting
    if "kvm" in offered and host_has_hw_virt(capabilities):
        return "kvm"
    if "qemu" in offered:
        return "qemu"
    if offered:
        return offered[0]
    raise ValueError("this hypervisor offers no x86_64 domain type")
