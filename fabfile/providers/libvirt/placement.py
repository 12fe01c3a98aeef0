"""Which hypervisor runs which VM: the named hypervisors' configuration, pins, and the placement plan.

A pure module (no libvirt, no I/O): the libvirt provider reads the hypervisors from
``providers.libvirt.hypervisors`` and an environment's pins from its ``placement`` block, learns
where VMs run now (each domain's record says so) and which hypervisors answer, then asks ``place``
where every VM of the environment belongs.

Rules (README "Growing past one machine"):

* A VM that exists stays where it is while its hypervisor answers: converging never moves a VM,
  even when a pin or a new hypervisor would put it elsewhere now (``Placement.misplaced`` says so).
* A pinned VM goes to its hypervisor or nowhere.
* Other VMs are spread: a VM goes to the hypervisor holding the fewest VMs of its environment that
  share a role with it (load balancers apart from load balancers, workers apart from workers), then
  the fewest VMs in all, then the first in configuration order. So no two workers share a
  hypervisor while another has room. Load balancers are placed before workers.
* Room: ``capacity_vms`` (VMs of any environment) and ``memory_mb`` (the memory of those VMs).
* VMs on a hypervisor that is down are lost: they are placed afresh on the survivors (``lost``),
  or reported ``unplaced`` with the reason when no survivor has room or their pin is down.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fabfile.core.config import REQUIRED, Checker, positive, valid_ifname, valid_ipv4
from fabfile.core.errors import BootedError, ConfigError

# The hypervisor the provider uses when none are configured: its ``uri`` setting.
DEFAULT_HYPERVISOR = "default"

LOADBALANCER = "loadbalancer"
WORKER = "worker"

_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_SCHEME = re.compile(r"([a-z][a-z0-9]*)(?:\+([a-z0-9]+))?")
# libvirt's transports (libvirt.org "Connection URIs"); all but unix reach another machine.
_TRANSPORTS = {"unix", "ssh", "libssh", "libssh2", "tls", "tcp", "ext"}


class PlacementError(BootedError):
    """A VM that cannot be placed; the message names it, its hypervisor(s) and why."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class HypervisorSpec:
    """One configured hypervisor (``providers.libvirt.hypervisors.NAME``)."""

    name: str
    uri: str
    capacity_vms: int | None = None  # VMs it may run (of all environments); None: no limit
    memory_mb: int | None = None  # memory its VMs may take together; None: no limit
    bridge: str | None = None  # its bridge onto the shared network; None: the provider's ``bridge``
    callhome_address: str | None = None  # where its VMs reach booted's nginx; None: the provider's

    @property
    def remote(self) -> bool:
        return is_remote_uri(self.uri)


def is_remote_uri(uri: str) -> bool:
    """True if ``uri`` reaches another machine's daemon (it has a host or a network transport)."""
    parts = urlsplit(uri)
    transport = _SCHEME.fullmatch(parts.scheme)
    return bool(parts.hostname) or bool(transport and transport.group(2) not in (None, "unix"))


def valid_hypervisor_name(value: Any) -> str | None:
    if isinstance(value, str) and _NAME.fullmatch(value):
        return None
    return f"invalid hypervisor name {value!r}: use lower-case letters, digits and '-' (starting with a letter)"


def valid_uri(value: Any) -> str | None:
    """A libvirt connection URI: ``driver[+transport]://[user@][host][:port]/path[?params]``."""
    if not value or any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in value):
        return f"{value!r} is not a libvirt URI (like qemu+ssh://root@hv1/system)"
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        return f"{value!r} is not a libvirt URI (like qemu+ssh://root@hv1/system)"
    scheme = _SCHEME.fullmatch(parts.scheme)
    if not scheme or not value.startswith(f"{parts.scheme}://") or not parts.path.startswith("/"):
        return f"{value!r} is not a libvirt URI (like qemu+ssh://root@hv1/system)"
    transport = scheme.group(2)
    if transport and transport not in _TRANSPORTS:
        return f"unknown libvirt transport {transport!r} (known: {', '.join(sorted(_TRANSPORTS))})"
    if transport not in (None, "unix") and not parts.hostname:
        return f"the {transport} transport needs a host ({parts.scheme}://root@HOST{parts.path})"
    return None


def _at_least(minimum: int):
    return lambda v: None if v >= minimum else f"must be at least {minimum}"


HYPERVISOR_SETTINGS = {
    "uri": ((str,), REQUIRED, valid_uri),
    "capacity_vms": ((int,), None, positive),
    "memory_mb": ((int,), None, _at_least(256)),
    "bridge": ((str,), None, valid_ifname),
    "callhome_address": ((str,), None, valid_ipv4),
}


