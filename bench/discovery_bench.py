"""Discovery: `fab hosts-logged` on a booted log of 1M lines, re-reads, forged vs junk (issue 18, item 3).

    python3 bench/discovery_bench.py [--lines 1000000] [--append 10000] [--kind-lines 100000] [--rounds 3]

No root, no network: everything happens in a private state dir. The mixed log is what a busy booted
nginx collects: valid calls home from 100 hosts (10 %), junk (60 %: scanners, garbage) and
forged call homes (30 %: well-formed, wrongly signed, half naming the environment's own images).
The line makers are bench/forged_lines.py's (the security benchmark), so both benches forge alike.

Cases, interleaved per round (docs/benchmarking.md §8), each the unmodified `fab hosts-logged
--booted-log FILE`:

* start-up: on an empty log (the floor every case pays: interpreter, fabric, config);
* read 1M: the whole mixed log, no cursor (first read). Goal ≤ 2 s;
* re-read +0: again, nothing appended: must cost about the start-up;
* re-read +K: after K new lines were appended: must cost what reading those K lines alone costs
  (proportional to the new lines only). Its floor, "fresh K", is a first read of a log holding only
  K lines of the same mix; the full read's per-line cost, times K, is printed too (since a large
  read is cut into parts read on every core, that rate is lower than a small read's);
* junk / forged (distinct names) / forged (declared names): forged_lines.py's logs of
  ``--kind-lines`` lines, each read whole. Goal: forged ≤ 2 × junk, also net of start-up.

Correctness, per run: exit 0, and the summary line counts the lines read and the calls found.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import projectvenv  # noqa: E402

projectvenv.use()

import forged_lines  # noqa: E402  (bench/forged_lines.py: the line makers)
import sidebyside as sbs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOSTS = 100
ENV = "disc"
GOAL_FULL_S = 2.0
GOAL_FORGED = 2.0  # × junk
SUMMARY = re.compile(r"read (\d+) lines of .*: (\d+) calls home")


def images() -> list[str]:
    return [f"d-{i:03d}" for i in range(1, HOSTS + 1)]


def config_text() -> str:
    names = images()
    return "\n".join([
        "# written by bench/discovery_bench.py",
        "environments:",
        f"  {ENV}:",
        "    provider: local",
        f"    images: [{', '.join(names)}]",
        "    roles:",
        f"      loadbalancers: [{names[0]}]",
        f"      workers: [{', '.join(names[1:])}]",
        "    service: hello",
        "    version: v2",
        forged_lines.CONFIG.split("environments:\n", 1)[1].rstrip(),   # the security bench's 'prod'
    ]) + "\n"


def host_address(i: int) -> str:
    return f"10.{200 + i // 250}.0.{1 + i % 250}"


def mixed_line(i: int, now: int, keys: dict[str, str]) -> str:
    """Line ``i`` of the mixed log: 1 in 10 a valid call, 3 in 10 forged, the rest junk."""
    slot = i % 10
    if slot == 0:
        h = (i // 10) % HOSTS
        name, addr = images()[h], host_address(h)
        ts = now + i // 10_000
        return forged_lines.line(addr, forged_lines.call(ENV, name, forged_lines._mac(h), addr, ts, keys[name]),
                                 ts + 0.25)
    if slot in (1, 2, 3):
        addr = forged_lines._addr(i)
        name = images()[i % HOSTS] if slot != 3 else f"forged-{i}"
        return forged_lines.line(addr, forged_lines.call(ENV, name, forged_lines._mac(i), addr, now, "0" * 64), now + 0.5)
    return f"GET /{'x' * (i % 200)} HTTP/1.1 {i}\n"


def write_mixed(path: Path, start: int, count: int, keys: dict[str, str], now: int) -> None:
    with open(path, "a") as fh:
        fh.writelines(mixed_line(i, now, keys) for i in range(start, start + count))


def expected_calls(start: int, count: int) -> int:
    """How many valid calls lines start..start+count-1 of the mixed log hold."""
    return sum(1 for i in range(start, start + count) if i % 10 == 0)


def check_summary(stdout: str, lines: int, calls: int | None) -> tuple[bool, str]:
    found = SUMMARY.search(stdout)
    if not found:
        return False, "no summary line"
    got_lines, got_calls = int(found.group(1)), int(found.group(2))
    if got_lines != lines or (calls is not None and got_calls != calls):
        return False, f"read {got_lines} lines / {got_calls} calls, expected {lines} / {calls}"
    return True, ""


def proportional(full_s: float, full_lines: int, startup_s: float, appended_s: float, appended: int) -> float | None:
    """Measured re-read cost (net of start-up) ÷ what the new lines alone would cost at the full
    read's per-line rate; ≈1 when a re-read reads only the new lines."""
    per_line = (full_s - startup_s) / full_lines if full_lines else 0
    if per_line <= 0 or appended <= 0:
        return None
    return max(appended_s - startup_s, 0.0) / (per_line * appended)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--append", type=int, default=10_000)
    parser.add_argument("--kind-lines", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    start_load = sbs.loadavg()
    work = Path(tempfile.mkdtemp(prefix="booted-discovery-"))
    try:
        state, config = work / "state", work / "environments.yaml"
        config.write_text(config_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTED_") and k != "PYTHONDONTWRITEBYTECODE"}
        env.update(BOOTED_STATE_DIR=str(state), BOOTED_CONFIG=str(config))
        os.environ.update(BOOTED_STATE_DIR=str(state), BOOTED_CONFIG=str(config))
        sys.path.insert(0, str(ROOT))
        from fabfile.hosts import callhome

        keys = {name: callhome.host_key(ENV, name) for name in images()}
        prod_keys = {image: callhome.host_key("prod", image) for image in ("prod-lb1", "prod-web1", "prod-web2")}
        now = int(time.time())
        started = time.perf_counter()
        empty, mixed, fresh = work / "empty.log", work / "mixed.log", work / "fresh.log"
        empty.write_text("")
        write_mixed(mixed, 0, args.lines, keys, now)
        write_mixed(fresh, args.lines, args.append, keys, now)
        kinds = forged_lines.write_logs(work, args.kind_lines, prod_keys.__getitem__)
        print(f"logs written in {time.perf_counter() - started:.1f}s: mixed {args.lines:,} lines "
              f"({mixed.stat().st_size / 2**20:.0f} MiB), {len(kinds)} kinds × {args.kind_lines:,}", flush=True)
        fab = forged_lines.fab_command()
        appended = {"lines": 0}

        def hosts_logged(path: Path, fresh: bool, lines: int, calls: int | None) -> sbs.Outcome:
            if fresh:
                (state / "inventory.json").unlink(missing_ok=True)
                shutil.rmtree(state / "bootlog", ignore_errors=True)
            begin = time.perf_counter()
            proc = subprocess.run([*fab, "hosts-logged", "--booted-log", str(path)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL)
            seconds = time.perf_counter() - begin
            if proc.returncode != 0:
                return sbs.Outcome(seconds, False, f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
            ok, note = check_summary(proc.stdout, lines, calls)
            return sbs.Outcome(seconds, ok, note)

        def reread_plus() -> sbs.Outcome:
            total = args.lines + appended["lines"]
            hosts_logged(mixed, True, total, None)  # untimed: the cursor at the end of the log
            write_mixed(mixed, total, args.append, keys, now)
            appended["lines"] += args.append
            return hosts_logged(mixed, False, args.append, expected_calls(total, args.append))

        cases = {
            "start-up": lambda: hosts_logged(empty, True, 0, 0),
            "read-1M": lambda: hosts_logged(mixed, True, args.lines + appended["lines"], None),
            "re-read+0": lambda: (hosts_logged(mixed, True, args.lines + appended["lines"], None),
                                  hosts_logged(mixed, False, 0, 0))[1],
            "re-read+K": reread_plus,
            "fresh+K": lambda: hosts_logged(fresh, True, args.append, expected_calls(args.lines, args.append)),
            **{k: (lambda p=p: hosts_logged(p, True, args.kind_lines, None)) for k, p in kinds.items() if k != "genuine"},
        }
        samples = sbs.interleave(cases, args.rounds, seed=args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"`fab hosts-logged`: mixed log of {args.lines:,} lines (10% valid from {HOSTS} hosts, 30% forged, 60% junk); "
          f"{args.rounds} rounds + warm-up")
    print(sbs.table(samples, [
        ("start-up", "start-up: empty log (floor)"),
        ("read-1M", f"whole mixed log, {args.lines:,} lines"),
        ("re-read+0", "re-read, nothing new"),
        ("re-read+K", f"re-read after {args.append:,} new lines"),
        ("fresh+K", f"first read of a log of those {args.append:,} lines alone"),
        ("junk", f"junk, {args.kind_lines:,} lines"),
        ("forged, distinct names", f"forged (distinct names), {args.kind_lines:,}"),
        ("forged, declared names", f"forged (declared names), {args.kind_lines:,}"),
    ], floor="start-up"))
    med = {c: sbs.cell(samples, c)["median_s"] for c in
           ("start-up", "read-1M", "re-read+0", "re-read+K", "fresh+K", "junk", "forged, distinct names", "forged, declared names")}
    print(sbs.verdict(f"hosts-logged on {args.lines:,} lines", med["read-1M"], GOAL_FULL_S, " s"))
    if None not in (med["read-1M"], med["start-up"], med["re-read+K"]):
        ratio = proportional(med["read-1M"], args.lines, med["start-up"], med["re-read+K"], args.append)
        expected = (med["read-1M"] - med["start-up"]) / args.lines * args.append
        print(f"re-read after {args.append:,} new lines: {max(med['re-read+K'] - med['start-up'], 0):.3f} s over "
              f"start-up; the full read's per-line cost predicts {expected:.3f} s (ratio {sbs.fmt(ratio, 2)}; "
              "≤ ~1: only the new lines are read)")
    print(sbs.verdict(f"re-read after {args.append:,} new lines ÷ a first read of them alone (paired)",
                      sbs.paired_ratio(samples, "re-read+K", "fresh+K"), 1.2, "×"))
    for kind in ("forged, distinct names", "forged, declared names"):
        raw = sbs.paired_ratio(samples, kind, "junk")
        print(sbs.verdict(f"{kind} ÷ junk (paired)", raw, GOAL_FORGED, "×"))
        if None not in (med[kind], med["junk"], med["start-up"]) and med["junk"] > med["start-up"]:
            net = (med[kind] - med["start-up"]) / (med["junk"] - med["start-up"])
            print(f"  net of start-up: {net:.2f}×")
    print(f"conditions: {sbs.conditions(start_load)}")
    return 0 if all(s.ok for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
