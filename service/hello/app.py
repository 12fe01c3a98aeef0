#!/usr/bin/env python3
"""hello: the Greetings service that booted deploys to its workers.

    GET  /          -> Hello World!
    POST /NAME      -> Hello NAME World!
    POST /          -> Hello NAME World!  with the name in the body: form ``name=NAME``
                       or JSON ``{"name": "NAME"}`` (Content-Type: application/json)
    GET  /healthz   -> ok                 (for load balancers and deploy checks)
    GET  /version   -> the running release (HELLO_VERSION, else the VERSION file, else "unknown")

Standard library only: workers may have no internet. One line per request goes to stderr (the
journal under systemd). SIGTERM stops accepting connections, lets in-flight requests finish, and
exits 0.

Settings (environment, set by the systemd unit):
    HELLO_PORT        port (default 9999; ``--port`` overrides)
    HELLO_BIND        address to listen on (default 0.0.0.0; ``--bind`` overrides)
    HELLO_VERSION     what GET /version answers
    HELLO_SHARED_DIR  the release-independent directory; its ``delay_ms`` is the default delay file
    HELLO_DELAY_FILE  a file holding milliseconds to wait before answering GET / and POST, so a
                      load test needs little load to make a worker slow; re-read at most once a second
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

HERE = Path(__file__).resolve().parent
DEFAULT_PORT = 9999
MAX_NAME = 100            # characters in a greeted name
MAX_BODY = 64 * 1024      # bytes in a POST body
MAX_DELAY_MS = 30_000     # a typo in the delay file must not hang workers for hours
IDLE_TIMEOUT_S = 15       # an idle keep-alive connection is closed after this long

_log_lock = threading.Lock()
# control characters (and DEL) shown escaped so a request line cannot forge log lines
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def log(message: str) -> None:
    with _log_lock:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    version: str = "unknown"
    delay_file: Path | None = None


class SettingsError(Exception):
    """A bad setting; the message is the one line printed before exiting with status 2."""


def read_version(environ: dict, version_file: Path = HERE / "VERSION") -> str:
    """HELLO_VERSION, else the VERSION file next to the app, else "unknown"."""
    text = environ.get("HELLO_VERSION", "").strip()
    if not text:
        try:
            text = version_file.read_text(errors="replace").strip().splitlines()[0].strip()
        except (OSError, IndexError):
            text = ""
    # git archive fills in VERSION (export-subst); a checkout still holds the placeholder
    if not text or text.startswith("$Format"):
        return "unknown"
    return text[:100].translate(_CONTROL)


def load_settings(argv: list[str] | None = None, environ: dict | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    parser = argparse.ArgumentParser(prog="hello", description="The Greetings service.")
    parser.add_argument("--port", help=f"port to listen on (default HELLO_PORT or {DEFAULT_PORT})")
    parser.add_argument("--bind", help="address to listen on (default HELLO_BIND or 0.0.0.0)")
    args = parser.parse_args(argv)

    port_text = args.port if args.port is not None else environ.get("HELLO_PORT", "") or str(DEFAULT_PORT)
    source = "--port" if args.port is not None else "HELLO_PORT"
    try:
        port = int(port_text)
    except ValueError:
        raise SettingsError(f"{source}={port_text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise SettingsError(f"{source}={port} is not a port number (0-65535)")

    bind = args.bind if args.bind is not None else environ.get("HELLO_BIND", "") or "0.0.0.0"

    if "HELLO_DELAY_FILE" in environ:
        delay_file = Path(environ["HELLO_DELAY_FILE"]) if environ["HELLO_DELAY_FILE"] else None
    elif environ.get("HELLO_SHARED_DIR"):
        delay_file = Path(environ["HELLO_SHARED_DIR"]) / "delay_ms"
    else:
        delay_file = None
    return Settings(port=port, bind=bind, version=read_version(environ), delay_file=delay_file)


# --------------------------------------------------------------------------- slow-down setting
class Delay:
    """Milliseconds read from a file, re-read at most once per ``every`` seconds."""

    def __init__(self, path: Path | None, every: float = 1.0, clock=time.monotonic):
        self.path, self.every, self.clock = path, every, clock
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._seconds = 0.0
        self._complained: str | None = None

    def seconds(self) -> float:
        if self.path is None:
            return 0.0
        with self._lock:
            now = self.clock()
            if self._read_at is None or now - self._read_at >= self.every:
                self._read_at = now
                self._seconds = self._read()
            return self._seconds

    def _read(self) -> float:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                text = fh.read(64).strip()
        except FileNotFoundError:
            return 0.0
        except OSError as err:
            return self._ignore(f"cannot read it ({err.strerror})")
        if not text:
            return 0.0
        try:
            ms = float(text)
        except ValueError:
            return self._ignore(f"{text[:20]!r} is not a number of milliseconds")
        if ms != ms or ms < 0:
            return self._ignore(f"{text[:20]!r} is not a number of milliseconds")
        self._complained = None
        return min(ms, MAX_DELAY_MS) / 1000.0

    def _ignore(self, problem: str) -> float:
        if problem != self._complained:   # once per distinct problem, not once per second
            log(f"hello: ignoring delay file {self.path}: {problem}")
            self._complained = problem
        return 0.0


# --------------------------------------------------------------------------- requests
class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def greeting(name: str | None) -> str:
    return f"Hello {name} World!" if name else "Hello World!"


def clean_name(raw: object) -> str | None:
    """The name to greet (None for no name), or BadRequest saying what is wrong with it."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise BadRequest(400, "name must be a string")
    name = raw.strip()
    if len(name) > MAX_NAME:
        raise BadRequest(400, f"name is too long (at most {MAX_NAME} characters)")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise BadRequest(400, "name must not contain control characters")
    return name or None


