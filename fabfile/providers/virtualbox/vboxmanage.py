"""VBoxManage: the command wrapper and pure parsers for its output.

Everything VirtualBox-specific about *talking to* VBoxManage lives here; what to ask it lives in
``provider.py``. Facts used (sources in docs/virtualbox.md):

* Failure is a non-zero exit **or** a ``VBoxManage: error:`` line on stderr, even at exit 0, as Vagrant and
  Packer treat it (docs/virtualbox.md §1). The first such line is the message; ``Details: code NAME (0x...)`` names the code.
* Output is translated, so every call runs with ``LANG=C LC_ALL=C`` (docs/virtualbox.md §1).
* Session-lock errors (``VBOX_E_INVALID_OBJECT_STATE``, "is already locked") are transient right after a VM
  powers off or while another client holds the VM; they are retried for up to a minute per call (Packer allows
  five minutes), with exponential backoff and jitter, so a busy VirtualBox delays a build instead of failing it.
* ``showvminfo --machinereadable`` quotes values (and keys that contain ``=``) and backslash-escapes ``"`` and
  ``\\`` inside them; some numeric values are unquoted (docs/virtualbox.md §3.4).
"""
from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from fabfile.core import localcmd
from fabfile.core.errors import CommandError, ProviderError, UsageError
from fabfile.core.output import progress

EXECUTABLE = "VBoxManage"
LOCALE_ENV = {"LANG": "C", "LC_ALL": "C"}
INSTALL_HINT = (
    "VBoxManage not found on PATH: install VirtualBox 7 (your distribution's virtualbox package "
    "or the package from virtualbox.org), then check `VBoxManage --version`"
)

# No single call should take longer (a full clone of a big disk is the slowest); a hung VBoxSVC fails here.
COMMAND_TIMEOUT_S = 900
# Retries of session-lock errors: for up to RETRY_WINDOW_S per call; the first delay doubles each time up to
# RETRY_DELAY_CAP_FACTOR times itself, and each wait is drawn from [delay/2, delay] (jitter) so that two
# booted processes waiting on one VM do not retry in step. With the defaults a call gets at least 15 attempts
# (even if every wait is the longest): at a 30% lock-error rate it gives up with probability 0.3**15 (~1e-8).
RETRY_WINDOW_S = 60.0
RETRY_WINDOW_ENV = "BOOTED_VBOX_RETRY_WINDOW"
RETRY_DELAY_ENV = "BOOTED_VBOX_RETRY_DELAY"
RETRY_DELAY_DEFAULT = 0.5
RETRY_DELAY_CAP_FACTOR = 10.0

_ERROR_LINE = re.compile(r"^VBoxManage(?:\.exe)?: error: (.*)$", re.M)
_ERROR_CODE = re.compile(r"code (\w+) \((0x[0-9a-fA-F]+)\)")
_LIST_LINE = re.compile(r'^"(.+?)" \{(.+?)\}$')


# --------------------------------------------------------------------------- parsers (pure)
def parse_version(text: str) -> tuple[int, ...]:
    """``7.1.12r169651`` -> (7, 1, 12); the first line not starting with ``WARNING:`` (Vagrant's rule)."""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("WARNING:"):
            continue
        raw = line.split("_")[0].split("r")[0]
        parts = raw.split(".")
        if parts and all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
        break
    raise ValueError(f"unrecognised VBoxManage --version output: {text.strip()[:80]!r}")


def broken_install(text: str) -> str | None:
    """The line explaining a broken install (``--version`` mentions the kernel module), else None."""
    for line in text.splitlines():
        if "vboxdrv kernel module is not loaded" in line or "Please install" in line:
            return line.strip()
    return None


def parse_list_vms(text: str) -> list[tuple[str, str]]:
    """``list vms`` / ``list runningvms``: [(name, uuid)], one ``"NAME" {UUID}`` per line."""
    found = []
    for line in text.splitlines():
        match = _LIST_LINE.match(line.strip())
        if match:
            found.append((match.group(1), match.group(2)))
    return found


