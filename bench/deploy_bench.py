#!/usr/bin/env python3
"""booted's deploy side by side with Ansible, pyinfra and an OpenSSH floor, on N = 1, 10, 30 local hosts.

    python3 bench/deploy_bench.py                 # the full run (about 10 minutes on 2 cores)
    python3 bench/deploy_bench.py --blocks 1      # quicker, one timed block
    python3 bench/deploy_bench.py --scaling       # booted alone: wall time per N (issue 4 item 7)

Needs root, systemd-nspawn and debootstrap (local hosts). It installs the peers into bench/.venv
(pinned in bench/requirements.txt), builds its own lab of local hosts with booted (own state dir,
config, bridge, subnet and nginx port; torn down at the end, also on Ctrl-C), then runs blocks:
every (tool, N) once per block in a fresh random order; block 0 is a discarded warm-up. Every run
deploys a new version name (a new tag on the same commit), so every tool does a full deploy, and
counts only if it exits 0, every host's ``current`` points at that version and every host answers
/version with it. Failures are reported, never retried. Results: a table on stdout and
bench/results/deploy-<timestamp>.json and .md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import projectvenv  # noqa: E402

if __name__ == "__main__":
    projectvenv.use()  # `python3 bench/deploy_bench.py` works as the README says, venv active or not

import benchlab  # noqa: E402
import tools  # noqa: E402
from report import Run, render_markdown, summarize  # noqa: E402

RESULTS = BENCH / "results"


# ---------------------------------------------------------------------------- the peers' venv
def ensure_venv() -> None:
    """bench/.venv with requirements.txt installed (re-installed when the file changes)."""
    req = BENCH / "requirements.txt"
    marker = tools.VENV / ".requirements.sha256"
    want = hashlib.sha256(req.read_bytes()).hexdigest()
    if marker.exists() and marker.read_text().strip() == want:
        return
    print("peers: creating bench/.venv with ansible-core and pyinfra (pinned in bench/requirements.txt)", flush=True)
    if not (tools.VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(tools.VENV)], check=True)
    proc = subprocess.run([str(tools.VENV / "bin" / "pip"), "install", "--quiet", "-r", str(req)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"installing the peers failed: {proc.stderr.strip()[-800:]}")
    marker.write_text(want + "\n")


# ---------------------------------------------------------------------------- one run
def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine so far (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime + me.ru_utime + me.ru_stime


def one_run(runner: tools.Runner, lab: benchlab.BenchLab, base: tools.Shipment, tool: str, n: int,
            block: int, logs: Path) -> Run:
    version = lab.new_version(f"{tool}-n{n}-b{block}")
    ship = tools.Shipment(**{**asdict(base), "version": version})
    log = logs / f"{version}.log"
    busy0, ctrl0 = cpu_busy_seconds(), children_cpu()
    start = time.perf_counter()
    outcome = runner.run(tool, n, ship, log)
    wall = time.perf_counter() - start
    busy, ctrl = cpu_busy_seconds() - busy0, children_cpu() - ctrl0
    problems = []
    if outcome.returncode != 0:
        problems.append(f"exit {outcome.returncode}: {outcome.stderr}")
    want = f"releases/{version}"
    for address in lab.addresses[n]:
        current = lab.current_release(address)
        if current != want:
            problems.append(f"{address}: current -> {current}")
        try:
            status, body = tools.http_get(address, base.port, "/version")
            if status != 200 or body != version:
                problems.append(f"{address}: /version {status} {body[:40]!r}")
        except OSError as err:
            problems.append(f"{address}: /version {err}")
    if not problems:
        log.unlink(missing_ok=True)
    return Run(tool=tool, n=n, block=block, version=version, wall_s=wall, ok=not problems,
               problems=problems[:5], ctrl_cpu_s=ctrl, machine_cpu_s=busy)


SHIPMENT_CODE = """
import json, sys
from fabfile.providers import load_config
from fabfile import config, release, services, ssh
cfg = load_config()
svc = services.get(sys.argv[1])
rel = release.prepare(svc, sys.argv[2])
print(json.dumps(dict(service=svc.name, version=rel.version, commit=rel.commit, tarball=str(rel.tarball),
                      unit=release.unit_text(svc), script=release.DEPLOY_SCRIPT, keep=cfg.deploy["keep_releases"],
                      port=svc.port, user=ssh.user(cfg), key=ssh.keypair(cfg)[0])))
