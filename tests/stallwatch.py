"""Whether this machine itself stood still during a drill.

A drill's verdict says something about booted only if the machine kept running: when every process
on it (wrk, nginx, the workers, the test itself) is frozen for longer than the load balancer's
shortest timeout, as a virtual machine paused or starved by its own host is, requests time out on
resumption whatever booted does. CI's machines are such VMs: one CI run saw a drill's wrk finish 17 s
after the test had asked it to stop, every connection's request answered more than 10 s late, the
fab step long finished and nothing in the logs.

``StallWatch`` runs a separate small process (so neither the test's GIL nor its threads can delay it)
that sleeps 50 ms at a time and reports each wake-up more than a second late, and reads the
hypervisor's steal time (``/proc/stat``) before and after. Whoever asks decides what a stall means;
the drills (tests/drills.py) run a drill once more, only once, only when requests failed while the
machine stood still for longer than the load balancer's shortest timeout.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

# The watcher: prints "<seconds since start> <seconds late>" for every wake-up >= 1 s late.
WATCHER = """
import sys, time
step, t0 = 0.05, time.monotonic()
last = t0
while True:
    time.sleep(step)
    now = time.monotonic()
    if now - last - step >= 1.0:
        print(f"{last - t0:.2f} {now - last - step:.2f}", flush=True)
    last = now
"""


def steal_seconds() -> float:
    """CPU time the hypervisor took from this machine so far, all CPUs (0 where it is not reported)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" and len(fields) > 8 else 0.0
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Stalls:
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the watch, seconds late)
    steal_s: float = 0.0

    @property
    def longest(self) -> float:
        return max((gap for _, gap in self.gaps), default=0.0)

    def __str__(self) -> str:
        if not self.gaps:
            return f"the machine never stood still for 1 s or more (hypervisor steal {self.steal_s:.1f} s)"
        listed = ", ".join(f"{gap:.1f}s at t={t:.1f}s" for t, gap in self.gaps[:5])
        return (f"the whole machine stood still: {listed}"
                f"{' ...' if len(self.gaps) > 5 else ''} (hypervisor steal {self.steal_s:.1f} s)")


def parse(output: str) -> list[tuple[float, float]]:
    gaps = []
    for line in output.splitlines():
        try:
            t, gap = (float(x) for x in line.split())
        except ValueError:
            continue
        gaps.append((t, gap))
    return gaps


class StallWatch:
    """``with StallWatch() as watch: ...``; then ``watch.stalls``."""

    def __init__(self):
        self.stalls = Stalls()
        self._proc: subprocess.Popen | None = None
        self._steal0 = 0.0

    def __enter__(self) -> "StallWatch":
        self._steal0 = steal_seconds()
        self._proc = subprocess.Popen([sys.executable, "-c", WATCHER], stdout=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, text=True)
        time.sleep(0.1)  # started before what it watches
        return self

    def __exit__(self, *exc) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGKILL)
        out, _ = self._proc.communicate()
        self.stalls = Stalls(parse(out), max(0.0, steal_seconds() - self._steal0))
