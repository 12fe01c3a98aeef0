"""Unit tests for the issue-18 benchmarks' pure parts: configs they write, their checks, their numbers.

    python3 -m pytest bench/test_perf_bench.py -q

(The benchmarks themselves need root, local hosts or a quiet machine; these need none of that.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bringup  # noqa: E402
import reach_bench  # noqa: E402
import sidebyside as sbs  # noqa: E402


# ------------------------------------------------------------------------------ sidebyside
def _samples(rows):
    return [sbs.Sample(case, rnd, seconds, ok) for case, rnd, seconds, ok in rows]


def test_ratios_are_paired_by_round_and_leave_out_the_warm_up_and_failures():
    samples = _samples([
        ("floor", 0, 100.0, True), ("x", 0, 1.0, True),        # warm-up: ignored
        ("floor", 1, 1.0, True), ("x", 1, 2.0, True),          # 2.0
        ("floor", 2, 2.0, True), ("x", 2, 3.0, True),          # 1.5
        ("floor", 3, 1.0, True), ("x", 3, 9.0, False),         # failed: no pair
        ("floor", 4, 4.0, True), ("x", 4, 4.0, True),          # 1.0
    ])
    assert sbs.paired_ratio(samples, "x", "floor") == 1.5
    cell = sbs.cell(samples, "x")
    assert (cell["runs"], cell["failed"], cell["median_s"], cell["min_s"], cell["max_s"]) == (4, 1, 3.0, 2.0, 4.0)


def test_table_marks_the_floor_and_counts_good_runs():
    samples = _samples([("floor", 1, 1.0, True), ("x", 1, 1.5, True), ("x", 2, 9.0, False)])
    text = sbs.table(samples, [("floor", "the floor"), ("x", "booted")], floor="floor")
    assert "| the floor | 1.000 | 1.000–1.000 | 1/1 | 1 |" in text
    assert "| booted | 1.500 | 1.500–1.500 | 1/2 | 1.50 |" in text


@pytest.mark.parametrize("measured, limit, word", [(1.2, 1.3, "MET"), (1.4, 1.3, "NOT MET"), (None, 1.3, "not measured")])
def test_verdict(measured, limit, word):
    assert sbs.verdict("x", measured, limit).endswith(word)


def test_interleave_runs_every_case_once_per_round_plus_a_warm_up():
    calls = []
    cases = {c: (lambda c=c: calls.append(c) or sbs.Outcome(0.1)) for c in "abc"}
    samples = sbs.interleave(cases, rounds=3, log=lambda _: None)
    assert sorted(calls) == sorted("abc" * 4)
    assert {s.round for s in samples} == {0, 1, 2, 3}


# ------------------------------------------------------------------------------ reach_bench
def test_reach_addresses_split_in_two_halves_inside_the_subnet():
    live, dead = reach_bench.split_addresses("10.250.7.0/24", 100)
    assert len(live) == len(dead) == 50 and not set(live) & set(dead)
    assert all(a.startswith("10.250.7.") for a in live + dead)
    assert "10.250.7.1" not in live + dead   # the control host's end of the veth


def test_reach_inventory_and_config_are_what_booted_reads(tmp_path, monkeypatch):
    """The bench's inventory passes booted's own reader, and its config booted's validation."""
    from fabfile.hosts.inventory import Inventory
    from fabfile.providers import load_config

    images = [f"rb-{i:03d}" for i in range(1, 5)]
    (tmp_path / "environments.yaml").write_text(reach_bench.config_text(images))
    assert load_config(tmp_path / "environments.yaml").env("rb").workers == tuple(images)
    import json

    path = tmp_path / "inventory.json"
    path.write_text(json.dumps(reach_bench.inventory_doc({i: f"10.0.0.{n}" for n, i in enumerate(images, 2)}, 1.0)))
    assert [e.address for e in Inventory(path).hosts(env="rb")] == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]


@pytest.mark.parametrize("code, out, kept, ok", [
    (0, "ssh: 2 of 4 hosts answer; dropped: ...", {"a", "b"}, True),
    (1, "ssh: 2 of 4 hosts answer", {"a", "b"}, False),          # exit code
    (0, "ssh: 3 of 4 hosts answer", {"a", "b"}, False),          # wrong count said
    (0, "ssh: 2 of 4 hosts answer", {"a", "c"}, False),          # kept a dead one
])
def test_reach_run_is_judged_on_exit_output_and_inventory(code, out, kept, ok):
    assert reach_bench.filter_outcome(code, out, kept, {"a", "b"}, 4)[0] is ok


# ------------------------------------------------------------------------------ bringup
def test_bringup_lab_config_is_valid_booted_config(tmp_path):
    from fabfile.providers import load_config

    path = tmp_path / "environments.yaml"
    path.write_text(bringup.lab_config([3, 30], 8123, "bbup00001", "10.250.3.0/24"))
    cfg = load_config(path)
    assert cfg.env("u30").loadbalancers == ("u30-lb",)
    assert len(cfg.env("u30").workers) == 30 and "u30-lb" not in cfg.env("u30").workers
    assert cfg.env("u3").lb_port == bringup.LB_PORT


