"""The decisions inside the environment flows, as pure functions (planning apart from doing).

``fabfile.flows.environment`` gathers facts (provider machines, inventory entries, versions the
workers answer), asks these functions what to do, and does it. Tests drive them with tables.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fabfile.core.errors import BootedError
from fabfile.hosts.inventory import HostEntry
from fabfile.providers.base import UNREACHABLE, Machine

# How the environment's service reaches the workers that don't serve its version yet.
NOTHING = "nothing"      # every worker already serves it
ROLLING = "rolling"      # a load balancer is serving users: one worker at a time behind it
PARALLEL = "parallel"    # nobody is being served: all at once


@dataclass
class StartPlan:
    build: list[str] = field(default_factory=list)    # images that don't exist yet: build, then start
    start: list[str] = field(default_factory=list)    # built, not running: start
    running: list[str] = field(default_factory=list)  # already running: leave alone

    def action(self, image: str) -> str:
        if image in self.running:
            return "running"
        return "build" if image in self.build else "start"


def plan_start(images: list[str], known: Mapping[str, Machine]) -> StartPlan:
    """What starting ``images`` means, given the provider's machines by name."""
    plan = StartPlan()
    for image in images:
        machine = known.get(image)
        if machine is None:
            plan.build.append(image)
        elif machine.running:
            plan.running.append(image)
        else:
            plan.start.append(image)
    return plan


def plan_stop(images: list[str], known: Mapping[str, Machine]) -> dict[str, str]:
    """{image: "not built" | "already stopped" | "stop"} for stopping ``images``."""
    plan = {}
    for image in images:
        machine = known.get(image)
        plan[image] = "not built" if machine is None else ("stop" if machine.running else "already stopped")
    return plan


def not_called_home(started: Mapping[str, float | None], entries: Mapping[str, HostEntry],
                    slack_s: float = 1.0) -> list[str]:
    """The images still to hear from: ``started`` maps an image to when this run booted it
    (``None``: it was already running, any record of it will do). A host booted by this run
    counts only once it called home after its start (``slack_s`` for clock rounding)."""
    return [image for image, at in started.items()
            if image not in entries or (at is not None and entries[image].last_seen < at - slack_s)]


def stale_workers(serving: Mapping[str, str | None], version: str) -> list[str]:
    """Workers (by image) whose ``/version`` answer is not ``version`` (``None``: no answer)."""
    return [image for image, current in serving.items() if current != version]


def may_come_back(current: str | None, recorded: str | None, version: str, just_booted: bool) -> bool:
    """Whether a worker gets time to start ``version`` by itself before it is redeployed: this run
    booted it, it does not answer with ``version`` yet, and ``version`` is what booted last deployed
    there (its unit is enabled: it starts at boot)."""
    return just_booted and current != version and recorded == version


def converge_mode(stale: list[str], loadbalancer_live: bool) -> str:
    if not stale:
        return NOTHING
    return ROLLING if loadbalancer_live else PARALLEL


class RollingSteps(Protocol):
    """What a rolling change does to one worker; ``roll`` decides the order and when to stop."""

    def drain(self, image: str) -> None:
        """Take the worker out of the load balancers."""

    def change(self, image: str) -> str:
        """Wait for its in-flight requests, switch it (deploy or rollback); a one-line detail."""

    def check(self, image: str) -> None:
        """Readiness: it answers as what it now runs."""

    def restore(self) -> None:
        """Every worker back in the load balancers."""


def roll(workers: list[str], steps: RollingSteps,
         report: Callable[[str, bool, str], None] = lambda image, ok, detail: None) -> list[tuple[str, bool, str]]:
    """Change ``workers`` one at a time: drain, change, check, put back. The first failure leaves that
    worker drained (users never reach a broken one) and stops the rollout; ``report`` hears each worker."""
    results = []
    for image in workers:
        try:
            steps.drain(image)
            detail = steps.change(image)
            steps.check(image)
            steps.restore()
        except BootedError as err:
            results.append((image, False, f"{err} (left drained; rollout stopped)"))
            report(*results[-1])
            break
        results.append((image, True, f"{detail} (drained, switched, back in)"))
        report(*results[-1])
    return results


def lost_hosts(entries: Mapping[str, HostEntry], known: Mapping[str, Machine], since: Mapping[str, float],
               now: float, after_s: float) -> tuple[list[str], dict[str, float]]:
    """(lost, since'): the inventory's images lost with the machine running them (a hypervisor that does
    not answer) for ``after_s`` or longer: they leave the inventory and the load balancers. ``since``:
    when each was first seen unreachable (since' is it updated with this look; an image that answers
    again drops out). One slow answer is not a loss: a hypervisor under load can miss a connect
    timeout, and leaving the inventory is not undone when it answers again (hosts call home only when
    they boot). An image the provider does not list at all stays (that is not proof of its loss: it
    may belong to another provider's view)."""
    unreachable = {image: since.get(image, now) for image in entries
                   if image in known and known[image].state == UNREACHABLE}
    return sorted(image for image, first in unreachable.items() if now - first >= after_s), unreachable


def workers_up(workers: Iterable[str], known: Mapping[str, Machine], in_doubt: Collection[str]) -> frozenset[str]:
    """The workers the monitor counts as running: those whose machine runs, and those ``in_doubt``
    (unreachable, not lost yet: ``lost_hosts``). A worker in doubt is neither replaced nor health
    checked until it is lost (a blip of its hypervisor must not get a second copy of it built
    elsewhere, with its address); once lost it leaves the inventory, and then the count."""
    return frozenset(w for w in workers if w in known and (known[w].running or w in in_doubt))
