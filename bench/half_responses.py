#!/usr/bin/env python3
"""Workers killed mid-response: what a client sees through booted's load balancer (issue 13).

    python3 bench/half_responses.py                 # about 2 minutes; no root needed
    python3 bench/half_responses.py --runs 3 --seconds 30

On loopback: nginx with booted's own load-balancer config (rendered by fabfile/balancing) in front
of three hello services; under wrk (64 connections) one of them is SIGKILLed and started again
every 0.2 s, so a kill often lands while that worker is answering. Printed side by side, per run:
hello as shipped (each response leaves in one write) and the peer, the same hello with the
stdlib's unbuffered writer (headers and body in two writes, as before the fix). A kill between the
two writes leaves nginx holding headers it has already passed on, and it can only cut the client's
connection: wrk counts a read error, nginx logs `upstream prematurely closed connection while
reading upstream`. Everything started here is stopped at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT), str(ROOT / "tests")]

import projectvenv  # noqa: E402

projectvenv.use()

import wrkload  # noqa: E402  (tests/wrkload.py)

from fabfile.balancing import loadbalancer  # noqa: E402
from fabfile.core.output import table  # noqa: E402

HELLO = ROOT / "service" / "hello"
# The peer: the same service with the unbuffered writer it had before (two writes per response).
TWO_WRITES = "import app, sys; app.HelloHandler.wbufsize = 0; sys.exit(app.main(sys.argv[1:]))"
ONE_WRITE = "import app, sys; sys.exit(app.main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"half_responses: nothing listens on 127.0.0.1:{port} after {timeout_s:g}s")


class Lab:
    """nginx (booted's LB config) + three hello processes on loopback, in a temporary directory."""

    def __init__(self, program: str, workdir: Path):
        self.program, self.dir = program, workdir
        self.ports = [free_port() for _ in range(3)]
        self.lb_port = free_port()
        self.hellos: dict[int, subprocess.Popen] = {}
        self.nginx_conf = workdir / "nginx.conf"
        self.error_log = workdir / "error.log"

    def start_hello(self, port: int) -> None:
        self.hellos[port] = subprocess.Popen(
            [sys.executable, "-c", self.program, "--port", str(port), "--bind", "127.0.0.1"],
            cwd=HELLO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> Lab:
        env = SimpleNamespace(name="bench", lb_port=self.lb_port)
        conf, _ = loadbalancer.render(env, [loadbalancer.Upstream("127.0.0.1", p) for p in self.ports])
        conf = conf.replace("/var/log/nginx/booted-lb.log", str(self.dir / "access.log"))
        self.nginx_conf.write_text(
            f"worker_processes 2;\npid {self.dir / 'nginx.pid'};\nerror_log {self.error_log};\n"
            f"events {{ worker_connections 4096; }}\nhttp {{\n{conf}\n}}\n")
        for port in self.ports:
            self.start_hello(port)
        for port in self.ports:
            wait_listening(port)
        subprocess.run(["nginx", "-c", str(self.nginx_conf)], check=True, stdin=subprocess.DEVNULL)
        wait_listening(self.lb_port)
        return self

    def kill_and_restart(self, port: int) -> None:
        proc = self.hellos[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.start_hello(port)

    def __exit__(self, *exc) -> None:
        subprocess.run(["nginx", "-c", str(self.nginx_conf), "-s", "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for proc in self.hellos.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        pid_file = self.dir / "nginx.pid"
        for _ in range(50):
            if not pid_file.exists():
                break
            time.sleep(0.1)


def drill(program: str, seconds: float, every_s: float) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="booted-half-") as tmp:
        os.chmod(tmp, 0o755)  # nginx's workers (user nobody when run as root) write nothing here
        with Lab(program, Path(tmp)) as lab:
            kills = 0
            with wrkload.WrkRun(f"http://127.0.0.1:{lab.lb_port}/", connections=64, seconds=seconds) as wrk:
                time.sleep(1)
                end = time.monotonic() + seconds - 2
                while time.monotonic() < end:
                    lab.kill_and_restart(lab.ports[0])
                    kills += 1
                    time.sleep(every_s)
                report = wrk.wait()
        errors = lab.error_log.read_text(errors="replace") if lab.error_log.exists() else ""
    cut = len(re.findall(r"prematurely closed connection while reading upstream", errors))
    return [f"{report.requests:,}", str(kills), str(report.non_2xx), str(report.socket_errors), str(cut)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--every", type=float, default=0.2, help="seconds between kills")
    args = parser.parse_args()
    reason = wrkload.available()
    if reason or not shutil.which("nginx"):
        print(f"half_responses: {reason or 'nginx is not installed'}", file=sys.stderr)
        return 2
    rows = []
    for run in range(1, args.runs + 1):
        for name, program in (("hello, one write (shipped)", ONE_WRITE), ("peer: two writes (before)", TWO_WRITES)):
            rows.append([str(run), name, *drill(program, args.seconds, args.every)])
            print(f"  run {run}: {name}: done", file=sys.stderr, flush=True)
    print(f"wrk -t2 -c64 -d{args.seconds:g}s through booted's LB config, one of 3 hello killed every "
          f"{args.every:g}s; load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(table(["run", "hello", "requests", "kills", "non-2xx", "socket errors", "cut mid-response (nginx)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
