"""The booted log's fast reader says exactly what the line-by-line parser says, and the host-key
signer that makes forged lines cheap agrees with the standard HMAC on every key and message."""
from __future__ import annotations

import hashlib
import hmac
import random
from collections import Counter

import pytest
from test_bootlog import CONTROL, cfg, hostile_lines, valid_line  # noqa: F401  (cfg: the fixture)

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
