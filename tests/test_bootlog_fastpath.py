"""The booted log's fast paths give every line the verdict the general path gives it.

A line in booted-callhome's exact shape skips the general parsing (``_Checks.canonical``); many
such lines at once skip even that, line by line, when cheap checks over all of them pass
(``_Checks.lines``). Each table row is a line and the verdict the general path gives it
(``_Checks.other``, the parser every line took before the fast paths existed); the fast paths must
agree on every row, alone and read in chunks of every size."""
from __future__ import annotations

from collections import Counter

import pytest
from test_bootlog import CONTROL, MSEC, SCRIPT, cfg, log_line, query, valid_line  # noqa: F401  (cfg: the fixture)

from fabfile.hosts import bootlog, callhome
from fabfile.hosts.bootlog import BootedLog, Call

SIG = "0123456789abcdef" * 4  # well-formed, signs nothing


def signed(name="prod-web1", env="prod", ts="1700000000", mac="52:54:00:12:34:56", addr="10.77.0.11", key_of=None):
    return SCRIPT.sign(callhome.host_key(key_of or env, name), [env, name, mac, addr, ts])


def with_sig(sig: str, **fields) -> str:
    """A canonical line whose sig field is ``sig``, written into the log as it is (not %-encoded,
    and not escaped as nginx would: the parser must hold even if something else wrote the line)."""
    return f'booted1 {fields.get("addr", "10.77.0.11")} {MSEC} "{query(sig=SIG, **fields).replace(SIG, sig)}"'


def table() -> list[tuple[str, str | bytes, object]]:
    """(what, line, the general path's verdict: a reason, or "call")."""
    far = str(1700000000 + 901)
    return [
        ("genuine", valid_line(), "call"),
        ("genuine, the other environment", valid_line(name="dev-box", env="dev-env", addr="10.77.0.12"), "call"),
        ("name booted made no key for", log_line("10.77.0.11", query(name="stranger", sig=SIG)), bootlog.UNKNOWN_IMAGE),
        ("'..' in a name with no key", log_line("10.77.0.11", query(name="a..b", sig=SIG)), bootlog.BAD_NAME),
        ("name ending .lock", log_line("10.77.0.11", query(name="web.lock", sig=SIG)), bootlog.BAD_NAME),
        ("bad name before the time window", log_line("10.77.0.11", query(name="a..b", ts=far, sig=SIG)), bootlog.BAD_NAME),
        ("no key, outside the window", log_line("10.77.0.11", query(name="stranger", ts=far, sig=SIG)), bootlog.TS_WINDOW),
        ("keyed, outside the window", log_line("10.77.0.11", query(ts=far, sig=signed(ts=far))), bootlog.TS_WINDOW),
        ("keyed, 900 s early", log_line("10.77.0.11", query(ts="1700000900", sig=signed(ts="1700000900")), msec="1700000000.000"), "call"),
        ("keyed, 901 s late", log_line("10.77.0.11", query(ts="1699999099", sig=signed(ts="1699999099")), msec="1700000000.000"), bootlog.TS_WINDOW),
        ("wrongly signed", log_line("10.77.0.11", query(sig=SIG)), bootlog.BAD_SIGNATURE),
        ("signed by another host's key", log_line("10.77.0.11", query(sig=signed(key_of="dev-env", name="prod-web1"))), bootlog.BAD_SIGNATURE),
        ("upper-case signature", with_sig(signed().upper()), bootlog.BAD_SIGNATURE),
        ("'g' in the signature", with_sig("g" + SIG[1:]), bootlog.BAD_SIGNATURE),
        ("'&' in a 64-byte signature", with_sig(SIG[:30] + "&x=" + SIG[33:]), bootlog.BAD_QUERY),
        ("%-encoded hex in the signature", with_sig("%61" + signed()[3:]), bootlog.BAD_SIGNATURE),
        ("raw quote in the signature", with_sig(SIG[:63] + '"'), bootlog.MALFORMED),
        ("backslash in the signature", with_sig(SIG[:63] + "\\"), bootlog.ESCAPED),
        ("non-ASCII byte in the signature", with_sig(SIG[:63] + "\x00").encode().replace(b"\x00", b"\xff"), bootlog.MALFORMED),
        ("quote in the signature, as nginx escapes it", log_line("10.77.0.11", query(sig=SIG).replace(SIG, SIG[:63] + '"')), bootlog.ESCAPED),
        ("upper-case MAC", log_line("10.77.0.11", query(mac="52:54:00:AB:CD:EF", sig=SIG)), bootlog.BAD_MAC),
        ("MAC %-encoded in lower case", log_line("10.77.0.11", query(sig=signed()).replace("%3A", "%3a")), "call"),
        ("'%' where a MAC digit goes", log_line("10.77.0.11", query(sig=SIG).replace("mac=52%3A", "mac=%3%3A")), bootlog.BAD_MAC),
        ("'&mac=' inside the name", log_line("10.77.0.11", query(sig=signed()).replace("name=prod-web1", "name=a&mac=zz")), bootlog.BAD_QUERY),
        ("'..' %-encoded in a name", log_line("10.77.0.11", query(sig=SIG).replace("name=prod-web1", "name=a%2E%2Eb")), bootlog.BAD_NAME),
        ("name starting with '.'", log_line("10.77.0.11", query(name=".web", sig=SIG)), bootlog.BAD_NAME),
        ("name of 63 characters", log_line("10.77.0.11", query(name="n" * 63, sig=SIG)), bootlog.UNKNOWN_IMAGE),
        ("name of 64 characters", log_line("10.77.0.11", query(name="n" * 64, sig=SIG)), bootlog.BAD_NAME),
        ("environment not configured", log_line("10.77.0.11", query(env="staging", sig=SIG)), bootlog.UNKNOWN_ENV),
        ("environment %-encoded", log_line("10.77.0.11", query(sig=signed()).replace("env=prod", "env=pro%64")), "call"),
        ("loopback", log_line("127.0.0.1", query(addr="127.0.0.1", sig=SIG)), bootlog.LOOPBACK),
        ("this machine", log_line("10.77.0.1", query(addr="10.77.0.1", sig=SIG)), bootlog.CONTROL_HOST),
        ("address with a leading zero", log_line("10.77.0.011", query(addr="10.77.0.011", sig=SIG)), bootlog.MALFORMED),
        ("octet over 255", log_line("10.77.0.256", query(addr="10.77.0.256", sig=SIG)), bootlog.MALFORMED),
        ("claimed address not nginx's", log_line("10.77.0.66", query(sig=signed())), bootlog.FORGED_ADDR),
        ("13-digit timestamp", log_line("10.77.0.11", query(ts="1" * 13, sig=SIG)), bootlog.BAD_TS),
        ("msec with two decimals", log_line("10.77.0.11", query(sig=signed()), msec="1700000000.12"), bootlog.MALFORMED),
        ("junk", "GET / HTTP/1.1", bootlog.MALFORMED),
    ]


