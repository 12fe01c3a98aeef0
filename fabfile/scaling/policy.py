"""The monitor's scaling policy: pure decisions from observations, no I/O, no clock of its own.

Modelled on Kubernetes' HPA and AWS target tracking (docs/autoscaling.md §1.5):

* **up fast**: ``up_samples`` consecutive bad samples (p95 above ``latency_high_ms`` or errors
  above ``max_error_rate``) add one worker, two if p95 is twice the limit; then ``up_cooldown_s``;
* **down slowly**: only after every sample of the last ``down_window_s`` was good (p95 below
  ``latency_low_ms``, no errors) and ``down_cooldown_s`` after the last change; one worker a step;
* **never on missing data**: a tick whose load-balancer probes got no answer removes nothing; it
  breaks the good window (and neither extends nor breaks a bad streak); a gap in the samples
  (monitor stopped or busy) starts the streaks afresh, as does every capacity change;
* **warm-up**: a started worker is *pending* until it passes its health check; while one is pending
  no scaling step is taken; one that is not healthy ``warmup_timeout_s`` after its start is stopped
  and does not count as capacity (its start is retried after a back-off); a start that was
  interrupted (the monitor was stopped during it) is undone, and redone if still needed;
* **bounds**: below ``min_workers`` start workers whatever the latency; above ``max_workers`` stop them;
* **replacement**: a worker failing ``health_failures`` health checks in a row is replaced (stopped
  and started again), cooldowns notwithstanding; only while the load balancer answers, so a monitor
  that lost its network does not restart healthy workers; never one that is also a load balancer;
* **hands off** an environment that is not up (no load balancer in the inventory): ``env-stop``
  is not undone by the monitor.

Every method takes ``now`` (epoch seconds), so tests drive it with a fake clock and the state
(``PolicyState``, plain data) survives a restart of the monitor.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fabfile.core.config import MonitorSettings

HOLD, UP, DOWN, REPLACE, ABANDON = "hold", "up", "down", "replace", "abandon"
ACTIONS = (HOLD, UP, DOWN, REPLACE, ABANDON)
PENDING_KINDS = ("up", "replace")


# --------------------------------------------------------------------------- inputs and outputs
@dataclass(frozen=True)
class Sample:
    """What the probes through the load balancer measured in one tick."""

    p95_ms: float
    error_rate: float  # 0..1, failed probes / probes that reached the load balancer
    probes: int  # probes that reached the load balancer

    def __str__(self) -> str:
        return f"p95 {self.p95_ms:.0f}ms, errors {self.error_rate:.0%} of {self.probes}"


@dataclass(frozen=True)
class Observation:
    """One tick's view of the environment."""

    sample: Sample | None  # None: the load balancer could not be probed (no data)
    running: frozenset[str]  # the environment's workers whose machine runs
    healthy: Mapping[str, bool] = field(default_factory=dict)  # running worker -> passed its health check
    no_data: str = ""  # why ``sample`` is None
    env_up: bool = True  # False: the environment has no load balancer (never started, or stopped): hands off
    lost: frozenset[str] = frozenset()  # images lost with their machine this tick (out of the inventory now)


@dataclass(frozen=True)
class Decision:
    action: str  # one of ACTIONS
    images: tuple[str, ...] = ()  # workers to start (UP), stop (DOWN, ABANDON) or replace (REPLACE)
    reason: str = ""
    ready: int = 0  # workers in service when deciding
    pending: int = 0  # workers started, not yet through the health check
    notes: tuple[str, ...] = ()  # what changed on the way (a worker came up, a start failed)

    def __str__(self) -> str:
        target = f" {','.join(self.images)}" if self.images else ""
        return f"{self.action}{target}: {self.reason} [ready {self.ready}, pending {self.pending}]"


