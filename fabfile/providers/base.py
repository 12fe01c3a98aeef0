"""The provider interface: where hosts come from.

A provider manages *images*: named machines that boot into hosts (a VirtualBox VM, a local
systemd-nspawn container). Tasks and the environment logic talk only to this interface.
"""
from __future__ import annotations

import abc
import builtins
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fabfile.core.errors import ProviderError
from fabfile.hosts import callhome

if TYPE_CHECKING:
    from fabfile.core.config import Config, Environment

RUNNING = "running"
STOPPED = "poweroff"
# The machine that runs the image (a hypervisor) does not answer: the image is lost with it until it
# is started again (elsewhere, where the provider can).
UNREACHABLE = "unreachable"


@dataclass
class Machine:
    """One image as its provider sees it."""

    name: str
    provider: str
    state: str  # RUNNING, STOPPED, or a provider's own word ("aborted", "saved", ...)
    macs: list[str] = field(default_factory=list)  # lower-case, colon-separated
    addresses: list[str] = field(default_factory=list)
    detail: dict = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state == RUNNING


@dataclass(frozen=True)
class CloneRecord:
    """A clone booted made that inherited its source's call-home identity: the MACs booted gave
    it prove, together with the source's key, that a call home is the clone's (inventory.py)."""

    image: str
    source: str
    macs: tuple[str, ...]


class Provider(abc.ABC):
    """A source of hosts. Every method takes validated image names."""

    name = "abstract"
    # Whether build() needs booted's nginx (an installer fetching its kickstart from it); the build flow
    # starts nginx first and keeps it for the build.
    build_needs_endpoint = False

    def __init__(self, config: "Config"):
        self.config = config
        self.settings = config.provider_settings(self.name)

    def installed(self) -> bool:
        """Whether this machine has what the provider drives (a provider that is not installed runs nothing)."""
        return True

    @abc.abstractmethod
    def build(self, image: str, env: "Environment | None") -> Machine:
        """Create ``image`` (install it, for VirtualBox) so that it can be started."""

    @abc.abstractmethod
    def clone(self, source: str, new: str, env: "Environment | None") -> Machine:
        """Make ``new`` from ``source`` with its own identity (MACs, hostname, keys)."""

    @abc.abstractmethod
    def start(self, image: str) -> Machine:
        """Boot ``image``; return once it is running (not necessarily reachable)."""

    @abc.abstractmethod
    def stop(self, image: str, force: bool = False) -> Machine:
        """Shut ``image`` down cleanly (``force``: power off at once); wait with a timeout."""

    @abc.abstractmethod
    def delete(self, image: str) -> None:
        """Remove ``image`` and its disks. Refuses a running image."""

    @abc.abstractmethod
    def list(self) -> list[Machine]:
        """Every image this provider knows, with state, MACs and addresses where known."""

    def clone_records(self) -> builtins.list[CloneRecord]:
        """Clones that call home under their source's name until renamed (none by default: a
        provider that gives each clone its own call-home identity at once has none)."""
        return []
    @abc.abstractmethod
    def booted_address(self) -> str:
        """The address at which this provider's hosts reach booted's nginx (the call-home endpoint)."""

    def booted_addresses(self) -> builtins.list[str]:
        """Every address this provider's hosts call home to (a provider spanning machines may have several)."""
        return [self.booted_address()]

    def endpoint_ready(self) -> None:  # noqa: B027  (an optional hook: most providers need nothing)
        """Make ``booted_address()`` exist on this machine, so booted's nginx can listen there
        (default: nothing; it is the hypervisor's, e.g. a host-only interface)."""

    def callhome_url(self) -> str:
        """The call-home URL this provider's hosts are given."""
        return callhome.callhome_url(self.booted_address(), self.config.nginx["port"])

    def get(self, image: str) -> Machine | None:
        for machine in self.list():
            if machine.name == image:
                return machine
        return None

    def require(self, image: str) -> Machine:
        machine = self.get(image)
        if machine is None:
            raise ProviderError(f"no such {self.name} image (see `fab image-list`)", image=image)
        return machine
