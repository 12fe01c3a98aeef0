"""The monitor daemon: every ``interval_s`` probe, check, decide (scaling.Policy), act, log, save.

One tick:

1. **observe**: which of the environment's workers run (the provider), ``probes`` GETs through the
   load balancer(s) on fresh connections (p95 latency, error rate; no answer at all = no data), and
   a GET of the service's health path on every running worker directly;
2. **decide**: ``scaling.Policy.decide`` (pure; its state is saved in ``state/monitor/<env>.json``);
3. **act**: ``environment.start_worker`` / ``environment.stop_image`` (both regenerate the load
   balancers), in this thread, one worker per step.

Every decision and every step's outcome is one timestamped line on stdout and appended to
``state/monitor/<env>.log`` (one ``write`` on an ``O_APPEND`` descriptor per line, so lines from
two processes never interleave).

Signals: the first SIGINT/SIGTERM stops the loop after the current step (a step is never cut
short by it); a second one during a step abandons the step (the state saved before it says what
was under way, and the next run finishes or undoes it); a third kills the process at once.
Only one monitor per environment runs: it holds ``state/monitor/<env>.pid`` locked for its life.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from fabfile.balancing import loadbalancer
from fabfile.core.config import Config, Environment
from fabfile.core.errors import BootedError
from fabfile.core.http import Probe, probe_once
from fabfile.core.state import atomic_write_json, locked, state_path
from fabfile.flows import environment, plans
from fabfile.hosts.inventory import Inventory
from fabfile.scaling.policy import (
    ABANDON,
    DOWN,
    HOLD,
    REPLACE,
    UP,
    Decision,
    Observation,
    Policy,
    PolicyState,
    Sample,
    percentile,
)

STATE_VERSION = 1


class StepAbandoned(BaseException):
    """A second signal arrived during a scaling step. BaseException: no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --------------------------------------------------------------------------- probing
def measure(targets: Sequence[tuple[str, int]], probes: int, timeout: float,
            should_stop: Callable[[], bool] = lambda: False) -> tuple[Sample | None, str]:
    """``probes`` requests spread over ``targets`` (the load balancers), one after another.

    Returns (sample, "") or (None, why): no data when no probe reached a load balancer (or a
    stop was requested), so an unreachable load balancer never looks like an idle one.
    """
    if not targets:
        return None, "no load balancer in the inventory"
    results: list[Probe] = []
    for n in range(probes):
        if should_stop():
            return None, "stopping"
        address, port = targets[n % len(targets)]
        results.append(probe_once(address, port, "/", timeout))
    reached = [r for r in results if r.reached]
    if not reached:
        return None, f"load balancer not answering ({results[-1].detail})"
    failed = sum(1 for r in reached if not r.ok)
    return Sample(percentile([r.ms for r in reached], 95), failed / len(reached), len(reached)), ""


def check_health(address: str, port: int, path: str, timeout: float) -> bool:
    return probe_once(address, port, path, timeout).ok


# --------------------------------------------------------------------------- the world it acts on
class World(Protocol):
    """What the daemon observes and changes; ``EnvironmentWorld`` for real, fakes in tests."""

    def observe(self, should_stop: Callable[[], bool]) -> Observation | None: ...

    def start_worker(self, image: str) -> str: ...

    def stop_image(self, image: str) -> None: ...


class EnvironmentWorld:
    """A real environment: its provider, inventory, load balancers and workers."""

    def __init__(self, cfg: Config, env: Environment):
        self.cfg, self.env = cfg, env
        self.service = environment.service_of(env)
        self.unreachable_since: dict[str, float] = {}  # image -> when its machine first did not answer

    def observe(self, should_stop: Callable[[], bool]) -> Observation | None:
        settings = self.env.monitor
        machines = {m.name: m for m in environment.provider_of(self.cfg, self.env).list()}
        entries = {e.image: e for e in Inventory().hosts(env=self.env.name)}
        lost, self.unreachable_since = plans.lost_hosts(entries, machines, self.unreachable_since,
                                                        time.monotonic(), settings.lost_after_s)
        in_doubt = set(self.unreachable_since) - set(lost)
        running = plans.workers_up(self.env.workers, machines, in_doubt)
        if lost:
            entries = environment.forget_lost(self.cfg, self.env, lost)
        lbs = [e for e in entries.values() if "loadbalancers" in e.roles]
        if not lbs:  # the environment was never started, or was stopped: the monitor keeps its hands off
            return Observation(None, running, {}, "no load balancer in the inventory", env_up=False)
        targets = [(lb.address, self.env.lb_port) for lb in loadbalancer.loadbalancers(self.cfg, self.env)]
        sample, why = measure(targets, settings.probes, settings.probe_timeout_s, should_stop)
        healthy: dict[str, bool] = {}
        for image in sorted(running - in_doubt):
            if should_stop():
                return None
            address = entries[image].address if image in entries else next(iter(machines[image].addresses), None)
            if address:  # no address known: no check (a missing check changes no counter)
                healthy[image] = check_health(address, self.service.port, self.service.health,
                                              settings.probe_timeout_s)
        if should_stop():
            return None
        return Observation(sample, running, healthy, why, lost=frozenset(lost))

    def start_worker(self, image: str) -> str:
        return environment.start_worker(self.cfg, self.env, image)

    def stop_image(self, image: str) -> None:
        environment.stop_image(self.cfg, self.env, image)