def percentile(values: Iterable[float], pct: float) -> float:
    """Nearest-rank percentile (of 8 probes, p95 is the slowest)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


# --------------------------------------------------------------------------- state
@dataclass
class Pending:
    since: float
    kind: str  # "up" (adds capacity) or "replace"
    done: bool = False  # the step finished: deployed and in the load balancer; only the health check is due


@dataclass
class PolicyState:
    """Everything the policy remembers; plain data, saved by the monitor after every change."""

    started: dict[str, float] = field(default_factory=dict)  # workers the monitor started, still running
    pending: dict[str, Pending] = field(default_factory=dict)  # started, not yet through the health check
    stopping: dict[str, float] = field(default_factory=dict)  # a stop began here and has not finished
    last_up: float | None = None  # when the last added worker passed its health check
    last_down: float | None = None  # when the last worker was stopped
    last_failed_start: float | None = None
    bad_streak: int = 0  # consecutive bad samples
    good_since: float | None = None  # first sample of the current run of good ones
    last_sample_at: float | None = None
    health_failures: dict[str, int] = field(default_factory=dict)  # consecutive failed checks per worker

    def reset_streaks(self) -> None:
        """Samples taken before a change (or a gap) say nothing about what comes after it."""
        self.bad_streak, self.good_since, self.last_sample_at = 0, None, None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "PolicyState":
        """The state saved by ``to_dict``; ValueError naming the key if it is malformed."""
        if not isinstance(data, dict):
            raise ValueError("policy: must be a mapping")
        known = {f for f in cls.__dataclass_fields__}
        for key in data:
            if key not in known:
                raise ValueError(f"policy.{key}: unknown key")
        st = cls()
        st.started = _times(data.get("started", {}), "policy.started")
        st.stopping = _times(data.get("stopping", {}), "policy.stopping")
        pending = data.get("pending", {})
        if not isinstance(pending, dict):
            raise ValueError("policy.pending: must be a mapping")
        for image, p in pending.items():
            if (not isinstance(p, dict) or set(p) != {"since", "kind", "done"} or not _is_time(p["since"])
                    or p["kind"] not in PENDING_KINDS or not isinstance(p["done"], bool)):
                raise ValueError(f"policy.pending.{image}: must be {{since: <time>, kind: up|replace, "
                                 f"done: true|false}}")
            st.pending[str(image)] = Pending(float(p["since"]), p["kind"], p["done"])
        for key in ("last_up", "last_down", "last_failed_start", "good_since", "last_sample_at"):
            value = data.get(key)
            if value is not None and not _is_time(value):
                raise ValueError(f"policy.{key}: must be a time or null")
            setattr(st, key, None if value is None else float(value))
        streak = data.get("bad_streak", 0)
        if not isinstance(streak, int) or isinstance(streak, bool) or streak < 0:
            raise ValueError("policy.bad_streak: must be a count")
        st.bad_streak = streak
        failures = data.get("health_failures", {})
        if not isinstance(failures, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in failures.values()):
            raise ValueError("policy.health_failures: must map workers to counts")
        st.health_failures = {str(k): v for k, v in failures.items()}
        return st


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _times(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict) or not all(_is_time(v) for v in value.values()):
        raise ValueError(f"{where}: must map workers to times")
    return {str(k): float(v) for k, v in value.items()}


# --------------------------------------------------------------------------- the policy
class Policy:
    """Decide, tick by tick, whether to add, remove or replace a worker.

    ``workers``: the environment's worker images in declared order (start the first stopped one);
    ``protected``: workers the monitor must never stop (those that are also load balancers).
    The monitor calls ``decide`` once a tick, then reports each step: ``starting`` before a start
    (or a replacement), ``started`` when it finished or ``start_failed``; ``stopping`` before a
    stop, then ``stopped`` or ``stop_failed``. Steps happen between decisions, never during one.
    """

    def __init__(self, settings: MonitorSettings, workers: Sequence[str], min_workers: int, max_workers: int,
                 protected: Iterable[str] = (), state: PolicyState | None = None):
        if not 1 <= min_workers <= max_workers <= len(workers):
            raise ValueError(f"need 1 <= min ({min_workers}) <= max ({max_workers}) <= workers ({len(workers)})")
        self.settings = settings
        self.workers = tuple(workers)
        self.min, self.max = min_workers, max_workers
        self.protected = frozenset(protected)
        self.state = state or PolicyState()
        self._running: frozenset[str] = frozenset()

    # -- derived limits
    @property
    def retry_after_s(self) -> float:
        """Back-off before starting again after a failed start (no hot loop on a broken image)."""
        return max(self.settings.up_cooldown_s, self.settings.interval_s)

    @property
    def stale_after_s(self) -> float:
        """A sample this long after the previous one does not continue its streak."""
        s = self.settings
        return 3 * s.interval_s + s.probes * s.probe_timeout_s

    # -- the decision
    def decide(self, now: float, obs: Observation) -> Decision:
        s, st = self.settings, self.state
        notes: list[str] = [f"{image} was lost with the machine running it; it left the inventory and the "
                            f"load balancers" for image in sorted(obs.lost)]
        running = self._running = obs.running

        # Workers the monitor started but somebody else stopped are no longer its own.
        for image in [i for i in st.started if i not in running and i not in st.pending]:
            del st.started[image]

        # Warm-up: a pending worker either passes its health check, or fails to come up in time.
        # Steps run between decisions, so a pending start that is not ``done`` here was interrupted
        # (a second signal, or the monitor was killed): it is undone, and redone if still needed.
        for image, p in sorted(st.pending.items()):
            if image not in running:
                del st.pending[image]
                st.started.pop(image, None)
                if p.done:
                    st.last_failed_start = now
                notes.append(f"{image} is not running: its start {'failed' if p.done else 'was interrupted'}; "
                             f"it does not count as capacity")
            elif not p.done:
                del st.pending[image]
                self._running = running - {image}  # about to be stopped: not capacity
                return self._decision(ABANDON, (image,), notes,
                                      f"the start of {image} was interrupted (the monitor stopped during it); "
                                      f"stopping it (it is started again if still needed)")
            elif obs.healthy.get(image):
                del st.pending[image]
                if p.kind == "up":
                    st.last_up = now
                st.reset_streaks()
                notes.append(f"{image} passed its health check {now - p.since:.0f}s after its start; in service")
            elif now - p.since > s.warmup_timeout_s:
                del st.pending[image]
                st.last_failed_start = now
                self._running = running - {image}  # about to be stopped: not capacity
                return self._decision(ABANDON, (image,), notes,
                                      f"{image} not healthy {s.warmup_timeout_s:g}s after its start; "
                                      f"stopping it (not counted as capacity; the start is retried)")

        # A stop that was interrupted (the monitor was killed mid-step) is finished first.
        for image in sorted(st.stopping):
            if image in running:
                return self._decision(DOWN, (image,), notes, f"finishing the interrupted stop of {image}")
            del st.stopping[image]
            st.started.pop(image, None)
            st.last_down = now
            st.reset_streaks()
            notes.append(f"{image} is stopped (its stop was interrupted and finished anyway)")

        if not obs.env_up:
            st.reset_streaks()
            return self._decision(HOLD, (), notes, "the environment is not up (no load balancer in the inventory); "
                                  "starting nothing until it is (fab env-start-min)")

        pending = [w for w in self.workers if w in st.pending]
        ready = [w for w in self.workers if w in running and w not in st.pending]
        count = len(ready) + len(pending)

        # Health: consecutive failures per worker in service; a missing check changes nothing.
        for image in [i for i in st.health_failures if i not in ready]:
            del st.health_failures[image]
        for image in ready:
            if image in obs.healthy:
                st.health_failures[image] = 0 if obs.healthy[image] else st.health_failures.get(image, 0) + 1
        failing = [w for w in ready if st.health_failures.get(w, 0) >= s.health_failures]
        for image in failing:
            times = st.health_failures[image]
            if image in self.protected:
                if times == s.health_failures:
                    notes.append(f"{image} failed its health check {times} times but is also a load balancer; "
                                 f"the monitor does not replace it")
            elif obs.sample is None:
                if times == s.health_failures:
                    notes.append(f"{image} failed its health check {times} times, but the load balancer "
                                 f"does not answer either; not replacing anything blind")
            else:
                st.health_failures[image] = 0
                return self._decision(REPLACE, (image,), notes,
                                      f"{image} failed its health check {times} times in a row")

        # Bounds hold whatever the metrics say.
        if count < self.min:
            if self._backing_off(now):
                return self._decision(HOLD, (), notes, f"{_count(count, 'worker')}, below the minimum {self.min}, "
                                      f"but a start failed {self._since_failed_start(now):.0f}s ago; retrying "
                                      f"after {self.retry_after_s:g}s")
            images = self._to_start(running, self.min - count)
            if images:
                return self._decision(UP, images, notes, f"{_count(count, 'worker')}, below the minimum {self.min}")
        if count > self.max:
            images = self._to_stop(ready, count - self.max)
            if images:
                return self._decision(DOWN, images, notes, f"{_count(count, 'worker')}, above the maximum {self.max}")

        if obs.sample is None:
            st.good_since = None
            return self._decision(HOLD, (), notes, f"no data ({obs.no_data or 'no probe answered'}); "
                                  f"capacity kept")
        sample = obs.sample
        if pending:
            return self._decision(HOLD, (), notes, f"{sample}; waiting for {', '.join(pending)} to pass "
                                  f"its health check")

        # Record the sample.
        if st.last_sample_at is not None and now - st.last_sample_at > self.stale_after_s:
            notes.append(f"no sample for {now - st.last_sample_at:.0f}s; streaks start afresh")
            st.reset_streaks()
        st.last_sample_at = now
        bad = sample.p95_ms > s.latency_high_ms or sample.error_rate > s.max_error_rate
        good = not bad and sample.p95_ms < s.latency_low_ms and sample.error_rate == 0
        if bad:
            st.bad_streak += 1
            st.good_since = None
        elif good:
            st.bad_streak = 0
            st.good_since = now if st.good_since is None else st.good_since
        else:
            st.bad_streak, st.good_since = 0, None

        if bad:
            why = (f"p95 over {s.latency_high_ms:g}ms" if sample.p95_ms > s.latency_high_ms
                   else f"errors over {s.max_error_rate:.0%}")
            if st.bad_streak < s.up_samples:
                return self._decision(HOLD, (), notes, f"{sample}: {why} ({st.bad_streak} of {s.up_samples} "
                                      f"bad samples before adding a worker)")
            if count >= self.max:
                return self._decision(HOLD, (), notes,
                                      f"{sample}: {why}, but at the maximum of {_count(self.max, 'worker')}")
            if st.last_up is not None and now - st.last_up < s.up_cooldown_s:
                return self._decision(HOLD, (), notes, f"{sample}: {why}; in the up cooldown "
                                      f"({s.up_cooldown_s - (now - st.last_up):.0f}s left)")
            if self._backing_off(now):
                return self._decision(HOLD, (), notes, f"{sample}: {why}; a start failed "
                                      f"{self._since_failed_start(now):.0f}s ago, retrying after "
                                      f"{self.retry_after_s:g}s")
            step = 1 if sample.p95_ms < 2 * s.latency_high_ms else 2
            images = self._to_start(running, min(step, self.max - count))
            if images:
                return self._decision(UP, images, notes, f"{sample}: {why} for {_count(st.bad_streak, 'sample')}")
            return self._decision(HOLD, (), notes, f"{sample}: {why}, but no stopped worker is left to start")

        if good:
            held = now - (now if st.good_since is None else st.good_since)
            if held < s.down_window_s:
                return self._decision(HOLD, (), notes, f"{sample}: good for {held:.0f}s of the "
                                      f"{s.down_window_s:g}s window before removing a worker")
            if count <= self.min:
                return self._decision(HOLD, (), notes,
                                      f"{sample}: good, at the minimum of {_count(self.min, 'worker')}")
            changes = [t for t in (st.last_up, st.last_down) if t is not None]
            if changes and now - max(changes) < s.down_cooldown_s:
                return self._decision(HOLD, (), notes, f"{sample}: good; in the down cooldown "
                                      f"({s.down_cooldown_s - (now - max(changes)):.0f}s left)")
            images = self._to_stop(ready, 1)
            if images:
                return self._decision(DOWN, images, notes, f"{sample}: good for {held:.0f}s "
                                      f"(window {s.down_window_s:g}s)")
            return self._decision(HOLD, (), notes, f"{sample}: good, but no worker the monitor may stop")

        return self._decision(HOLD, (), notes, f"{sample}: between {s.latency_low_ms:g}ms and "
                              f"{s.latency_high_ms:g}ms; holding")

    # -- what the monitor reports back
    def starting(self, now: float, image: str, kind: str) -> None:
        """About to start (``kind`` "up") or restart (``"replace"``) ``image``; it is pending from now."""
        if kind not in PENDING_KINDS:
            raise ValueError(f"kind must be one of {PENDING_KINDS}")
        self.state.pending[image] = Pending(now, kind)
        self.state.health_failures.pop(image, None)
        if kind == "up":
            self.state.started[image] = now

    def started(self, now: float, image: str) -> None:
        """The step for ``image`` finished (deployed, in the load balancer); its health check is due."""
        if image in self.state.pending:
            self.state.pending[image].done = True

    def start_failed(self, now: float, image: str) -> None:
        self.state.pending.pop(image, None)
        self.state.started.pop(image, None)
        self.state.last_failed_start = now

    def stopping(self, now: float, image: str) -> None:
        """About to stop ``image``: if the monitor dies half-way, its next run finishes the stop."""
        self.state.stopping[image] = now

    def stopped(self, now: float, image: str) -> None:
        st = self.state
        st.stopping.pop(image, None)
        st.started.pop(image, None)
        st.pending.pop(image, None)
        st.health_failures.pop(image, None)
        st.last_down = now
        st.reset_streaks()

    def stop_failed(self, now: float, image: str) -> None:
        """The stop failed; the worker still runs. The down cooldown spaces the next attempt."""
        self.state.stopping.pop(image, None)
        self.state.last_down = now

    # -- helpers
    def _since_failed_start(self, now: float) -> float:
        t = self.state.last_failed_start
        return 0.0 if t is None else now - t

    def _backing_off(self, now: float) -> bool:
        t = self.state.last_failed_start
        return t is not None and now - t < self.retry_after_s

    def _to_start(self, running: frozenset[str], count: int) -> tuple[str, ...]:
        """The first ``count`` declared workers that are neither running nor pending."""
        stopped = [w for w in self.workers if w not in running and w not in self.state.pending]
        return tuple(stopped[:max(0, count)])

    def _to_stop(self, ready: Sequence[str], count: int) -> tuple[str, ...]:
        """Workers to stop: the monitor's own (newest first), then the last declared; never protected ones."""
        candidates = [w for w in ready if w not in self.protected]
        own = sorted((w for w in candidates if w in self.state.started),
                     key=lambda w: (self.state.started[w], self.workers.index(w)), reverse=True)
        others = [w for w in reversed(candidates) if w not in self.state.started]
        return tuple((own + others)[:max(0, count)])

    def _decision(self, action: str, images: tuple[str, ...], notes: list[str], reason: str) -> Decision:
        pending = sum(1 for w in self.workers if w in self.state.pending)
        ready = sum(1 for w in self.workers if w in self._running and w not in self.state.pending)
        return Decision(action, images, reason, ready=ready, pending=pending, notes=tuple(notes))
