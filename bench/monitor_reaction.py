"""Monitor reaction: from a latency breach through the load balancer to a new worker serving (issue 18, item 5).

    python3 bench/monitor_reaction.py

Needs root and local hosts (tests/lab.py's lab: own state dir, config, bridge, subnet, nginx port;
``BOOTED_IMAGE_CACHE`` reuses a cached base image). One environment ``mr``: a load balancer and up
to three workers (min 1), monitor settings below. The run, printed as a timeline:

1. `fab env-start-min --env mr` (load balancer + mr-w1), untimed.
2. **One worker's bring-up, measured in this run**: `fab env-start-worker --image mr-w3` on a
   fresh image (built, booted, deployed, put behind the load balancer), then it is stopped and
   deleted again. This is the "bring-up of one worker" of the goal.
3. `fab monitor --env mr` in the background; once it holds at the minimum, a steady client load
   through the load balancer starts and mr-w1's hello is slowed (its delay file, 250 ms > the
   150 ms high mark).
4. **Breach**: the first request through the load balancer slower than the high mark (the moment
   its latency passed the mark). **Serving**: the first request the load balancer's own log shows
   it sent to the worker the monitor started (read from the load balancer's overlay: no SSH).
   Goal: serving − breach ≤ up_samples × interval_s + one worker's bring-up + 2 s.
5. The load stops and the delay goes; **scale-down** must come only after ``down_window_s`` of
   good samples: the monitor's "down" decision must be ≥ down_window_s after the load stopped.

Everything the run starts is stopped at the end (monitor: SIGTERM; lab: tests/lab.py's teardown).
"""
from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import projectvenv  # noqa: E402

projectvenv.use()

import sidebyside as sbs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from lab import Lab, can_run_local_hosts, free_port, free_subnet  # noqa: E402  (tests/lab.py)

ENV = "mr"
LB, WORKERS = "mr-lb", ("mr-w1", "mr-w2", "mr-w3")
HIGH_MS, LOW_MS = 150, 60
INTERVAL_S, UP_SAMPLES, DOWN_WINDOW_S = 2, 2, 10
DELAY_MS = 250
DELAY_FILE = "/opt/booted/hello/shared/delay_ms"
LB_LOG = "var/log/nginx/booted-lb.log"   # inside the load balancer's overlay
LB_PORT = 8080


def lab_config(port: int, bridge: str, subnet: str) -> str:
    return f"""\
# written by bench/monitor_reaction.py
settings:
  nginx: {{port: {port}}}
providers:
  local: {{bridge: {bridge}, subnet: {subnet}, boot_timeout_s: 120, stop_timeout_s: 20}}
environments:
  {ENV}:
    provider: local
    images: [{LB}, {', '.join(WORKERS)}]
    roles:
      loadbalancers: [{LB}]
      workers: [{', '.join(WORKERS)}]
    service: hello
    version: v2
    workers: {{min: 1, max: 3}}
    lb_port: {LB_PORT}
    monitor:
      latency_high_ms: {HIGH_MS}
      latency_low_ms: {LOW_MS}
      interval_s: {INTERVAL_S}
      probes: 6
      up_samples: {UP_SAMPLES}
      down_window_s: {DOWN_WINDOW_S}
      up_cooldown_s: 2
      down_cooldown_s: 4
      health_failures: 2
      warmup_timeout_s: 120
"""


def reaction_goal(up_samples: int, interval_s: float, bringup_s: float) -> float:
    return up_samples * interval_s + bringup_s + 2.0


def first_breach(requests: list[tuple[float, float, int]], high_ms: float, after: float) -> float | None:
    """When the first request started after ``after`` passed ``high_ms`` (its start + the mark)."""
    for start, seconds, _status in sorted(requests):
        if start >= after and seconds * 1000 > high_ms:
            return start + high_ms / 1000
    return None


_ISO = re.compile(r"\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)([+-]\d\d:\d\d)\]")


def first_hit(log_text: str, address: str) -> float | None:
    """Epoch second of the first load-balancer log line that sent a request to ``address``:9999."""
    import datetime

    for line in log_text.splitlines():
        if re.search(r"upstream=(\S+, )*" + re.escape(address) + r":9999\b", line):
            found = _ISO.search(line)
            if found:
                return datetime.datetime.fromisoformat(found.group(1) + found.group(2)).timestamp()
    return None


