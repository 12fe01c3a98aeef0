"""Networking for local hosts: one bridge, and per host a network namespace joined to it by a veth pair.

Planning is kept apart from doing: the ``plan_*`` functions return the exact ``ip`` argument lists
(tested as tables), ``apply`` runs them. Names are derived from the state dir and the image, so a
test's hosts never collide with the ones a user left running.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass

from fabfile.core import localcmd
from fabfile.core.errors import BootedError
from fabfile.core.state import locked, state_dir


@dataclass(frozen=True)
class Subnet:
    network: ipaddress.IPv4Network

    @classmethod
    def parse(cls, text: str) -> "Subnet":
        return cls(ipaddress.IPv4Network(text))

    @property
    def gateway(self) -> str:
        """The control host's address on the bridge: the first host address."""
        return str(next(self.network.hosts()))

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    def host_addresses(self) -> list[str]:
        """Addresses that hosts may get (all but the gateway)."""
        return [str(a) for a in self.network.hosts()][1:]


@dataclass(frozen=True)
class HostLink:
    """The names one host's network plumbing uses."""

    netns: str
    veth: str  # the bridge side; the host side is always "host0" inside the namespace

    @classmethod
    def for_image(cls, image: str) -> "HostLink":
        digest = hashlib.sha1(f"{state_dir()}\0{image}".encode()).hexdigest()
        return cls(netns=f"booted-{digest[:12]}", veth=f"vb{digest[:12]}")


def plan_bridge(bridge: str, subnet: Subnet, present: bool, has_address: bool) -> list[list[str]]:
    plan = []
    if not present:
        plan.append(["ip", "link", "add", bridge, "type", "bridge"])
    if not has_address:
        plan.append(["ip", "addr", "add", f"{subnet.gateway}/{subnet.prefixlen}", "dev", bridge])
    plan.append(["ip", "link", "set", bridge, "up"])
    return plan


def plan_host_up(link: HostLink, bridge: str, subnet: Subnet, address: str, mac: str) -> list[list[str]]:
    ns = link.netns
    return [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", link.veth, "type", "veth", "peer", "name", "host0", "netns", ns],
        ["ip", "-n", ns, "link", "set", "host0", "address", mac],
        ["ip", "link", "set", link.veth, "master", bridge],
        ["ip", "link", "set", link.veth, "up"],
        ["ip", "-n", ns, "addr", "add", f"{address}/{subnet.prefixlen}", "dev", "host0"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "link", "set", "host0", "up"],
        ["ip", "-n", ns, "route", "add", "default", "via", subnet.gateway],
    ]


def plan_host_down(link: HostLink) -> list[list[str]]:
    # Deleting the namespace destroys host0 and with it the veth pair.
    return [["ip", "link", "del", link.veth], ["ip", "netns", "del", link.netns]]


def apply(plan: list[list[str]], ignore_errors: bool = False) -> None:
    for argv in plan:
        result = localcmd.run(argv, check=False)
        if not result.ok and not ignore_errors:
            detail = result.stderr.strip().splitlines()
            raise BootedError(f"network setup failed: {' '.join(argv)}: {detail[-1] if detail else result.returncode}")


def link_state(name: str) -> dict | None:
    result = localcmd.run(["ip", "-j", "addr", "show", "dev", name], check=False)
    if not result.ok:
        return None
    data = json.loads(result.stdout or "[]")
    return data[0] if data else None


def ensure_bridge(bridge: str, subnet: Subnet) -> None:
    if localcmd.which("ip") is None:
        raise BootedError("the `ip` command is missing: install iproute2 (apt-get install iproute2)")
    with locked("local-bridge"):  # hosts start in parallel; only one may create the bridge
        state = link_state(bridge)
        has_address = state is not None and any(a.get("local") == subnet.gateway for a in state.get("addr_info", []))
        apply(plan_bridge(bridge, subnet, present=state is not None, has_address=has_address))


def remove_bridge(bridge: str) -> None:
    if link_state(bridge) is not None:
        apply([["ip", "link", "del", bridge]], ignore_errors=True)


def host_up(link: HostLink, bridge: str, subnet: Subnet, address: str, mac: str) -> None:
    host_down(link)  # a crash may have left a half: start from nothing
    apply(plan_host_up(link, bridge, subnet, address, mac))


def host_present(link: HostLink) -> bool:
    """Is any of the host's network plumbing (namespace or veth) there?"""
    return os.path.exists(f"/run/netns/{link.netns}") or link_state(link.veth) is not None


def host_down(link: HostLink) -> None:
    if host_present(link):
        apply(plan_host_down(link), ignore_errors=True)
