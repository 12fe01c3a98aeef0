"""Run a function in a forked child, on another core, and get its result back.

For CPU-bound work in pure Python that splits into independent parts (reading a large booted log):
threads would share one interpreter lock, and a process pool would start new interpreters and
import booted again (0.2 s); a fork starts at once with everything already loaded.

The child's result comes back pickled through a pipe. Whatever goes wrong in the child (an
exception, a signal, a result that cannot be pickled) makes ``result()`` return None, and the caller
does that part itself, so the answer never depends on the child. Leaving the ``with`` block kills
and reaps a child not yet collected, also on Ctrl-C: no child outlives its parent's use of it.
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
from collections.abc import Callable
from typing import Any


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def can_fork() -> bool:
    """Whether forking is safe here: only from a process with one thread (a fork copies one thread,
    and a lock another one held, in the interpreter or a C library, would stay held in the child)."""
    return hasattr(os, "fork") and threading.active_count() == 1


class Forked:
    """``fn(*args)`` run in a forked child; ``result()`` is its return value, or None if it failed."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.pid: int | None = None
        self._read_end: int | None = None
        try:
            read_end, write_end = os.pipe()
        except OSError:  # out of file descriptors: no child, result() is None
            return
        try:
            pid = os.fork()
        except OSError:  # out of processes or memory: the same
            os.close(read_end)
            os.close(write_end)
            return
        if pid == 0:  # the child: never returns into the caller's code
            status = 1
            try:
                os.close(read_end)
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it at once, no traceback
                data = pickle.dumps(fn(*args), protocol=pickle.HIGHEST_PROTOCOL)
                view = memoryview(data)
                while view:
                    view = view[os.write(write_end, view):]
                status = 0
            except BaseException:  # noqa: BLE001 (the parent redoes the work and reports any error itself)
                pass
            finally:
                os._exit(status)  # no atexit handlers, no flush of the parent's buffers
        os.close(write_end)
        self.pid = pid
        self._read_end = read_end

    def result(self) -> Any | None:
        """Wait for the child; its result, or None if it failed, could not be started or was
        already collected."""
        chunks = []
        if self._read_end is None:
            return None
        try:
            while chunk := os.read(self._read_end, 1 << 20):
                chunks.append(chunk)
        finally:
            status = self._reap(kill=False)
        if status != 0:
            return None
        try:
            return pickle.loads(b"".join(chunks))
        except Exception:  # noqa: BLE001 (a truncated stream: the caller redoes the work)
            return None

    def _reap(self, kill: bool) -> int | None:
        if self._read_end is not None:
            os.close(self._read_end)
            self._read_end = None
        if self.pid is None:
            return None
        if kill:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        return os.waitstatus_to_exitcode(status)

    def __enter__(self) -> Forked:
        return self

    def __exit__(self, *exc: object) -> None:
        self._reap(kill=True)
