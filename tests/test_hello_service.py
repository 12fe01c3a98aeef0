"""The hello service as workers run it: a real process (python3 app.py), real HTTP, real signals."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HELLO_DIR = Path(__file__).resolve().parent.parent / "service" / "hello"


class Hello:
    """``python3 app.py`` in a folder, its port, and its stderr lines (the journal)."""

    def __init__(self, app_dir: Path, env: dict[str, str], args: list[str] = ()):
        base = {k: v for k, v in os.environ.items() if not k.startswith("HELLO_")}
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", *args], cwd=app_dir, env={**base, "PYTHONDONTWRITEBYTECODE": "1", **env},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        deadline = time.monotonic() + 10
        while not self.port and time.monotonic() < deadline and self.proc.poll() is None:
            for line in list(self.lines):
                if " listening on " in line:
                    self.port = int(line.split(" listening on ", 1)[1].split(",")[0].rsplit(":", 1)[1])
            time.sleep(0.02)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 10):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def timed(self, method: str, path: str, body=None):
        start = time.monotonic()
        status = self.request(method, path, body)[0]
        return status, time.monotonic() - start

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(2)


@pytest.fixture
def shared(tmp_path):
    path = tmp_path / "shared"
    path.mkdir()
    return path


@pytest.fixture
def start(shared):
    started: list[Hello] = []

    def start_(app_dir: Path = HELLO_DIR, args: list[str] = (), **env: str) -> Hello:
        env = {"HELLO_PORT": "0", "HELLO_BIND": "127.0.0.1", "HELLO_SHARED_DIR": str(shared), **env}
        hello = Hello(app_dir, env, list(args))
        started.append(hello)
        return hello

    yield start_
    for hello in started:
        hello.stop()


@pytest.fixture(scope="module")
def hello(tmp_path_factory):
    """One server for the tests that only read from it (no delay file)."""
    shared = tmp_path_factory.mktemp("shared")
    h = Hello(HELLO_DIR, {"HELLO_PORT": "0", "HELLO_BIND": "127.0.0.1", "HELLO_SHARED_DIR": str(shared),
                          "HELLO_VERSION": "v-test"})
    assert h.port, h.lines
    yield h
    assert h.stop() == 0


# --------------------------------------------------------------------------- endpoints
@pytest.mark.parametrize("method, path, body, headers, expected", [
    ("GET", "/", None, {}, (200, "Hello World!")),
    ("POST", "/Ann", None, {}, (200, "Hello Ann World!")),
    ("POST", "/Ann%20Lee", None, {}, (200, "Hello Ann Lee World!")),
    ("POST", "/", "name=Bob", {"Content-Type": "application/x-www-form-urlencoded"}, (200, "Hello Bob World!")),
    ("POST", "/", json.dumps({"name": "Cy"}), {"Content-Type": "application/json"}, (200, "Hello Cy World!")),
    ("POST", "/", "", {}, (200, "Hello World!")),
    ("POST", "/", "{oops", {"Content-Type": "application/json"},
     (400, "body is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2")),
    ("POST", "/", '{"name": ["x"]}', {"Content-Type": "application/json"}, (400, "name must be a string")),
    ("POST", "/" + "x" * 101, None, {}, (400, "name is too long (at most 100 characters)")),
    ("GET", "/healthz", None, {}, (200, "ok")),
    ("GET", "/version", None, {}, (200, "v-test")),
    ("GET", "/missing", None, {}, (404, "not found")),
])
def test_endpoints(hello, method, path, body, headers, expected):
    assert hello.request(method, path, body, headers) == expected


def test_one_log_line_per_request(hello):
    before = len(hello.lines)
    hello.request("GET", "/healthz")
    hello.request("POST", "/Ann")
    time.sleep(0.1)
    requests = hello.lines[before:]
    assert len(requests) == 2, hello.lines
    assert requests[0].startswith('127.0.0.1 "GET /healthz HTTP/1.1" 200 2 ')
    assert requests[1].startswith('127.0.0.1 "POST /Ann HTTP/1.1" 200 16 ')


def test_version_comes_from_the_version_file_without_hello_version(start, tmp_path):
    app_dir = tmp_path / "release"
    shutil.copytree(HELLO_DIR, app_dir, ignore=shutil.ignore_patterns("__pycache__"))
    (app_dir / "VERSION").write_text("v5\n")
    assert start(app_dir).request("GET", "/version") == (200, "v5")
    (app_dir / "VERSION").unlink()
    assert start(app_dir).request("GET", "/version") == (200, "unknown")


def test_port_from_hello_port(start):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    h = start(HELLO_PORT=str(port))
    assert h.port == port
    assert h.request("GET", "/healthz") == (200, "ok")


def test_port_flag_wins_over_hello_port(start):
    h = start(args=["--port", "0"], HELLO_PORT="1")
    assert h.port and h.port != 1


def test_bad_port_is_one_line_and_exit_2(start):
    h = start(HELLO_PORT="ninety")
    assert h.proc.wait(10) == 2
    h._reader.join(2)
    assert h.lines == ["hello: HELLO_PORT='ninety' is not a port number"]


def test_busy_port_is_one_line_and_exit_1(hello, start):
    other = start(HELLO_PORT=str(hello.port))
    assert other.proc.wait(10) == 1
    other._reader.join(2)
    assert len(other.lines) == 1 and other.lines[0].startswith(f"hello: cannot listen on 127.0.0.1:{hello.port}")


# --------------------------------------------------------------------------- the slow-down setting
def test_delay_file_slows_greetings_but_not_health(start, shared):
    (shared / "delay_ms").write_text("400\n")
    h = start()
    status, took = h.timed("GET", "/")
    assert status == 200 and took >= 0.39
    status, took = h.timed("POST", "/Ann")
    assert status == 200 and took >= 0.39
    assert h.timed("GET", "/healthz")[1] < 0.3
    (shared / "delay_ms").write_text("0\n")
    time.sleep(1.1)   # re-read at most once a second
    assert h.timed("GET", "/")[1] < 0.3


def test_hello_delay_file_overrides_the_shared_dir(start, tmp_path, shared):
    (shared / "delay_ms").write_text("2000")
    elsewhere = tmp_path / "my_delay"
    elsewhere.write_text("300")
    h = start(HELLO_DELAY_FILE=str(elsewhere))
    assert 0.29 <= h.timed("GET", "/")[1] < 1.5


def test_slow_requests_are_served_concurrently(start, shared):
    (shared / "delay_ms").write_text("500")
    h = start()
    start_at = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: h.request("GET", "/"), range(8)))
    assert results == [(200, "Hello World!")] * 8
    assert time.monotonic() - start_at < 2.0   # 8 x 0.5 s one after another would be 4 s


# --------------------------------------------------------------------------- graceful stop
def test_sigterm_finishes_in_flight_requests_then_exits_0(start, shared):
    (shared / "delay_ms").write_text("800")
    h = start()
    got = {}
    client = threading.Thread(target=lambda: got.update(answer=h.request("GET", "/")))
    client.start()
    time.sleep(0.3)                    # the request is inside its delay now
    h.proc.send_signal(signal.SIGTERM)
    client.join(10)
    assert got.get("answer") == (200, "Hello World!")
    assert h.proc.wait(10) == 0
    h._reader.join(2)
    assert any("SIGTERM" in line for line in h.lines)
    assert h.lines[-1] == "hello: stopped"
    with pytest.raises(OSError):
        h.request("GET", "/healthz", timeout=2)


def test_idle_keep_alive_connections_do_not_hold_up_sigterm(start):
    hello = start()
    conn = http.client.HTTPConnection("127.0.0.1", hello.port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok"     # connection stays open (HTTP/1.1 keep-alive)
        started = time.monotonic()
        hello.proc.send_signal(signal.SIGTERM)
        assert hello.proc.wait(10) == 0
        assert time.monotonic() - started < 3
    finally:
        conn.close()


def test_keep_alive_requests_are_not_held_back_by_nagle(hello):
    # with Nagle's algorithm on, each keep-alive response waits ~40 ms for the client's delayed ACK
    conn = http.client.HTTPConnection("127.0.0.1", hello.port, timeout=5)
    try:
        started = time.monotonic()
        for _ in range(20):
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"Hello World!"
        assert time.monotonic() - started < 0.6
    finally:
        conn.close()


# --------------------------------------------------------------------------- bursts
def test_a_burst_of_connections_while_it_is_busy_is_queued_not_dropped(start):
    """200 clients connect while the server cannot accept (stopped, as when the GIL or the CPU is
    busy elsewhere): the kernel completes every handshake into the listen backlog at once, and each
    is answered once the server runs again. With socketserver's default backlog of 5, the kernel
    drops the other SYNs and those clients wait a second or more for a retransmit: the load
    balancer's 1 s connect timeout then takes a healthy worker out."""
    h = start()
    assert h.port, h.lines
    h.proc.send_signal(signal.SIGSTOP)
    socks = []
    try:
        for _ in range(200):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", h.port))
            socks.append(s)
        time.sleep(0.3)
        import select

        _, writable, _ = select.select([], socks, [], 0.5)
        established = [s for s in writable if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0]
        assert len(established) == 200, f"only {len(established)} of 200 connections were queued"
    finally:
        h.proc.send_signal(signal.SIGCONT)
    for s in socks:
        s.setblocking(True)
        s.settimeout(10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answers = []
    for s in socks:
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        answers.append(data.split(b"\r\n", 1)[0])
        s.close()
    assert answers == [b"HTTP/1.1 200 OK"] * 200
