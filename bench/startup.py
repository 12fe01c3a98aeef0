"""Start-up: wall time of `fab --list` and `fab hosts-list`, next to their floors (issue 18, item 7).

    python3 bench/startup.py [--runs 20]

No root, no network; a private state dir with an empty inventory. Uses hyperfine (Debian package
``hyperfine``) when it is installed, which runs the commands interleaved with warm-up runs; else
the same protocol in Python (sidebyside.interleave; hyperfine runs each command's runs in a row). Cases:

* ``python -c pass``: the interpreter alone (the floor the goal compares against);
* ``import invoke``: the command-line library booted's `fab` is built on (its floor);
* ``import fabric.main``: what fabric's own `fab` entry point imports before it looks at its
  arguments (invoke, fabric, paramiko);
* fabric's `fab --list` / `fab hosts-list`: the same tasks through fabric's entry point, as `fab`
  ran them before booted had its own (fabfile/program.py);
* `fab --list` and `fab hosts-list`: booted's `fab`. Goal: each ≤ 0.25 s of wall time.

Bytecode: the commands run without PYTHONDONTWRITEBYTECODE (one warm-up writes it), as an installed
booted runs; CPU time (user + system) is printed too, since wall time on a busy machine is noise.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import projectvenv  # noqa: E402

projectvenv.use()

import sidebyside as sbs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 0.25


def commands() -> dict[str, list[str]]:
    python = str(Path(sys.prefix) / "bin" / "python")
    fab = str(Path(sys.prefix) / "bin" / "fab")
    fabric_fab = [python, "-c", "import sys; from fabric.main import program; sys.argv[0] = 'fab'; program.run()"]
    return {
        "python -c pass": [python, "-c", "pass"],
        "import invoke": [python, "-c", "import invoke"],
        "import fabric.main": [python, "-c", "import fabric.main"],
        "fabric's fab --list": [*fabric_fab, "--list"],
        "fabric's fab hosts-list": [*fabric_fab, "hosts-list"],
        "fab --list": [fab, "--list"],
        "fab hosts-list": [fab, "hosts-list"],
    }


def run_once(argv: list[str], env: dict) -> sbs.Outcome:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace").strip()
    proc.stderr.close()
    return sbs.Outcome(seconds, proc.returncode == 0, err[-200:], {"cpu": usage.ru_utime + usage.ru_stime})


def with_hyperfine(cmds: dict[str, list[str]], env: dict, runs: int) -> dict[str, dict]:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    try:
        argv = ["hyperfine", "-N", "--warmup", "3", "--runs", str(runs), "--export-json", str(out), "--style", "basic"]
        for name, cmd in cmds.items():
            argv += ["-n", name, shlex.join(cmd)]
        subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        results = json.loads(out.read_text())["results"]
    finally:
        out.unlink(missing_ok=True)
    return {r["command"]: {"median_s": r["median"], "min_s": r["min"], "max_s": r["max"],
                           "cpu_s": r["user"] + r["system"], "runs": len(r["times"])} for r in results}


def with_python(cmds: dict[str, list[str]], env: dict, runs: int) -> dict[str, dict]:
    cpu: dict[str, list[float]] = {}

    def case(name: str):
        def run() -> sbs.Outcome:
            out = run_once(cmds[name], env)
            cpu.setdefault(name, []).append(out.extra["cpu"])
            return out
        return run

    samples = sbs.interleave({n: case(n) for n in cmds}, runs, log=lambda _: None)
    failed = [s for s in samples if not s.ok]
    if failed:
        raise SystemExit(f"startup: {failed[0].case} failed: {failed[0].note}")
    return {n: {**sbs.cell(samples, n), "cpu_s": sbs.median(cpu[n][1:])} for n in cmds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-hyperfine", action="store_true")
    args = parser.parse_args()
    start_load = sbs.loadavg()
    work = Path(tempfile.mkdtemp(prefix="booted-startup-"))
    try:
        (work / "environments.yaml").write_text((ROOT / "environments.yaml").read_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTED_") and k != "PYTHONDONTWRITEBYTECODE"}
        env.update(BOOTED_STATE_DIR=str(work / "state"), BOOTED_CONFIG=str(work / "environments.yaml"))
        cmds = commands()
        for cmd in cmds.values():  # bytecode written, errors seen before timing
            out = run_once(cmd, env)
            if not out.ok:
                raise SystemExit(f"startup: {' '.join(cmd)} failed: {out.note}")
        tool = "hyperfine" if shutil.which("hyperfine") and not args.no_hyperfine else "python"
        cells = with_hyperfine(cmds, env, args.runs) if tool == "hyperfine" else with_python(cmds, env, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor = cells["python -c pass"]["median_s"]
    print(f"Start-up, {args.runs} runs each ({tool}, after warm-up runs)")
    print("| command | median s | min–max s | CPU s (user+sys) | − python -c pass |")
    print("|---|---|---|---|---|")
    for name, c in cells.items():
        print(f"| `{name}` | {sbs.fmt(c['median_s'])} | {sbs.fmt(c['min_s'])}–{sbs.fmt(c['max_s'])} | "
              f"{sbs.fmt(c['cpu_s'])} | {sbs.fmt(c['median_s'] - floor)} |")
    for name in ("fab --list", "fab hosts-list"):
        print(sbs.verdict(f"{name} wall", cells[name]["median_s"], GOAL_S, " s"))
        own = cells[name]["median_s"] - cells["import invoke"]["median_s"]
        before = cells[f"fabric's {name}"]["median_s"]
        print(f"  {cells[name]['median_s'] / before:.2f}× fabric's entry point on the same task ({before:.3f} s); "
              f"booted's own beyond `import invoke`: {own:.3f} s")
    print(f"conditions: {sbs.conditions(start_load)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