def _read_quoted(line: str, start: int) -> tuple[str, int]:
    """Read a ``"..."`` string with ``\\"`` and ``\\\\`` escapes at ``line[start]``; return (text, end)."""
    out, i = [], start + 1
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line) and line[i + 1] in '"\\':
            out.append(line[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise ValueError("unterminated quoted string")


def parse_machinereadable(text: str) -> dict[str, str]:
    """``key="value"`` lines (showvminfo / snapshot list ``--machinereadable``) -> dict.

    Keys may be quoted (storage attachments, keys containing ``=``); values are quoted with
    backslash escapes, or bare (some numbers). Lines that fit neither are skipped.
    """
    info: dict[str, str] = {}
    for line in text.splitlines():
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            if line.startswith('"'):
                key, pos = _read_quoted(line, 0)
                if pos >= len(line) or line[pos] != "=":
                    continue
            else:
                pos = line.find("=")
                if pos <= 0:
                    continue
                key = line[:pos]
            rest = line[pos + 1:]
            if rest.startswith('"'):
                value, end = _read_quoted(rest, 0)
            else:
                value = rest.strip()
        except ValueError:
            continue
        info[key] = value
    return info


def parse_snapshot_names(text: str) -> list[str]:
    """``snapshot VM list --machinereadable``: names from ``SnapshotName...="..."`` lines."""
    info = parse_machinereadable(text)
    return [v for k, v in info.items() if k.startswith("SnapshotName")]


_PROP_NEW = re.compile(r"^(\S+) = '(.*)'(?:\s+@.*)?$")
_PROP_OLD = re.compile(r"^Name: (.*?), value: (.*?), timestamp: .*$")


def parse_guestproperties(text: str) -> dict[str, str]:
    """``guestproperty enumerate``: 7.x ``NAME = 'VALUE' @ ...`` or 6.1 ``Name: N, value: V, ...`` lines."""
    props = {}
    for line in text.splitlines():
        line = line.strip()
        match = _PROP_NEW.match(line) or _PROP_OLD.match(line)
        if match:
            props[match.group(1)] = match.group(2)
    return props


_NET_IP = re.compile(r"^/VirtualBox/GuestInfo/Net/(\d+)/V4/IP$")
# The per-VM NAT network of NIC 1 (docs/virtualbox.md §6.1): every VM is 10.0.2.15 there, unreachable from the host.
_NAT_PREFIX = "10.0.2."


def guest_addresses(props: dict[str, str]) -> list[str]:
    """IPv4 addresses the guest reports, in its interface order, without the NAT-only address.

    Drops ``0.0.0.0`` and addresses ending in ``.1`` as Vagrant does (a DHCP server's address; docs/virtualbox.md §7).
    """
    found = []
    for key, value in props.items():
        match = _NET_IP.match(key)
        if not match:
            continue
        value = value.strip()
        if not value or value == "0.0.0.0" or value.endswith(".1") or value.startswith(_NAT_PREFIX):
            continue
        found.append((int(match.group(1)), value))
    return [addr for _, addr in sorted(found)]


def parse_ostypes(text: str) -> list[str]:
    return re.findall(r"^ID:\s+(\S+)\s*$", text, re.M)


def parse_hostonlyifs(text: str) -> list[dict[str, str]]:
    """``list hostonlyifs``: blocks separated by blank lines, ``Key:   value`` per line."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    return blocks


def mac_colon(raw: str) -> str:
    """``080027E34B7A`` -> ``08:00:27:e3:4b:7a``."""
    raw = raw.strip().replace(":", "").replace("-", "").lower()
    return ":".join(raw[i:i + 2] for i in range(0, len(raw), 2))


@dataclass(frozen=True)
class VBoxFailure:
    """What a failed call said: the first error line and the COM code, when present."""

    message: str
    code: str = ""

    @property
    def retryable(self) -> bool:
        return self.code == "VBOX_E_INVALID_OBJECT_STATE" or "is already locked" in self.message \
            or "while it is locked" in self.message


def parse_failure(stderr: str) -> VBoxFailure | None:
    """The failure reported on stderr (``VBoxManage: error: ...``), or None if there is none."""
    lines = [m.strip() for m in _ERROR_LINE.findall(stderr)]
    if not lines:
        return None
    code_match = _ERROR_CODE.search(stderr)
    message = next((ln for ln in lines if ln and not ln.startswith(("Details:", "Context:"))), lines[0])
    return VBoxFailure(message, code_match.group(1) if code_match else "")


# --------------------------------------------------------------------------- running it
class VBoxError(ProviderError):
    """A VBoxManage call failed; ``code`` is VirtualBox's (e.g. ``VBOX_E_OBJECT_NOT_FOUND``) if given."""

    def __init__(self, message: str, *, image: str | None = None, result=None, code: str = "",
                 vbox_message: str = ""):
        super().__init__(message, image=image, result=result)
        self.code, self.vbox_message = code, vbox_message

    @property
    def gone(self) -> bool:
        return self.code == "VBOX_E_OBJECT_NOT_FOUND"


def _seconds_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UsageError(f"{name}={raw!r}: must be a number of seconds (0 or more)")
    return value


def retry_delay() -> float:
    return _seconds_from_env(RETRY_DELAY_ENV, RETRY_DELAY_DEFAULT)


def retry_window() -> float:
    return _seconds_from_env(RETRY_WINDOW_ENV, RETRY_WINDOW_S)


def backoff(attempt: int, delay: float, rng: random.Random) -> float:
    """The wait before retry number ``attempt`` (1 = the first retry): doubling, capped, with jitter."""
    ceiling = min(delay * 2 ** (attempt - 1), delay * RETRY_DELAY_CAP_FACTOR)
    return rng.uniform(ceiling / 2, ceiling)


class VBoxManage:
    """Runs VBoxManage with argument lists; raises ``VBoxError`` with VirtualBox's one-line message."""

    def __init__(self, executable: str = EXECUTABLE, *, window: float | None = None,
                 delay: float | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None):
        self.executable = executable
        self.window = retry_window() if window is None else window
        self.delay = retry_delay() if delay is None else delay
        self.sleep, self.clock = sleep, clock
        self.rng = rng or random.Random()
        self._version: tuple[int, ...] | None = None
        self._checked = False

    def _check_installed(self) -> None:
        if not self._checked:
            if localcmd.which(self.executable) is None:
                raise ProviderError(INSTALL_HINT)
            self._checked = True

    def run(self, *args: str, image: str | None = None, retry: bool = True,
            success: Callable[[localcmd.CommandResult], bool] | None = None) -> localcmd.CommandResult:
        """Run ``VBoxManage ARGS``; retry session-lock failures; raise ``VBoxError`` on failure.

        ``success`` may accept a result the generic rule calls failed (startvm's "successfully started").
        """
        self._check_installed()
        argv = [self.executable, *[str(a) for a in args]]
        attempt = 1
        give_up_at = self.clock() + self.window
        while True:
            try:
                result = localcmd.run(argv, check=False, env=LOCALE_ENV, timeout=COMMAND_TIMEOUT_S)
            except CommandError as err:
                if "command not found" in str(err):
                    raise ProviderError(INSTALL_HINT) from None
                raise ProviderError(str(err), image=image) from None
            failure = parse_failure(result.stderr)
            if result.returncode != 0 and failure is None:
                detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
                failure = VBoxFailure(detail[-1].strip() if detail else f"exit status {result.returncode}")
            if failure is None or (success is not None and success(result)):
                return result
            wait = backoff(attempt, self.delay, self.rng)
            if retry and failure.retryable and self.clock() + wait <= give_up_at:
                if attempt == 1 or wait >= 2:  # one line per locked call, then only for the long waits
                    progress(f"VirtualBox: {image or args[0]} is locked ({failure.code or 'busy'}); "
                             f"retrying in {wait:.2g}s (attempt {attempt + 1}, for up to {self.window:g}s)")
                self.sleep(wait)
                attempt += 1
                continue
            where = f"VBoxManage {args[0]}" if args else "VBoxManage"
            code = f" [{failure.code}]" if failure.code else ""
            tries = f" (after {attempt} attempts in {self.window:g}s)" if attempt > 1 else ""
            raise VBoxError(f"{where}: {failure.message}{code}{tries}", image=image, result=result,
                            code=failure.code, vbox_message=failure.message)

    def version(self) -> tuple[int, ...]:
        """VirtualBox's version, asked once per instance."""
        if self._version is None:
            result = self.run("--version", retry=False)
            text = result.stdout + result.stderr
            broken = broken_install(text)
            if broken:
                raise ProviderError(f"VirtualBox is installed but not usable: {broken}")
            try:
                self._version = parse_version(result.stdout)
            except ValueError as err:
                raise ProviderError(str(err), result=result) from None
        return self._version

