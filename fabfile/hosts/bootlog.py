"""Reading the booted log: which hosts called home, and which lines to ignore.

booted's nginx writes one line per call home::

    log_format booted 'booted1 $remote_addr $msec "$args"';

nginx escapes ``"``, ``\\`` and every byte below 0x20 or above 0x7e as ``\\xXX``, so a line is
printable ASCII; ``$args`` is the raw, still URL-encoded query string. Anyone who can reach nginx
can put a line in the log, so a line counts only if every field is well-formed, its environment is
configured, it names an image booted made a key for, its timestamp is within ``CLOCK_WINDOW_S`` of
the time nginx received it (a recorded call replayed later is refused), its signature verifies
(``callhome.Keyring``) and the address it claims is the address nginx saw. A wrongly signed line
costs about what a junk line costs: keys come from memory, never from a file read per line. Everything else is skipped and counted by reason; nothing from a line is ever run, and
parsing never raises on what a line contains.

``BootedLog.read_new`` reads the log incrementally: a cursor (device, inode, offset) in a small
JSON file under ``state/bootlog/`` remembers how far it got, so a large log is read once and then
only what was appended. A replaced file (new inode) or a truncated one starts again from 0.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import stat
import urllib.parse
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fabfile.core import localcmd, names
from fabfile.core.config import Config
from fabfile.core.errors import BootedError, UsageError
from fabfile.core.state import atomic_write_json, locked, read_json, state_path
from fabfile.hosts import callhome

MAX_LINE = 4096  # bytes, without the newline; a real call home is about 250
CLOCK_WINDOW_S = 900  # a host's clock may be this far from nginx's, either way
QUERY_KEYS = ("env", "name", "mac", "addr", "ts", "sig")

# Why a line was skipped: the keys of ReadResult.skipped.
MALFORMED = "malformed"  # not 'booted1 ADDR MSEC "ARGS"', or not ASCII
OVERLONG = "overlong"  # more than MAX_LINE bytes
ESCAPED = "escaped-bytes"  # the query held raw control, non-ASCII, quote or backslash bytes
BAD_QUERY = "bad-query"  # keys missing, repeated or unknown; bad %-encoding
IPV6 = "ipv6"  # nginx saw an IPv6 client; hosts call home over IPv4
LOOPBACK = "loopback"  # 127.0.0.0/8 or ::1: from this machine, not a host
CONTROL_HOST = "control-host"  # one of this machine's own addresses
UNKNOWN_ENV = "unknown-environment"
BAD_NAME = "bad-name"
BAD_MAC = "bad-mac"
BAD_ADDR = "bad-addr"  # addr is not a dotted IPv4 address
FORGED_ADDR = "forged-address"  # addr is not the address nginx saw
BAD_TS = "bad-ts"
TS_WINDOW = "outside-time-window"  # ts too far from when nginx received the call: stale or replayed
UNKNOWN_IMAGE = "unknown-image"  # names no image booted made a key for
BAD_SIGNATURE = "bad-signature"  # not 64 hex digits, or does not verify
REASONS = (
    MALFORMED, OVERLONG, ESCAPED, BAD_QUERY, IPV6, LOOPBACK, CONTROL_HOST, UNKNOWN_ENV,
    BAD_NAME, BAD_MAC, BAD_ADDR, FORGED_ADDR, BAD_TS, TS_WINDOW, UNKNOWN_IMAGE, BAD_SIGNATURE,
)

# $args sits between quotes; nginx wrote any '"' inside it as \x22
_PREFIX = b"booted1 "
_LINE = re.compile(r'booted1 ([0-9A-Fa-f:.]{1,45}) ([0-9]{1,12}\.[0-9]{3}) "([\x20\x21\x23-\x7e]*)"')
# The exact shape booted-callhome's request takes in the log (urlencode, keys in its order), as
# bytes: such a line needs no decoding and none of the general parsing below, only the checks that
# need state (so a forged line, however well-formed, costs one signature check more than junk).
# Anything else takes the general path.
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL = re.compile(
    rb'booted1 (' + _OCTET + rb'(?:\.' + _OCTET + rb'){3}) ([0-9]{1,12}\.[0-9]{3}) "env=([a-z][a-z0-9-]{0,31})'
    rb"&name=([A-Za-z0-9][A-Za-z0-9._-]{0,62})&mac=((?:[0-9a-f]{2}%3A){5}[0-9a-f]{2})&addr=\1"
    rb'&ts=([0-9]{1,12})&sig=([0-9a-f]{64})"')
# Many lines at once, joined by newlines: each line either in the canonical shape (its 7 groups) or,
# as the 8th group, whole. One call per chunk instead of a match object per line.
_CANONICAL_LINES = re.compile(rb"(?m)^(?:" + _CANONICAL.pattern + rb"$|([^\n]*)$)")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_TS = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")
_CURSOR_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_HEAD = 256  # bytes of the log's start remembered to notice a file rewritten in place
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Call:
    """One verified call home."""

    env: str
    name: str  # the image name the host called home as (a clone keeps its source's)
    mac: str
    addr: str
    ts: int  # the host's clock when it called
    seen_at: float  # nginx's clock ($msec) when the call arrived


@dataclass
class ReadResult:
    calls: list[Call] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> lines
    lines: int = 0  # complete lines read, counted or skipped
    start: int = 0  # byte offset reading began at
    end: int = 0  # byte offset after the last complete line
    restarted: str | None = None  # "new-file", "truncated" or "rewritten" when the cursor was reset


# --------------------------------------------------------------------------- one line
def parse_line(line: str | bytes, config: Config, control: Collection[str] = (),
               keys: callhome.Keyring | None = None) -> Call | str:
    """A ``Call`` if ``line`` is a genuine call home, else the reason (one of ``REASONS``) to skip it.

    ``control`` holds this machine's own addresses. ``keys``, if given, holds host keys across
    lines. Never raises on the line's contents.
    """
    return _Checks(config, control, keys).line(line)


class _Checks:
    """What checking lines needs besides the line, prepared once per read: this machine's addresses
    and the configured environments (also as bytes, for lines in the canonical shape), and the keys."""

    def __init__(self, config: Config, control: Collection[str], keys: callhome.Keyring | None):
        self.config = config
        self.control = control
        self.control_bytes = frozenset(a.encode() for a in control)
        self.env_bytes = frozenset(e.encode() for e in config.environments)
        self.keys = callhome.Keyring(config) if keys is None else keys
        self.signers: dict[tuple[bytes, bytes], callhome.HostSigner] = {}  # names booted made a key for only
        self.keyed: dict[bytes, frozenset[bytes]] = {}  # environment -> the names it has keys for

    def line(self, line: str | bytes) -> Call | str:
        if isinstance(line, bytes):
            line = line.removesuffix(b"\n")
            if len(line) > MAX_LINE:
                return OVERLONG
            if not line.startswith(_PREFIX):  # both patterns begin with it: junk costs no decode, no regex
                return MALFORMED
        else:
            line = line.removesuffix("\n")
            if len(line) > MAX_LINE:
                return OVERLONG
            try:
                line = line.encode("ascii")
            except UnicodeEncodeError:
                return MALFORMED
        canonical = _CANONICAL.fullmatch(line)
        if canonical:
            return self.canonical(canonical.groups())
        try:
            return self.general(line.decode("ascii"))
        except UnicodeDecodeError:
            return MALFORMED

    def canonical(self, fields: tuple[bytes, ...]) -> Call | str:
        """A line in booted-callhome's exact shape (``_CANONICAL``'s groups): the same checks as
        ``general``, in the same order, minus those the pattern already made (address, MAC, name,
        timestamp and signature syntax)."""
        addr, msec, env, name, mac, ts, sig = fields[:7]
        if addr.startswith(b"127."):
            return LOOPBACK
        if addr in self.control_bytes:
            return CONTROL_HOST
        if env not in self.env_bytes:
            return UNKNOWN_ENV
        if abs(int(ts) - float(msec)) > CLOCK_WINDOW_S:
            return TS_WINDOW
        signer = self.signers.get((env, name))
        if signer is None:
            keyed = self.keyed.get(env)
            if keyed is None:
                keyed = self.keyed[env] = frozenset(n.encode() for n in self.keys.names(env.decode()))
            if name not in keyed:
                return UNKNOWN_IMAGE  # no decoding, no key lookup: a flood of invented names stays cheap
            signer = self.keys.signer(env.decode(), name.decode())
            if signer is None:
                return UNKNOWN_IMAGE
            self.signers[(env, name)] = signer
        mac = mac.replace(b"%3A", b":")
        if not signer.verifies(b"|".join((env, name, mac, addr, ts)), sig):
            return BAD_SIGNATURE
        return Call(env=env.decode(), name=name.decode(), mac=mac.decode(), addr=addr.decode(), ts=int(ts),
                    seen_at=float(msec))

    def general(self, line: str) -> Call | str:
        match = _LINE.fullmatch(line)
        if not match:
            return MALFORMED
        remote_text, msec, args = match.groups()
        try:
            remote = ipaddress.ip_address(remote_text)
        except ValueError:
            return MALFORMED
        if remote.version == 6:
            mapped = remote.ipv4_mapped
            if remote.is_loopback or (mapped is not None and mapped.is_loopback):
                return LOOPBACK
            return IPV6
        if remote.is_loopback:
            return LOOPBACK
        if remote_text in self.control:
            return CONTROL_HOST

        if "\\" in args:  # nginx wrote \xXX: the request carried raw bytes no call home sends
            return ESCAPED
        query = _split_query(args)
        if query is None:
            return BAD_QUERY

        env, name, mac, addr, ts, sig = (query[k] for k in QUERY_KEYS)
        if env not in self.config.environments or not _valid("environment", env):
            return UNKNOWN_ENV
        if not _valid("image", name):
            return BAD_NAME
        if not _MAC.fullmatch(mac):
            return BAD_MAC
        if not _IPV4.fullmatch(addr) or not _is_ipv4(addr):
            return BAD_ADDR
        if addr != remote_text:
            return FORGED_ADDR
        if not _TS.fullmatch(ts):
            return BAD_TS
        if abs(int(ts) - float(msec)) > CLOCK_WINDOW_S:
            return TS_WINDOW
        if not _SIG.fullmatch(sig):
            return BAD_SIGNATURE
        signer = self.keys.signer(env, name)
        if signer is None:
            return UNKNOWN_IMAGE
        if not signer.verifies("|".join([env, name, mac, addr, ts]).encode(), sig):
            return BAD_SIGNATURE
        return Call(env=env, name=name, mac=mac, addr=addr, ts=int(ts), seen_at=float(msec))


def _split_query(args: str) -> dict[str, str] | None:
    """The six call-home fields, each exactly once and nothing else; None otherwise."""
    fields: dict[str, str] = {}
    for part in args.split("&"):
        key, sep, value = part.partition("=")
        if not sep or key not in QUERY_KEYS or key in fields:
            return None
        try:
            fields[key] = urllib.parse.unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            return None
    return fields if len(fields) == len(QUERY_KEYS) else None


def _valid(kind: str, value: str) -> bool:
    try:
        names.check(kind, value)
    except UsageError:
        return False
    return True


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def control_addresses() -> set[str]:
    """This machine's own addresses (every family), from ``ip -j addr``."""
    result = localcmd.run(["ip", "-j", "addr", "show"])
    try:
        links = json.loads(result.stdout or "[]")
    except ValueError:
        raise BootedError("`ip -j addr show` printed something that is not JSON") from None
    found = set()
    for link in links if isinstance(links, list) else []:
        for info in link.get("addr_info", []) if isinstance(link, dict) else []:
            local = info.get("local") if isinstance(info, dict) else None
            if isinstance(local, str) and local:
                found.add(local)
    return found


