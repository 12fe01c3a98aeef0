"""Side by side with a floor: interleaved rounds, medians, ratios paired by round, one table.

The issue-18 scripts (bringup, discovery_bench, reach_bench, monitor_reaction) all measure a
figure next to its floor in the same run, the way docs/benchmarking.md §8 says: a warm-up round
that is thrown away, then rounds in which every case runs once in a fresh random order, medians,
and each case's ratio to the floor paired by round (runs close in time share the same background
load). This module holds that protocol once, plus the conditions line the README quotes.
"""
from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Sample:
    case: str
    round: int          # 0 is the warm-up, left out of every figure
    seconds: float
    ok: bool = True
    note: str = ""


@dataclass
class Outcome:
    """What one timed call returns: its time, whether its correctness check passed, and why not."""

    seconds: float
    ok: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def interleave(cases: dict[str, Callable[[], Outcome]], rounds: int, seed: int = 1,
               warmup: bool = True, log: Callable[[str], None] = print) -> list[Sample]:
    """Run every case once per round in a fresh random order; round 0 is the warm-up."""
    rng = random.Random(seed)
    samples = []
    for rnd in range(0 if warmup else 1, rounds + 1):
        order = list(cases)
        rng.shuffle(order)
        for case in order:
            out = cases[case]()
            samples.append(Sample(case, rnd, out.seconds, out.ok, out.note))
            tag = "warm-up" if rnd == 0 else f"round {rnd}"
            log(f"  {tag:8} {case:28} {out.seconds:8.3f} s {'ok' if out.ok else 'FAILED: ' + out.note}")
    return samples


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def cell(samples: list[Sample], case: str) -> dict:
    """Median, min, max and counts of a case's good timed runs."""
    mine = [s for s in samples if s.case == case and s.round > 0]
    good = sorted(s.seconds for s in mine if s.ok)
    return {"case": case, "runs": len(mine), "failed": len(mine) - len(good), "median_s": median(good),
            "min_s": good[0] if good else None, "max_s": good[-1] if good else None}


def paired_ratio(samples: list[Sample], case: str, floor: str) -> float | None:
    """Median over rounds of case ÷ floor, both from the same round (good runs only)."""
    by = {(s.case, s.round): s.seconds for s in samples if s.round > 0 and s.ok}
    pairs = [by[(case, r)] / by[(floor, r)] for (c, r) in by if c == case and (floor, r) in by and by[(floor, r)] > 0]
    return median(pairs)


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(samples: list[Sample], rows: list[tuple], floor: str | None = None) -> str:
    """A markdown table: one row per (case, label[, its own floor]); "× floor" is the paired ratio to
    the row's floor (else ``floor``)."""
    lines = ["| case | median s | min–max s | good/runs | × floor |", "|---|---|---|---|---|"]
    for case, label, *own in rows:
        row_floor = own[0] if own else floor
        c = cell(samples, case)
        ratio = paired_ratio(samples, case, row_floor) if row_floor and case != row_floor else None
        lines.append(f"| {label} | {fmt(c['median_s'])} | {fmt(c['min_s'])}–{fmt(c['max_s'])} | "
                     f"{c['runs'] - c['failed']}/{c['runs']} | {fmt(ratio, 2) if ratio is not None else ('1' if case == row_floor else '—')} |")
    return "\n".join(lines)


def verdict(name: str, measured: float | None, limit: float | None, unit: str = "") -> str:
    """One line: measured vs goal, and whether it holds."""
    if measured is None or limit is None:
        return f"{name}: not measured"
    holds = "MET" if measured <= limit else "NOT MET"
    return f"{name}: {measured:.3g}{unit} (goal ≤ {limit:.3g}{unit}) {holds}"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def conditions(start_load: str) -> str:
    """The line every table carries: when, where, and how busy the machine was."""
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
            f"load {start_load} at start, {loadavg()} at end")