def as_bytes(line: str | bytes) -> bytes:
    return line.encode() if isinstance(line, str) else line


def verdict_name(verdict) -> object:
    return "call" if isinstance(verdict, Call) else verdict


def test_each_line_gets_the_general_paths_verdict(cfg):  # noqa: F811
    rows = table()
    checks = bootlog._Checks(cfg, CONTROL, None)
    general = {what: verdict_name(checks.other(as_bytes(line))) for what, line, _ in rows}
    assert general == {what: expected for what, _, expected in rows}  # the table is right
    fast = {what: verdict_name(bootlog.parse_line(line, cfg, CONTROL)) for what, line, _ in rows}
    assert fast == general
    for _, line, expected in rows:  # the same calls, not just calls
        if expected == "call":
            assert bootlog.parse_line(line, cfg, CONTROL) == checks.other(as_bytes(line))


@pytest.mark.parametrize("chunk", [1 << 17, 4096, 333])
@pytest.mark.parametrize("layout", ["mixed", "canonical first", "genuine and forged only"])
def test_a_log_read_in_chunks_gets_the_general_paths_verdicts(cfg, tmp_path, monkeypatch, chunk, layout):  # noqa: F811
    """Chunks where every cheap check passes for all lines at once (then only names and signatures
    are looked at one by one) and chunks where one fails, or a line only looks canonical."""
    monkeypatch.setattr(bootlog, "_CHUNK", chunk)
    rows = [as_bytes(line) for _, line, _ in table()]
    plain = [as_bytes(valid_line(addr=f"10.77.1.{i}", mac=f"52:54:00:00:00:{i:02x}")) for i in range(1, 60)]
    plain += [as_bytes(log_line(f"10.77.2.{i}", query(addr=f"10.77.2.{i}", name=n, sig=SIG)))
              for i, n in enumerate(["prod-web2", "stranger", "a..b", "x.lock", "dev-box"] * 10, start=1)]
    lines = {"mixed": rows + plain + rows, "canonical first": plain + rows, "genuine and forged only": plain * 3}[layout]
    log = tmp_path / "booted.log"
    log.write_bytes(b"\n".join(lines) + b"\n")

    checks = bootlog._Checks(cfg, CONTROL, None)
    expected_calls, expected_skipped = [], Counter()
    for line in lines:
        verdict = checks.other(line)
        if isinstance(verdict, Call):
            expected_calls.append(verdict)
        else:
            expected_skipped[verdict] += 1
    result = BootedLog(log, cfg, CONTROL).read_all()

    assert result.lines == len(lines)
    assert result.skipped == expected_skipped
    assert result.calls == expected_calls
