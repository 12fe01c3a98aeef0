#!/usr/bin/env python3
"""Capacity and drills through booted's load balancer, measured with wrk (issue 13).

    python3 bench/capacity.py              # as root, from the repo root; about 8 minutes on 2 cores
    python3 bench/capacity.py --no-drills  # capacity only, about 3 minutes

It builds a private lab with booted itself (tests/lab.py: own state dir, bridge, subnet, nginx
port; environment ``sat``: 1 load balancer + 3 workers), then prints:

1. **Capacity**: requests/s through the load balancer at saturation (wrk -t2 -c64, 10 s) with 3,
   2 and 1 workers (workers leave with ``env-stop-worker``), next to one worker asked directly (no
   load balancer: the floor the balancer's own cost is read against); then p50/p99 latency at
   about half of each saturation rate (wrk paced by its delay() hook, 16 connections).
2. **Drills** (the ones tests/test_saturation.py asserts on), each at 16 and 64 connections:
   requests sent, failed (non-2xx or socket error), p99 and max latency.

The lab is torn down at the end, also on Ctrl-C or SIGTERM. The machine's load average is printed
with the results: on a shared machine, read the rates with it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import drills  # noqa: E402  (tests/drills.py)
import wrkload  # noqa: E402  (tests/wrkload.py)
from lab import can_run_local_hosts, make_lab  # noqa: E402  (tests/lab.py)

ENV = "sat"
WORKERS = [f"{ENV}-w1", f"{ENV}-w2", f"{ENV}-w3"]


class _Terminated(Exception):
    pass


def fab(lab, *args: str) -> None:
    result = lab.fab(*args, timeout=900)
    if not result.ok:
        raise SystemExit(f"capacity: {' '.join(args)} failed:\n{result.output[-3000:]}")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def capacity(lab, seconds: float) -> list[list[str]]:
    url = drills.lb_url(lab, ENV)
    direct = f"http://{lab.host_address(WORKERS[0])}:9999/"
    rows = []
    saturated: dict[str, float] = {}
    plan = [("3 workers", url, None), ("2 workers", url, WORKERS[2]), ("1 worker", url, WORKERS[1]),
            ("1 worker, direct (no load balancer)", direct, None)]
    for label, target, leave in plan:
        if leave:
            fab(lab, "env-stop-worker", "--image", leave, "--env", ENV)
        full = wrkload.run(target, connections=64, seconds=seconds)
        saturated[label] = full.rps
        # about half the saturation rate: 16 connections, each pausing between requests; a short
        # run measures what a request costs on top of the pause, the pause is shortened by it
        interval_ms = 16 * 1000.0 / (full.rps / 2)
        probe = wrkload.run(target, connections=16, seconds=4, delay_ms=interval_ms)
        overhead_ms = max(0.0, 16 * 1000.0 / probe.rps - interval_ms) if probe.rps else 0.0
        half = wrkload.run(target, connections=16, seconds=seconds, delay_ms=max(0.5, interval_ms - overhead_ms))
        rows.append([label, f"{full.rps:,.0f}", f"{full.failed}", f"{half.rps:,.0f}",
                     f"{half.latency_ms['p50']:.1f}", f"{half.latency_ms['p99']:.1f}", f"{half.failed}"])
        print(f"  {label}: saturated {full.summary()}\n  {label}: half load {half.summary()}", flush=True)
    for image in WORKERS[1:]:
        fab(lab, "env-start-worker", "--image", image, "--env", ENV)
    return rows


def drill_rows(lab) -> list[list[str]]:
    rows = []
    runs = []
    for c in (16, 64):
        runs += [
            lambda c=c: drills.kill_service(lab, ENV, c),
            lambda c=c: drills.power_off_and_stop(lab, ENV, c),
            lambda c=c: drills.scale_up_and_down(lab, ENV, c),
            lambda c=c: drills.rolling(lab, ENV, c, "GET" if c == 16 else "POST", ("hello-deploy", "--version", "v2")),
            lambda c=c: drills.rolling(lab, ENV, c, "POST" if c == 16 else "GET", ("hello-rollback",)),
        ]
    for run in runs:
        d = run()
        r = d.report
        print(f"  {d}", flush=True)
        rows.append([d.name, str(d.connections), d.method, f"{r.seconds:.0f}", f"{r.requests:,}",
                     f"{r.non_2xx}", f"{r.socket_errors}", f"{r.latency_ms['p99']:.0f}", f"{r.latency_ms['max']:.0f}",
                     "yes" if d.failed_steps else ""])
    return rows


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-drills", action="store_true", help="measure capacity only")
    parser.add_argument("--seconds", type=float, default=10, help="length of each capacity run (default 10)")
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab's folder (hosts are stopped)")
    args = parser.parse_args(argv)
    for reason in (can_run_local_hosts(), wrkload.available()):
        if reason:
            print(f"capacity: cannot run here: {reason}", file=sys.stderr)
            return 2
    root = Path(tempfile.mkdtemp(prefix="booted-capacity-"))
    lab = make_lab(root)

    def on_term(signum, frame):
        raise _Terminated(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        print(f"lab: {root} (bridge {lab.bridge}, subnet {lab.subnet}); load average {loadavg()}", flush=True)
        started = time.monotonic()
        fab(lab, "env-start-all", "--env", ENV)
        print(f"lab: {ENV} up (1 load balancer + 3 workers) in {time.monotonic() - started:.0f}s", flush=True)
        print("capacity:", flush=True)
        cap = capacity(lab, args.seconds)
        drill = [] if args.no_drills else (print("drills:", flush=True), drill_rows(lab))[1]
        print(f"\n{os.cpu_count()} cores, load average {loadavg()}\n")
        print(table(["through", "req/s at saturation (c64)", "failed", "half load req/s (c16 paced)",
                     "p50 ms", "p99 ms", "failed"], cap))
        if drill:
            print()
            print(table(["drill", "connections", "load", "seconds", "requests", "non-2xx", "socket errors",
                         "p99 ms", "max ms", "step failed"], drill))
        bad = sum(int(row[5]) + int(row[6]) for row in drill) + sum(int(row[2]) + int(row[6]) for row in cap)
        return 1 if bad or any(row[9] for row in drill) else 0
    except (_Terminated, KeyboardInterrupt) as err:
        print(f"capacity: stopped ({err or 'Ctrl-C'})", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut the teardown short
        try:
            print("lab: tearing down", flush=True)
            left = lab.teardown()
            if left:
                print(f"lab: WARNING killed what the hosts' stop left: {', '.join(map(str, left))}", flush=True)
            if not args.keep_lab:
                shutil.rmtree(root, ignore_errors=True)
        finally:
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
