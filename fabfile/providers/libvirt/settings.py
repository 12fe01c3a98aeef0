"""The settings `providers.libvirt` takes in environments.yaml: {key: (types, default[, check])}."""
from __future__ import annotations

from typing import Any

from fabfile.core.config import positive, valid_ifname, valid_ipv4, valid_network
from fabfile.providers.libvirt.placement import check_hypervisors, valid_uri


def valid_directory(value: Any) -> str | None:
    ok = value.startswith("/") and ".." not in value.split("/") and all(c.isalnum() or c in "/._-+" for c in value)
    return None if ok else "must be an absolute directory path (letters, digits, '/', '.', '_', '-', '+')"


def at_least(minimum: int):
    return lambda v: None if v >= minimum else f"must be at least {minimum}"


SETTINGS = {
    "uri": ((str,), "qemu:///system", valid_uri),
    # several machines: {name: {uri, capacity_vms, memory_mb, bridge, callhome_address}} (replaces uri)
    "hypervisors": ((dict,), None, check_hypervisors),
    # where VMs reach booted's nginx; "": this machine's address on the subnet (its gateway)
    "callhome_address": ((str,), "", lambda v: None if v == "" else valid_ipv4(v)),
    "connect_timeout_s": ((int, float), 15, positive),  # a hypervisor that does not answer by then is down
    # kvm where the CPU has vmx/svm; else qemu (TCG: software emulation)
    "domain_type": ((str,), "auto", lambda v: None if v in ("auto", "kvm", "qemu") else "must be auto, kvm or qemu"),
    "cpus": ((int,), 1, positive),
    "memory_mb": ((int,), 512, at_least(256)),
    "disk_mb": ((int,), 3072, at_least(2048)),  # the base image's root file system
    "bridge": ((str,), "booted1", valid_ifname),
    "subnet": ((str,), "10.78.0.0/24", valid_network),
    "storage_dir": ((str,), "/var/lib/libvirt/images/booted", valid_directory),
    "tcg_cache_mb": ((int,), 64, at_least(16)),  # QEMU's TCG translation cache per VM (its default: 1 GiB)
    "boot_timeout_s": ((int, float), 300, positive),
    "stop_timeout_s": ((int, float), 60, positive),
}