def parse_hypervisors(chk: Checker, value: Any, keypath: str, parent: Any = None,
                      key: str | None = None) -> dict[str, HypervisorSpec]:
    """``providers.libvirt.hypervisors`` -> {name: HypervisorSpec}, in file order.

    Raises ConfigError at the first mistake, with the line of the key at fault (``value`` comes
    from ``fabfile.core.config.load_yaml``, whose mappings remember their lines)."""
    hvs_doc = chk.mapping(value, keypath, parent, key)
    if not hvs_doc:
        chk.fail(keypath, "names no hypervisor (leave it out to use providers.libvirt.uri)", parent, key)
    out: dict[str, HypervisorSpec] = {}
    by_uri: dict[str, str] = {}
    for name, body in hvs_doc.items():
        kp = f"{keypath}.{name}"
        problem = valid_hypervisor_name(name)
        if problem:
            chk.fail(kp, problem, hvs_doc, name)
        f = chk.fields(chk.mapping(body, kp, hvs_doc, name), kp, HYPERVISOR_SETTINGS)
        if f["uri"] in by_uri:
            chk.fail(f"{kp}.uri", f"is also the uri of hypervisor {by_uri[f['uri']]!r}", body, "uri")
        by_uri[f["uri"]] = name
        out[name] = HypervisorSpec(name, f["uri"], f["capacity_vms"], f["memory_mb"], f["bridge"],
                                   f["callhome_address"])
    return out


def parse_pins(chk: Checker, value: Any, keypath: str, images: Iterable[str],
               hypervisors: Iterable[str], parent: Any = None, key: str | None = None) -> dict[str, str]:
    """An environment's ``placement: {image: hypervisor}`` -> {image: hypervisor name}."""
    pins_doc = chk.mapping(value, keypath, parent, key)
    images, known = list(images), list(hypervisors)
    out = {}
    for image, hv in pins_doc.items():
        kp = f"{keypath}.{image}"
        if image not in images:
            chk.fail(kp, f"names image {image!r}, which is not in this environment's images", pins_doc, image)
        if not isinstance(hv, str):
            chk.fail(kp, "must be a hypervisor name (a string)", pins_doc, image)
        if hv not in known:
            chk.fail(kp, f"unknown hypervisor {hv!r} (known: {', '.join(known) or 'none'})", pins_doc, image)
        out[image] = hv
    return out


class _Problem(Exception):
    def __init__(self, keypath: str, message: str, line: int | None):
        super().__init__(message)
        self.keypath, self.message, self.line = keypath, message, line


class _CollectingChecker(Checker):
    """A Checker that hands the first mistake back instead of raising ConfigError."""

    def fail(self, keypath, message, parent=None, key=None):
        try:
            super().fail(keypath, message, parent, key)
        except ConfigError as err:
            raise _Problem(keypath, message, err.line) from None


def check_hypervisors(value: Any) -> str | None:
    """The ``hypervisors`` setting's check for a provider's SETTINGS ``(types, default, check)``.

    SETTINGS checks return one message, located at the ``hypervisors`` key by the caller; this one
    names the key inside it and that key's own line."""
    if value is None:
        return None
    try:
        parse_hypervisors(_CollectingChecker(""), value, "hypervisors")
    except _Problem as problem:
        where = problem.keypath.removeprefix("hypervisors").lstrip(".")
        at = f" (line {problem.line})" if problem.line else ""
        return f"{where}{at}: {problem.message}" if where else problem.message
    return None


def hypervisors_from_settings(settings: Mapping[str, Any]) -> dict[str, HypervisorSpec]:
    """The provider's hypervisors: the configured ones, or ``default`` at ``settings['uri']``."""
    configured = settings.get("hypervisors")
    if configured:
        return {name: HypervisorSpec(name, body["uri"], body.get("capacity_vms"), body.get("memory_mb"),
                                     body.get("bridge"), body.get("callhome_address"))
                for name, body in configured.items()}
    return {DEFAULT_HYPERVISOR: HypervisorSpec(DEFAULT_HYPERVISOR, settings["uri"])}


# --------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class VM:
    """A VM to place (or that exists): its image, environment, roles and memory."""

    image: str
    env: str = ""
    roles: frozenset[str] = frozenset({WORKER})
    memory_mb: int = 0


@dataclass(frozen=True)
class Placement:
    """Where each VM runs, and what changed."""

    where: dict[str, str]  # image -> hypervisor, for every placed VM (kept and new)
    kept: tuple[str, ...] = ()  # VMs that stay where they run
    new: tuple[str, ...] = ()  # VMs this plan placed (including lost ones placed again)
    lost: tuple[str, ...] = ()  # VMs whose hypervisor is down
    unplaced: dict[str, str] = field(default_factory=dict)  # image -> why it has no hypervisor
    misplaced: dict[str, str] = field(default_factory=dict)  # image -> the pin it runs apart from

    def on(self, hypervisor: str) -> list[str]:
        return [image for image, hv in self.where.items() if hv == hypervisor]

    def require_all(self) -> None:
        """Raise PlacementError for the first VM left unplaced."""
        for image, why in self.unplaced.items():
            raise PlacementError(f"{image}: {why}")


