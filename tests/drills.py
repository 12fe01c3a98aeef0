"""Failure and change drills at saturation: wrk drives the load balancer flat out while something
happens to the workers. Shared by tests/test_saturation.py (which asserts no request failed) and
bench/capacity.py (which prints what each drill sent and lost).

Each drill takes a lab (tests/lab.py) whose environment ``env`` is up with one load balancer and
three workers, and returns a ``DrillResult``: wrk's own report plus what was done and when, and
whether the machine itself stood still meanwhile (tests/stallwatch.py).
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from stallwatch import Stalls, StallWatch
from wrkload import WrkReport, WrkRun

# The load balancer's shortest timeout (proxy_read_timeout, fabfile/balancing/loadbalancer.py): a
# machine frozen longer than this fails requests on resumption whatever booted does.
MACHINE_STALL_S = 3.0


@dataclass
class DrillResult:
    name: str
    connections: int
    method: str
    report: WrkReport
    steps: list[str] = field(default_factory=list)      # "t=3.0s image-stop ... -> exit 0"
    failed_steps: list[str] = field(default_factory=list)
    stalls: Stalls = field(default_factory=Stalls)

    @property
    def failed(self) -> bool:
        return bool(self.failed_steps or self.report.failed)

    def __str__(self) -> str:
        return (f"drill {self.name} (-c{self.connections} {self.method}): {self.report.summary()}\n  "
                + "\n  ".join(self.steps + [str(self.stalls)] * bool(self.stalls.gaps)))


def again_if_machine_stalled(run, restore=None) -> DrillResult:
    """``run()`` a drill; if requests failed while the whole machine stood still for longer than the
    load balancer's shortest timeout, say so and run it once more (after ``restore()``, which puts the
    hosts back as the drill expects them). The second run's result stands, whatever it is."""
    drill = run()
    if not (drill.failed and drill.stalls.longest >= MACHINE_STALL_S):
        return drill
    print(f"\nvoid, running it again: {drill}", file=sys.stderr)
    if restore is not None:
        restore()
    return run()


def lb_url(lab, env: str) -> str:
    return f"http://{lab.host_address(env + '-lb')}:8080/"


class Timeline:
    """Runs the drill's steps at their times while wrk runs; records each one's outcome."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.steps: list[str] = []
        self.failed: list[str] = []

    def at(self, seconds: float) -> None:
        delay = self.t0 + seconds - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def fab(self, lab, *args: str, timeout: float = 300) -> None:
        start = time.monotonic() - self.t0
        result = lab.fab(*args, timeout=timeout)
        line = f"t={start:.1f}s..{time.monotonic() - self.t0:.1f}s fab {' '.join(args)} -> exit {result.returncode}"
        self.steps.append(line)
        if not result.ok:
            self.failed.append(f"{line}\n{result.output[-1500:]}")

    def ssh(self, lab, image: str, *argv: str) -> None:
        start = time.monotonic() - self.t0
        result = lab.ssh(image, *argv)
        line = f"t={start:.1f}s {image}: {' '.join(argv)} -> exit {result.returncode}"
        self.steps.append(line)
        if result.returncode != 0:
            self.failed.append(f"{line}\n{result.stderr[-500:]}")


def run_drill(lab, env: str, name: str, connections: int, method: str, steps, tail: float = 2.0,
              longest: float = 240) -> DrillResult:
    """wrk against the environment's load balancer while ``steps(timeline)`` runs, and ``tail``
    seconds more; wrk is stopped then (or after ``longest`` seconds, a drill's bound)."""
    timeline = Timeline()
    error: list[BaseException] = []
    with StallWatch() as watch, WrkRun(lb_url(lab, env), connections=connections, seconds=longest,
                                       method=method) as wrk:
        timeline.t0 = time.monotonic()

        def body():
            try:
                steps(timeline)
            except BaseException as err:  # reported with the result, never lost in the thread
                error.append(err)

        worker = threading.Thread(target=body, daemon=True)
        worker.start()
        worker.join(timeout=longest)
        if worker.is_alive():
            timeline.failed.append(f"drill steps still running after {longest:g}s")
        else:
            time.sleep(tail)
        report = wrk.stop()
    if error:
        timeline.failed.append(f"drill step raised {type(error[0]).__name__}: {error[0]}")
    return DrillResult(name, connections, method, report, timeline.steps, timeline.failed, watch.stalls)


# --------------------------------------------------------------------------- the drills
def kill_service(lab, env: str, connections: int) -> DrillResult:
    """A worker's service SIGKILLed (main process only, as the OOM killer would); systemd restarts it."""
    def steps(t: Timeline):
        t.at(3)
        t.ssh(lab, f"{env}-w1", "sudo", "systemctl", "kill", "--kill-whom=main", "-s", "KILL", "booted-hello")
        t.at(8)   # systemd restarts it after RestartSec=1; nginx probes it again after fail_timeout

    return run_drill(lab, env, "service SIGKILL", connections, "GET", steps)


def power_off_and_stop(lab, env: str, connections: int) -> DrillResult:
    """One worker host powered off (image-stop --force), then another stopped cleanly (image-stop)."""
    def steps(t: Timeline):
        t.at(3)
        t.fab(lab, "image-stop", "--image", f"{env}-w2", "--force")
        t.at(8)
        t.fab(lab, "image-stop", "--image", f"{env}-w3")

    return run_drill(lab, env, "power-off + clean stop", connections, "GET", steps, tail=4)


def scale_up_and_down(lab, env: str, connections: int) -> DrillResult:
    """Workers added while loaded (env-start-worker: boot, deploy, into the load balancer), one
    removed (env-stop-worker: out of the load balancer, drained, stopped) and added again."""
    def steps(t: Timeline):
        t.at(2)
        t.fab(lab, "env-start-worker", "--image", f"{env}-w2", "--env", env)
        t.fab(lab, "env-start-worker", "--image", f"{env}-w3", "--env", env)
        t.fab(lab, "env-stop-worker", "--image", f"{env}-w3", "--env", env)
        t.fab(lab, "env-start-worker", "--image", f"{env}-w3", "--env", env)

    return run_drill(lab, env, "scale up/down", connections, "GET", steps)


def rolling(lab, env: str, connections: int, method: str, action: tuple[str, ...]) -> DrillResult:
    """A rolling deploy (``hello-deploy --version V``) or rollback (``hello-rollback``) under load."""
    def steps(t: Timeline):
        t.at(2)
        t.fab(lab, *action, "--env", env)

    return run_drill(lab, env, " ".join(action[:1] + action[2:]), connections, method, steps)
