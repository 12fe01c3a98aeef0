"""Exceptions that carry what went wrong, and the one place they become a user-facing exit.

Every error a user can cause (bad config, unknown image, a host that does not answer) is a
``BootedError``: tasks never print tracebacks for them. ``user_errors`` wraps a task body and turns
a ``BootedError`` into ``invoke.Exit(message, code)``, so ``fab`` prints one line and exits non-zero.
"""
from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from invoke import Exit


class BootedError(Exception):
    """A failure the user can act on. ``str(err)`` is the one line they see."""

    exit_code = 1

    def __init__(self, message: str, *, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.exit_code = code


class ConfigError(BootedError):
    """environments.yaml (or another input file) is wrong; says file, line and key path."""

    exit_code = 2

    def __init__(self, path: str, message: str, *, keypath: str = "", line: int | None = None):
        where = str(path)
        if line is not None:
            where += f":{line}"
        if keypath:
            where += f": {keypath}"
        super().__init__(f"{where}: {message}")
        self.path, self.keypath, self.line = path, keypath, line


class UsageError(BootedError):
    """A bad flag or argument value (an invalid name, a missing --image)."""

    exit_code = 2



class CommandError(BootedError):
    """A local command failed. Carries the ``result`` (a ``localcmd.CommandResult``)."""

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


class ProviderError(BootedError):
    """A provider could not do what was asked for an image."""

    def __init__(self, message: str, *, image: str | None = None, result: Any = None):
        super().__init__(f"{image}: {message}" if image else message)
        self.image, self.result = image, result


class HostError(BootedError):
    """Something failed on one host; ``host`` names it, ``result`` holds the remote result if any."""

    def __init__(self, host: str, message: str, result: Any = None):
        super().__init__(f"{host}: {message}")
        self.host, self.reason, self.result = host, message, result


class WaitTimeout(BootedError):
    """A long wait (build, boot, deploy) ran past its limit."""


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn BootedError (and Ctrl-C) into a one-line ``invoke.Exit`` with the error's code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with terminate_as_interrupt():
            try:
                return func(*args, **kwargs)
            except BootedError as err:
                raise Exit(f"error: {err}", code=err.exit_code) from None
            except Terminated:
                raise Exit("terminated", code=143) from None
            except KeyboardInterrupt:
                raise Exit("interrupted", code=130) from None

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: every cleanup written for Ctrl-C (a half-built VM, a served kickstart) runs."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (unless someone already handles SIGTERM)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
