"""The booted log's fast reader says exactly what the line-by-line parser says, and the host-key
signer that makes forged lines cheap agrees with the standard HMAC on every key and message."""
from __future__ import annotations

import hashlib
import hmac
import random
from collections import Counter

import pytest
from test_bootlog import CONTROL, cfg, hostile_lines, valid_line  # noqa: F401  (cfg: the fixture)

from fabfile.core import forked
from fabfile.hosts import bootlog, callhome
from fabfile.hosts.bootlog import BootedLog, Call, parse_lines


@pytest.mark.parametrize("key_length", [0, 1, 32, 63, 64, 65, 128, 200])
def test_host_signer_is_hmac_sha256(key_length):
    rng = random.Random(key_length)
    key = bytes(rng.randrange(256) for _ in range(key_length))
    signer = callhome.HostSigner(key)
    for size in (0, 1, 50, 55, 56, 64, 119, 120, 1000):
        message = bytes(rng.randrange(256) for _ in range(size))
        expected = hmac.new(key, message, hashlib.sha256)
        assert signer.digest(message) == expected.digest()
        assert signer.verifies(message, expected.hexdigest().encode())
        assert not signer.verifies(message, ("0" * 64).encode())
    assert callhome.HostSigner("ab" * 32).digest(b"m") == hmac.digest(b"ab" * 32, b"m", "sha256")


def mangled_lines(tmp_path) -> list[bytes]:
    """Valid lines, every hostile line, and single-byte edits of a valid line (no newlines)."""
    rng = random.Random(18)
    base = valid_line().encode()
    lines = [base, valid_line(name="prod-web2", addr="10.77.0.12", msec="1700000001.500").encode()]
    lines += [x.encode() if isinstance(x, str) else x for _, x, _ in hostile_lines(tmp_path)]
    alphabet = b'\\"x%&=:.0aF \x1b-\xff3A'
    for i in range(len(base)):
        lines += [base[:i] + bytes([rng.choice(alphabet)]) + base[i + 1:], base[:i] + base[i + 1:]]
    lines += [b"booted1 " + b"y" * n for n in (4087, 4088, 4089, 5000)]  # 4095..5007 bytes: both sides of MAX_LINE
    lines += [b"j" * n for n in (4095, 4096, 4097, 9000)]
    return [line.replace(b"\n", b"") for line in lines]


@pytest.mark.parametrize("chunk", [1 << 20, 4096, 333])
def test_the_chunked_reader_matches_the_line_parser(cfg, tmp_path, monkeypatch, chunk):  # noqa: F811
    """Every line parsed alone, and the log read in chunks (lines straddling chunk ends), agree."""
    monkeypatch.setattr(bootlog, "_CHUNK", chunk)
    lines = mangled_lines(tmp_path)
    log = tmp_path / "booted.log"
    log.write_bytes(b"\n".join(lines) + b"\n")

    expected = parse_lines([line if len(line) <= bootlog.MAX_LINE else None for line in lines], cfg, CONTROL)
    result = BootedLog(log, cfg, CONTROL).read_all()

    assert result.lines == expected.lines == len(lines)
    assert result.skipped == expected.skipped
    assert result.calls == expected.calls
    assert [c.name for c in result.calls][:2] == ["prod-web1", "prod-web2"]
    assert all(isinstance(c, Call) for c in result.calls)
    assert expected.skipped[bootlog.OVERLONG] == 5 and expected.skipped[bootlog.BAD_SIGNATURE] > 50
    assert set(result.skipped) <= set(bootlog.REASONS) and 0 not in Counter(result.skipped).values()


@pytest.mark.parametrize("cores", [2, 3, 5])
@pytest.mark.parametrize("part_min", [700, 5000])
def test_a_log_read_in_parts_by_forked_children_matches_one_read(cfg, tmp_path, monkeypatch, cores, part_min):  # noqa: F811
    """A large read cut into parts (one per core, at line ends, some inside overlong lines), read by
    forked children and joined, gives what one read gives; and the cursor stops before a partial
    last line, as it does for one read."""
    lines = mangled_lines(tmp_path) * 3
    log = tmp_path / "booted.log"
    log.write_bytes(b"\n".join(lines) + b"\n" + b"booted1 partial")
    one = BootedLog(log, cfg, CONTROL).read_all()  # below _PART_MIN: one read

    forks, real_fork = [], forked.Forked
    monkeypatch.setattr(bootlog, "_PART_MIN", part_min)
    monkeypatch.setattr(bootlog.forked, "cores", lambda: cores)
    monkeypatch.setattr(bootlog.forked, "Forked", lambda *a: forks.append(a) or real_fork(*a))
    parts = BootedLog(log, cfg, CONTROL).read_all()

    assert len(forks) == cores - 1  # the read was cut into one part per core
    assert (parts.lines, parts.end, parts.skipped, parts.calls) == (one.lines, one.end, one.skipped, one.calls)
    assert parts.end == log.stat().st_size - len(b"booted1 partial")
    assert all(type(c) is Call for c in parts.calls) and len(parts.calls) == len(one.calls) > 3


def test_a_part_whose_child_fails_is_read_by_the_parent(cfg, tmp_path, monkeypatch):  # noqa: F811
    lines = mangled_lines(tmp_path) * 2
    log = tmp_path / "booted.log"
    log.write_bytes(b"\n".join(lines) + b"\n")
    one = BootedLog(log, cfg, CONTROL).read_all()

    def broken(self, fd, start, stop):
        raise OSError("the child cannot read")
    monkeypatch.setattr(bootlog, "_PART_MIN", 1000)
    monkeypatch.setattr(bootlog.forked, "cores", lambda: 2)
    monkeypatch.setattr(BootedLog, "_read_forked", broken)
    parts = BootedLog(log, cfg, CONTROL).read_all()
    assert (parts.lines, parts.end, parts.skipped, parts.calls) == (one.lines, one.end, one.skipped, one.calls)


def test_a_log_is_read_in_one_piece_when_small_or_threads_run(cfg, tmp_path, monkeypatch):  # noqa: F811
    log = tmp_path / "booted.log"
    log.write_bytes(b"\n".join(mangled_lines(tmp_path)) + b"\n")
    monkeypatch.setattr(bootlog.forked, "cores", lambda: 4)
    with open(log, "rb") as fh:
        assert bootlog._parts(fh, 0) == [0]  # below _PART_MIN
        monkeypatch.setattr(bootlog, "_PART_MIN", 1000)
        bounds = bootlog._parts(fh, 0)
        assert len(bounds) == 4 and all(log.read_bytes()[b - 1:b] == b"\n" for b in bounds[1:])
        monkeypatch.setattr(bootlog.forked.threading, "active_count", lambda: 2)
        assert bootlog._parts(fh, 0) == [0]  # a fork copies one thread: not with others running
