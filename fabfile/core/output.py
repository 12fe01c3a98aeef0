"""Output for people: tables for lists, one line per host, a summary line, progress on waits."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence

from fabfile.core.errors import WaitTimeout


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], empty: str = "(none)") -> str:
    """A plain-text table with a header row; ``empty`` when there are no rows."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    if not cells:
        return empty
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def host_line(host: str, ok: bool, detail: str = "", width: int = 16) -> str:
    """One line per host: ``web1            ok    detail``."""
    return f"{host:<{width}} {'ok' if ok else 'FAILED':<6} {detail}".rstrip()


def say(message: str) -> None:
    print(message, flush=True)


def progress(message: str) -> None:
    """Progress for long waits goes to stderr so stdout stays parseable."""
    print(message, file=sys.stderr, flush=True)


def poll(check: Callable[[], object], *, timeout: float, interval: float = 0.05,
         on_tick: Callable[[float], None] | None = None) -> object:
    """booted's one deadline loop: call ``check`` until it returns something truthy (returned) or
    ``timeout`` seconds pass (None). ``on_tick(elapsed)`` runs after each unsuccessful check."""
    start = time.monotonic()
    while True:
        value = check()
        if value:
            return value
        elapsed = time.monotonic() - start
        if elapsed >= timeout:
            return None
        if on_tick is not None:
            on_tick(elapsed)
        time.sleep(min(interval, max(0.0, timeout - elapsed)))


def wait_until(
    check: Callable[[], object],
    *,
    timeout: float,
    what: str,
    interval: float = 0.5,
    report_every: float = 10.0,
    report: Callable[[str], None] = progress,
    hint: str = "",
) -> object:
    """Call ``check`` until it returns something truthy; report progress; raise WaitTimeout.

    ``what`` completes "waiting for ...": e.g. ``"web1 to answer on SSH"``.
    """
    next_report = report_every

    def tick(elapsed: float) -> None:
        nonlocal next_report
        if elapsed >= next_report:
            report(f"... still waiting for {what} ({elapsed:.0f}s of {timeout:g}s)")
            next_report = elapsed + report_every

    value = poll(check, timeout=timeout, interval=interval, on_tick=tick)
    if not value:
        raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}" + (f"; {hint}" if hint else ""))
    return value
