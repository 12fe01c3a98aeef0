"""Run one function per host in a bounded pool; one line per host as it finishes; a summary.

Deploy, start, stop, test, hosts-filter and environment start-up all fan out the same way, so
they share this instead of each growing its own thread loop.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TypeVar

from fabfile.core.errors import BootedError
from fabfile.core.output import host_line, say

T = TypeVar("T")


@dataclass
class HostResult:
    """What happened on one host."""

    host: str  # the name shown: the image
    ok: bool
    detail: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


def fan_out(
    items: Sequence[T],
    work: Callable[[T], str | HostResult],
    *,
    label: Callable[[T], str],
    parallel: int = 32,
    quiet: bool = False,
) -> list[HostResult]:
    """Call ``work(item)`` for every item, at most ``parallel`` at once.

    ``work`` returns a detail string (success) or a HostResult, or raises: a BootedError is that
    host's failure with its message; any other exception is reported with its type so one bad host
    never hides the others' results.
    """
    results: list[HostResult] = []
    if not items:
        return results
    width = max(len(label(i)) for i in items) + 1

    def one(item: T) -> HostResult:
        start = time.monotonic()
        try:
            out = work(item)
            result = out if isinstance(out, HostResult) else HostResult(label(item), True, out or "")
        except BootedError as err:
            result = HostResult(label(item), False, _strip_host(str(err), label(item)))
        except Exception as err:  # report, don't crash the whole fan-out
            result = HostResult(label(item), False, f"{type(err).__name__}: {err}")
        result.seconds = time.monotonic() - start
        return result

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(items)))) as pool:
        futures = [pool.submit(one, item) for item in items]
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            if not quiet:
                say(host_line(result.host, result.ok, result.detail, width))
    order = {label(i): n for n, i in enumerate(items)}
    results.sort(key=lambda r: order.get(r.host, 0))
    return results


def _strip_host(message: str, host: str) -> str:
    return message[len(host) + 2:] if message.startswith(f"{host}: ") else message


def summary(what: str, results: Iterable[HostResult]) -> str:
    results = list(results)
    failed = [r.host for r in results if not r.ok]
    ok = len(results) - len(failed)
    line = f"{what}: {ok} of {len(results)} hosts ok"
    if failed:
        line += f"; failed: {', '.join(failed)}"
    return line


def raise_if_failed(what: str, results: Iterable[HostResult]) -> None:
    results = list(results)
    if any(not r.ok for r in results):
        raise BootedError(summary(what, results))
