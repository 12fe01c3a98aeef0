"""The monitor's scaling policy (fabfile/scaling/policy.py), driven with a fake clock and a simulated environment."""
from __future__ import annotations

import dataclasses
import math
import random

import pytest

from fabfile.core.config import MonitorSettings
from fabfile.scaling.policy import (
    ABANDON,
    DOWN,
    HOLD,
    REPLACE,
    UP,
    Observation,
    Pending,
    Policy,
    PolicyState,
    Sample,
    percentile,
)

WORKERS = ("w1", "w2", "w3", "w4")
DEFAULTS = MonitorSettings()  # interval 15s, high 300ms, low 60ms, up 3 samples, window 300s, ...
GOOD = Sample(20.0, 0.0, 8)
BAD = Sample(400.0, 0.0, 8)
VERY_BAD = Sample(900.0, 0.0, 8)
BETWEEN = Sample(120.0, 0.0, 8)


def obs(sample, running, unhealthy=(), unchecked=()):
    running = frozenset(running)
    return Observation(sample, running, {w: w not in unhealthy for w in running if w not in unchecked},
                       "" if sample else "test: no answer")


class Sim:
    """A fake environment the policy acts on: workers start instantly and pass health after ``warmup_s``."""

    def __init__(self, policy: Policy, running=("w1",), warmup_s=30.0, fail_starts=()):
        self.policy, self.warmup_s = policy, warmup_s
        self.running = set(running)
        self.ready_at = {w: -math.inf for w in running}
        self.fail_starts = set(fail_starts)  # these never become healthy
        self.broken: set[str] = set()  # running but failing health checks
        self.decisions: list[tuple[float, object]] = []

    def healthy(self, now):
        return {w: now >= self.ready_at.get(w, math.inf) and w not in self.broken and w not in self.fail_starts
                for w in self.running}

    def tick(self, now, sample):
        d = self.policy.decide(now, Observation(sample, frozenset(self.running), self.healthy(now)))
        self.decisions.append((now, d))
        if d.action == UP:
            for w in d.images:
                self.policy.starting(now, w, "up")
                self.running.add(w)
                self.policy.started(now, w)
                self.ready_at[w] = now + self.warmup_s
        elif d.action == REPLACE:
            w = d.images[0]
            self.policy.starting(now, w, "replace")
            self.policy.started(now, w)
            self.broken.discard(w)
            self.ready_at[w] = now + self.warmup_s
        elif d.action in (DOWN, ABANDON):
            for w in d.images:
                if d.action == DOWN:
                    self.policy.stopping(now, w)
                self.running.discard(w)
                if d.action == DOWN:
                    self.policy.stopped(now, w)
        return d

    @property
    def ready(self):
        return len(self.running - set(self.policy.state.pending))

    def changes(self):
        return sum(len(d.images) for _, d in self.decisions if d.action in (UP, DOWN))


def policy(settings=DEFAULTS, min_workers=1, max_workers=3, workers=WORKERS[:3], **kw):
    return Policy(settings, workers, min_workers, max_workers, **kw)


# ---------------------------------------------------------------------------- percentile
@pytest.mark.parametrize("values, expected", [
    ([5], 5), ([1, 2, 3, 4, 5, 6, 7, 8], 8), (list(range(1, 101)), 95), (list(range(1, 21)), 19), ([3, 1, 2], 3),
])
def test_percentile_is_nearest_rank(values, expected):
    assert percentile(values, 95) == expected


