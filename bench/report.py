"""Turning timed runs into the numbers the README quotes: medians, paired ratios, per-host slope, targets."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

# booted's targets at the largest N (issue 8): its median wall time at most this many times the other's
TARGETS = {"pyinfra": 0.5, "ansible": 0.1, "floor": 1.5}


@dataclass
class Run:
    tool: str
    n: int
    block: int            # 0 is the discarded warm-up
    version: str
    wall_s: float
    ok: bool
    problems: list[str] = field(default_factory=list)
    ctrl_cpu_s: float = 0.0     # CPU of the tool's processes (and the harness, for the floor)
    machine_cpu_s: float = 0.0  # busy CPU of the whole machine during the run (controller + hosts)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[Run], sizes: list[int], tools: list[str]) -> dict:
    """Medians per (tool, N) over the timed blocks' good runs, ratios to booted paired by block."""
    timed = [r for r in runs if r.block > 0]
    cells: dict[str, dict] = {}
    for tool in tools:
        for n in sizes:
            mine = [r for r in timed if r.tool == tool and r.n == n]
            good = [r for r in mine if r.ok]
            walls = sorted(r.wall_s for r in good)
            cells[f"{tool}@{n}"] = {
                "tool": tool, "n": n, "runs": len(mine), "failed": len(mine) - len(good),
                "median_s": _median(walls), "min_s": walls[0] if walls else None, "max_s": walls[-1] if walls else None,
                "walls_s": walls,
                "ctrl_cpu_s": _median([r.ctrl_cpu_s for r in good]),
                "machine_cpu_s": _median([r.machine_cpu_s for r in good]),
            }
    by_key = {(r.tool, r.n, r.block): r for r in timed if r.ok}
    ratios: dict[str, float | None] = {}
    for tool in tools:
        for n in sizes:
            pairs = [by_key[(tool, n, b)].wall_s / by_key[("booted", n, b)].wall_s
                     for (t, m, b) in by_key if t == tool and m == n and ("booted", n, b) in by_key]
            ratios[f"{tool}@{n}"] = _median(pairs)   # this tool's time / booted's, same block
    slopes: dict[str, float | None] = {}
    if len(sizes) >= 2:
        lo, hi = sizes[-2], sizes[-1]
        for tool in tools:
            a, b = cells[f"{tool}@{lo}"]["median_s"], cells[f"{tool}@{hi}"]["median_s"]
            slopes[tool] = (b - a) / (hi - lo) * 1000 if a is not None and b is not None else None
    targets = []
    top = sizes[-1]
    booted = cells.get(f"booted@{top}", {}).get("median_s")
    for peer, limit in TARGETS.items():
        other = cells.get(f"{peer}@{top}", {}).get("median_s")
        if booted is None or other is None:
            continue
        ratio = booted / other
        targets.append({"peer": peer, "n": top, "booted_s": booted, "peer_s": other, "ratio": ratio,
                        "limit": limit, "met": ratio <= limit})
    return {"cells": cells, "ratio_to_booted": ratios, "slope_ms_per_host": slopes,
            "slope_between": sizes[-2:] if len(sizes) >= 2 else sizes, "targets": targets,
            "sizes": sizes, "tools": tools}


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_markdown(summary: dict, meta: dict, kind: str = "deploy") -> str:
    sizes, tools, cells = summary["sizes"], summary["tools"], summary["cells"]
    lo_hi = summary["slope_between"]
    lines = []
    title = "booted deploy: wall time per N" if kind == "scaling" else \
        "Deploying one release to N local hosts: booted vs pyinfra vs Ansible vs an OpenSSH floor"
    lines.append(f"### {title}")
    lines.append("")
    head = ["tool"] + [f"N={n} median s (min–max)" for n in sizes]
    if kind != "scaling":
        head += [f"× booted @{n}" for n in sizes]
    if len(sizes) >= 2:
        head.append(f"ms/host ({lo_hi[0]}→{lo_hi[1]})")
    head.append(f"ctrl CPU s @{sizes[-1]}")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for tool in tools:
        row = [tool]
        for n in sizes:
            c = cells[f"{tool}@{n}"]
            cell = f"{_s(c['median_s'])} ({_s(c['min_s'])}–{_s(c['max_s'])})"
            if c["failed"]:
                cell += f" [{c['failed']} failed]"
            row.append(cell)
        if kind != "scaling":
            for n in sizes:
                ratio = summary["ratio_to_booted"][f"{tool}@{n}"]
                row.append("1" if tool == "booted" else _s(ratio, 2) + "×" if ratio is not None else "—")
        if len(sizes) >= 2:
            row.append(_s(summary["slope_ms_per_host"].get(tool), 0))
        row.append(_s(cells[f"{tool}@{sizes[-1]}"]["ctrl_cpu_s"], 2))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if summary["targets"]:
        lines.append(f"Targets at N={sizes[-1]} (booted's median ÷ the other's median):")
        for t in summary["targets"]:
            verdict = "met" if t["met"] else "NOT met"
            lines.append(f"- vs {t['peer']}: {t['booted_s']:.2f} s ÷ {t['peer_s']:.2f} s = {t['ratio']:.2f} "
                         f"(target ≤ {t['limit']}) — {verdict}")
        lines.append("")
    runs_per_cell = max((c["runs"] for c in cells.values()), default=0)
    lines.append(
        f"{meta.get('machine', '')}; Python {meta.get('python', '')}; tarball {meta.get('tarball_bytes', '?')} bytes; "
        f"{meta.get('blocks', '?')} timed blocks ({runs_per_cell} runs per cell) after a discarded warm-up, "
        f"random order per block (seed {meta.get('seed', '?')}); total {meta.get('runtime_s', '?')} s."
    )
    if meta.get("loadavg_start") is not None:
        end = meta.get("loadavg_end") or ["?"]
        lines.append(f"Load average (1 min) at start {meta['loadavg_start'][0]:.1f}, at end {end[0] if isinstance(end[0], str) else f'{end[0]:.1f}'}; "
                     "it includes the lab's own hosts; other work on the machine counts as noise.")
    if meta.get("booted_repo"):
        lines.append(f"booted: `fab hello-deploy` from {meta['booted_repo']} (its DEPLOY_SCRIPT and unit for every tool).")
    versions = meta.get("versions") or {}
    if versions:
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    lines.append(
        "Wall time = from starting the tool to its exit, including interpreter start-up and the HTTP "
        "check; × booted = the tool's time ÷ booted's in the same block (median); ctrl CPU = CPU of "
        "the tool's own processes. A run counts only if it exited 0, every host's `current` points "
        "at the run's version and every host answers /version with it."
    )
    return "\n".join(lines)