def parse_lines(lines: Iterable[bytes | str | None], config: Config, control: Collection[str] = (),
                result: ReadResult | None = None, keys: callhome.Keyring | None = None) -> ReadResult:
    """Parse ``lines`` into ``result`` (a new one by default); ``None`` stands for an overlong line."""
    result = ReadResult() if result is None else result
    checks = _Checks(config, control, keys)
    for raw in lines:
        result.lines += 1
        parsed = OVERLONG if raw is None else checks.line(raw)
        if isinstance(parsed, Call):
            result.calls.append(parsed)
        else:
            result.skipped[parsed] += 1
    return result


# --------------------------------------------------------------------------- the file
class BootedLog:
    """The booted log at ``path``, read whole or from where the last read stopped.

    ``control``: this machine's addresses, whose lines are skipped; ``None`` reads them with
    ``control_addresses()``.
    """

    def __init__(self, path: str | os.PathLike, config: Config, control: Collection[str] | None = None):
        self.path = Path(path)
        self.config = config
        self._control = None if control is None else frozenset(str(a) for a in control)

    @property
    def control(self) -> frozenset[str]:
        if self._control is None:
            self._control = frozenset(control_addresses())
        return self._control

    def read_all(self) -> ReadResult:
        """Every complete line from the start (after hosts-clear). Leaves the cursors alone."""
        with self._open() as fh:
            result = ReadResult()
            self._read(fh, 0, result)
        return result

    def read_new(self, state: str | os.PathLike = "hosts") -> ReadResult:
        """The complete lines appended since the last ``read_new`` with the same cursor.

        ``state`` names the cursor (``state/bootlog/<state>.json``) or is a path to its file.
        The cursor is saved atomically once the lines are parsed; a partial last line is left
        for the next read.
        """
        cursor_path = self._cursor_path(state)
        with locked("bootlog"):
            with self._open() as fh:
                st = os.fstat(fh.fileno())
                cursor = _load_cursor(cursor_path)
                start, restarted = 0, None
                if cursor is not None:
                    start, restarted = self._resume_at(fh, st, cursor)
                result = ReadResult(start=start, restarted=restarted)
                self._read(fh, start, result)
                head = _head(fh, result.end)
            atomic_write_json(cursor_path, {
                "path": str(self.path.resolve()),
                "device": st.st_dev,
                "inode": st.st_ino,
                "offset": result.end,
                "head_sha256": head,
            })
        return result

    # -- internals
    def _open(self):
        try:
            if self.path.exists() and not stat.S_ISREG(self.path.stat().st_mode):
                raise BootedError(f"booted log {self.path} is not a regular file (a device, FIFO or folder)")
            return open(self.path, "rb")
        except FileNotFoundError:
            raise BootedError(f"booted log {self.path} does not exist (is booted's nginx running? `fab restart-nginx`)") from None
        except IsADirectoryError:
            raise BootedError(f"booted log {self.path} is a directory, not a log file") from None
        except OSError as err:
            raise BootedError(f"cannot read booted log {self.path}: {err.strerror}") from None

    @staticmethod
    def _cursor_path(state: str | os.PathLike) -> Path:
        if isinstance(state, str) and os.sep not in state:
            if not _CURSOR_NAME.fullmatch(state):
                raise UsageError(f"invalid bootlog cursor name {state!r}: lower-case letters, digits, '-', '_'")
            return state_path("bootlog", f"{state}.json")
        return Path(state)

    @staticmethod
    def _resume_at(fh, st: os.stat_result, cursor: dict) -> tuple[int, str | None]:
        if (cursor["device"], cursor["inode"]) != (st.st_dev, st.st_ino):
            return 0, "new-file"
        if st.st_size < cursor["offset"]:
            return 0, "truncated"
        if _head(fh, cursor["offset"]) != cursor["head_sha256"]:
            return 0, "rewritten"  # truncated and refilled past the old offset between two reads
        return cursor["offset"], None

    def _read(self, fh, start: int, result: ReadResult) -> None:
        """Parse every complete line from ``start`` into ``result``, one chunk of lines at a time.

        ``parse_lines`` for a million lines at C speed where it can be: the lines that begin like a
        booted line are cut out of the chunk by one ``split`` on that beginning, the rest (junk) are
        only counted; those lines are matched against the canonical shape in one ``findall``, and
        each goes straight to its checks. This machine's addresses are looked up only if there is a
        line to read."""
        result.start = result.end = start
        checks = None
        canonical_lines, calls, skipped = _CANONICAL_LINES.findall, result.calls, result.skipped
        for lines, count, overlong, end in _line_batches(fh, start):
            if checks is None:
                checks = _Checks(self.config, self.control, callhome.Keyring(self.config))
            booted = [rest.partition(b"\n")[0] for rest in (b"\n" + lines).split(_LINE_START)[1:]] if count else []
            if overlong:
                skipped[OVERLONG] += overlong
            if len(booted) < count:
                skipped[MALFORMED] += count - len(booted)
            for found in canonical_lines(_PREFIX + _LINE_START.join(booted)) if booted else ():
                parsed = checks.line(found[7]) if found[7] else checks.canonical(found)
                if isinstance(parsed, Call):
                    calls.append(parsed)
                else:
                    skipped[parsed] += 1
            result.lines += count + overlong
            result.end = end


