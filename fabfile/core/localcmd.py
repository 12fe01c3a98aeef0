"""The one helper that runs local commands: argument lists only, never a shell string."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fabfile.core.errors import CommandError, WaitTimeout
from fabfile.core.output import progress


@dataclass
class CommandResult:
    """What a finished command did."""

    argv: list[str]
    returncode: int
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)
    host: str = ""  # where it ran: "" for this machine, else the remote host (fabfile.core.ssh)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def failure(self, what: str) -> str:
        """``WHAT failed (exit N): its last line of output``: how booted reports a failed command."""
        detail = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return f"{what} failed (exit {self.returncode})" + (f": {detail[-1]}" if detail else "")

    @property
    def command(self) -> str:
        return " ".join(self.argv)


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    input: str | None = None,
    cwd: str | os.PathLike | None = None,
) -> CommandResult:
    """Run ``argv`` (a list; no shell) and return its result; raise ``CommandError`` if ``check``."""
    argv = [str(a) for a in argv]
    full_env = child_environ()
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            input=input,
            cwd=cwd,
            stdin=None if input is not None else subprocess.DEVNULL,
            # its own process group: a Ctrl-C meant for booted (which finishes or abandons its
            # step cleanly) must not kill the command under it mid-way
            process_group=0,
        )
    except FileNotFoundError:
        raise CommandError(f"command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"timed out after {timeout:g}s: {' '.join(argv[:3])}") from None
    result = CommandResult(argv, proc.returncode, proc.stdout, proc.stderr)
    if check and not result.ok:
        raise CommandError(result.failure(" ".join(argv[:3])), result)
    return result


def is_secret_variable(name: str) -> bool:
    """Variables that hold secrets booted reads itself (the root password, repository URLs, which
    may carry credentials): no child process needs them."""
    return name == "BOOTED_PW" or name.endswith("_REPO")


def child_environ() -> dict[str, str]:
    """booted's environment without its secrets: what every local command starts from."""
    return {k: v for k, v in os.environ.items() if not is_secret_variable(k)}


def process_alive(pid: int, name: bytes | None = None) -> bool:
    """True if ``pid`` runs, is not a zombie (this machine's PID 1 reaps orphans late, so a plain
    ``kill -0`` says yes long after a process ended), and, if ``name`` is given, has it in its argv[0]."""
    from pathlib import Path

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    return name is None or name in argv0


def which(name: str) -> str | None:
    return shutil.which(name)


def run_logged(argv: Sequence[str], log: Path, *, timeout: float, what: str, report_every: float = 10.0) -> None:
    """Run a long command with its output in ``log``: a progress line with its latest output line every
    ``report_every`` seconds, killed at ``timeout``; one-line errors naming the log."""
    def latest() -> str:
        lines = log.read_text(errors="replace").strip().splitlines()
        return lines[-1][:160] if lines else ""

    with open(log, "w") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_environ(), process_group=0)
        start = time.monotonic()
        next_report = start + report_every
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - start > timeout:
                    raise WaitTimeout(f"{what} did not finish within {timeout:g}s (log: {log})")
                if now >= next_report:
                    progress(f"... {what} ({now - start:.0f}s): {latest() or 'starting'}")
                    next_report = now + report_every
                time.sleep(0.3)
        except BaseException:  # the timeout, Ctrl-C or SIGTERM: end the command's whole process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if proc.returncode != 0:
        raise CommandError(f"{what} failed (exit {proc.returncode}): {latest() or 'no output'} (log: {log})")