def test_floor_addresses_come_from_the_top_and_leave_room_for_booted():
    addresses = bringup.floor_addresses("10.250.3.0/24", 4)
    assert addresses == ["10.250.3.254", "10.250.3.253", "10.250.3.252", "10.250.3.251"]
    with pytest.raises(SystemExit):
        bringup.floor_addresses("10.250.3.0/24", 127)


def test_marginal_cost_uses_the_two_largest_sizes():
    assert bringup.marginal_cost({3: 10.0, 30: 37.0, 100: 107.0}) == 1.0
    assert bringup.marginal_cost({3: 10.0, 30: None}) is None


@pytest.mark.parametrize("code, out, ok", [
    (0, "u-w1 ok already serving v2\nu-w2 ok already serving v2\n", True),
    (0, "u-w1 ok already serving v2\nu-w2 ok v2 (abc)\n", False),   # it redeployed one
    (1, "u-w1 ok already serving v2\nu-w2 ok already serving v2\n", False),
])
def test_convergence_must_redeploy_nothing(code, out, ok):
    assert bringup.converge_ok(code, out, 2)[0] is ok


# ------------------------------------------------------------------------------ monitor_reaction
import monitor_reaction  # noqa: E402


def test_breach_is_when_the_first_slow_request_after_the_slow_down_passed_the_mark():
    requests = [(10.0, 0.30, 200), (20.0, 0.01, 200), (21.0, 0.20, 200), (22.0, 0.40, 200)]
    assert monitor_reaction.first_breach(requests, 150, after=15.0) == pytest.approx(21.15)
    assert monitor_reaction.first_breach(requests, 500, after=15.0) is None


def test_first_hit_reads_the_load_balancers_log_for_that_worker_only():
    log = ('10.0.0.1 [2026-12-02T03:52:10+00:00] "GET / HTTP/1.1" 200 upstream=10.0.0.3:9999 upstream_status=200\n'
           '10.0.0.1 [2026-12-02T03:52:11+00:00] "GET / HTTP/1.1" 200 upstream=10.0.0.3:9999, 10.0.0.4:9999 x\n')
    assert monitor_reaction.first_hit(log, "10.0.0.4") == 1796183531.0
    assert monitor_reaction.first_hit(log, "10.0.0.40") is None
    assert monitor_reaction.reaction_goal(2, 2.0, 4.4) == pytest.approx(10.4)


def test_monitor_lab_config_is_valid(tmp_path):
    from fabfile.providers import load_config

    path = tmp_path / "environments.yaml"
    path.write_text(monitor_reaction.lab_config(8123, "bbmr00001", "10.250.3.0/24"))
    env = load_config(path).env(monitor_reaction.ENV)
    assert (env.monitor.interval_s, env.monitor.up_samples, env.monitor.down_window_s) == (2, 2, 10)


# ------------------------------------------------------------------------------ discovery_bench
import discovery_bench  # noqa: E402


def test_the_mixed_log_is_what_it_says_when_booted_reads_it(tmp_path, monkeypatch):
    """1 in 10 lines a valid call, 3 in 10 forged (skipped as such), the rest junk: read by booted's own parser."""
    from collections import Counter

    from fabfile.hosts import bootlog, callhome
    from fabfile.providers import load_config

    monkeypatch.setenv("BOOTED_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "environments.yaml").write_text(discovery_bench.config_text())
    cfg = load_config(tmp_path / "environments.yaml")
    keys = {name: callhome.host_key(discovery_bench.ENV, name) for name in discovery_bench.images()}
    log = tmp_path / "mixed.log"
    discovery_bench.write_mixed(log, 0, 1000, keys, 1_800_000_000)
    result = bootlog.BootedLog(log, cfg, control=()).read_all()
    assert len(result.calls) == discovery_bench.expected_calls(0, 1000) == 100
    assert {c.name for c in result.calls} == set(discovery_bench.images())
    assert result.skipped == Counter({bootlog.MALFORMED: 600, bootlog.BAD_SIGNATURE: 200, bootlog.UNKNOWN_IMAGE: 100})


@pytest.mark.parametrize("out, lines, calls, ok", [
    ("read 1000 lines of /x/mixed.log: 100 calls home; skipped: ...", 1000, 100, True),
    ("read 1000 lines of /x/mixed.log: 99 calls home; skipped: ...", 1000, 100, False),
    ("read 999 lines of /x/mixed.log: 100 calls home; skipped: ...", 1000, None, False),
    ("nothing", 0, 0, False),
])
def test_discovery_runs_are_judged_on_the_summary_line(out, lines, calls, ok):
    assert discovery_bench.check_summary(out, lines, calls)[0] is ok


def test_a_re_read_of_only_the_new_lines_is_proportional():
    # full read: 1M lines in 0.3 + 3.0 s -> 3 us a line; 10,000 new lines predict 0.03 s
    assert discovery_bench.proportional(3.3, 1_000_000, 0.3, 0.33, 10_000) == pytest.approx(1.0)
    assert discovery_bench.proportional(3.3, 1_000_000, 0.3, 3.3, 10_000) == pytest.approx(100.0)  # re-read it all