_LINE_START = b"\n" + _PREFIX
_BLOCK = 2048  # any run of 2 × _BLOCK - 1 bytes holds an aligned block: MAX_LINE + 1 >= 2 × _BLOCK - 1


def _line_batches(fh, start: int) -> Iterator[tuple[bytes, int, int, int]]:
    """The complete lines from ``start``, a chunk at a time: (the lines joined by newlines, without
    the overlong ones; how many lines that is; how many overlong lines were dropped; file offset
    after the last line).

    A line longer than ``MAX_LINE`` is counted, never held in memory whole; an unterminated last
    line is not yielded (the cursor stays before it). Lines are split apart only in a chunk that
    may hold an overlong one: one with an aligned ``_BLOCK`` of bytes and no newline in it.
    """
    fh.seek(start)
    pending = b""  # the start of a line begun in an earlier chunk (at most MAX_LINE bytes)
    overlong = False  # that line is already too long; its bytes are dropped until its newline
    position = start  # file offset of the first byte of the current chunk
    while True:
        chunk = fh.read(_CHUNK)
        if not chunk:
            return
        last = chunk.rfind(b"\n")
        if last < 0:
            if not overlong:
                pending += chunk
                if len(pending) > MAX_LINE:
                    overlong, pending = True, b""
            position += len(chunk)
            continue
        if overlong:  # the chunk begins with the rest of an overlong line
            first = chunk.find(b"\n")
            lines, dropped = chunk[first + 1:last], 1
            count = 0 if first == last else lines.count(b"\n") + 1
        else:
            lines, dropped = pending + chunk[:last], 0
            count = lines.count(b"\n") + 1
        if count and any(lines.find(b"\n", i, i + _BLOCK) < 0 for i in range(0, len(lines) - _BLOCK + 1, _BLOCK)):
            kept = [line for line in lines.split(b"\n") if len(line) <= MAX_LINE]
            dropped += count - len(kept)
            lines, count = b"\n".join(kept), len(kept)
        tail = chunk[last + 1:]
        overlong = len(tail) > MAX_LINE
        pending = b"" if overlong else tail
        yield lines, count, dropped, position + last + 1
        position += len(chunk)


def _head(fh, offset: int) -> str:
    fh.seek(0)
    return hashlib.sha256(fh.read(min(offset, _HEAD))).hexdigest()


def _load_cursor(path: Path) -> dict | None:
    """The saved cursor, or None if there is none or it is unreadable (then the log is read again)."""
    try:
        cursor = read_json(path)
    except (OSError, ValueError, BootedError):
        return None
    if not isinstance(cursor, dict):
        return None
    kinds = {"device": int, "inode": int, "offset": int, "head_sha256": str}
    if any(not isinstance(cursor.get(k), t) or isinstance(cursor.get(k), bool) for k, t in kinds.items()):
        return None
    if cursor["offset"] < 0:
        return None
    return cursor