"""


def shipment(lab: benchlab.BenchLab, booted_repo: Path) -> tools.Shipment:
    """The release every tool ships, from booted's own release.prepare (the bytes fab uploads),
    with the deploy script and unit of the booted checkout being measured."""
    proc = subprocess.run([sys.executable, "-c", SHIPMENT_CODE, benchlab.SERVICE, benchlab.BASE_VERSION],
                          cwd=booted_repo, env=lab.booted_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"release.prepare failed in {booted_repo}: {proc.stderr.strip()[-800:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["tarball"], data["key"] = Path(data["tarball"]), Path(data["key"])
    return tools.Shipment(**data)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,30", help="host counts N (default 1,10,30)")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks after the warm-up (default 3)")
    parser.add_argument("--tools", default=",".join(tools.TOOLS), help=f"subset of {','.join(tools.TOOLS)}")
    parser.add_argument("--scaling", action="store_true", help="booted only: wall time per N (issue 4 item 7)")
    parser.add_argument("--seed", type=int, default=None, help="random order seed (default: time)")
    parser.add_argument("--booted-repo", default=str(benchlab.ROOT),
                        help="the booted checkout whose `fab hello-deploy` is timed (default: this one)")
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab's files (hosts are stopped anyway)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    chosen = ["booted"] if args.scaling else [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(chosen) - set(tools.TOOLS))
    if unknown or not sizes or min(sizes) < 1 or args.blocks < 1:
        parser.error(f"bad --tools/--sizes/--blocks ({', '.join(unknown) or 'sizes and blocks must be >= 1'})")
    if any(t in chosen for t in ("ansible", "pyinfra")):
        ensure_venv()
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    kind = "scaling" if args.scaling else "deploy"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.time()
    runs: list[Run] = []
    meta: dict = {}
    try:
        with benchlab.open_lab(sizes, keep=args.keep_lab) as lab:
            booted_repo = Path(args.booted_repo).resolve()
            base = shipment(lab, booted_repo)
            runner = tools.Runner(lab, lab.lab.root / "peers", tools.timing_env(lab.lab.root), base, booted_repo)
            logs = lab.lab.root / "logs"
            logs.mkdir(exist_ok=True)
            meta = environment_facts(base, chosen, sizes, args.blocks, seed)
            meta["booted_repo"] = str(booted_repo)
            cells = [(t, n) for t in chosen for n in sizes]
            for block in range(args.blocks + 1):
                order = cells[:]
                rng.shuffle(order)
                label = "warm-up block (discarded)" if block == 0 else f"block {block}/{args.blocks}"
                print(f"== {label}", flush=True)
                for tool, n in order:
                    run = one_run(runner, lab, base, tool, n, block, logs)
                    runs.append(run)
                    mark = "ok" if run.ok else "FAILED " + " | ".join(run.problems)[:300]
                    print(f"   {tool:<8} N={n:<3} {run.wall_s:7.2f}s  {mark}", flush=True)
                    time.sleep(0.5)
    except KeyboardInterrupt:
        print("interrupted: lab torn down; partial results follow", file=sys.stderr, flush=True)
    meta["runtime_s"] = round(time.time() - started, 1)
    meta["loadavg_end"] = os.getloadavg()
    if not runs:
        return 1
    summary = summarize(runs, sizes, chosen)
    text = render_markdown(summary, meta, kind=kind)
    print()
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{kind}-{stamp}.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "runs": [asdict(r) for r in runs]}, indent=1))
    (out / f"{kind}-{stamp}.md").write_text(text + "\n")
    print(f"\nresults: {out / f'{kind}-{stamp}.md'} and .json", flush=True)
    failed = [r for r in runs if not r.ok and r.block > 0]
    return 1 if failed else 0


def environment_facts(base: tools.Shipment, chosen: list[str], sizes: list[int], blocks: int, seed: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": f"{os.cpu_count()} cores, {cpu}, kernel {platform.release()}",
        "python": platform.python_version(),
        "tools": chosen, "sizes": sizes, "blocks": blocks, "seed": seed,
        "tarball_bytes": base.tarball.stat().st_size,
        "versions": tools.versions(peers=any(t != "booted" for t in chosen)),
        "loadavg_start": os.getloadavg(),
    }


if __name__ == "__main__":
    sys.exit(main())
