"""Networking for local hosts: per host a network namespace joined to booted's bridge (bridge.py)
by a veth pair.

Planning is kept apart from doing: the ``plan_*`` functions return the exact ``ip`` argument lists
(tested as tables), ``apply`` runs them. Names are derived from the state dir and the image, so a
test's hosts never collide with the ones a user left running.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from fabfile.core.state import state_dir
from fabfile.providers.bridge import Subnet, apply, link_state


@dataclass(frozen=True)
class HostLink:
    """The names one host's network plumbing uses."""

    netns: str
    veth: str  # the bridge side; the host side is always "host0" inside the namespace

    @classmethod
    def for_image(cls, image: str) -> "HostLink":
        digest = hashlib.sha1(f"{state_dir()}\0{image}".encode()).hexdigest()
        return cls(netns=f"booted-{digest[:12]}", veth=f"vb{digest[:12]}")


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


def host_up(link: HostLink, bridge: str, subnet: Subnet, address: str, mac: str) -> None:
    host_down(link)  # a crash may have left a half: start from nothing
    apply(plan_host_up(link, bridge, subnet, address, mac))


def host_present(link: HostLink) -> bool:
    """Is any of the host's network plumbing (namespace or veth) there?"""
    return os.path.exists(f"/run/netns/{link.netns}") or link_state(link.veth) is not None


def host_down(link: HostLink) -> None:
    if host_present(link):
        apply(plan_host_down(link), ignore_errors=True)
