"""The drills' stall watch: a machine frozen during a drill is seen, and only then is a failed drill
run once more (tests/stallwatch.py, tests/drills.py)."""
from __future__ import annotations

import os
import signal
import time

import drills
import pytest
from stallwatch import Stalls, StallWatch, parse
from wrkload import WrkReport


def test_a_frozen_process_is_seen_and_a_running_one_is_not():
    with StallWatch() as quiet:
        time.sleep(0.5)
    assert quiet.stalls.gaps == []
    with StallWatch() as watch:
        # what a paused VM does to every process: the watcher itself stopped for 1.6 s
        os.kill(watch._proc.pid, signal.SIGSTOP)
        time.sleep(1.6)
        os.kill(watch._proc.pid, signal.SIGCONT)
        time.sleep(0.3)
    assert watch.stalls.longest >= 1.4, watch.stalls  # (no upper bound: a busy machine only adds to it)
    assert str(watch.stalls).startswith("the whole machine stood still: ")


def test_watcher_lines_are_parsed_and_junk_ignored():
    assert parse("0.50 1.25\nnoise\n3.00 17.40\n") == [(0.5, 1.25), (3.0, 17.4)]


def _drill(failed: int, stall: float) -> drills.DrillResult:
    report = WrkReport(requests=1000, seconds=10, statuses={200: 1000},
                       errors={"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": failed})
    return drills.DrillResult("d", 64, "GET", report, stalls=Stalls([(5.0, stall)] if stall else []))


@pytest.mark.parametrize("first,runs", [
    ((0, 0.0), 1),     # clean: done
    ((0, 17.0), 1),    # clean although the machine stood still: done
    ((64, 0.0), 1),    # failed, machine running: a finding, never repeated
    ((64, 2.0), 1),    # failed, stall shorter than the load balancer's shortest timeout: a finding
    ((64, 17.0), 2),   # failed while the machine stood still: void, run once more
])
def test_a_drill_runs_again_only_when_it_failed_while_the_machine_stood_still(first, runs):
    results = [_drill(*first), _drill(64, 17.0), _drill(0, 0.0)]
    calls, restored = [], []

    def run():
        calls.append(1)
        return results[len(calls) - 1]

    final = drills.again_if_machine_stalled(run, restore=lambda: restored.append(1))
    assert len(calls) == runs and len(restored) == runs - 1
    assert final is results[runs - 1]  # the second run's verdict stands, even when it failed again
