"""The monitor daemon (fabfile/flows/monitor.py) without real hosts: probes against a local HTTP server,
the log, the state file, the one-monitor lock, and the loop's signal handling with a fake environment."""
from __future__ import annotations

import dataclasses
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fabfile.core.config import Environment, MonitorSettings
from fabfile.core.errors import BootedError
from fabfile.flows import monitor as monitord
from fabfile.scaling.policy import Observation, Sample

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTED_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


# ---------------------------------------------------------------------------- probes
class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):
        delay, status = self.routes.get(self.path, (0.0, 404))
        time.sleep(delay)
        body = b"x\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    routes = {}
    handler = type("H", (_Handler,), {"routes": routes})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], routes
    finally:
        httpd.shutdown()
        httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_measure_reports_p95_and_error_rate(server):
    port, routes = server
    routes["/"] = (0.12, 200)
    sample, why = monitord.measure([("127.0.0.1", port)], 4, 2.0)
    assert why == "" and sample.probes == 4 and sample.error_rate == 0
    assert 120 <= sample.p95_ms < 1500
    routes["/"] = (0.0, 502)
    sample, _ = monitord.measure([("127.0.0.1", port)], 4, 2.0)
    assert sample.error_rate == 1.0 and sample.p95_ms < 120


def test_an_answer_too_slow_is_an_error_at_the_timeout(server):
    port, routes = server
    routes["/"] = (3.0, 200)
    sample, _ = monitord.measure([("127.0.0.1", port)], 2, 0.3)
    assert sample.error_rate == 1.0 and 300 <= sample.p95_ms < 2500  # gave up at the timeout, not the answer


def test_a_load_balancer_that_does_not_answer_is_no_data(server):
    port, routes = server
    routes["/"] = (0.0, 200)
    sample, why = monitord.measure([("127.0.0.1", closed_port())], 3, 0.5)
    assert sample is None and "not answering" in why and "connect" in why
    # with two load balancers, one down: the probes that reached the other one count
    sample, _ = monitord.measure([("127.0.0.1", closed_port()), ("127.0.0.1", port)], 4, 0.5)
    assert sample.probes == 2 and sample.error_rate == 0
    assert monitord.measure([], 3, 0.5) == (None, "no load balancer in the inventory")


def test_health_check(server):
    port, routes = server
    routes["/healthz"] = (0.0, 200)
    assert monitord.check_health("127.0.0.1", port, "/healthz", 1.0)
    routes["/healthz"] = (0.0, 503)
    assert not monitord.check_health("127.0.0.1", port, "/healthz", 1.0)
    assert not monitord.check_health("127.0.0.1", closed_port(), "/healthz", 1.0)


# ---------------------------------------------------------------------------- log, state, lock
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4} lab writer(\d) line (\d+) " + "x" * 200 + "$")


def test_log_lines_from_concurrent_writers_stay_whole(tmp_path):
    path = tmp_path / "lab.log"
    logs = [monitord.MonitorLog("lab", path, echo=lambda line: None) for _ in range(4)]

    def write(n):
        for i in range(300):
            logs[n].write(f"writer{n} line {i} " + "x" * 200)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1200
    assert all(LINE.match(line) for line in lines)
    for n in range(4):  # each writer's lines in its own order
        assert [int(m.group(2)) for m in map(LINE.match, lines) if m.group(1) == str(n)] == list(range(300))


def test_state_store_round_trip_drops_undeclared_workers_and_refuses_a_broken_file(state_dir):
    store = monitord.StateStore("lab", ["w1", "w2"])
    assert store.load() == monitord.PolicyState()
    st = monitord.PolicyState(started={"w2": 3.0, "gone": 1.0}, last_up=3.0)
    store.save(st, 4.0)
    doc = json.loads(store.path.read_text())
    assert doc["env"] == "lab" and doc["policy"]["started"] == {"w2": 3.0, "gone": 1.0}
    loaded = store.load()
    assert loaded.started == {"w2": 3.0} and loaded.last_up == 3.0
    assert not list(store.path.parent.glob(".lab.json.*"))  # no temp files left
    store.path.write_text("{not json")
    with pytest.raises(BootedError, match=r"lab\.json: not valid JSON .*delete it"):
        store.load()
    store.path.write_text(json.dumps({"version": 1, "env": "lab", "policy": {"bad_streak": "many"}}))
    with pytest.raises(BootedError, match=r"lab\.json: policy\.bad_streak: must be a count"):
        store.load()


