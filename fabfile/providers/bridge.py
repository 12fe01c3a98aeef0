"""booted's bridge on this machine: the network local hosts and this machine's VMs join, with this
machine's address on it (the subnet's first), where booted's nginx answers their calls home.

Planning is kept apart from doing: ``plan_bridge`` returns the exact ``ip`` argument lists (tested
as tables), ``apply`` runs them.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from fabfile.core import localcmd
from fabfile.core.errors import BootedError
from fabfile.core.state import locked


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


def plan_bridge(bridge: str, subnet: Subnet, present: bool, has_address: bool) -> list[list[str]]:
    plan = []
    if not present:
        plan.append(["ip", "link", "add", bridge, "type", "bridge"])
    if not has_address:
        plan.append(["ip", "addr", "add", f"{subnet.gateway}/{subnet.prefixlen}", "dev", bridge])
    plan.append(["ip", "link", "set", bridge, "up"])
    return plan


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
