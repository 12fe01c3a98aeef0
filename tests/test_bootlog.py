"""The booted log: genuine call homes are parsed exactly, everything else is skipped by reason,
and the log is read incrementally across appends, partial lines, rotation and truncation."""
from __future__ import annotations

import http.server
import importlib.machinery
import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections import Counter

import pytest
from configs import two_environments, use_config

from fabfile.core.errors import BootedError
from fabfile.hosts import bootlog, callhome
from fabfile.hosts.bootlog import BootedLog, Call, parse_line

CONFIG = two_environments("local")
CONTROL = {"192.168.56.1", "10.77.0.1", "fe80::1"}
MSEC = "1700000000.123"


def load_script():
    """The host side of the call home, kickstart/firstboot/booted-callhome, as a module."""
    loader = importlib.machinery.SourceFileLoader("booted_callhome_script", str(callhome.SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


SCRIPT = load_script()


@pytest.mark.parametrize("key_len", [0, 1, 32, 63, 64, 65, 200])
@pytest.mark.parametrize("builtin", [True, False], ids=["cpython-sha256", "hashlib-fallback"])
def test_the_host_signs_as_hmac_does_without_loading_openssl(key_len, builtin, monkeypatch):
    """booted-callhome's own HMAC-SHA256 (CPython's built-in SHA-256: no libcrypto at boot) is
    RFC 2104's, for keys shorter, as long as and longer than SHA-256's 64-byte block."""
    import hashlib
    import hmac

    if not builtin:  # a Python without _sha256/_sha2: hashlib's
        real_import = __import__
        monkeypatch.setattr("builtins.__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                            if name in ("_sha256", "_sha2") else real_import(name, *a, **k))
    key, message = bytes(range(256))[:key_len] * 1, b"prod|prod-web1|52:54:00:12:34:56|10.77.0.11|1700000000"
    assert SCRIPT.hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).hexdigest()


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    return use_config(tmp_path, monkeypatch, CONFIG)[1]


def nginx_escape(raw: bytes) -> str:
    """What nginx's log escaping does to a variable: '"', '\\', < 0x20 and > 0x7e become \\xXX."""
    return "".join(
        f"\\x{b:02X}" if b in (0x22, 0x5C) or b < 0x20 or b > 0x7E else chr(b) for b in raw
    )


def log_line(remote: str, args: str | bytes, msec: str = MSEC) -> str:
    raw = args.encode("latin-1") if isinstance(args, str) else args
    return f'booted1 {remote} {msec} "{nginx_escape(raw)}"'


def query(env="prod", name="prod-web1", mac="52:54:00:12:34:56", addr="10.77.0.11", ts="1700000000",
          key=None, sig=None, **extra) -> str:
    """The query string booted-callhome sends (its own sign(); urlencode as in call_once)."""
    fields = [env, name, mac, addr, ts]
    if sig is None:
        sig = SCRIPT.sign(key if key is not None else callhome.host_key(env, name), fields)
    params = {"env": env, "name": name, "mac": mac, "addr": addr, "ts": ts, "sig": sig, **extra}
    return urllib.parse.urlencode(params)


def valid_line(name="prod-web1", addr="10.77.0.11", mac="52:54:00:12:34:56", env="prod", msec=MSEC, ts="1700000000"):
    return log_line(addr, query(env=env, name=name, mac=mac, addr=addr, ts=ts), msec)


def hostile_lines(tmp_path) -> list[tuple[str, str | bytes, str]]:
    """(what, line, expected reason). Built after cfg so signatures use the test's secrets."""
    good = query()
    canary = tmp_path / "pwned"
    overlong = valid_line() + "&pad=" + "A" * 5000
    return [
        ("empty line", "", bootlog.MALFORMED),
        ("garbage", "hello world", bootlog.MALFORMED),
        ("combined format", f'10.77.0.11 - - [14/Nov/2023:22:13:20 +0000] "GET /booted/callhome?{good} HTTP/1.1" 200 3 "-" "-"', bootlog.MALFORMED),
        ("no quotes", f"booted1 10.77.0.11 {MSEC} {good}", bootlog.MALFORMED),
        ("text after the quotes", valid_line() + " extra", bootlog.MALFORMED),
        ("msec not a number", log_line("10.77.0.11", good, msec="now"), bootlog.MALFORMED),
        ("unix socket client", log_line("unix:", good), bootlog.MALFORMED),
        ("not an address", log_line("10.77.0.999", good), bootlog.MALFORMED),
        ("raw non-ASCII byte in the log", valid_line().encode() + b"\xff", bootlog.MALFORMED),
        ("raw quote inside the args", f'booted1 10.77.0.11 {MSEC} "{good}&x="y""', bootlog.MALFORMED),
        ("IPv6 client", log_line("fe80::5054:ff:fe12:3456", good), bootlog.IPV6),
        ("IPv4-mapped IPv6 client", log_line("::ffff:10.77.0.11", good), bootlog.IPV6),
        ("overlong", overlong, bootlog.OVERLONG),
        ("loopback", log_line("127.0.0.1", query(addr="127.0.0.1")), bootlog.LOOPBACK),
        ("loopback 127/8", log_line("127.5.6.7", query(addr="127.5.6.7")), bootlog.LOOPBACK),
        ("IPv6 loopback", log_line("::1", good), bootlog.LOOPBACK),
        ("control host", log_line("192.168.56.1", query(addr="192.168.56.1")), bootlog.CONTROL_HOST),
        ("shell $() in a name", log_line("10.77.0.11", query(name=f"$(touch {canary})")), bootlog.BAD_NAME),
        ("raw shell $() and `;|", log_line("10.77.0.11", good.replace("prod-web1", f"$(touch${{IFS}}{canary})`id`;|")), bootlog.BAD_NAME),
        ("'&' splits into an unknown key", log_line("10.77.0.11", good + "&;rm -rf /"), bootlog.BAD_QUERY),
        ("terminal escape, raw (nginx escapes it)", log_line("10.77.0.11", good.replace("prod-web1", "\x1b[2J\x1b]0;owned\x07")), bootlog.ESCAPED),
        ("terminal escape, %-encoded", log_line("10.77.0.11", query(name="a\x1b[31m")), bootlog.BAD_NAME),
        ("NUL, raw", log_line("10.77.0.11", good + "\x00"), bootlog.ESCAPED),
        ("NUL, %-encoded", log_line("10.77.0.11", query(name="prod-web1\x00")), bootlog.BAD_NAME),
        ("unicode, raw UTF-8", log_line("10.77.0.11", good.replace("prod-web1", "pröd").encode("utf-8")), bootlog.ESCAPED),
        ("unicode, %-encoded", log_line("10.77.0.11", query(name="pröd-web1")), bootlog.BAD_NAME),
        ("invalid UTF-8 %-encoded", log_line("10.77.0.11", good.replace("prod-web1", "%FF%FE")), bootlog.BAD_QUERY),
        ("quote escaped by nginx", log_line("10.77.0.11", good + '&x="'), bootlog.ESCAPED),
        ("forged address", log_line("10.77.0.66", good), bootlog.FORGED_ADDR),
        ("wrong token", log_line("10.77.0.11", query(key="0" * 64)), bootlog.BAD_SIGNATURE),
        ("another host's key", log_line("10.77.0.11", query(key=callhome.host_key("prod", "prod-web2"))), bootlog.BAD_SIGNATURE),
        ("replayed sig, changed name", log_line("10.77.0.11", good.replace("name=prod-web1", "name=prod-web2")), bootlog.BAD_SIGNATURE),
        ("replayed sig, changed ts", log_line("10.77.0.11", good.replace("ts=1700000000", "ts=1700000001")), bootlog.BAD_SIGNATURE),
        ("missing token", log_line("10.77.0.11", good.split("&sig=")[0]), bootlog.BAD_QUERY),
        ("empty token", log_line("10.77.0.11", good.split("&sig=")[0] + "&sig="), bootlog.BAD_SIGNATURE),
        ("non-hex sig", log_line("10.77.0.11", query(sig="z" * 64)), bootlog.BAD_SIGNATURE),
        ("upper-case sig", log_line("10.77.0.11", query(sig=SCRIPT.sign(callhome.host_key("prod", "prod-web1"), ["prod", "prod-web1", "52:54:00:12:34:56", "10.77.0.11", "1700000000"]).upper())), bootlog.BAD_SIGNATURE),
        ("unknown env", log_line("10.77.0.11", query(env="staging")), bootlog.UNKNOWN_ENV),
        ("path in env", log_line("10.77.0.11", query(env="../../etc/passwd")), bootlog.UNKNOWN_ENV),
        ("duplicate key", log_line("10.77.0.11", good + "&name=prod-web2"), bootlog.BAD_QUERY),
        ("missing keys", log_line("10.77.0.11", "env=prod&name=prod-web1"), bootlog.BAD_QUERY),
        ("extra key", log_line("10.77.0.11", good + "&x=1"), bootlog.BAD_QUERY),
        ("key without '='", log_line("10.77.0.11", good + "&x"), bootlog.BAD_QUERY),
        ("no args (nginx writes -)", log_line("10.77.0.11", "-"), bootlog.BAD_QUERY),
        ("upper-case MAC", log_line("10.77.0.11", query(mac="52:54:00:AB:CD:EF")), bootlog.BAD_MAC),
        ("MAC without colons", log_line("10.77.0.11", query(mac="525400123456")), bootlog.BAD_MAC),
        ("addr with leading zero", log_line("10.77.0.11", query(addr="10.77.0.011")), bootlog.BAD_ADDR),
        ("addr a host name", log_line("10.77.0.11", query(addr="localhost")), bootlog.BAD_ADDR),
        ("addr IPv6", log_line("10.77.0.11", query(addr="fe80::1")), bootlog.BAD_ADDR),
        ("ts not an integer", log_line("10.77.0.11", query(ts="17e8")), bootlog.BAD_TS),
        ("ts negative", log_line("10.77.0.11", query(ts="-5")), bootlog.BAD_TS),
    ]


def test_valid_lines_parse_exactly(cfg):
    call = parse_line(valid_line(), cfg, CONTROL)
    assert call == Call(env="prod", name="prod-web1", mac="52:54:00:12:34:56", addr="10.77.0.11",
                        ts=1700000000, seen_at=1700000000.123)
    # a name booted made no key for is refused before any signature work
    other = valid_line(name="stranger", addr="10.77.0.12", env="dev-env", msec="1700000005.000")
    assert parse_line(other, cfg, CONTROL) == bootlog.UNKNOWN_IMAGE
    # an undeclared image booted built (a renamed clone) has a key record, and parses
    callhome.new_host_key("dev-env", "stranger")
    other = parse_line(valid_line(name="stranger", addr="10.77.0.12", env="dev-env", msec="1700000005.000"), cfg, CONTROL)
    assert other == Call("dev-env", "stranger", "52:54:00:12:34:56", "10.77.0.12", 1700000000, 1700000005.0)


def test_each_hostile_line_is_skipped_for_its_reason(cfg, tmp_path):
    lines = hostile_lines(tmp_path)
    assert len(lines) >= 50
    got = {what: parse_line(line, cfg, CONTROL) for what, line, _ in lines}
    assert got == {what: reason for what, _, reason in lines}
    assert not (tmp_path / "pwned").exists()


def test_a_mixed_log_counts_every_skip_and_keeps_the_valid_calls(cfg, tmp_path):
    hostile = hostile_lines(tmp_path)
    valid = [valid_line(), valid_line(name="prod-web2", addr="10.77.0.12", mac="52:54:00:00:00:02", msec="1700000001.500")]
    log = tmp_path / "booted.log"
    with open(log, "wb") as fh:
        fh.write((valid[0] + "\n").encode())
        for _, line, _ in hostile:
            fh.write((line.encode() if isinstance(line, str) else line) + b"\n")
        fh.write((valid[1] + "\n").encode())

    result = BootedLog(log, cfg, CONTROL).read_all()

    assert [(c.name, c.addr, c.seen_at) for c in result.calls] == [
        ("prod-web1", "10.77.0.11", 1700000000.123), ("prod-web2", "10.77.0.12", 1700000001.5)]
    assert result.skipped == Counter(reason for _, _, reason in hostile)
    assert result.lines == len(hostile) + 2
    assert set(result.skipped) <= set(bootlog.REASONS)
    assert not (tmp_path / "pwned").exists()


def test_mangled_and_random_lines_never_raise(cfg):
    """Every single-character change, deletion or insertion of a valid line, and random bytes."""
    rng = random.Random(1234)
    base = valid_line()
    alphabet = "\\\"x%&=:.0aF \x1b-"
    mangled = []
    for i in range(len(base)):
        mangled += [base[:i] + rng.choice(alphabet) + base[i + 1:], base[:i] + base[i + 1:],
                    base[:i] + rng.choice(alphabet) + base[i:]]
    mangled += [bytes(rng.randrange(256) for _ in range(rng.randrange(300))) for _ in range(500)]
    outcomes = Counter()
    for line in mangled:
        result = parse_line(line, cfg, CONTROL)
        outcomes["call" if isinstance(result, Call) else result] += 1
        assert isinstance(result, Call) or result in bootlog.REASONS
        if isinstance(result, Call):  # only changes the signature does not cover may survive
            assert (result.env, result.name, result.mac, result.addr, result.ts) == ("prod", "prod-web1", "52:54:00:12:34:56", "10.77.0.11", 1700000000)
    assert outcomes[bootlog.BAD_SIGNATURE] > 50 and outcomes[bootlog.MALFORMED] > 500


def test_overlong_line_across_read_chunks_is_skipped_once(cfg, tmp_path):
    log = tmp_path / "booted.log"
    log.write_bytes(b"x" * (3 * 1024 * 1024 + 17) + b"\n" + (valid_line() + "\n").encode())
    result = BootedLog(log, cfg, CONTROL).read_all()
    assert result.skipped == Counter({bootlog.OVERLONG: 1})
    assert [c.name for c in result.calls] == ["prod-web1"]


def test_the_real_callhome_script_is_understood(cfg, tmp_path):
    """booted-callhome (its own config reader, signing and request) -> HTTP -> log line -> Call."""
    captured = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            captured.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = callhome.callhome_url("127.0.0.1", server.server_address[1])
        conf_file = tmp_path / "callhome.conf"
        conf_file.write_text(callhome.host_config("prod", "prod-web2", url))
        conf = SCRIPT.read_conf(str(conf_file))
        # The request goes to this machine, so the host's interface is stood in for (the only
        # part not exercised): the script signs the address and MAC it believes are its own.
        original = SCRIPT.route_source
        SCRIPT.route_source = lambda _url: ("10.77.0.21", "52:54:00:aa:bb:cc")
        try:
            assert SCRIPT.call_once(conf) == 200
        finally:
            SCRIPT.route_source = original
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    path, _, args = captured[0].partition("?")
    assert path == callhome.CALLHOME_PATH
    now = f"{time.time():.3f}"
    call = parse_line(log_line("10.77.0.21", args, now), cfg, CONTROL)
    assert isinstance(call, Call)
    assert (call.env, call.name, call.mac, call.addr, call.seen_at) == ("prod", "prod-web2", "52:54:00:aa:bb:cc", "10.77.0.21", float(now))
    assert abs(call.ts - time.time()) < 60


@pytest.mark.parametrize("value", [
    "prod-web1", "52:54:00:aa:bb:cc", "10.77.0.21", "a b+c&d=e/f?g#h%", "~_.-", "é€\u2603", "", "\x00\x7f\n",
])
def test_the_script_encodes_a_query_as_urlencode_does(value):
    pairs = [("env", "prod"), ("v", value), (value, "k")]
    assert SCRIPT.urlencode(pairs) == urllib.parse.urlencode(pairs)


@pytest.mark.parametrize("url, expected", [
    ("http://10.77.0.1:8080/booted/callhome", ("10.77.0.1", 8080, "/booted/callhome")),
    ("http://10.77.0.1/booted/callhome", ("10.77.0.1", 80, "/booted/callhome")),
    ("http://[fd00::1]:81/x?y=1", ("fd00::1", 81, "/x?y=1")),
    ("http://host:9", ("host", 9, "")),
])
def test_the_script_splits_its_url(url, expected):
    assert SCRIPT.split_url(url) == expected


@pytest.mark.parametrize("url", ["https://10.77.0.1/x", "10.77.0.1:80/x", "http://h:port/x"])
def test_the_script_refuses_a_url_it_cannot_call(url):
    with pytest.raises(ValueError):
        SCRIPT.split_url(url)


def test_the_script_finds_each_interface_mac_as_ip_does():
    """The MAC of the interface holding an address, from the kernel, as `ip` reports it."""
    links = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout)
    pairs = [(a["local"], link.get("address", "")) for link in links for a in link.get("addr_info", [])
             if a.get("family") == "inet"][:8]
    assert ("127.0.0.1", "00:00:00:00:00:00") in pairs
    for addr, mac in pairs:
        assert SCRIPT.interface_mac(addr) in (mac, "")  # "": not its interface's first address
        assert SCRIPT.interface_mac_ip(addr) == mac
    assert SCRIPT.interface_mac("192.0.2.77") == ""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a network namespace")
def test_the_script_finds_the_mac_in_its_own_network_namespace():
    """A local host's /sys shows the machine's links, not its own network namespace's (nspawn with
    a namespace path): the MAC comes from the kernel through a socket, as in the host."""
    code = ("import runpy, sys; m = runpy.run_path(sys.argv[1], run_name='x'); "
            "print(m['interface_mac']('192.0.2.5'), m['route_source']('http://192.0.2.9:80/x'))")
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-ec",
         'ip link add v0 address 02:aa:bb:cc:dd:ee type veth peer name v1; ip addr add 192.0.2.5/24 dev v0; '
         'ip link set v0 up; exec /usr/bin/python3 -IS -c "$0" "$1"', code, str(callhome.SCRIPT)],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "02:aa:bb:cc:dd:ee ('192.0.2.5', '02:aa:bb:cc:dd:ee')"


