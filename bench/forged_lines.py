"""What wrongly signed call-home lines cost `fab hosts-logged`, next to junk lines (issue 14, item 8).

Anyone who can reach booted's nginx can put lines in the booted log. Lines that look exactly like a
call home but carry a wrong signature must cost about what junk costs, or a flood of them stalls
every task that reads the log. This writes four logs of N lines each (default 100,000) into a
private state dir and times the unmodified `fab hosts-logged --booted-log FILE` on each:

* junk: lines that are not call homes at all (the floor);
* forged, distinct names: well-formed calls, each naming a different image no environment has;
* forged, declared names: well-formed calls for the environment's own images, wrongly signed;
* genuine: correctly signed calls (for scale: these are recorded in the inventory).

Run from the repo root (nothing else is needed; no root, no network):

    python3 bench/forged_lines.py [--lines 100000] [--repeat 3]

It prints one row per kind: lines, best wall time of ``--repeat`` runs, lines per second and the
ratio to junk; the floor for both forged kinds is 2.0x junk.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = """\
environments:
  prod:
    provider: virtualbox
    images: [prod-lb1, prod-web1, prod-web2]
    roles: {loadbalancers: [prod-lb1], workers: [prod-web1, prod-web2]}
    service: hello
    version: v1
"""
FLOOR = 2.0


def fab_command() -> list[str]:
    """`fab` from the venv this runs in, or the project's .venv, or PATH."""
    for candidate in (Path(sys.executable).with_name("fab"), REPO / ".venv" / "bin" / "fab"):
        if candidate.exists():
            return [str(candidate)]
    found = shutil.which("fab")
    if not found:
        sys.exit("fab not found: run ./quickstart.sh first, or activate the project's .venv")
    return [found]


def line(addr: str, query: dict[str, str], msec: float) -> str:
    return f'booted1 {addr} {msec:.3f} "{urllib.parse.urlencode(query)}"\n'


def call(env: str, name: str, mac: str, addr: str, ts: int, key: str) -> dict[str, str]:
    message = "|".join([env, name, mac, addr, str(ts)]).encode()
    sig = hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
    return {"env": env, "name": name, "mac": mac, "addr": addr, "ts": str(ts), "sig": sig}


def write_logs(folder: Path, lines: int, host_key) -> dict[str, Path]:
    now = int(time.time())
    logs = {}
    kinds = {
        "junk": lambda i: f"GET /{'x' * (i % 200)} HTTP/1.1 {i}\n",
        "forged, distinct names": lambda i: line(
            _addr(i), call("prod", f"forged-{i}", _mac(i), _addr(i), now, "0" * 64), now + 0.5),
        "forged, declared names": lambda i: line(
            _addr(i), call("prod", ("prod-lb1", "prod-web1", "prod-web2")[i % 3], _mac(i), _addr(i), now, "0" * 64),
            now + 0.5),
        "genuine": lambda i: line(
            _addr(i), call("prod", ("prod-lb1", "prod-web1", "prod-web2")[i % 3], _mac(i), _addr(i), now + i // 1000,
                           host_key(("prod-lb1", "prod-web1", "prod-web2")[i % 3])), now + i // 1000 + 0.5),
    }
    for kind, make in kinds.items():
        path = folder / (kind.replace(", ", "-").replace(" ", "-") + ".log")
        with open(path, "w") as fh:
            fh.writelines(make(i) for i in range(lines))
        logs[kind] = path
    return logs


def _addr(i: int) -> str:
    return f"10.{99 + i // 65536 % 100}.{i // 256 % 256}.{1 + i % 250}"


def _mac(i: int) -> str:
    return "02:" + ":".join(f"{(i >> s) & 0xff:02x}" for s in (32, 24, 16, 8, 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="booted-forged-"))
    try:
        state = work / "state"
        config = work / "environments.yaml"
        config.write_text(CONFIG)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTED_")}
        env.update(BOOTED_STATE_DIR=str(state), BOOTED_CONFIG=str(config), PYTHONDONTWRITEBYTECODE="1")
        sys.path.insert(0, str(REPO))
        os.environ.update(BOOTED_STATE_DIR=str(state), BOOTED_CONFIG=str(config))
        from fabfile.hosts import callhome

        keys = {image: callhome.host_key("prod", image) for image in ("prod-lb1", "prod-web1", "prod-web2")}
        logs = write_logs(work, args.lines, keys.__getitem__)
        fab = fab_command()
        results = {}
        for kind, path in logs.items():
            best = None
            for _ in range(args.repeat):
                (state / "inventory.json").unlink(missing_ok=True)
                shutil.rmtree(state / "bootlog", ignore_errors=True)  # read each log whole, every run
                started = time.perf_counter()
                done = subprocess.run([*fab, "hosts-logged", "--booted-log", str(path)], cwd=REPO, env=env,
                                      capture_output=True, text=True, stdin=subprocess.DEVNULL)
                elapsed = time.perf_counter() - started
                if done.returncode != 0:
                    print(f"fab hosts-logged failed on the {kind} log: {done.stderr.strip()}", file=sys.stderr)
                    return 1
                best = elapsed if best is None else min(best, elapsed)
            results[kind] = (best, done.stdout.strip().splitlines()[0])
        junk = results["junk"][0]
        print(f"fab hosts-logged on {args.lines:,} lines of each kind (best of {args.repeat}; floor: forged <= "
              f"{FLOOR:.1f}x junk)")
        print(f"{'kind':<24} {'seconds':>8} {'lines/s':>10} {'x junk':>7}  verdict")
        worst = 0.0
        for kind, (seconds, _) in results.items():
            ratio = seconds / junk
            verdict = "-" if kind in ("junk", "genuine") else ("ok" if ratio <= FLOOR else "TOO SLOW")
            if kind.startswith("forged"):
                worst = max(worst, ratio)
            print(f"{kind:<24} {seconds:>8.2f} {args.lines / seconds:>10,.0f} {ratio:>7.2f}  {verdict}")
        for kind, (_, summary) in results.items():
            print(f"  {kind}: {summary}")
        return 0 if worst <= FLOOR else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
