"""booted's records of its libvirt VMs: where each lives, who it is, and the domain XML booted starts
it as. A stopped VM is no libvirt domain (provider.py runs VMs as transient domains), so these records
are what makes it exist between runs.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from fabfile.core import names
from fabfile.core.errors import BootedError
from fabfile.core.state import atomic_write_json, read_json, state_path
from fabfile.providers.libvirt import domainxml
from fabfile.providers.libvirt.domainxml import HostRecord
from fabfile.providers.libvirt.hypervisor import Hypervisor
from fabfile.providers.libvirt.placement import valid_hypervisor_name


@dataclass(frozen=True)
class Placed:
    """booted's record of one VM: the hypervisor it lives on, its identity, and the domain XML booted
    starts it as ("" while it is being built: placed, no volumes yet or not all of them)."""

    hv: str
    record: HostRecord
    domain: str = ""


@dataclass(frozen=True)
class Vm:
    """A built VM as booted finds it: its record, and its running domain (None: stopped, no domain)."""

    hv: Hypervisor
    record: HostRecord
    domain: str  # the domain XML booted starts it as
    dom: Any = None  # a libvirt.virDomain

    @property
    def disks(self) -> list[str]:
        return domainxml.parse_domain(self.domain).disks


class VmRecords:
    """Where each VM of this state dir lives, and how it starts: ``state/libvirt/vms.json``
    {image: {hypervisor, record, domain}}.

    Written under the ``libvirt-hosts`` lock when a VM is placed (before its volumes are made, so
    parallel builds see each other's choice), when it is built (its domain XML) and when it is deleted."""

    def __init__(self):
        self.path = state_path("libvirt", "vms.json")

    def load(self) -> dict[str, Placed]:
        data = read_json(self.path, {})
        out = {}
        if isinstance(data, dict):
            for image, entry in data.items():
                try:
                    hv, record = str(entry["hypervisor"]), HostRecord(**entry["record"])
                    # its values go into domain XML, seed disks and names: only what booted writes
                    names.check("image", record.image)
                    domainxml.check_mac(record.mac)
                    ipaddress.IPv4Address(record.address)
                    domain = str(entry.get("domain") or "")
                except (KeyError, TypeError, ValueError, BootedError):
                    continue  # an entry booted did not write
                if image == record.image and valid_hypervisor_name(hv) is None:
                    out[image] = Placed(hv, record, domain if domain_of(domain, record) else "")
        return out

    def save(self, records: dict[str, Placed]) -> None:
        atomic_write_json(self.path, {image: {"hypervisor": p.hv, "record": p.record.__dict__, "domain": p.domain}
                                      for image, p in sorted(records.items())}, mode=0o600)

    def put(self, placed: Placed) -> None:
        records = self.load()
        records[placed.record.image] = placed
        self.save(records)

    def drop(self, image: str) -> None:
        records = self.load()
        if records.pop(image, None) is not None:
            self.save(records)


def domain_of(domain: str, record: HostRecord) -> bool:
    """Whether ``domain`` is XML booted rendered for exactly this record (what start hands libvirt)."""
    if not domain:
        return False
    try:
        facts = domainxml.parse_domain(domain)
    except (ValueError, SyntaxError):  # ET.ParseError is a SyntaxError
        return False
    return facts.record == record and facts.name == f"booted-{record.owner}-{record.image}"