@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200),
    (b"HTTP/1.0 403 Forbidden\r\n\r\n", 403),
    (b"HTTP/1.1 503", 503),
    (b"SSH-2.0-OpenSSH_9.2\r\n", None),
    (b"", None),
])
def test_the_script_reads_the_status_of_an_answer(answer, expected):
    """The script's own HTTP: one GET with Host and Connection: close; the status line's code, and
    an error for anything that is not an HTTP answer."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    received = []

    def serve():
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            received.append(data)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        if expected is None:
            with pytest.raises(OSError):
                SCRIPT.http_get(f"http://127.0.0.1:{port}/booted/callhome?a=1", timeout=5)
        else:
            assert SCRIPT.http_get(f"http://127.0.0.1:{port}/booted/callhome?a=1", timeout=5) == expected
    finally:
        thread.join(5)
        server.close()
    request = received[0].decode()
    assert request.startswith("GET /booted/callhome?a=1 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{port}\r\n" in request and "\r\nConnection: close\r\n" in request


def test_the_script_runs_isolated_with_debians_python():
    """Its first line runs it with -IS; it imports and answers with nothing from site-packages."""
    first = callhome.SCRIPT.read_text().splitlines()[0]
    assert first == "#!/usr/bin/python3 -IS"
    proc = subprocess.run(["/usr/bin/python3", "-IS", "-c",
                           "import runpy, sys; m = runpy.run_path(sys.argv[1], run_name='x'); "
                           "print(m['split_url']('http://h:1/p'), 'json' in sys.modules, 'urllib' in sys.modules)",
                           str(callhome.SCRIPT)], capture_output=True, text=True)
    assert proc.stdout.strip() == "('h', 1, '/p') False False", proc.stderr


@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed: cannot check the real log format")
def test_lines_as_real_nginx_writes_them(cfg, tmp_path):
    """A real nginx with booted's log_format; only the client address is rewritten afterwards
    (test traffic stays on loopback, which the parser rightly refuses)."""
    log = tmp_path / "booted.log"
    port = _free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
  log_format booted 'booted1 $remote_addr $msec "$args"';
  access_log off;
  server {{
    listen 127.0.0.1:{port};
    location = {callhome.CALLHOME_PATH} {{ access_log {log} booted; return 200 "ok\\n"; }}
  }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log"),
                             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, tmp_path / "error.log")
        good = query(name="prod-web2", addr="10.77.0.21", mac="52:54:00:aa:bb:cc", ts=str(int(time.time())))
        targets = [
            f"{callhome.CALLHOME_PATH}?{good}".encode(),
            f"{callhome.CALLHOME_PATH}?{good}".encode().replace(b"prod-web2", b'"pr\\od"\xc3\xa9'),
            f"{callhome.CALLHOME_PATH}?{good}&x=$(id)`;|".encode(),
            callhome.CALLHOME_PATH.encode(),
        ]
        for target in targets:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET " + target + b" HTTP/1.0\r\n\r\n")
                assert sock.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    written = log.read_text(encoding="ascii").splitlines()
    assert len(written) == len(targets)
    assert written[1].endswith('\\x22pr\\x5Cod\\x22\\xC3\\xA9' + good.split("prod-web2")[1] + '"')
    as_host = [line.replace("booted1 127.0.0.1 ", "booted1 10.77.0.21 ", 1) for line in written]
    first = parse_line(as_host[0], cfg, CONTROL)
    assert isinstance(first, Call) and (first.name, first.addr) == ("prod-web2", "10.77.0.21")
    assert abs(first.seen_at - time.time()) < 60
    assert [parse_line(line, cfg, CONTROL) for line in as_host[1:]] == [bootlog.ESCAPED, bootlog.BAD_QUERY, bootlog.BAD_QUERY]
    assert [parse_line(line, cfg, CONTROL) for line in written] == [bootlog.LOOPBACK] * len(targets)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port, proc, error_log, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"nginx exited: {error_log.read_text() if error_log.exists() else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail("nginx did not listen within 10s")


def test_control_addresses_reads_this_machines_addresses():
    if not shutil.which("ip"):
        pytest.skip("no `ip` command")
    found = bootlog.control_addresses()
    assert "127.0.0.1" in found
    shown = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout)
    assert found == {a["local"] for link in shown for a in link.get("addr_info", []) if a.get("local")}


# --------------------------------------------------------------------------- incremental reading
def append(path, *lines, end="\n"):
    with open(path, "a") as fh:
        fh.write("".join(line + "\n" for line in lines[:-1]) + lines[-1] + end)


def names_of(result):
    return [c.name for c in result.calls]


def test_read_new_returns_only_what_was_appended(cfg, tmp_path):
    log = tmp_path / "booted.log"
    append(log, valid_line("prod-web1", "10.77.0.11"), valid_line("prod-web2", "10.77.0.12"))
    reader = BootedLog(log, cfg, CONTROL)

    first = reader.read_new()
    assert names_of(first) == ["prod-web1", "prod-web2"] and first.start == 0 and first.restarted is None
    assert first.end == log.stat().st_size

    append(log, "junk", valid_line("prod-lb1", "10.77.0.10"))
    second = reader.read_new()
    assert names_of(second) == ["prod-lb1"]
    assert second.lines == 2 and second.skipped == Counter({bootlog.MALFORMED: 1})
    assert second.start == first.end

    third = reader.read_new()
    assert (third.lines, third.calls, third.start) == (0, [], log.stat().st_size)

    # the cursor is a small JSON file in the state dir, written without leaving temp files
    cursor_dir = tmp_path / "state" / "bootlog"
    assert sorted(p.name for p in cursor_dir.iterdir()) == ["hosts.json"]
    saved = json.loads((cursor_dir / "hosts.json").read_text())
    assert (saved["inode"], saved["offset"]) == (log.stat().st_ino, log.stat().st_size)

    # read_all re-reads everything and leaves the cursor alone
    assert names_of(reader.read_all()) == ["prod-web1", "prod-web2", "prod-lb1"]
    assert reader.read_new().lines == 0
    # another cursor has its own position
    assert names_of(reader.read_new("monitor")) == ["prod-web1", "prod-web2", "prod-lb1"]


def test_partial_last_line_waits_until_completed(cfg, tmp_path):
    log = tmp_path / "booted.log"
    line = valid_line()
    append(log, line[:40], end="")
    reader = BootedLog(log, cfg, CONTROL)
    assert reader.read_new().lines == 0
    append(log, line[40:-3], end="")
    assert reader.read_new().lines == 0
    append(log, line[-3:])
    result = reader.read_new()
    assert names_of(result) == ["prod-web1"] and result.skipped == Counter()


def test_rotation_to_a_new_file_starts_from_zero(cfg, tmp_path):
    log = tmp_path / "booted.log"
    append(log, valid_line("prod-web1", "10.77.0.11"), valid_line("prod-web2", "10.77.0.12"))
    reader = BootedLog(log, cfg, CONTROL)
    reader.read_new()
    os.rename(log, tmp_path / "booted.log.1")  # what a log rotation does; nginx reopens
    append(log, valid_line("prod-lb1", "10.77.0.10"))
    result = reader.read_new()
    assert names_of(result) == ["prod-lb1"] and result.restarted == "new-file"
    # a file replaced in place by a bigger one (os.replace), same path
    bigger = tmp_path / "new.log"
    append(bigger, *(valid_line("prod-web1", "10.77.0.11") for _ in range(5)))
    os.replace(bigger, log)
    result = reader.read_new()
    assert len(result.calls) == 5 and result.restarted == "new-file"


def test_truncation_starts_from_zero(cfg, tmp_path):
    log = tmp_path / "booted.log"
    append(log, valid_line("prod-web1", "10.77.0.11"), valid_line("prod-web2", "10.77.0.12"))
    reader = BootedLog(log, cfg, CONTROL)
    reader.read_new()
    inode = log.stat().st_ino
    with open(log, "w"):
        pass
    append(log, valid_line("prod-lb1", "10.77.0.10"))
    assert log.stat().st_ino == inode
    result = reader.read_new()
    assert names_of(result) == ["prod-lb1"] and result.restarted == "truncated"


def test_rewritten_in_place_past_the_old_offset_starts_from_zero(cfg, tmp_path):
    log = tmp_path / "booted.log"
    append(log, valid_line("prod-web1", "10.77.0.11"))
    reader = BootedLog(log, cfg, CONTROL)
    reader.read_new()
    with open(log, "w") as fh:  # truncated and refilled between two reads: size grew, content differs
        fh.write("\n".join([valid_line("prod-lb1", "10.77.0.10")] * 3) + "\n")
    result = reader.read_new()
    assert names_of(result) == ["prod-lb1"] * 3 and result.restarted == "rewritten"


def test_large_log_is_read_once_then_only_the_tail(cfg, tmp_path):
    log = tmp_path / "booted.log"
    keys = {name: callhome.host_key("prod", name) for name in ("prod-web1", "prod-web2")}

    def line(i):
        name, addr = f"prod-web{1 + i % 2}", f"10.77.{i // 250}.{2 + i % 250}"
        return log_line(addr, query(name=name, addr=addr, key=keys[name], ts=str(1700000000 + i)), f"{1700000000 + i}.000")

    lines = [line(i) for i in range(20000)]
    with open(log, "w") as fh:
        for i, line in enumerate(lines):
            fh.write(line + "\n")
            if i % 1000 == 0:
                fh.write("noise\n")
    reader = BootedLog(log, cfg, CONTROL)
    started = time.monotonic()
    first = reader.read_new()
    elapsed = time.monotonic() - started
    assert len(first.calls) == 20000 and first.skipped == Counter({bootlog.MALFORMED: 20})
    assert elapsed < 15, f"20000 lines took {elapsed:.1f}s"
    append(log, valid_line("prod-lb1", "10.77.0.10"))
    started = time.monotonic()
    tail = reader.read_new()
    assert tail.lines == 1 and names_of(tail) == ["prod-lb1"]
    assert time.monotonic() - started < 1.0


def test_unreadable_cursor_means_reading_again_from_zero(cfg, tmp_path):
    log = tmp_path / "booted.log"
    append(log, valid_line())
    reader = BootedLog(log, cfg, CONTROL)
    reader.read_new()
    (tmp_path / "state" / "bootlog" / "hosts.json").write_text("{not json")
    assert names_of(reader.read_new()) == ["prod-web1"]
    assert reader.read_new().lines == 0


def test_missing_log_is_a_one_line_error(cfg, tmp_path):
    with pytest.raises(BootedError, match=r"booted log .*nothere\.log does not exist"):
        BootedLog(tmp_path / "nothere.log", cfg, CONTROL).read_new()


def test_by_default_this_machines_own_addresses_are_skipped(cfg, tmp_path):
    if not shutil.which("ip"):
        pytest.skip("no `ip` command")
    own = sorted(a for a in bootlog.control_addresses() if "." in a and not a.startswith("127."))
    if not own:
        pytest.skip("this machine has no non-loopback IPv4 address to test with")
    log = tmp_path / "booted.log"
    append(log, valid_line("prod-web1", own[0]), valid_line("prod-web2", "10.77.0.12"))
    result = BootedLog(log, cfg).read_all()  # control addresses read with `ip -j addr`
    assert result.skipped == Counter({bootlog.CONTROL_HOST: 1}) and names_of(result) == ["prod-web2"]