def test_only_one_monitor_per_environment():
    with monitord.only_monitor("lab") as path:
        assert path.read_text().strip() == str(os.getpid())
        running = rf"a monitor for environment lab is already running \(pid {os.getpid()}\)"
        with pytest.raises(BootedError, match=running):
            with monitord.only_monitor("lab"):
                pass
        with monitord.only_monitor("other"):  # another environment is independent
            pass
    with monitord.only_monitor("lab"):  # released when the first one ended
        pass


CONFIG = """\
environments:
  lab:
    provider: local
    images: [lab-lb, lab-w1]
    roles: {loadbalancers: [lab-lb], workers: [lab-w1]}
    service: hello
    version: v1
"""


def fab(tmp_path, state_dir, *args):
    cfg = tmp_path / "environments.yaml"
    cfg.write_text(CONFIG)
    env = dict(os.environ, BOOTED_STATE_DIR=str(state_dir), BOOTED_CONFIG=str(cfg))
    return subprocess.run(["fab", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_fab_monitor_refuses_a_second_monitor_with_one_line(tmp_path, state_dir):
    with monitord.only_monitor("lab"):
        proc = fab(tmp_path, state_dir, "monitor", "--env", "lab")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: a monitor for environment lab is already running (pid {os.getpid()}); "
                                   f"stop it first (kill -TERM {os.getpid()})")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_fab_monitor_needs_a_known_environment(tmp_path, state_dir):
    proc = fab(tmp_path, state_dir, "monitor")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --env is required (known: lab)"
    proc = fab(tmp_path, state_dir, "monitor", "--env", "nope")
    assert proc.returncode == 2 and "unknown environment 'nope' (known: lab)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- the loop, with a fake world
SETTINGS = MonitorSettings(latency_high_ms=150, latency_low_ms=40, interval_s=0.05, probes=2, up_samples=1,
                           down_window_s=0, up_cooldown_s=0, down_cooldown_s=0, health_failures=2,
                           warmup_timeout_s=30)
ENV = Environment(name="lab", provider="local", images=("lab-lb", "w1", "w2", "w3"), loadbalancers=("lab-lb",),
                  workers=("w1", "w2", "w3"), service="hello", version="v1", min_workers=1, max_workers=3,
                  lb_port=8080, monitor=SETTINGS)
SLOW = Sample(400, 0.0, 2)
FAST = Sample(5, 0.0, 2)


class FakeWorld:
    def __init__(self, running=("w1",), sample=SLOW, step_s=0.0, on_step=None, fail_start=None):
        self.running = set(running)
        self.sample, self.step_s, self.on_step, self.fail_start = sample, step_s, on_step, fail_start
        self.calls: list[tuple[str, str]] = []

    def observe(self, should_stop):
        return Observation(self.sample, frozenset(self.running), {w: True for w in self.running}, "")

    def start_worker(self, image):
        self.calls.append(("start", image))
        if self.on_step:
            self.on_step()
        deadline = time.monotonic() + self.step_s
        while time.monotonic() < deadline:
            time.sleep(0.01)
        if self.fail_start:
            raise BootedError(self.fail_start)
        self.running.add(image)
        return f"{image} serving v1"

    def stop_image(self, image):
        self.calls.append(("stop", image))
        self.running.discard(image)


def make_monitor(world, lines=None, env=ENV):
    store = monitord.StateStore(env.name, env.workers)
    policy = monitord.make_policy(env, store.load())
    log = monitord.MonitorLog(env.name, monitord.state_path("monitor", "lab.log"),
                              echo=(lines.append if lines is not None else (lambda line: None)))
    signals = monitord.Signals()
    return monitord.Monitor(env, policy, world, store, log, signals), signals, log


def run_with_signals(world, *delays, once=False, env=ENV):
    """Run the loop in this (the main) thread; send SIGTERM after each of ``delays`` seconds."""
    lines: list[str] = []
    mon, signals, log = make_monitor(world, lines, env)
    timers = [threading.Timer(d, os.kill, (os.getpid(), signal.SIGTERM)) for d in delays]
    signals.install()
    start = time.monotonic()
    try:
        for t in timers:
            t.start()
        code = mon.run(once=once)
    finally:
        for t in timers:
            t.cancel()
        signals.restore()
        log.close()
    return code, time.monotonic() - start, lines, mon


def saved_policy():
    return json.loads(monitord.state_path("monitor", "lab.json").read_text())["policy"]


def test_sigterm_while_idle_stops_at_once_and_cleanly():
    code, took, lines, _ = run_with_signals(FakeWorld(running=("w1",), sample=Sample(100, 0.0, 2)), 0.3)
    assert code == 0 and took < 3.0
    assert lines[0].split(" ", 2)[2].startswith("monitor started")
    assert lines[-1].endswith("lab stopped (SIGTERM) cleanly")
    assert sum(" hold: " in line for line in lines) >= 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_a_first_signal_lets_the_step_finish():
    world = FakeWorld(step_s=0.8)
    world.on_step = lambda: threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    code, took, lines, _ = run_with_signals(world)
    assert code == 0 and 0.8 <= took < 5.0
    assert world.calls == [("start", "w2")]  # the step finished; no second step started
    assert any("done: started w2" in line for line in lines)
    assert lines[-1].endswith("stopped (SIGTERM) cleanly")
    assert saved_policy()["pending"]["w2"] == {"since": saved_policy()["pending"]["w2"]["since"], "kind": "up",
                                               "done": True}  # in service, pending its health check


def test_a_second_signal_abandons_the_step_and_the_next_run_resolves_it():
    world = FakeWorld(step_s=10)
    world.on_step = lambda: [threading.Timer(d, os.kill, (os.getpid(), signal.SIGTERM)).start() for d in (0.1, 0.3)]
    code, took, lines, _ = run_with_signals(world)
    assert code == 130 and took < 5.0  # the step alone would take 10 s
    assert "w2" not in world.running
    assert "a second signal abandoned the step" in lines[-1] and "under way: w2" in lines[-1]
    pending = saved_policy()["pending"]
    assert set(pending) == {"w2"} and pending["w2"]["done"] is False
    # the next monitor finds w2 running (half started): it undoes the interrupted step ...
    world2 = FakeWorld(running=("w1", "w2"), sample=Sample(200, 0.0, 2))
    code, _, lines, mon = run_with_signals(world2, once=True)
    assert code == 0 and world2.calls == [("stop", "w2")]
    assert any(" abandon w2: the start of w2 was interrupted" in line for line in lines)
    # ... and, latency still bad, starts it again on the next tick (nothing failed: no back-off)
    code, _, lines, mon = run_with_signals(world2, once=True)
    assert world2.calls == [("stop", "w2"), ("start", "w2")], lines
    # a started worker is counted once it passes its health check
    mon, _, log = make_monitor(world2, lines := [])
    mon.tick()
    log.close()
    assert any("event: w2 passed its health check" in line for line in lines)


def test_a_failed_start_is_logged_cleaned_up_and_backed_off():
    world = FakeWorld(fail_start="w2: no call home within 90s")
    env = dataclasses.replace(ENV, monitor=dataclasses.replace(SETTINGS, up_cooldown_s=30))
    code, _, lines, mon = run_with_signals(world, 0.5, env=env)
    assert code == 0
    assert any("failed: starting w2 after 0s: w2: no call home within 90s" in line for line in lines)
    assert world.calls == [("start", "w2"), ("stop", "w2")]  # the half-started worker stopped; one try
    assert any("a start failed 0s ago, retrying after 30s" in line for line in lines)
    assert mon.policy.state.last_failed_start is not None and saved_policy()["pending"] == {}


def test_a_broken_observation_is_logged_and_the_loop_goes_on():
    class Broken(FakeWorld):
        def observe(self, should_stop):
            raise RuntimeError("provider exploded")

    code, _, lines, _ = run_with_signals(Broken(), 0.3)
    assert code == 0
    assert any("hold: could not observe lab (RuntimeError: provider exploded); nothing changed" in line
               for line in lines)


def test_once_runs_one_tick_and_prints_the_decision(capsys):
    code, _, lines, _ = run_with_signals(FakeWorld(running=("w1",), sample=SLOW), once=True)
    assert code == 0
    decisions = [line for line in lines if " up " in line or " hold: " in line]
    assert len(decisions) == 1 and " up w2,w3: p95 400ms" in decisions[0]  # over twice the limit: two
    log = monitord.state_path("monitor", "lab.log").read_text().splitlines()
    assert decisions[0] in log


def test_a_signal_before_the_step_begins_means_it_never_begins():
    class SignalWhileObserving(FakeWorld):
        def observe(self, should_stop):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives after the probes, before the decision is acted on
            return super().observe(should_stop)

    world = SignalWhileObserving(sample=SLOW)
    code, took, lines, _ = run_with_signals(world)
    assert code == 0 and world.calls == []
    assert any(" up w2,w3: " in line for line in lines)
    assert any("stopping: up w2, w3 not begun" in line for line in lines)
    assert saved_policy()["pending"] == {}
