"""The environment flows' decisions as tables: facts in, what to do out (no root, no hosts)."""
from __future__ import annotations

import pytest

from fabfile.core.errors import BootedError
from fabfile.flows import plans
from fabfile.hosts.inventory import HostEntry
from fabfile.providers.base import RUNNING, STOPPED, Machine


def machines(**states: str) -> dict[str, Machine]:
    return {name: Machine(name, "fake", state) for name, state in states.items()}


def entry(image: str, last_seen: float) -> HostEntry:
    return HostEntry(image, image, "10.9.0.2", "02:00:00:00:00:01", "e", ["workers"], last_seen, last_seen)


@pytest.mark.parametrize("images, known, build, start, running", [
    (["lb", "w1"], {}, ["lb", "w1"], [], []),
    (["lb", "w1"], {"lb": RUNNING, "w1": STOPPED}, [], ["w1"], ["lb"]),
    (["w1", "w2"], {"w1": "aborted", "w2": RUNNING}, [], ["w1"], ["w2"]),  # any non-running state starts
    (["w2"], {"w1": RUNNING}, ["w2"], [], []),                               # others are not touched
])
def test_plan_start(images, known, build, start, running):
    plan = plans.plan_start(images, machines(**known))
    assert (plan.build, plan.start, plan.running) == (build, start, running)


@pytest.mark.parametrize("known, expected", [
    ({}, {"w1": "not built"}),
    ({"w1": STOPPED}, {"w1": "already stopped"}),
    ({"w1": RUNNING}, {"w1": "stop"}),
])
def test_plan_stop(known, expected):
    assert plans.plan_stop(["w1"], machines(**known)) == expected


@pytest.mark.parametrize("started, entries, missing", [
    ({"w1": 100.0}, {}, ["w1"]),                                  # never called home
    ({"w1": 100.0}, {"w1": entry("w1", 50.0)}, ["w1"]),           # only a call from before its start
    ({"w1": 100.0}, {"w1": entry("w1", 99.5)}, []),               # within the clock slack
    ({"w1": 100.0}, {"w1": entry("w1", 101.0)}, []),
    ({"w1": None}, {"w1": entry("w1", 1.0)}, []),                 # already running: any record will do
    ({"w1": None, "w2": 100.0}, {"w1": entry("w1", 1.0)}, ["w2"]),
])
def test_not_called_home(started, entries, missing):
    assert plans.not_called_home(started, entries) == missing


@pytest.mark.parametrize("serving, live, stale, mode", [
    ({"w1": "v2", "w2": "v2"}, True, [], plans.NOTHING),
    ({"w1": "v1", "w2": "v2"}, True, ["w1"], plans.ROLLING),
    ({"w1": "v1", "w2": None}, False, ["w1", "w2"], plans.PARALLEL),   # no answer counts as stale
    ({}, False, [], plans.NOTHING),
])
def test_converge(serving, live, stale, mode):
    got = plans.stale_workers(serving, "v2")
    assert got == stale
    assert plans.converge_mode(got, live) == mode


@pytest.mark.parametrize("current, recorded, just_booted, wait", [
    (None, "v2", True, True),      # restarted with v2 on disk: its service is still starting
    ("v1", "v2", True, True),      # an older copy answers first (e.g. a clone's): still worth the wait
    ("v2", "v2", True, False),     # already serving
    (None, "v2", False, False),    # running all along and not serving: deploy now
    (None, None, True, False),     # first boot: nothing to come back
    (None, "v1", True, False),     # had another version: deploy now
])
def test_may_come_back(current, recorded, just_booted, wait):
    assert plans.may_come_back(current, recorded, "v2", just_booted) is wait


class FakeSteps:
    """Records what a rolling change did; ``fail`` names (step, image) that raise."""

    def __init__(self, fail=()):
        self.fail, self.calls = set(fail), []

    def _do(self, step, image=""):
        self.calls.append(f"{step} {image}".strip())
        if (step, image) in self.fail:
            raise BootedError(f"{step} failed on {image}")

    def drain(self, image):
        self._do("drain", image)

    def change(self, image):
        self._do("change", image)
        return f"{image} now v2"

    def check(self, image):
        self._do("check", image)

    def restore(self):
        self._do("restore")


@pytest.mark.parametrize("fail, calls, outcome", [
    ((), ["drain w1", "change w1", "check w1", "restore", "drain w2", "change w2", "check w2", "restore"],
     [("w1", True), ("w2", True)]),
    # a worker that fails its change stays drained (no restore) and the rollout stops there
    ({("change", "w1")}, ["drain w1", "change w1"], [("w1", False)]),
    # readiness failing on the second worker: the first was already back in; the second stays out
    ({("check", "w2")}, ["drain w1", "change w1", "check w1", "restore", "drain w2", "change w2", "check w2"],
     [("w1", True), ("w2", False)]),
])
def test_roll_one_worker_at_a_time_and_stop_at_the_first_failure(fail, calls, outcome):
    steps = FakeSteps(fail)
    heard = []
    results = plans.roll(["w1", "w2"], steps, lambda image, ok, detail: heard.append((image, ok)))
    assert steps.calls == calls
    assert [(image, ok) for image, ok, _ in results] == outcome == heard
    assert all("left drained; rollout stopped" in d for _, ok, d in results if not ok)
