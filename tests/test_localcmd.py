"""Long local commands (debootstrap, image builds): output to a log, one-line failures, a timeout that kills."""
from __future__ import annotations

import time

import pytest

from fabfile.core import localcmd
from fabfile.core.errors import CommandError, WaitTimeout


def test_run_logged_keeps_the_output_in_its_log(tmp_path):
    log = tmp_path / "step.log"
    localcmd.run_logged(["sh", "-c", "echo one; echo two >&2"], log, timeout=10, what="step")
    assert log.read_text().split() == ["one", "two"]


def test_a_failed_long_command_is_one_line_with_its_last_output_and_log(tmp_path):
    log = tmp_path / "step.log"
    with pytest.raises(CommandError) as err:
        localcmd.run_logged(["sh", "-c", "echo working; echo 'E: no such suite' >&2; exit 3"], log, timeout=10,
                            what="debootstrap")
    assert str(err.value) == f"debootstrap failed (exit 3): E: no such suite (log: {log})"


def test_a_long_command_past_its_timeout_is_killed(tmp_path):
    marker = tmp_path / "still-running"
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match="did not finish within 1s"):
        # the touch runs in a grandchild: the whole process group must go, not only the shell
        localcmd.run_logged(["sh", "-c", f"(sleep 3; touch {marker}) & wait"], tmp_path / "step.log", timeout=1,
                            what="step")
    time.sleep(3)
    assert not marker.exists() and time.monotonic() - started < 10
