"""`fab monitor` for real, on the local-host lab (tests/lab.py): slow workers make it add workers that
take traffic, fast ones make it go back to the minimum, a dead service gets its worker replaced, and
SIGTERM stops it cleanly. The lab's monitor settings tick every second (environments.yaml in lab.py)."""
from __future__ import annotations

import http.client
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from lab import ROOT, Lab

pytestmark = pytest.mark.local

LB_LOG = "/var/log/nginx/booted-lb.log"
DELAY_FILE = "/opt/booted/hello/shared/delay_ms"
WORKERS = ("lab-w1", "lab-w2", "lab-w3")


# ---------------------------------------------------------------------------- helpers
def running(lab: Lab, image: str) -> bool:
    """Does the image's container run? Read from /proc, independently of booted's code."""
    try:
        pid = int((lab.state / "local" / "hosts" / image / "nspawn.pid").read_text())
        return b"systemd-nspawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def running_workers(lab: Lab) -> set[str]:
    return {w for w in WORKERS if running(lab, w)}


def get(address: str, port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def answers(address: str, port: int, path: str) -> bool:
    try:
        return get(address, port, path, timeout=2)[0] == 200
    except OSError:
        return False


def set_delay(lab: Lab, image: str, ms: int | None) -> None:
    if ms is None:
        result = lab.ssh(image, "sudo", "rm", "-f", DELAY_FILE)
    else:  # the value and path reach the remote shell as arguments, never inside the script
        result = lab.ssh(image, "sudo", "sh", "-c", 'printf "%s\\n" "$1" > "$2"', "set-delay", str(ms), DELAY_FILE)
    assert result.returncode == 0, result


def lb_hits(lab: Lab, address: str) -> int:
    """Requests the load balancer's log shows it sent to ``address``:9999 (first try or retry)."""
    pattern = r"upstream=([0-9.]+:[0-9]+, )*" + re.escape(address) + r":9999\b"
    result = lab.ssh("lab-lb", "sudo", "grep", "-c", "-E", pattern, LB_LOG)
    return int(result.stdout.strip() or 0)


class Load(threading.Thread):
    """Light, bounded client load through the load balancer: stops after ``seconds`` or ``requests``."""

    def __init__(self, address: str, port: int, seconds: float = 120, requests: int = 1500):
        super().__init__(daemon=True)
        self.address, self.port, self.seconds, self.requests = address, port, seconds, requests
        self.statuses: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._halt.is_set() and time.monotonic() < deadline and len(self.statuses) < self.requests:
            try:
                self.statuses.append(get(self.address, self.port, "/", timeout=5)[0])
            except OSError:
                self.statuses.append(0)
            self._halt.wait(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


class MonitorProcess:
    def __init__(self, lab: Lab, out: Path):
        self.lab, self.out = lab, out
        with open(out, "wb") as fh:
            self.proc = subprocess.Popen(["fab", "monitor", "--env", "lab"], cwd=ROOT, env=lab.env(), stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, check, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            assert self.proc.poll() is None, f"the monitor exited ({self.proc.returncode}):\n{self.output[-4000:]}"
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; monitor output:\n{self.output[-4000:]}")

    def wait_idle_at_minimum(self, timeout: float = 60) -> None:
        """The monitor holds at one worker with no bad sample in its streak: with up_samples 2 its next
        tick cannot start a step, so a signal sent now does not land in the middle of one."""
        def idle() -> bool:
            lines = [line for line in self.output.splitlines() if " lab " in line]
            return (running_workers(self.lab) == {"lab-w1"} and bool(lines) and " lab hold: " in lines[-1]
                    and "[ready 1, pending 0]" in lines[-1] and " over " not in lines[-1])

        self.wait_for(idle, timeout, "the monitor to hold at the minimum (lab-w1 only)")

    def terminate(self) -> tuple[int, float]:
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        return code, time.monotonic() - start

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def monitor(lab: Lab, out: Path):
    mon = MonitorProcess(lab, out)
    try:
        yield mon
    finally:
        mon.cleanup()


def monitor_log(lab: Lab, since: int = 0) -> str:
    """The monitor's log file (from byte ``since``: what this test's monitor wrote)."""
    path = lab.state / "monitor" / "lab.log"
    return path.read_bytes()[since:].decode() if path.exists() else ""


def log_size(lab: Lab) -> int:
    path = lab.state / "monitor" / "lab.log"
    return path.stat().st_size if path.exists() else 0


@pytest.fixture(scope="module")
def lab_at_minimum(lab: Lab) -> Lab:
    """The lab environment up with its load balancer and one worker (min is 1)."""
    result = lab.fab("env-start-min", "--env", "lab", timeout=300)
    assert result.ok, result
    extra = running_workers(lab) - {"lab-w1"}
    if extra:  # left by another test module of this session
        with lab.activated():
            from fabfile.flows import environment

            cfg = lab.config()
            for image in sorted(extra):
                environment.stop_image(cfg, cfg.env("lab"), image)
    assert running_workers(lab) == {"lab-w1"}
    return lab


# ---------------------------------------------------------------------------- tests
def test_slow_workers_get_help_and_the_monitor_returns_to_the_minimum(lab_at_minimum: Lab, tmp_path):
    lab = lab_at_minimum
    lb = lab.host_address("lab-lb")
    since = log_size(lab)
    once = lab.fab("monitor", "--env", "lab", "--once", timeout=60)
    assert once.ok, once
    decisions = [line for line in once.stdout.splitlines() if " lab " in line]
    assert len(decisions) == 1 and re.search(r" lab hold: p95 \d+ms, errors 0% of 6: ", decisions[0]), once

    set_delay(lab, "lab-w1", 200)  # p95 ~200 ms > 150 ms (and < 300 ms: one worker a step)
    load = Load(lb, 8080)
    try:
        load.start()
        with monitor(lab, tmp_path / "monitor.out") as mon:
            mon.wait_for(lambda: "lab-w2" in running_workers(lab) and "done: started lab-w2" in mon.output, 90,
                         "the monitor to start lab-w2")
            new = lab.host_address("lab-w2")
            assert answers(new, 9999, "/healthz")
            mon.wait_for(lambda: lb_hits(lab, new) > 0, 30, f"the load balancer to send requests to lab-w2 ({new})")
            load.stop()
            set_delay(lab, "lab-w1", None)
            mon.wait_idle_at_minimum(90)
            code, took = mon.terminate()
            assert code == 0, mon.output[-3000:]
            assert took < 5, f"SIGTERM took {took:.1f}s"
    finally:
        load.stop()
        set_delay(lab, "lab-w1", None)

    assert load.statuses and load.statuses.count(200) / len(load.statuses) > 0.9, load.statuses
    log = monitor_log(lab, since)
    assert decisions[0] in log  # --once logs its decision too
    assert re.search(r"^\S+ lab up lab-w2(,lab-w3)?: p95 \d+ms, errors \d+% of 6: p95 over 150ms for \d+ samples",
                     log, re.M), log
    assert re.search(r"^\S+ lab event: lab-w2 passed its health check", log, re.M), log
    assert re.search(r"^\S+ lab down lab-w[23]: p95 \d+ms, errors 0% of 6: good for \d+s \(window 4s\)", log,
                     re.M), log
    assert re.search(r"^\S+ lab stopped \(SIGTERM\) cleanly$", log, re.M), log
    assert running_workers(lab) == {"lab-w1"}
    inventory_workers = {i for i, e in lab.inventory().items() if "workers" in e["roles"]}
    assert inventory_workers == {"lab-w1"}


def test_a_worker_whose_service_died_is_replaced(lab_at_minimum: Lab, tmp_path):
    lab = lab_at_minimum
    w1 = lab.host_address("lab-w1")
    lb = lab.host_address("lab-lb")
    assert running_workers(lab) == {"lab-w1"} and answers(w1, 9999, "/healthz")
    since = log_size(lab)
    with monitor(lab, tmp_path / "monitor.out") as mon:
        mon.wait_idle_at_minimum(30)
        # one monitor per environment: a second one is refused, naming this one's pid
        second = lab.fab("monitor", "--env", "lab", timeout=60)
        assert second.returncode == 1 and second.stderr.strip().startswith(
            f"error: a monitor for environment lab is already running (pid {mon.proc.pid})"), second

        result = lab.ssh("lab-w1", "sudo", "systemctl", "stop", "booted-hello")
        assert result.returncode == 0, result
        assert not answers(w1, 9999, "/healthz")  # the service is really down
        mon.wait_for(lambda: "done: replaced lab-w1" in mon.output, 90, "the monitor to replace lab-w1")
        mon.wait_for(lambda: answers(w1, 9999, "/healthz"), 30, "lab-w1's service to answer again")
        mon.wait_for(lambda: answers(lb, 8080, "/"), 30, "the load balancer to answer through lab-w1")
        assert get(lb, 8080, "/")[1].strip() == "Hello World!"
        mon.wait_idle_at_minimum(60)
        code, took = mon.terminate()
        assert code == 0 and took < 5, (code, took, mon.output[-3000:])

    log = monitor_log(lab, since)
    assert re.search(r"^\S+ lab replace lab-w1: lab-w1 failed its health check 2 times in a row", log, re.M), log
    assert re.search(r"^\S+ lab event: lab-w1 passed its health check", log, re.M), log
    assert re.search(r"^\S+ lab stopped \(SIGTERM\) cleanly$", log, re.M), log
