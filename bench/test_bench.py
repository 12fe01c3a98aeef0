"""Unit tests for the benchmark's pure parts: the lab config, the peers' files, the numbers in the table.

    python3 -m pytest bench/test_bench.py -q

(The benchmark itself needs root and local hosts; these need neither.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import benchlab  # noqa: E402
import tools  # noqa: E402
from report import Run, render_markdown, summarize  # noqa: E402


def test_lab_config_is_valid_booted_config(tmp_path):
    """The lab's environments.yaml passes booted's own validation: one environment per N."""
    from fabfile.providers import load_config

    path = tmp_path / "environments.yaml"
    path.write_text(benchlab.lab_config([1, 10, 30], 8123, "bbch00001", "10.250.3.0/24"))
    cfg = load_config(path)
    assert sorted(cfg.environments) == ["b1", "b10", "b30"]
    assert cfg.env("b30").workers == tuple(f"bn30-{i:02d}" for i in range(1, 31))
    assert cfg.env("b10").loadbalancers == ("bn10-01",)
    assert cfg.providers["local"]["bridge"] == "bbch00001"
    assert cfg.nginx["port"] == 8123
    assert cfg.deploy["parallel"] >= 30          # settings as shipped: all 30 hosts at once


def _run(tool, n, block, wall, ok=True):
    return Run(tool=tool, n=n, block=block, version=f"{tool}-{n}-{block}", wall_s=wall, ok=ok,
               ctrl_cpu_s=wall / 4, machine_cpu_s=wall)


def test_summary_medians_ignore_warmup_and_failures():
    runs = [
        _run("booted", 1, 0, 99.0),                    # warm-up: ignored
        _run("booted", 1, 1, 1.0), _run("booted", 1, 2, 3.0), _run("booted", 1, 3, 2.0),
        _run("booted", 1, 4, 0.1, ok=False),          # failed: reported, not in the median
    ]
    cell = summarize(runs, [1], ["booted"])["cells"]["booted@1"]
    assert cell["median_s"] == 2.0
    assert (cell["min_s"], cell["max_s"]) == (1.0, 3.0)
    assert (cell["runs"], cell["failed"]) == (4, 1)


def test_ratios_are_paired_by_block_and_slope_uses_the_two_largest_n():
    runs = []
    for block, (b10, b30, p10, p30) in enumerate([(2, 4, 4, 10), (3, 5, 3, 10), (2, 4, 6, 8)], start=1):
        runs += [_run("booted", 10, block, b10), _run("booted", 30, block, b30),
                 _run("pyinfra", 10, block, p10), _run("pyinfra", 30, block, p30)]
    s = summarize(runs, [10, 30], ["booted", "pyinfra"])
    assert s["ratio_to_booted"]["pyinfra@10"] == 2.0          # per block 2.0, 1.0, 3.0
    assert s["ratio_to_booted"]["pyinfra@30"] == 2.0          # per block 2.5, 2.0, 2.0
    assert s["slope_ms_per_host"]["booted"] == pytest.approx((4 - 2) / 20 * 1000)
    target = {t["peer"]: t for t in s["targets"]}["pyinfra"]
    assert target["ratio"] == pytest.approx(4 / 10)
    assert target["met"] is True                               # 0.4 <= 0.5


def test_markdown_table_has_a_row_per_tool_and_the_verdicts():
    runs = [_run("booted", 30, 1, 5.0), _run("ansible", 30, 1, 40.0), _run("floor", 30, 1, 4.0)]
    text = render_markdown(summarize(runs, [30], ["booted", "ansible", "floor"]),
                           {"blocks": 1, "seed": 7, "loadavg_start": (1.0, 1, 1), "loadavg_end": (2.0, 1, 1)})
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["tool", "booted", "ansible", "floor"]
    assert "vs ansible: 5.00 s ÷ 40.00 s = 0.12 (target ≤ 0.1) — NOT met" in text
    assert "vs floor: 5.00 s ÷ 4.00 s = 1.25 (target ≤ 1.5) — met" in text
    assert "8.00×" in rows[2]                                   # ansible ÷ booted


def test_peers_get_the_same_remote_command_as_booted(tmp_path):
    """The floor's remote command is exactly what booted's ssh.run_with_input sends."""
    from fabfile.core import ssh
    from fabfile.services import release

    ship = tools.Shipment(service="hello", version="v9", commit="c" * 40, tarball=tmp_path / "r.tar.gz",
                          unit="[Unit]\nDescription=x", script=release.DEPLOY_SCRIPT, keep=5, port=9999,
                          user="booted", key=tmp_path / "k")
    assert ship.remote_argv() == ["sh", "-c", release.DEPLOY_SCRIPT, "deploy", "hello", "v9", "c" * 40,
                                  "[Unit]\nDescription=x", "5"]
    assert ssh.quote(ship.remote_argv()) == tools.shlex.join(ship.remote_argv())
    data = ship.as_json()
    assert data["deploy_script"] == release.DEPLOY_SCRIPT and data["keep"] == 5


def test_timing_env_caches_bytecode_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("HELLO_REPO", "/elsewhere")
    env = tools.timing_env(tmp_path)
    assert "PYTHONDONTWRITEBYTECODE" not in env and "HELLO_REPO" not in env
    assert env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "pycache")
