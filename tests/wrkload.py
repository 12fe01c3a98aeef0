"""wrk, the HTTP load generator, driven for drills and benchmarks: start it in the background,
do something to the hosts, then read wrk's own report (statuses, socket errors, latency).

wrk runs a fixed duration and stops by itself; ``WrkRun`` also kills it (by its own pid) if the
caller leaves early. It only ever targets the URL it is given: the lab's own load balancer.
The counting is done by wrk_report.lua inside wrk, so nothing here can drop a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "wrk_report.lua"
MARK = "WRK_REPORT "


class WrkError(Exception):
    """wrk could not run or printed no report."""


@dataclass(frozen=True)
class WrkReport:
    requests: int
    seconds: float
    statuses: dict[int, int]
    errors: dict[str, int]               # wrk's socket errors: connect, read, write, timeout (+ status)
    latency_ms: dict[str, float] = field(default_factory=dict)   # p50, p90, p99, max, mean

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    @property
    def socket_errors(self) -> int:
        return sum(self.errors[k] for k in ("connect", "read", "write", "timeout"))

    @property
    def failed(self) -> int:
        """Requests a user would have seen fail: a non-2xx answer or no answer at all."""
        return self.non_2xx + self.socket_errors

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        errors = ", ".join(f"{k} {v}" for k, v in self.errors.items() if v and k != "status") or "none"
        return (f"{self.requests} requests in {self.seconds:.1f}s ({self.rps:.0f}/s); statuses {{{statuses}}}; "
                f"socket errors: {errors}; latency p50 {self.latency_ms.get('p50', 0):.1f} ms, "
                f"p99 {self.latency_ms.get('p99', 0):.1f} ms, max {self.latency_ms.get('max', 0):.0f} ms")


def parse_report(stdout: str) -> WrkReport:
    for line in stdout.splitlines():
        if line.startswith(MARK):
            data = json.loads(line[len(MARK):])
            return WrkReport(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                statuses={int(k): v for k, v in data["statuses"].items()},
                errors=data["errors"],
                latency_ms={k: v / 1000.0 for k, v in data["latency_us"].items()},
            )
    raise WrkError(f"wrk printed no report:\n{stdout[-2000:]}")


def available() -> str | None:
    """None if wrk can run here, else why not."""
    return None if shutil.which("wrk") else "wrk is not installed (apt-get install wrk; see quickstart.sh)"


class WrkRun:
    """``with WrkRun(url, connections=16, seconds=20) as run: ...; report = run.wait()``

    ``seconds`` is the longest it runs; ``stop()`` ends it sooner (SIGINT: wrk stops sending,
    collects the answers under way and prints its report as at the end of its time)."""

    def __init__(self, url: str, connections: int = 16, seconds: float = 15, threads: int = 2,
                 method: str = "GET", timeout_s: float = 10, delay_ms: float = 0):
        self.argv = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections),
                     "-d", f"{max(1, round(seconds))}s", "--timeout", f"{timeout_s:g}s",
                     "-s", str(SCRIPT), url, "--", method]
        self.env = dict(os.environ, WRK_DELAY_MS=f"{delay_ms:g}" if delay_ms else "")
        self.seconds = seconds
        self.proc: subprocess.Popen | None = None
        self.report: WrkReport | None = None

    def __enter__(self) -> "WrkRun":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, stdin=subprocess.DEVNULL)
        return self

    def wait(self) -> WrkReport:
        assert self.proc is not None
        try:
            out, _ = self.proc.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise WrkError(f"wrk did not finish within {self.seconds + 30:g}s") from None
        if self.proc.returncode != 0:
            raise WrkError(f"wrk exited {self.proc.returncode}: {out[-2000:]}")
        self.report = parse_report(out)
        return self.report

    def stop(self) -> WrkReport:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def run(url: str, **kwargs) -> WrkReport:
    with WrkRun(url, **kwargs) as w:
        return w.wait()
