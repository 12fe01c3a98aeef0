"""A function run in a forked child: its result comes back, a failure comes back as None (the
caller does the work itself), and no child outlives the block that started it."""
from __future__ import annotations

import os
import time

import pytest

from fabfile.core import forked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_child_result_comes_back():
    big = list(range(200_000))  # more than a pipe holds: the parent reads while the child writes
    with forked.Forked(lambda n: (os.getpid(), big[:n], {"k": b"v"}), 150_000) as child:
        pid, values, extra = child.result()
    assert pid != os.getpid() and values == big[:150_000] and extra == {"k": b"v"}


@pytest.mark.parametrize("fn", [
    lambda: 1 / 0,                      # an exception
    lambda: os.kill(os.getpid(), 9),    # killed
    lambda: (lambda: None),             # a result pickle refuses
    lambda: os._exit(0),                # gone without a word
])
def test_a_child_that_fails_gives_none(fn):
    with forked.Forked(fn) as child:
        assert child.result() is None


def test_leaving_the_block_kills_and_reaps_a_child_still_running():
    with forked.Forked(time.sleep, 60) as child:
        pid = child.pid
        assert _alive(pid)
    assert child.pid is None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: not a zombie left for someone else


def test_no_fork_while_other_threads_run():
    import threading
    assert forked.can_fork()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not forked.can_fork()
    finally:
        stop.set()
        thread.join()
    assert forked.cores() >= 1


def test_a_child_that_cannot_be_started_gives_none(monkeypatch):
    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(forked.os, "fork", no_fork)
    with forked.Forked(lambda: 1) as child:
        assert child.pid is None and child.result() is None