# ---------------------------------------------------------------------------- oscillation: a flap budget
def change_bound(settings: MonitorSettings, min_workers: int, max_workers: int, seconds: float) -> int:
    """Most capacity changes the policy can make in ``seconds``, from its rules alone.

    Every removal needs a good window of ``down_window_s`` that starts after the last change and
    ``down_cooldown_s`` since it, so removals are at least D = max(window, cooldown) apart: at most
    seconds // D + 1 of them. Each addition must be undone by a removal before capacity can grow
    again past ``max``, so additions <= removals + (max - min).
    """
    d = max(settings.down_window_s, settings.down_cooldown_s)
    downs = int(seconds // d) + 1
    return 2 * downs + (max_workers - min_workers)


def run_flapping(settings, hours=1.0, warmup_s=30.0):
    """Capacity-coupled latency (kubernetes/website#54304): 1 worker is too slow, 2 are fast enough."""
    pol = policy(settings)
    sim = Sim(pol, running=("w1",), warmup_s=warmup_s)
    now = 0.0
    while now < hours * 3600:
        sim.tick(now, BAD if sim.ready <= 1 else GOOD)
        now += settings.interval_s
    return sim


def test_flapping_latency_makes_a_bounded_number_of_changes_per_hour():
    sim = run_flapping(DEFAULTS)
    bound = change_bound(DEFAULTS, 1, 3, 3600)
    assert bound == 28  # 12+1 removals (300 s apart), as many additions, +2 headroom
    assert 2 <= sim.changes() <= bound, sim.changes()
    # the same scenario without hysteresis changes capacity far more often: the bound is not vacuous
    naive = dataclasses.replace(DEFAULTS, up_samples=1, down_window_s=0, down_cooldown_s=0, up_cooldown_s=0)
    assert run_flapping(naive, warmup_s=0).changes() > bound


def test_latency_oscillating_around_the_limit_stays_within_the_flap_budget():
    rng = random.Random(7)
    s = DEFAULTS
    for period in (60.0, 300.0, 900.0):
        pol = policy(s)
        sim = Sim(pol, running=("w1",))
        now = 0.0
        while now < 3600:
            p95 = s.latency_high_ms + 280 * math.sin(2 * math.pi * now / period) + rng.gauss(0, 30)
            sample = None if rng.random() < 0.05 else Sample(max(1.0, p95), 0.0, 8)
            sim.tick(now, sample)
            now += s.interval_s + rng.uniform(0, 2)
        assert sim.changes() <= change_bound(s, 1, 3, 3600), (period, sim.changes())


# ---------------------------------------------------------------------------- missing data
def test_missing_samples_never_reduce_capacity():
    rng = random.Random(11)
    for _ in range(30):
        pol = policy(dataclasses.replace(DEFAULTS, down_window_s=60, down_cooldown_s=30), max_workers=3)
        sim = Sim(pol, running=("w1", "w2", "w3"))
        now = 0.0
        for _ in range(400):
            sample = rng.choice([None, None, GOOD, GOOD, GOOD, BETWEEN, BAD])
            d = sim.tick(now, sample)
            if sample is None:
                assert d.action not in (DOWN, ABANDON) or d.reason.startswith("finishing"), d
            now += 15
        # and a window that had a gap in it never counts as good
    pol = policy(dataclasses.replace(DEFAULTS, down_window_s=60, down_cooldown_s=0), max_workers=3)
    sim = Sim(pol, running=("w1", "w2"))
    for n in range(200):  # good, good, good, no data, good, ... : never 60 s of unbroken good samples
        d = sim.tick(n * 15.0, None if n % 4 == 3 else GOOD)
        assert d.action == HOLD, d
    assert sim.running == {"w1", "w2"}


def test_no_data_says_why_and_keeps_capacity():
    pol = policy(dataclasses.replace(DEFAULTS, down_window_s=0, down_cooldown_s=0))
    d = pol.decide(0, Observation(None, frozenset({"w1", "w2"}), {"w1": True, "w2": True}, "lb refused"))
    assert d.action == HOLD and "no data (lb refused)" in d.reason


# ---------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("seed", range(12))
def test_min_and_max_always_hold_under_random_sequences(seed):
    rng = random.Random(seed)
    lo = rng.randint(1, 3)
    hi = rng.randint(lo, 4)
    settings = dataclasses.replace(
        DEFAULTS, up_samples=rng.randint(1, 3), down_window_s=rng.choice([0, 15, 60]),
        up_cooldown_s=rng.choice([0, 30]), down_cooldown_s=rng.choice([0, 45]), health_failures=rng.randint(1, 3),
        warmup_timeout_s=rng.choice([20, 60]))
    pol = Policy(settings, WORKERS, lo, hi)
    start = rng.sample(WORKERS, rng.randint(0, 4))
    # workers come up within the warm-up limit, except one that never does
    sim = Sim(pol, running=start, warmup_s=rng.choice([0, 15]), fail_starts={rng.choice(WORKERS)})
    now = 0.0
    for _ in range(1500):
        count_before = len(sim.running)
        if rng.random() < 0.02 and sim.running:  # a crash, or somebody stopping a worker
            sim.running.discard(rng.choice(sorted(sim.running)))
            count_before = len(sim.running)
        if rng.random() < 0.03 and sim.running:
            sim.broken.add(rng.choice(sorted(sim.running)))
        d = sim.tick(now, rng.choice([None, GOOD, GOOD, BETWEEN, BAD, VERY_BAD, Sample(50, 0.5, 8)]))
        after = len(sim.running)
        if lo <= count_before <= hi:
            assert lo <= after <= hi or d.action == ABANDON, (d, count_before, after)
        elif count_before < lo:  # below: start workers, unless backing off after a failed start
            assert d.action in (UP, ABANDON, REPLACE) or (d.action == HOLD and "start failed" in d.reason), d
            assert d.action != UP or after > count_before
        else:  # above: stop workers
            assert d.action in (DOWN, ABANDON, REPLACE) and after <= count_before, d
        if d.action == UP:
            assert after <= hi
        if d.action == DOWN and count_before <= hi:
            assert after >= lo
        now += settings.interval_s
    # left alone long enough, the bounds are restored (a failed start is retried after the back-off)
    sim.fail_starts.clear()
    sim.broken.clear()
    for _ in range(50):
        sim.tick(now, BETWEEN)
        now += settings.interval_s
    assert lo <= len(sim.running) <= hi


def test_below_the_minimum_starts_workers_whatever_the_data():
    pol = policy(min_workers=2, max_workers=3)
    d = pol.decide(0, obs(None, []))
    assert (d.action, d.images) == (UP, ("w1", "w2")) and "below the minimum 2" in d.reason


def test_above_the_maximum_stops_workers_even_when_slow():
    pol = policy(min_workers=1, max_workers=2)
    d = pol.decide(0, obs(VERY_BAD, ["w1", "w2", "w3"]))
    assert (d.action, d.images) == (DOWN, ("w3",)) and "above the maximum 2" in d.reason


# ---------------------------------------------------------------------------- scaling up
def test_scale_up_needs_consecutive_bad_samples_and_steps_by_one_or_two():
    pol = policy(max_workers=3)
    assert pol.decide(0, obs(BAD, ["w1"])).action == HOLD
    assert pol.decide(15, obs(BETWEEN, ["w1"])).action == HOLD  # breaks the streak
    assert pol.decide(30, obs(BAD, ["w1"])).action == HOLD
    assert pol.decide(45, obs(BAD, ["w1"])).action == HOLD
    d = pol.decide(60, obs(BAD, ["w1"]))
    assert (d.action, d.images) == (UP, ("w2",)) and "for 3 samples" in d.reason

    pol = policy(max_workers=3)
    for t in (0, 15):
        pol.decide(t, obs(VERY_BAD, ["w1"]))
    assert pol.decide(30, obs(VERY_BAD, ["w1"])).images == ("w2", "w3")  # p95 over twice the limit: two

    pol = policy(max_workers=2)
    for t in (0, 15):
        pol.decide(t, obs(VERY_BAD, ["w1"]))
    assert pol.decide(30, obs(VERY_BAD, ["w1"])).images == ("w2",)  # capped at the maximum


def test_errors_count_as_bad():
    pol = policy(dataclasses.replace(DEFAULTS, up_samples=1))
    d = pol.decide(0, obs(Sample(10, 0.25, 8), ["w1"]))
    assert d.action == UP and "errors 25%" in d.reason and "errors over 0%" in d.reason


def test_no_second_scale_up_while_a_worker_is_pending():
    s = dataclasses.replace(DEFAULTS, up_samples=1, up_cooldown_s=0, warmup_timeout_s=120)
    pol = policy(s, max_workers=3)
    sim = Sim(pol, running=("w1",), warmup_s=1e9)  # w2 never becomes healthy
    actions = [sim.tick(t * 15.0, BAD).action for t in range(10)]
    assert actions[0] == UP and actions[1:9] == [HOLD] * 8, actions  # pending: no second step
    assert actions[9] == ABANDON  # 135 s > warmup 120 s: given up, stopped, not counted
    assert "w2" not in sim.running and pol.state.pending == {}
    assert sim.tick(150.0, BAD).images == ("w2",)  # retried after the back-off (one interval)


def test_a_worker_counts_once_it_passes_its_health_check_and_the_up_cooldown_runs_from_then():
    s = dataclasses.replace(DEFAULTS, up_samples=1, up_cooldown_s=60)
    pol = policy(s, max_workers=3)
    sim = Sim(pol, running=("w1",), warmup_s=40)
    assert sim.tick(0, BAD).action == UP
    assert sim.tick(15, BAD).action == HOLD and sim.tick(30, BAD).action == HOLD
    d = sim.tick(45, BAD)  # w2 healthy now: in service, cooldown starts
    assert d.action == HOLD and any("w2 passed its health check" in n for n in d.notes)
    assert pol.state.last_up == 45
    assert [sim.tick(t, BAD).action for t in (60, 75, 90)] == [HOLD, HOLD, HOLD]
    assert sim.tick(105, BAD).images == ("w3",)


def test_a_failed_start_is_retried_after_a_back_off_and_never_counts():
    s = dataclasses.replace(DEFAULTS, up_samples=1, up_cooldown_s=60)
    pol = policy(s, max_workers=3)
    assert pol.decide(0, obs(BAD, ["w1"])).images == ("w2",)
    pol.starting(0, "w2", "up")
    pol.start_failed(5, "w2")
    assert pol.state.pending == {} and "w2" not in pol.state.started
    d = pol.decide(15, obs(BAD, ["w1"]))
    assert d.action == HOLD and "start failed" in d.reason
    assert pol.decide(70, obs(BAD, ["w1"])).images == ("w2",)


def test_pending_worker_that_is_not_running_is_dropped():
    pol = policy()
    pol.starting(0, "w2", "up")
    pol.started(5, "w2")
    d = pol.decide(10, obs(GOOD, ["w1"]))
    assert any("w2 is not running: its start failed" in n for n in d.notes) and pol.state.pending == {}
    assert pol.state.last_failed_start == 10


def test_an_interrupted_start_is_undone_and_redone_if_still_needed():
    s = dataclasses.replace(DEFAULTS, up_samples=1)
    pol = policy(s)
    pol.starting(0, "w2", "up")  # ... and the monitor was killed before the step finished
    d = pol.decide(10, obs(BAD, ["w1", "w2"], unhealthy={"w2"}))
    assert (d.action, d.images) == (ABANDON, ("w2",)) and "interrupted" in d.reason and d.ready == 1
    assert pol.decide(20, obs(BAD, ["w1"])).images == ("w2",)  # no back-off: nothing failed
    pol.starting(30, "w3", "up")  # interrupted before the machine even ran
    d = pol.decide(40, obs(GOOD, ["w1", "w2"]))
    assert any("w3 is not running: its start was interrupted" in n for n in d.notes) and pol.state.pending == {}


# ---------------------------------------------------------------------------- scaling down
def test_scale_down_needs_the_whole_window_good():
    s = dataclasses.replace(DEFAULTS, down_window_s=300, down_cooldown_s=0)
    pol = policy(s)
    running = ["w1", "w2"]
    for t in range(0, 300, 15):  # 0..285: window not yet full
        assert pol.decide(t, obs(GOOD, running)).action == HOLD
    assert pol.decide(300, obs(BETWEEN, running)).action == HOLD  # one sample in the band: start again
    for t in range(315, 615, 15):
        assert pol.decide(t, obs(GOOD, running)).action == HOLD, t
    d = pol.decide(615, obs(GOOD, running))  # 300 s of good samples since 315
    assert (d.action, d.images) == (DOWN, ("w2",)) and "good for 300s" in d.reason


def test_scale_down_waits_for_the_cooldown_and_stops_at_the_minimum():
    s = dataclasses.replace(DEFAULTS, down_window_s=30, down_cooldown_s=100)
    pol = policy(s)
    pol.state.last_up = 0
    for t in (10, 25, 40, 55, 70, 85):
        assert pol.decide(t, obs(GOOD, ["w1", "w2"])).action == HOLD
    d = pol.decide(100, obs(GOOD, ["w1", "w2"]))
    assert d.action == DOWN
    pol.stopped(100, "w2")
    for t in range(115, 600, 15):
        assert pol.decide(t, obs(GOOD, ["w1"])).action == HOLD


def test_samples_from_before_a_removal_do_not_count_for_the_next_one():
    s = dataclasses.replace(DEFAULTS, down_window_s=60, down_cooldown_s=0)
    pol = policy(s)
    running = ["w1", "w2", "w3"]
    for t in range(0, 60, 15):
        assert pol.decide(t, obs(GOOD, running)).action == HOLD
    assert pol.decide(60, obs(GOOD, running)).images == ("w3",)
    pol.stopping(60, "w3")
    pol.stopped(62, "w3")
    running = ["w1", "w2"]
    for t in range(75, 135, 15):  # the window starts again with the first sample after the change
        assert pol.decide(t, obs(GOOD, running)).action == HOLD, t
    assert pol.decide(135, obs(GOOD, running)).images == ("w2",)


def test_a_gap_in_the_samples_restarts_the_window():
    s = dataclasses.replace(DEFAULTS, down_window_s=60, down_cooldown_s=0)
    pol = policy(s)
    for t in (0, 15, 30, 45):
        pol.decide(t, obs(GOOD, ["w1", "w2"]))
    d = pol.decide(1000, obs(GOOD, ["w1", "w2"]))  # the monitor was stopped for 15 minutes
    assert d.action == HOLD and any("streaks start afresh" in n for n in d.notes)
    assert pol.stale_after_s == 3 * 15 + 8 * 3
    assert pol.decide(1045, obs(GOOD, ["w1", "w2"])).action == HOLD
    d = pol.decide(1045 + 70, obs(GOOD, ["w1", "w2"]))  # a 70 s gap (> 69 s): afresh again
    assert d.action == HOLD and any("streaks start afresh" in n for n in d.notes)
    assert pol.decide(1115 + 45, obs(GOOD, ["w1", "w2"])).action == HOLD
    assert pol.decide(1115 + 60, obs(GOOD, ["w1", "w2"])).action == DOWN


def test_stops_its_own_workers_first_newest_first_and_never_a_load_balancer():
    pol = policy(min_workers=1, max_workers=4, workers=WORKERS, protected={"w4"})
    pol.state.started = {"w1": 10.0, "w2": 20.0}
    assert pol._to_stop(["w1", "w2", "w3", "w4"], 3) == ("w2", "w1", "w3")
    pol.state.started = {}
    assert pol._to_stop(["w1", "w2", "w3", "w4"], 2) == ("w3", "w2")
    assert pol._to_start(frozenset({"w1", "w3"}), 2) == ("w2", "w4")


def test_an_interrupted_stop_is_finished_first():
    pol = policy()
    pol.stopping(0, "w2")
    d = pol.decide(5, obs(BAD, ["w1", "w2"]))
    assert (d.action, d.images) == (DOWN, ("w2",)) and "interrupted" in d.reason
    d = pol.decide(10, obs(BAD, ["w1"]))  # it did stop after all
    assert pol.state.stopping == {} and any("w2 is stopped" in n for n in d.notes)


# ---------------------------------------------------------------------------- health and replacement
def test_a_worker_failing_its_health_check_n_times_is_replaced_cooldown_or_not():
    s = dataclasses.replace(DEFAULTS, health_failures=3, up_cooldown_s=1e6, down_cooldown_s=1e6)
    pol = policy(s)
    pol.state.last_up = pol.state.last_down = 0
    running = ["w1", "w2"]
    assert pol.decide(1, obs(BETWEEN, running, unhealthy={"w2"})).action == HOLD
    assert pol.decide(2, obs(BETWEEN, running, unhealthy={"w2"})).action == HOLD
    assert pol.decide(3, obs(BETWEEN, running)).action == HOLD  # a pass resets the count
    assert pol.decide(4, obs(BETWEEN, running, unhealthy={"w2"})).action == HOLD
    assert pol.decide(5, obs(BETWEEN, running, unhealthy={"w2"}, unchecked={"w2"})).action == HOLD  # no check
    assert pol.decide(6, obs(BETWEEN, running, unhealthy={"w2"})).action == HOLD
    d = pol.decide(7, obs(BETWEEN, running, unhealthy={"w2"}))
    assert (d.action, d.images) == (REPLACE, ("w2",)) and "3 times in a row" in d.reason


def test_replacement_waits_for_the_load_balancer_to_answer_and_spares_load_balancers():
    s = dataclasses.replace(DEFAULTS, health_failures=1)
    pol = policy(s)
    d = pol.decide(0, obs(None, ["w1", "w2"], unhealthy={"w1", "w2"}))
    assert d.action == HOLD and any("not replacing anything blind" in n for n in d.notes)
    pol = policy(s, protected={"w1"})
    d = pol.decide(0, obs(GOOD, ["w1"], unhealthy={"w1"}))
    assert d.action == HOLD and any("also a load balancer" in n for n in d.notes)


def test_replacement_in_the_simulation_brings_the_worker_back():
    s = dataclasses.replace(DEFAULTS, health_failures=2)
    sim = Sim(policy(s), running=("w1", "w2"), warmup_s=20)
    sim.broken.add("w1")
    actions = [sim.tick(t * 15.0, BETWEEN).action for t in range(5)]
    assert actions[:2] == [HOLD, REPLACE], actions
    assert "w1" in sim.running and sim.policy.state.pending == {}  # back through its health check


# ---------------------------------------------------------------------------- state survives a restart
def test_state_round_trips_and_bad_state_is_refused():
    st = PolicyState(started={"w2": 5.0}, pending={"w3": Pending(7.0, "up", True)}, stopping={"w4": 9.0}, last_up=1.0,
                     bad_streak=2, good_since=None, health_failures={"w1": 1})
    assert PolicyState.from_dict(st.to_dict()) == st
    for bad, where in [
        ({"started": []}, "policy.started"),
        ({"pending": {"w3": {"since": 1, "kind": "sideways", "done": True}}}, "policy.pending.w3"),
        ({"pending": {"w3": {"since": 1, "kind": "up"}}}, "policy.pending.w3"),
        ({"bad_streak": -1}, "policy.bad_streak"),
        ({"last_up": "yesterday"}, "policy.last_up"),
        ({"surprise": 1}, "policy.surprise"),
    ]:
        with pytest.raises(ValueError, match=where):
            PolicyState.from_dict(bad)


def test_a_restarted_policy_continues_where_it_stopped():
    s = dataclasses.replace(DEFAULTS, up_samples=3)
    pol = policy(s)
    pol.decide(0, obs(BAD, ["w1"]))
    pol.decide(15, obs(BAD, ["w1"]))
    again = policy(s, state=PolicyState.from_dict(pol.state.to_dict()))
    assert again.decide(30, obs(BAD, ["w1"])).action == UP


def test_hands_off_an_environment_that_is_not_up():
    pol = policy(min_workers=2)
    d = pol.decide(0, Observation(None, frozenset(), {}, "no load balancer in the inventory", env_up=False))
    assert d.action == HOLD and "not up" in d.reason  # below the minimum, yet nothing is started
    assert pol.decide(15, obs(None, [])).action == UP  # once it is up, the minimum holds again