# --------------------------------------------------------------------------- log, state, lock
class MonitorLog:
    """One timestamped line per decision or event: on stdout and appended to the log file."""

    def __init__(self, env: str, path: Path, echo: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.env, self.path, self.clock = env, path, clock
        self.echo = echo or (lambda line: print(line, flush=True))
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text: str) -> str:
        now = self.clock()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}" + \
            time.strftime("%z", time.localtime(now))
        line = f"{stamp} {self.env} " + " ".join(text.split("\n"))
        self.echo(line)
        data = (line + "\n").encode()
        written = os.write(self.fd, data)  # O_APPEND: one write lands whole at the end
        if written != len(data):
            raise BootedError(f"{self.path}: short write ({written} of {len(data)} bytes)")
        return line

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StateStore:
    """``state/monitor/<env>.json``: the policy's state, written atomically under a lock."""

    def __init__(self, env: str, workers: Sequence[str]):
        self.env, self.workers = env, tuple(workers)
        self.path = state_path("monitor", f"{env}.json")
        self.lock = f"monitor-{env}"

    def load(self) -> PolicyState:
        """The saved state (a fresh one if there is none); workers no longer declared are dropped."""
        with locked(self.lock):
            try:
                text = self.path.read_bytes().decode("utf-8")
            except FileNotFoundError:
                return PolicyState()
            except UnicodeDecodeError:
                text = "\0"  # not JSON: reported below like any other damage
        hint = "fix or delete it (the monitor then forgets which workers it started)"
        try:
            doc = json.loads(text)
        except ValueError as err:
            raise BootedError(f"{self.path}: not valid JSON ({err}); {hint}") from None
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION or doc.get("env") != self.env:
            raise BootedError(f"{self.path}: expected version {STATE_VERSION} state of environment "
                              f"{self.env!r}; {hint}")
        try:
            st = PolicyState.from_dict(doc.get("policy"))
        except ValueError as err:
            raise BootedError(f"{self.path}: {err}; {hint}") from None
        keep = set(self.workers)
        for table in (st.started, st.pending, st.stopping, st.health_failures):
            for image in [i for i in table if i not in keep]:
                del table[image]
        return st

    def save(self, st: PolicyState, now: float) -> None:
        doc = {"version": STATE_VERSION, "env": self.env, "pid": os.getpid(), "saved_at": now,
               "policy": st.to_dict()}
        try:
            with locked(self.lock):
                atomic_write_json(self.path, doc)
        except OSError as err:
            raise BootedError(f"{self.path}: cannot save the monitor's state: {err.strerror or err}") from None


@contextlib.contextmanager
def only_monitor(env: str) -> Iterator[Path]:
    """Hold ``state/monitor/<env>.pid`` locked (flock) for the block; refuse if another monitor does."""
    path = state_path("monitor", f"{env}.pid")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise BootedError(f"a monitor for environment {env} is already running (pid {other}); "
                              f"stop it first (kill -TERM {other})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the lock


# --------------------------------------------------------------------------- signals
class Signals:
    """SIGINT/SIGTERM: the first asks the loop to stop; a second during a step abandons it."""

    def __init__(self):
        self.received: list[str] = []
        self.in_step = False
        self._saved: dict[int, Any] = {}  # signal.signal's previous handlers, whatever they were

    @property
    def stop_requested(self) -> bool:
        return bool(self.received)

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def _handle(self, signum: int, frame) -> None:
        # No printing here: the handler may run in the middle of a print in the main thread.
        self.received.append(signal.Signals(signum).name)
        if self.in_step and len(self.received) >= 2:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)  # a third signal ends the process at once
            raise StepAbandoned(signum)

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking within 0.1 s of a stop request."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.1, left))