def name_from_body(content_type: str, body: bytes) -> str | None:
    media = content_type.split(";", 1)[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, "body is not UTF-8") from None
    if media in ("", "application/x-www-form-urlencoded"):
        try:
            fields = parse_qs(text, keep_blank_values=True, max_num_fields=20,
                              encoding="utf-8", errors="strict")
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(400, "body is not a form like name=Ann") from None
        return clean_name(fields.get("name", [None])[0])
    if media == "application/json" or media.endswith("+json"):
        if not text.strip():
            return None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadRequest(400, f"body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
        if not isinstance(doc, dict):
            raise BadRequest(400, 'JSON body must be an object like {"name": "Ann"}')
        return clean_name(doc.get("name"))
    raise BadRequest(415, f"unsupported Content-Type {media[:60]!r}: send name=NAME as a form, or JSON")


class HelloHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    # A response goes out in ONE write: headers and body are buffered and the stdlib flushes them
    # after each request. With the default unbuffered writer they went out in two writes, and a
    # worker killed between them (SIGKILL, power-off) left the load balancer holding headers it
    # had already passed on: it can only cut the client's connection ("upstream prematurely closed
    # connection while reading upstream"), the rare socket error of the saturation drills.
    wbufsize = -1
    # no Nagle delay on the one write of a keep-alive response
    disable_nagle_algorithm = True
    server: "HelloServer"

    def version_string(self) -> str:
        return "hello"

    # -- connection bookkeeping for graceful shutdown
    def setup(self) -> None:
        super().setup()
        self.idle = True
        self.started = time.monotonic()
        self.server.track(self)

    def finish(self) -> None:
        self.server.untrack(self)
        super().finish()

    def parse_request(self) -> bool:
        self.started = time.monotonic()
        self.server.mark_busy(self)
        return super().parse_request()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            if self.server.mark_idle(self):  # stopping: no further request on this connection
                self.close_connection = True

    # -- routes
    def do_GET(self) -> None:
        self._get(send_body=True)

    def do_HEAD(self) -> None:
        self._get(send_body=False)

    def _get(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self.reply(200, "ok", send_body)
        elif path == "/version":
            self.reply(200, self.server.settings.version, send_body)
        elif path == "/":
            self.server.slow_down()
            self.reply(200, greeting(None), send_body)
        else:
            self.reply(404, "not found", send_body)

    def do_POST(self) -> None:
        try:
            body = self.read_body()
            self.server.slow_down()
            path = urlsplit(self.path).path
            segment = path[1:]
            if "/" in segment:
                raise BadRequest(404, "not found")
            if segment:
                try:
                    name = clean_name(unquote(segment, errors="strict"))
                except UnicodeDecodeError:
                    raise BadRequest(400, "name is not UTF-8") from None
            else:
                name = name_from_body(self.headers.get("Content-Type", ""), body)
        except BadRequest as err:
            self.reply(err.status, str(err))
            return
        self.reply(200, greeting(name))

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest(411, "send the body with a Content-Length (chunked bodies are not supported)")
        length_text = self.headers.get("Content-Length", "0").strip() or "0"
        if not length_text.isdigit():
            self.close_connection = True
            raise BadRequest(400, "bad Content-Length")
        length = int(length_text)
        if length > MAX_BODY:
            self.close_connection = True   # the unread body would be taken for the next request
            raise BadRequest(413, f"body too large (at most {MAX_BODY} bytes)")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            raise BadRequest(400, "body shorter than its Content-Length")
        return body

    # -- responses and logging
    def reply(self, status: int, text: str, send_body: bool = True) -> None:
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Hello-Version", self.server.settings.version)
        self.send_header("X-Hello-Host", self.server.hostname)
        if self.close_connection or self.server.stopping:
            self.send_header("Connection", "close")
        ms = (time.monotonic() - self.started) * 1000
        log(f'{self.client_address[0]} "{self.requestline.translate(_CONTROL)}" {status} {len(body)} {ms:.1f}ms')
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's errors (bad request line, unknown method) as one plain-text line."""
        self.close_connection = True
        self.reply(code, message or HTTPStatus(code).phrase, send_body=self.command != "HEAD")

    def log_request(self, code="-", size="-") -> None:
        pass   # reply() logs each request once, with its duration

    def log_message(self, format: str, *args) -> None:
        log(f"{self.client_address[0]} {(format % args).translate(_CONTROL)}")


# --------------------------------------------------------------------------- server
class HelloServer(ThreadingHTTPServer):
    daemon_threads = False   # server_close() waits for in-flight requests
    block_on_close = True
    # The listen backlog. socketserver's default, 5, overflows as soon as connections arrive
    # faster than the accept loop gets the GIL: the kernel then drops SYNs, and the load
    # balancer's connect waits 1 s for the retransmit and times out. (The kernel caps it at
    # net.core.somaxconn.)
    request_queue_size = 1024

    def __init__(self, settings: Settings):
        self.settings = settings
        self.delay = Delay(settings.delay_file)
        self.hostname = socket.gethostname()
        self.stopping = False
        self._conn_lock = threading.Lock()
        self._handlers: set[HelloHandler] = set()
        self.address_family = socket.AF_INET6 if ":" in settings.bind else socket.AF_INET
        super().__init__((settings.bind, settings.port), HelloHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def slow_down(self) -> None:
        seconds = self.delay.seconds()
        if seconds:
            time.sleep(seconds)

    def track(self, handler: HelloHandler) -> None:
        with self._conn_lock:
            self._handlers.add(handler)

    def untrack(self, handler: HelloHandler) -> None:
        with self._conn_lock:
            self._handlers.discard(handler)

    def mark_busy(self, handler: HelloHandler) -> None:
        with self._conn_lock:
            handler.idle = False

    def mark_idle(self, handler: HelloHandler) -> bool:
        """Between requests; True if the server is stopping (so close the connection)."""
        with self._conn_lock:
            handler.idle = True
            return self.stopping

    def stop(self) -> None:
        """Stop accepting, close idle keep-alive connections, let busy ones finish their request.

        Must not run on the thread inside serve_forever(); server_close() afterwards waits for
        the request threads.
        """
        with self._conn_lock:
            self.stopping = True
            idle = [h for h in self._handlers if h.idle]
        for handler in idle:
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.shutdown()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        server = HelloServer(settings)
    except SettingsError as err:
        log(f"hello: {err}")
        return 2
    except OSError as err:
        log(f"hello: cannot listen on {settings.bind}:{settings.port}: {err.strerror or err}")
        return 1

    def on_signal(signum, frame):
        if not server.stopping:
            log(f"hello: {signal.Signals(signum).name}: finishing in-flight requests, then exiting")
            threading.Thread(target=server.stop, name="stop").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    delay = f", delay file {settings.delay_file}" if settings.delay_file else ""
    log(f"hello {settings.version} listening on {settings.bind}:{server.port}{delay}")
    try:
        server.serve_forever(poll_interval=0.1)   # how soon a stop request is noticed
    finally:
        server.server_close()
    log("hello: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