class Load(threading.Thread):
    """Steady, bounded requests through the load balancer; records (start, seconds, status)."""

    def __init__(self, address: str, port: int, seconds: float = 400):
        super().__init__(daemon=True)
        self.address, self.port, self.seconds = address, port, seconds
        self.requests: list[tuple[float, float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self.halt.is_set() and time.monotonic() < deadline:
            start = time.time()
            try:
                conn = http.client.HTTPConnection(self.address, self.port, timeout=5)
                conn.request("GET", "/")
                status = conn.getresponse().status
                conn.close()
            except OSError:
                status = 0
            self.requests.append((start, time.time() - start, status))
            self.halt.wait(0.02)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


class Timeline:
    def __init__(self):
        self.t0 = time.time()
        self.events: list[tuple[float, str]] = []

    def add(self, what: str, at: float | None = None) -> float:
        at = time.time() if at is None else at
        self.events.append((at, what))
        print(f"  {at - self.t0:8.2f} s  {what}", flush=True)
        return at

    def render(self) -> str:
        return "\n".join(f"  {at - self.t0:8.2f} s  {what}" for at, what in sorted(self.events))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-lab", action="store_true")
    parser.parse_args()
    reason = can_run_local_hosts()
    if reason:
        raise SystemExit(f"monitor_reaction: cannot run local hosts here: {reason}")
    start_load = sbs.loadavg()
    root = Path(tempfile.mkdtemp(prefix="booted-monitor-"))
    lab = Lab(root=root, bridge=f"bbmr{os.getpid() % 100000:05d}", subnet=free_subnet(), port=free_port(),
              config_path=root / "environments.yaml")
    lab.config_path.write_text(lab_config(lab.port, lab.bridge, lab.subnet))
    if os.environ.get("BOOTED_IMAGE_CACHE"):
        lab.extra_env["BOOTED_IMAGE_CACHE"] = os.environ["BOOTED_IMAGE_CACHE"]
    env = lab.env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    tl = Timeline()
    monitor = load = None
    result = {}

    def fab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run(["fab", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"fab {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc

    def wait_for(check, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if monitor is not None and monitor.poll() is not None:
                raise RuntimeError(f"the monitor exited ({monitor.returncode}): {out_path.read_text()[-800:]}")
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")

    def stop_and_delete(image: str) -> None:
        with lab.activated():
            from fabfile.flows import environment
            from fabfile.providers import get_provider

            cfg = lab.config()
            environment.stop_image(cfg, cfg.env(ENV), image)
            get_provider("local", cfg).delete(image)

    def monitor_lines() -> list[str]:
        return [line for line in out_path.read_text(errors="replace").splitlines() if f" {ENV} " in line]

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    out_path = root / "monitor.out"
    try:
        print(f"lab: {root} (bridge {lab.bridge}, subnet {lab.subnet})", flush=True)
        fab("restart-nginx")
        fab("env-start-min", "--env", ENV, timeout=900)
        tl.add("environment up at its minimum (mr-lb, mr-w1)")
        began = time.time()
        fab("env-start-worker", "--image", "mr-w3")
        bringup_s = time.time() - began
        tl.add(f"one worker's bring-up (env-start-worker mr-w3, fresh image): {bringup_s:.1f} s")
        stop_and_delete("mr-w3")
        lb_addr = lab.host_address(LB)
        lb_log = root / "state" / "local" / "hosts" / LB / "upper" / LB_LOG

        with open(out_path, "wb") as fh:
            monitor = subprocess.Popen(["fab", "monitor", "--env", ENV], cwd=ROOT, env=env, stdout=fh,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: any(" hold: " in line for line in monitor_lines()), 60, "the monitor's first decision")
        tl.add("monitor running, holding at the minimum")
        load = Load(lb_addr, LB_PORT)
        load.start()
        time.sleep(2)
        result["delay_at"] = tl.add(f"load running; mr-w1 slowed to {DELAY_MS} ms (high mark {HIGH_MS} ms)")
        lab.ssh("mr-w1", "sudo", "sh", "-c", 'printf "%s\\n" "$1" > "$2"', "set-delay", str(DELAY_MS), DELAY_FILE)
        breach = wait_for(lambda: first_breach(load.requests, HIGH_MS, result["delay_at"]), 30, "a slow request")
        result["breach"] = tl.add("breach: first request through the load balancer over the high mark", breach)
        up_line = wait_for(lambda: next((line for line in monitor_lines() if f" {ENV} up " in line), None), 120,
                           "the monitor's up decision")
        tl.add(f"monitor: {up_line.split(f' {ENV} ', 1)[1][:100]}")
        new = re.search(r" up (mr-w\d)", up_line).group(1)
        new_addr = wait_for(lambda: lab.inventory().get(new, {}).get("address"), 300, f"{new} in the inventory")
        tl.add(f"{new} called home ({new_addr})")
        stamped = wait_for(lambda: first_hit(lb_log.read_text(errors="replace") if lb_log.exists() else "", new_addr),
                           300, f"the load balancer to send a request to {new}")
        # nginx stamps whole seconds; the figure uses when the harness saw the line (polled every 0.1 s),
        # an upper bound
        result["served"] = tl.add(f"serving: the load balancer's log shows its first request to {new} "
                                  f"(stamped {stamped - tl.t0:.0f} s)")
        done = wait_for(lambda: next((line for line in monitor_lines() if f"done: started {new}" in line), None), 60,
                        "the monitor's done line")
        tl.add(f"monitor: {done.split(f' {ENV} ', 1)[1][:100]}")
        time.sleep(3)
        load.stop()
        lab.ssh("mr-w1", "sudo", "rm", "-f", DELAY_FILE)
        result["quiet_at"] = tl.add("load stopped, delay removed")
        down_line = wait_for(lambda: next((line for line in monitor_lines() if f" {ENV} down " in line), None),
                             DOWN_WINDOW_S + 120, "the monitor's down decision")
        result["down"] = tl.add(f"monitor: {down_line.split(f' {ENV} ', 1)[1][:110]}")
        result["bringup"] = bringup_s
        ok_requests = sum(1 for r in load.requests if r[2] == 200)
        result["requests"] = (ok_requests, len(load.requests))
    except KeyboardInterrupt:
        print("monitor_reaction: interrupted; tearing the lab down", file=sys.stderr)
    except RuntimeError as err:
        print(f"monitor_reaction: {err}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if load is not None:
            load.stop()
        if monitor is not None and monitor.poll() is None:
            monitor.send_signal(signal.SIGTERM)
            try:
                monitor.wait(timeout=60)
            except subprocess.TimeoutExpired:
                monitor.kill()
                monitor.wait()
        left = lab.teardown()
        if left:
            print(f"monitor_reaction: WARNING left running: {left[:5]}", file=sys.stderr)
        elif not _keep(sys.argv):
            shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    print()
    print(f"Monitor reaction (interval_s {INTERVAL_S}, up_samples {UP_SAMPLES}, high {HIGH_MS} ms, "
          f"down_window_s {DOWN_WINDOW_S}); timeline:")
    print(tl.render())
    if not {"breach", "served", "down", "quiet_at", "bringup"} <= set(result):
        print("monitor_reaction: the run did not complete; no figures")
        return 1
    reaction = result["served"] - result["breach"]
    goal = reaction_goal(UP_SAMPLES, INTERVAL_S, result["bringup"])
    print(sbs.verdict("breach → new worker serving through the load balancer", reaction, goal, " s"))
    print(f"  = {UP_SAMPLES} × {INTERVAL_S} s + one worker's bring-up {result['bringup']:.1f} s + 2 s")
    after = result["down"] - result["quiet_at"]
    print(f"scale-down {after:.1f} s after the load stopped (window {DOWN_WINDOW_S} s): "
          f"{'MET' if after >= DOWN_WINDOW_S else 'NOT MET (too early)'}")
    print(f"requests through the load balancer during the drill: {result['requests'][0]} of {result['requests'][1]} ok")
    print(f"conditions: {sbs.conditions(start_load)}")
    return 0 if reaction <= goal and after >= DOWN_WINDOW_S else 1


def _keep(argv: list[str]) -> bool:
    return "--keep-lab" in argv


if __name__ == "__main__":
    sys.exit(main())