@dataclass
class _Load:
    vms: list[VM] = field(default_factory=list)

    @property
    def memory_mb(self) -> int:
        return sum(vm.memory_mb for vm in self.vms)

    def room_for(self, vm: VM, spec: HypervisorSpec) -> str | None:
        """None if ``vm`` fits on ``spec``, else why not."""
        if spec.capacity_vms is not None and len(self.vms) >= spec.capacity_vms:
            return f"{spec.name} is full ({len(self.vms)} of capacity_vms {spec.capacity_vms})"
        if spec.memory_mb is not None and self.memory_mb + vm.memory_mb > spec.memory_mb:
            return (f"{spec.name} lacks memory ({self.memory_mb} of memory_mb {spec.memory_mb} MB used, "
                    f"{vm.image} needs {vm.memory_mb} MB)")
        return None

    def neighbours(self, vm: VM) -> int:
        """VMs of ``vm``'s environment here that share a role with it."""
        return sum(1 for other in self.vms if other.env == vm.env and other.roles & vm.roles)


def place(hypervisors: Mapping[str, HypervisorSpec], vms: Iterable[VM], current: Mapping[str, str],
          pins: Mapping[str, str] | None = None, down: Iterable[str] = ()) -> Placement:
    """Where each of ``vms`` runs.

    ``hypervisors``: the configured ones, in configuration order (the last tie-break).
    ``vms``: every VM on these hypervisors that booted knows (all environments: they all take room),
    in the environment's order. ``current``: image -> hypervisor for the VMs that exist now.
    ``pins``: image -> hypervisor. ``down``: hypervisors that do not answer.
    """
    pins = dict(pins or {})
    down = set(down)
    order = {name: i for i, name in enumerate(hypervisors)}
    load = {name: _Load() for name in hypervisors}
    vms = list(vms)
    where: dict[str, str] = {}
    kept, lost, new = [], [], []
    unplaced: dict[str, str] = {}
    misplaced: dict[str, str] = {}

    for vm in vms:  # existing VMs first: they hold their places and take room
        hv = current.get(vm.image)
        if hv is None:
            continue
        if hv in down:
            lost.append(vm.image)
        elif hv in hypervisors:
            load[hv].vms.append(vm)
            where[vm.image] = hv
            kept.append(vm.image)
            if pins.get(vm.image, hv) != hv:
                misplaced[vm.image] = pins[vm.image]
        else:
            unplaced[vm.image] = f"runs on {hv!r}, which is no longer configured (delete the VM to place it again)"

    todo = [vm for vm in vms if vm.image not in where and vm.image not in unplaced]
    # Load balancers first, so they spread before workers fill the hypervisors; else keep the given order.
    todo.sort(key=lambda vm: LOADBALANCER not in vm.roles)
    for vm in todo:
        pin = pins.get(vm.image)
        candidates = [pin] if pin else [name for name in hypervisors if name not in down]
        if pin and pin in down:
            unplaced[vm.image] = f"pinned to hypervisor {pin!r}, which is down"
            continue
        if pin and pin not in hypervisors:
            unplaced[vm.image] = f"pinned to hypervisor {pin!r}, which is not configured"
            continue
        if not candidates:
            unplaced[vm.image] = f"no hypervisor answers (down: {', '.join(sorted(down))})"
            continue
        reasons = [load[name].room_for(vm, hypervisors[name]) for name in candidates]
        fitting = [name for name, why in zip(candidates, reasons) if why is None]
        if not fitting:
            unplaced[vm.image] = "no room: " + "; ".join(why for why in reasons if why)
            continue
        best = min(fitting, key=lambda name: (load[name].neighbours(vm), len(load[name].vms), order[name]))
        load[best].vms.append(vm)
        where[vm.image] = best
        new.append(vm.image)

    return Placement(where, tuple(kept), tuple(new), tuple(lost), unplaced, misplaced)


def environment_vms(images: Iterable[str], loadbalancers: Iterable[str], workers: Iterable[str],
                    env: str = "", memory_mb: int = 0) -> list[VM]:
    """The VMs of one environment (an image may be both load balancer and worker)."""
    lbs, ws = set(loadbalancers), set(workers)
    vms = []
    for image in images:
        roles = frozenset(r for r, members in ((LOADBALANCER, lbs), (WORKER, ws)) if image in members)
        vms.append(VM(image, env, roles, memory_mb))
    return vms
