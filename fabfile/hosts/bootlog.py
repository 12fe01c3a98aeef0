"""Reading the booted log: which hosts called home, and which lines to ignore.

booted's nginx writes one line per call home::

    log_format booted 'booted1 $remote_addr $msec "$args"';

nginx escapes ``"``, ``\\`` and every byte below 0x20 or above 0x7e as ``\\xXX``, so a line is
printable ASCII; ``$args`` is the raw, still URL-encoded query string. Anyone who can reach nginx
can put a line in the log, so a line counts only if every field is well-formed, its environment is
configured, it names an image booted made a key for, its timestamp is within ``CLOCK_WINDOW_S`` of
the time nginx received it (a recorded call replayed later is refused), its signature verifies
(``callhome.Keyring``) and the address it claims is the address nginx saw. Everything else is
skipped and counted by reason; nothing from a line is ever run, and parsing never raises on what a
line contains.

A flood of forged lines must not stall the tasks that read the log: a wrongly signed line costs at
most about twice what a junk line costs (bench/discovery_bench.py). Keys come from memory, never
from a file read per line; a line in booted-callhome's exact shape skips the general parsing, and
the checks that need no key are made for many such lines at once (``_Checks.lines``), so what is
left per line is a dictionary look-up and, for a name booted made a key for, one HMAC.

``BootedLog.read_new`` reads the log incrementally: a cursor (device, inode, offset) in a small
JSON file under ``state/bootlog/`` remembers how far it got, so a large log is read once and then
only what was appended. A replaced file (new inode) or a truncated one starts again from 0.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import operator
import os
import re
import stat
import urllib.parse
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import compress, repeat
from pathlib import Path
from typing import NamedTuple

from fabfile.core import forked, localcmd, names
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
# bytes, led by the newline that ends the line before it: such a line needs no decoding and none of
# the general parsing below, only the checks that need state. Anything else takes the general path.
# It begins with a literal (the regex engine skips ahead to it at C speed, so the junk between two
# call homes costs next to nothing) and never crosses a newline: `_CALL.split` of many lines joined
# by newlines cuts out every line in this shape and leaves the others, in order, between them.
# The name, MAC and signature are matched loosely ('.'), and their characters checked after, many
# lines at once (`_well_formed`): the regex engine tests a character class byte by byte, several
# times slower than `bytes.translate`. Together the two accept exactly what the strict pattern
# (`[A-Za-z0-9][A-Za-z0-9._-]{0,62}`, `(?:[0-9a-f]{2}%3A){5}[0-9a-f]{2}`, `[0-9a-f]{64}`) would, with
# the same fields: a name of those characters holds no '&', so the lazy name ends where the strict
# one would, and the MAC and signature are fixed-width.
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CALL = re.compile(
    rb'\nbooted1 (' + _OCTET + rb'(?:\.' + _OCTET + rb'){3}) ([0-9]{1,12}\.[0-9]{3}) "env=([a-z][a-z0-9-]{0,31})'
    rb"&name=([A-Za-z0-9].{0,62}?)&mac=(..%3A..%3A..%3A..%3A..%3A..)&addr=\1"
    rb'&ts=([0-9]{1,12})&sig=(.{64})"(?![^\n])')
_CALL_LINE = b'booted1 %s %s "env=%s&name=%s&mac=%s&addr=%s&ts=%s&sig=%s"'  # its fields back into the line
_FIELDS = 7  # _CALL's groups
_NAME_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
_HEX_CLASS = bytes(b"h"[0] if chr(c) in "0123456789abcdef" else b"-"[0] for c in range(256))  # hex digit -> h
_MAC_CLASS = b"00%3A00%3A00%3A00%3A00%3A00".translate(_HEX_CLASS)
_SIG_CLASS = b"h" * 64
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_TS = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")
_CURSOR_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_HEAD = 256  # bytes of the log's start remembered to notice a file rewritten in place
# Bytes read at once: small enough that the objects made of one chunk's lines reuse the memory of
# the last chunk's (at 1 MiB, a fresh process spent ~10 % more on page faults)
_CHUNK = 1 << 17


class Call(NamedTuple):
    """One verified call home. (A named tuple, not a frozen dataclass: as immutable, and made about
    three times faster, which a log of a hundred thousand genuine calls notices.)"""

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
        # (environment, name) -> the signer of its key: every name booted made a key for, in each
        # configured environment a line has named so far (``load``)
        self.signers: dict[tuple[bytes, bytes], callhome.HostSigner] = {}
        self.loaded: set[bytes] = set()

    def load(self, envs: Iterable[bytes]) -> None:
        """Have the signers of every name the configured ones of ``envs`` have a key for (each
        environment's secret and key record are read once; nothing for one that is not configured)."""
        for env in (set(envs) & self.env_bytes) - self.loaded:
            text = env.decode()
            for name in self.keys.names(text):
                signer = self.keys.signer(text, name)
                if signer is not None:  # always: names() are the names with a key
                    self.signers[(env, name.encode())] = signer
            self.loaded.add(env)

    def line(self, line: str | bytes) -> Call | str:
        if isinstance(line, bytes):
            line = line.removesuffix(b"\n")
            if len(line) > MAX_LINE:
                return OVERLONG
        else:
            line = line.removesuffix("\n")
            if len(line) > MAX_LINE:
                return OVERLONG
            try:
                line = line.encode("ascii")
            except UnicodeEncodeError:
                return MALFORMED
        canonical = _CALL.fullmatch(b"\n" + line)
        if canonical is None:
            return self.other(line)
        return self.fields(canonical.groups())

    def fields(self, fields: Sequence[bytes]) -> Call | str:
        """A line ``_CALL`` matched, as its groups: canonical if well-formed, else the general path."""
        addr, msec, env, name, mac, ts, sig = fields
        if _well_formed((name,), (mac,), (sig,)):
            return self.canonical(*fields)
        return self.other(_CALL_LINE % (addr, msec, env, name, mac, addr, ts, sig))

    def other(self, line: bytes) -> Call | str:
        """A line not in the canonical shape: the general path."""
        if not line.startswith(_PREFIX):  # as _LINE does, but before decoding: junk costs no decode, no regex
            return MALFORMED
        try:
            return self.general(line.decode("ascii"))
        except UnicodeDecodeError:
            return MALFORMED

    def canonical(self, addr: bytes, msec: bytes, env: bytes, name: bytes, mac: bytes, ts: bytes,
                  sig: bytes) -> Call | str:
        """A well-formed line in booted-callhome's exact shape (``_CALL``'s groups): the same
        checks as ``general``, with the same verdict, minus those the pattern already made (address,
        MAC, timestamp and signature syntax, most of the name's)."""
        if addr.startswith(b"127."):
            return LOOPBACK
        if addr in self.control_bytes:
            return CONTROL_HOST
        if env not in self.env_bytes:
            return UNKNOWN_ENV
        if env not in self.loaded:
            self.load((env,))
        signer = self.signers.get((env, name))
        if signer is None and _invalid_name(name):
            return BAD_NAME
        if abs(int(ts) - float(msec)) > CLOCK_WINDOW_S:
            return TS_WINDOW
        return _signed(signer, addr, msec, env, name, mac, ts, sig)

    def plain(self, addrs: list[bytes], msecs: list[bytes], envs: list[bytes], tss: list[bytes]) -> bool:
        """Whether no line of many canonical ones (their fields) comes from loopback or this machine,
        names an environment that is not configured, or was sent outside the time window: the checks
        ``canonical`` makes before the name's, for all the lines at once, at C speed. Then only the
        name and the signature are left to check line by line."""
        return (self.env_bytes.issuperset(envs)
                and self.control_bytes.isdisjoint(addrs)
                and b"\n127." not in b"\n" + b"\n".join(addrs)
                and max(map(abs, map(operator.sub, map(int, tss), map(float, msecs))), default=0) <= CLOCK_WINDOW_S)

    def lines(self, lines: bytes, calls: list[Call], skipped: Counter) -> None:
        """Check every line of ``lines`` (complete lines joined by newlines, none overlong) into
        ``calls`` and ``skipped``, in order: ``parse_lines`` at C speed where it can be.

        One ``_CALL.split`` cuts out every line in the canonical shape, as its fields; what lies
        between two of them is the other lines, whole. In the common case (the others are junk, the
        canonical lines well-formed and ``plain``) the junk is only counted, all at once, and each
        canonical line costs a dictionary look-up and, if it names a key booted made, its signature
        check. Otherwise every line is looked at in its place (``fields``, ``others``)."""
        parts = _CALL.split(b"\n" + lines)  # [others, 7 fields, others, 7 fields, ..., others]
        step = _FIELDS + 1
        others = b"".join(parts[::step])
        addrs, msecs, envs, names, macs, tss, sigs = (parts[i::step] for i in range(1, step))
        if _LINE_START in others or not (_well_formed(names, macs, sigs) and self.plain(addrs, msecs, envs, tss)):
            self.one_by_one(parts, calls, skipped)
            return
        if others:
            skipped[MALFORMED] += others.count(b"\n")
        self.load(envs)
        found = list(map(self.signers.get, zip(envs, names)))  # each line's signer, None if booted made no key
        unkeyed = found.count(None)
        if unkeyed:  # what canonical() has left to check on these: the name
            invalid = _invalid_names(list(compress(names, map(operator.not_, found))))
            skipped.update({BAD_NAME: invalid, UNKNOWN_IMAGE: unkeyed - invalid} if invalid else {UNKNOWN_IMAGE: unkeyed})
            if unkeyed == len(found):
                return
            addrs, msecs, envs, names, macs, tss, sigs = (
                list(compress(column, found)) for column in (addrs, msecs, envs, names, macs, tss, sigs))
        signers = list(filter(None, found))
        # and on the others, the signature: _signed(), a column at a time
        verified = list(map(callhome.HostSigner.verifies, signers, map(_message, envs, names, macs, addrs, tss), sigs))
        forged = verified.count(False)
        if forged:
            skipped[BAD_SIGNATURE] += forged
        if forged < len(verified):
            calls.extend(map(_call, *(compress(column, verified) for column in (addrs, msecs, envs, names, macs, tss))))

    def one_by_one(self, parts: list[bytes], calls: list[Call], skipped: Counter) -> None:
        """``lines``, for ``_CALL.split``'s ``parts``: each line in its place."""
        self.others(parts[0], calls, skipped)
        for addr, msec, env, name, mac, ts, sig, between in zip(*[iter(parts[1:])] * (_FIELDS + 1)):
            _tally(self.fields((addr, msec, env, name, mac, ts, sig)), calls, skipped)
            self.others(between, calls, skipped)

    def others(self, lines: bytes, calls: list[Call], skipped: Counter) -> None:
        """``lines``: newline-led lines not in the canonical shape (b"\\nL1\\nL2"), or nothing."""
        if not lines:
            return
        booted = lines.split(_LINE_START)
        if len(booted) > 1:
            for rest in booted[1:]:
                _tally(self.other(_PREFIX + rest.partition(b"\n")[0]), calls, skipped)
        malformed = lines.count(b"\n") - (len(booted) - 1)
        if malformed:
            skipped[MALFORMED] += malformed

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


def _tally(verdict: Call | str, calls: list[Call], skipped: Counter) -> None:
    """A line's verdict: a call home, or the reason it was skipped, counted."""
    if verdict.__class__ is Call:  # (not isinstance: a NamedTuple's check is slower, per line)
        calls.append(verdict)
    else:
        skipped[verdict] += 1


def _invalid_name(name: bytes) -> bool:
    """Whether a name ``_CALL`` matched fails what ``names.check`` adds to the pattern."""
    return b".." in name or name.endswith(b".lock")


def _invalid_names(names: list[bytes]) -> int:
    """How many of ``names`` (``_CALL`` matched them) fail ``_invalid_name``; most often none, seen at once."""
    text = b"\n".join(names) + b"\n"  # names hold no newline
    if b".." not in text and b".lock\n" not in text:
        return 0
    return sum(map(_invalid_name, names))


def _signed(signer: callhome.HostSigner | None, addr: bytes, msec: bytes, env: bytes, name: bytes, mac: bytes,
            ts: bytes, sig: bytes) -> Call | str:
    """The verdict on a canonical line that passed every check before the name's key: ``signer``
    is that key's, or None if booted made none for the name."""
    if signer is None:
        return UNKNOWN_IMAGE  # no decoding, no key: a flood of invented names stays cheap
    if not signer.verifies(_message(env, name, mac, addr, ts), sig):
        return BAD_SIGNATURE
    return _call(addr, msec, env, name, mac, ts)


def _message(env: bytes, name: bytes, mac: bytes, addr: bytes, ts: bytes) -> bytes:
    """What a canonical line's signature signs (``callhome.signature``)."""
    return b"|".join((env, name, mac.replace(b"%3A", b":"), addr, ts))


def _call(addr: bytes, msec: bytes, env: bytes, name: bytes, mac: bytes, ts: bytes) -> Call:
    return Call(env.decode(), name.decode(), mac.replace(b"%3A", b":").decode(), addr.decode(), int(ts), float(msec))


def _well_formed(names: Sequence[bytes], macs: Sequence[bytes], sigs: Sequence[bytes]) -> bool:
    """Whether every name, MAC and signature ``_CALL`` matched loosely is what its strict form would
    have matched; many lines at once."""
    return (not b"".join(names).translate(None, _NAME_CHARS)
            and b"".join(macs).translate(_HEX_CLASS) == _MAC_CLASS * len(macs)
            and b"".join(sigs).translate(_HEX_CLASS) == _SIG_CLASS * len(sigs))


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
        _tally(OVERLONG if raw is None else checks.line(raw), result.calls, result.skipped)
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
        """Parse every complete line from ``start`` into ``result``, one chunk of lines at a time
        (``_Checks.lines``). This machine's addresses are looked up only if there is a line to read.

        A large read is cut at line ends into parts, one per core (``_parts``); forked children
        read all but the last part while this process reads the last, and the parts' results are
        joined in file order: the same result as one read, sooner (1M lines: 2.1 -> 1.6 s on two
        cores; the rest is the children's results coming back and this process's own start-up). A
        child that fails has its part read here."""
        result.start = result.end = start
        bounds = _parts(fh, start)
        if len(bounds) == 1:
            self._read_part(fh, start, None, result)
            return
        self._control = self.control  # looked up once, before the fork, not in every child
        with ExitStack() as children:
            heads = [children.enter_context(forked.Forked(self._read_forked, fh.fileno(), a, b))
                     for a, b in zip(bounds, bounds[1:])]
            tail = ReadResult(start=bounds[-1])
            self._read_part(fh, bounds[-1], None, tail)
            parts = [_unpacked(child.result(), a) for child, a in zip(heads, bounds)]
        for part, (a, b) in zip(parts, zip(bounds, bounds[1:])):
            if part is None:
                part = ReadResult(start=a)
                self._read_part(fh, a, b, part)
            _join(result, part)
        _join(result, tail)

    def _read_forked(self, fd: int, start: int, stop: int) -> tuple:
        """``_read_part`` in a forked child, through its own open file (the parent's shares one
        offset), packed for the trip back (``_unpacked``)."""
        with open(f"/proc/self/fd/{fd}", "rb") as fh:
            part = ReadResult(start=start)
            self._read_part(fh, start, stop, part)
        # the calls as columns of plain values: pickling named tuples one by one cost 0.27 s per 50,000
        return part.lines, part.end, dict(part.skipped), tuple(zip(*part.calls))

    def _read_part(self, fh, start: int, stop: int | None, result: ReadResult) -> None:
        """Parse the complete lines from ``start`` up to ``stop`` (a line end; None: the end of the file)."""
        result.end = start
        checks = None
        for lines, count, overlong, end in _line_batches(fh, start, stop):
            if checks is None:
                checks = _Checks(self.config, self.control, callhome.Keyring(self.config))
            if overlong:
                result.skipped[OVERLONG] += overlong
            if count:
                checks.lines(lines, result.calls, result.skipped)
            result.lines += count + overlong
            result.end = end


def _join(result: ReadResult, part: ReadResult) -> None:
    """Add ``part``, read from where ``result`` ends, to ``result``."""
    result.calls += part.calls
    result.skipped.update(part.skipped)
    result.lines += part.lines
    result.end = part.end


def _unpacked(packed: tuple | None, start: int) -> ReadResult | None:
    """A part's result from ``_read_forked``'s packing; None for None (the child failed)."""
    if packed is None:
        return None
    lines, end, skipped, columns = packed
    calls = list(map(tuple.__new__, repeat(Call), zip(*columns)))  # Call(*row) at C speed
    return ReadResult(calls=calls, skipped=Counter(skipped), lines=lines, start=start, end=end)


# The least a part holds. A fork, the copies-on-write it causes and the return of a part's result
# cost 10-20 ms here; junk lines, the cheapest, read at about 3 ms a MiB (a junk log of 11 MiB read
# 0.035 s at once, 0.056 s in two parts), lines naming known images at 10-30 ms a MiB.
_PART_MIN = 8 << 20


def _parts(fh, start: int) -> list[int]:
    """Where the parts of a read from ``start`` begin. One part (``[start]``) unless the rest of the
    file holds two parts' worth (``_PART_MIN`` each), more than one core is free and forking is safe;
    then at most one part per core, of about equal size, each beginning just after a newline."""
    size = os.fstat(fh.fileno()).st_size
    count = min(forked.cores(), (size - start) // _PART_MIN)
    if count < 2 or not forked.can_fork():
        return [start]
    bounds = [start]
    for i in range(1, count):
        at = _line_start_from(fh.fileno(), max(bounds[-1] + 1, start + (size - start) * i // count), size)
        if at is None:
            break
        bounds.append(at)
    return bounds


def _line_start_from(fd: int, offset: int, size: int) -> int | None:
    """The first offset at or after ``offset`` that follows a newline, if it is before ``size``."""
    position = offset - 1
    while position < size - 1:
        block = os.pread(fd, _CHUNK, position)
        if not block:
            return None
        found = block.find(b"\n")
        if found >= 0:
            at = position + found + 1
            return at if at < size else None
        position += len(block)
    return None


_LINE_START = b"\n" + _PREFIX
_BLOCK = 2048  # any run of 2 × _BLOCK - 1 bytes holds an aligned block: MAX_LINE + 1 >= 2 × _BLOCK - 1


def _line_batches(fh, start: int, stop: int | None = None) -> Iterator[tuple[bytes, int, int, int]]:
    """The complete lines from ``start`` (up to ``stop``, if given), a chunk at a time: (the lines joined by newlines, without
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
        chunk = fh.read(_CHUNK if stop is None else min(_CHUNK, stop - position))
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