# --------------------------------------------------------------------------- the loop
class Monitor:
    def __init__(self, env: Environment, policy: Policy, world: World, store: StateStore, log: MonitorLog,
                 signals: Signals, clock: Callable[[], float] = time.time):
        self.env, self.policy, self.world, self.store, self.log = env, policy, world, store, log
        self.signals, self.clock = signals, clock
        self._saved: dict | None = None

    def run(self, once: bool = False) -> int:
        """Tick until a signal (or once); 0 after a clean stop, 130 if a step was abandoned."""
        s = self.env.monitor
        if not once:
            self.log.write(f"monitor started (pid {os.getpid()}): every {s.interval_s:g}s, p95 target "
                           f"{s.latency_low_ms:g}-{s.latency_high_ms:g}ms, workers {self.env.min_workers}.."
                           f"{self.env.max_workers}")
        try:
            while not self.signals.stop_requested:
                started = time.monotonic()
                decision = self.tick()
                if once:  # success only if it observed the environment and decided something
                    return 0 if decision is not None else 1
                self.signals.sleep(s.interval_s - (time.monotonic() - started))
        except BootedError as err:  # e.g. the state cannot be saved: acting on without it would be blind
            self.log.write(f"stopped: {err}")
            raise
        except StepAbandoned as sig:
            self.save()
            under_way = sorted({*self.policy.state.pending, *self.policy.state.stopping})
            self.log.write(f"stopped ({sig}): a second signal abandoned the step; state saved"
                           + (f"; under way: {', '.join(under_way)} (the next run finishes or undoes it)"
                              if under_way else ""))
            return 130
        self.log.write(f"stopped ({self.signals.received[0]}) cleanly")
        return 0

    def tick(self) -> Decision | None:
        try:
            obs = self.world.observe(lambda: self.signals.stop_requested)
        except Exception as err:
            # Without an observation the policy cannot even count workers: no decision this tick
            # (a broken probe or provider must not end the daemon, nor change capacity).
            self.log.write(f"hold: could not observe {self.env.name} ({_describe(err)}); nothing changed")
            return None
        if obs is None:  # a stop was requested half-way through
            return None
        decision = self.policy.decide(self.clock(), obs)
        for note in decision.notes:
            self.log.write(f"event: {note}")
        self.log.write(str(decision))
        self.save()
        self.act(decision)
        return decision

    def save(self) -> None:
        """Save the policy's state if it changed (beyond the time of the last sample: saving each
        tick would fsync once a second, and a restart that finds an older sample time just starts
        its streaks afresh, which is the safe side)."""
        current = self.policy.state.to_dict()
        current.pop("last_sample_at")
        if current != self._saved:
            self.store.save(self.policy.state, self.clock())
            self._saved = current

    def act(self, decision: Decision) -> None:
        """Carry out ``decision``, one worker per step; a stop request is honoured between steps
        (a step already begun finishes; ABANDON's stop is cleanup and always runs)."""
        if decision.action == HOLD:
            return
        self.signals.in_step = True
        try:
            if decision.action == ABANDON:
                image = decision.images[0]
                try:
                    self.world.stop_image(image)
                    self.log.write(f"done: stopped {image}; its start is undone")
                except Exception as err:
                    self.log.write(f"failed: stopping {image}: {_describe(err)}")
                return
            for n, image in enumerate(decision.images):
                if self.signals.stop_requested:
                    self.log.write(f"stopping: {decision.action} {', '.join(decision.images[n:])} not begun")
                    return
                if decision.action == UP and not self._start(image, "up"):
                    return
                if decision.action == REPLACE:
                    self._start(image, "replace")
                if decision.action == DOWN:
                    self._stop(image)
        finally:
            self.signals.in_step = False

    def _start(self, image: str, kind: str) -> bool:
        """Start (``up``) or replace one worker; True if it is now serving, pending its health check."""
        began = time.monotonic()
        self.policy.starting(self.clock(), image, kind)
        self.save()  # from here a crash leaves "pending", which the next run resolves
        try:
            if kind == "replace":
                self.world.stop_image(image)  # out of the load balancers first, then down
            detail = self.world.start_worker(image)
        except Exception as err:
            self.policy.start_failed(self.clock(), image)
            self.save()
            self.log.write(f"failed: {'replacing' if kind == 'replace' else 'starting'} {image} after "
                           f"{time.monotonic() - began:.0f}s: {_describe(err)}")
            with contextlib.suppress(Exception):
                self.world.stop_image(image)  # don't leave a half-started worker behind
            return False
        self.policy.started(self.clock(), image)
        self.save()
        self.log.write(f"done: {'replaced' if kind == 'replace' else 'started'} {image} in "
                       f"{time.monotonic() - began:.0f}s ({detail}); in the load balancer, pending its health check")
        return True

    def _stop(self, image: str) -> None:
        began = time.monotonic()
        self.policy.stopping(self.clock(), image)
        self.save()
        try:
            self.world.stop_image(image)
        except Exception as err:
            self.policy.stop_failed(self.clock(), image)
            self.save()
            self.log.write(f"failed: stopping {image}: {_describe(err)}")
            return
        self.policy.stopped(self.clock(), image)
        self.save()
        self.log.write(f"done: stopped {image} in {time.monotonic() - began:.0f}s")


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, BootedError) else f"{type(err).__name__}: {err}"


# --------------------------------------------------------------------------- entry point
def make_policy(env: Environment, state: PolicyState | None = None) -> Policy:
    protected = set(env.workers) & set(env.loadbalancers)  # stopping one would stop a load balancer
    return Policy(env.monitor, env.workers, env.min_workers, env.max_workers, protected=protected, state=state)


def run(cfg: Config, env: Environment, once: bool = False, world: World | None = None) -> int:
    """The body of ``fab monitor``: returns the exit code."""
    with only_monitor(env.name):
        store = StateStore(env.name, env.workers)
        policy = make_policy(env, store.load())
        log = MonitorLog(env.name, state_path("monitor", f"{env.name}.log"))
        signals = Signals()
        signals.install()
        try:
            return Monitor(env, policy, world or EnvironmentWorld(cfg, env), store, log, signals).run(once)
        finally:
            signals.restore()
            log.close()
            sys.stdout.flush()
