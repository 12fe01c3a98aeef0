"""hello's own tests: the deploy gate runs them on the packed release tree before it ships.

    python3 -m unittest discover -s tests -t .

Standard library only. Each test starts the server in-process on an ephemeral port.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path
from unittest import mock

import app

APP = Path(app.__file__).resolve()


class Running:
    """A HelloServer serving on 127.0.0.1:<ephemeral> in a thread."""

    def __init__(self, **settings):
        self.logs: list[str] = []
        self.quiet = mock.patch.object(app, "log", self.logs.append)   # keep test output readable
        self.quiet.start()
        self.server = app.HelloServer(app.Settings(port=0, bind="127.0.0.1", **settings))
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, headers=None, timeout=10):
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8"), resp
        finally:
            conn.close()

    def close(self):
        if not self.server.stopping:
            self.server.stop()
        self.server.server_close()
        self.thread.join(5)
        self.quiet.stop()


class ServerCase(unittest.TestCase):
    settings: dict = {}

    def setUp(self):
        self.running = Running(**self.settings)
        self.addCleanup(self.running.close)

    def request(self, *args, **kwargs):
        return self.running.request(*args, **kwargs)


class Greetings(ServerCase):
    settings = {"version": "v-test"}

    def test_get_root_greets_the_world(self):
        status, body, resp = self.request("GET", "/")
        self.assertEqual((status, body), (200, "Hello World!"))
        self.assertEqual(resp.getheader("Content-Type"), "text/plain; charset=utf-8")
        self.assertEqual(resp.getheader("X-Hello-Version"), "v-test")

    def test_post_name_in_path(self):
        self.assertEqual(self.request("POST", "/Ann")[:2], (200, "Hello Ann World!"))

    def test_post_name_in_path_is_url_decoded(self):
        self.assertEqual(self.request("POST", "/Ann%20Lee")[:2], (200, "Hello Ann Lee World!"))

    def test_post_form_body(self):
        got = self.request("POST", "/", "name=Bob", {"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(got[:2], (200, "Hello Bob World!"))

    def test_post_form_body_without_content_type(self):
        self.assertEqual(self.request("POST", "/", "name=Bob")[:2], (200, "Hello Bob World!"))

    def test_post_without_a_name_greets_the_world(self):
        self.assertEqual(self.request("POST", "/", "")[:2], (200, "Hello World!"))
        self.assertEqual(self.request("POST", "/", "other=1")[:2], (200, "Hello World!"))

    def test_post_json_body(self):
        got = self.request("POST", "/", json.dumps({"name": "Cy"}), {"Content-Type": "application/json"})
        self.assertEqual(got[:2], (200, "Hello Cy World!"))

    def test_bad_json_is_a_one_line_400(self):
        status, body, _ = self.request("POST", "/", "{not json", {"Content-Type": "application/json"})
        self.assertEqual(status, 400)
        self.assertTrue(body.startswith("body is not valid JSON"), body)
        self.assertNotIn("\n", body)

    def test_json_must_be_an_object_with_a_string_name(self):
        status, body, _ = self.request("POST", "/", "[1]", {"Content-Type": "application/json"})
        self.assertEqual(status, 400)
        self.assertIn("object", body)
        status, body, _ = self.request("POST", "/", '{"name": 5}', {"Content-Type": "application/json"})
        self.assertEqual((status, body), (400, "name must be a string"))

    def test_long_names_are_refused(self):
        status, body, _ = self.request("POST", "/" + "a" * (app.MAX_NAME + 1))
        self.assertEqual(status, 400)
        self.assertIn("too long", body)
        self.assertEqual(self.request("POST", "/" + "a" * app.MAX_NAME)[0], 200)

    def test_control_characters_are_refused(self):
        status, body, _ = self.request("POST", "/", "name=a%0Ab")
        self.assertEqual((status, body), (400, "name must not contain control characters"))

    def test_other_content_types_are_415(self):
        self.assertEqual(self.request("POST", "/", "x", {"Content-Type": "text/csv"})[0], 415)

    def test_oversized_body_is_413(self):
        self.assertEqual(self.request("POST", "/", "a" * (app.MAX_BODY + 1))[0], 413)

    def test_unknown_paths_are_404(self):
        self.assertEqual(self.request("GET", "/nope")[:2], (404, "not found"))
        self.assertEqual(self.request("POST", "/a/b")[:2], (404, "not found"))

    def test_one_log_line_per_request(self):
        self.request("GET", "/healthz")
        self.request("POST", "/Ann")
        self.assertEqual(len(self.running.logs), 2, self.running.logs)
        self.assertRegex(self.running.logs[0], r'^127\.0\.0\.1 "GET /healthz HTTP/1\.1" 200 2 [0-9.]+ms$')
        self.assertIn('"POST /Ann HTTP/1.1" 200 16', self.running.logs[1])

    def test_log_lines_cannot_be_forged(self):
        with socket.create_connection(("127.0.0.1", self.running.server.port), timeout=5) as sock:
            sock.sendall(b"GET /a\rb\x1b[2K HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertTrue(sock.recv(1024).startswith(b"HTTP/1.1 400 "))   # \r splits the line
        self.assertEqual(len(self.running.logs), 1)
        self.assertIn("/a\\x0db\\x1b[2K", self.running.logs[0])
        self.assertFalse(any(c in self.running.logs[0] for c in "\r\n\x1b"))

    def test_healthz(self):
        self.assertEqual(self.request("GET", "/healthz")[:2], (200, "ok"))
        self.assertEqual(self.request("HEAD", "/healthz")[:2], (200, ""))

    def test_version(self):
        self.assertEqual(self.request("GET", "/version")[:2], (200, "v-test"))

    def test_unsupported_method_is_plain_text(self):
        status, body, _ = self.request("PUT", "/")
        self.assertEqual(status, 501)
        self.assertNotIn("<", body)

    def test_keep_alive_serves_several_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.running.server.port, timeout=5)
        self.addCleanup(conn.close)
        for path in ("/", "/healthz", "/version"):
            conn.request("GET", path)
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            self.assertNotEqual(resp.read(), b"")

    def test_each_response_leaves_in_one_write(self):
        """A worker killed between two writes leaves the load balancer holding headers without a
        body, and the client's connection is cut; one write per response leaves nothing half sent."""
        port = self.running.server.port
        writes: list[bytes] = []
        real_send, real_sendall = socket.socket.send, socket.socket.sendall

        def recording(real):
            def write(sock, data, *args):
                if sock.getsockname()[1] == port:   # the server's side of the connection
                    writes.append(bytes(data))
                return real(sock, data, *args)
            return write

        with mock.patch.object(socket.socket, "send", recording(real_send)), \
                mock.patch.object(socket.socket, "sendall", recording(real_sendall)):
            for method, path, body in (("GET", "/", None), ("POST", "/Ann", None), ("GET", "/nowhere", None)):
                writes.clear()
                status, text, _ = self.request(method, path, body=body)
                self.assertEqual(len(writes), 1, (method, path, writes))
                head, _, sent_body = writes[0].partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), writes[0])
                self.assertEqual(sent_body.decode(), text)


class VersionSetting(unittest.TestCase):
    def test_env_wins_then_file_then_unknown(self):
        with tempfile.TemporaryDirectory() as tmp:
            vfile = Path(tmp, "VERSION")
            self.assertEqual(app.read_version({}, vfile), "unknown")
            vfile.write_text("v7\n")
            self.assertEqual(app.read_version({}, vfile), "v7")
            self.assertEqual(app.read_version({"HELLO_VERSION": "v9"}, vfile), "v9")
            vfile.write_text("$Format:%(describe)$\n")   # a checkout, not a git archive
            self.assertEqual(app.read_version({}, vfile), "unknown")

    def test_settings_from_env_and_flags(self):
        env = {"HELLO_PORT": "8123", "HELLO_BIND": "127.0.0.1", "HELLO_SHARED_DIR": "/srv/hello/shared"}
        s = app.load_settings([], env)
        self.assertEqual((s.port, s.bind, s.delay_file), (8123, "127.0.0.1", Path("/srv/hello/shared/delay_ms")))
        self.assertEqual(app.load_settings(["--port", "7000"], env).port, 7000)
        self.assertEqual(app.load_settings([], {}).port, 9999)
        self.assertIsNone(app.load_settings([], {}).delay_file)
        self.assertEqual(app.load_settings([], {**env, "HELLO_DELAY_FILE": "/d"}).delay_file, Path("/d"))

    def test_bad_port_is_a_one_line_error(self):
        with self.assertRaisesRegex(app.SettingsError, "HELLO_PORT='x' is not a port"):
            app.load_settings([], {"HELLO_PORT": "x"})


class SlowDown(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.delay_file = Path(tmp.name, "delay_ms")
        self.running = Running(delay_file=self.delay_file)
        self.addCleanup(self.running.close)

    def timed(self, method, path, body=None):
        start = time.monotonic()
        status = self.running.request(method, path, body)[0]
        return status, time.monotonic() - start

    def test_delay_applies_to_greetings_not_health(self):
        self.delay_file.write_text("200\n")
        status, took = self.timed("GET", "/")
        self.assertEqual(status, 200)
        self.assertGreaterEqual(took, 0.19)
        self.assertGreaterEqual(self.timed("POST", "/Ann")[1], 0.19)
        # health answers at once even when greetings wait the longest delay there is (an upper
        # bound on a wall time would fail on a busy machine; a 30 s delay against a 10 s timeout cannot)
        self.delay_file.write_text(str(app.MAX_DELAY_MS))
        time.sleep(1.05)                                   # the file is re-read at most once a second
        self.assertEqual(self.running.request("GET", "/healthz", timeout=10)[:2], (200, "ok"))
        self.assertEqual(self.running.server.delay.seconds(), app.MAX_DELAY_MS / 1000)

    def test_garbage_in_the_delay_file_means_no_delay(self):
        self.delay_file.write_text("fast please")
        self.assertEqual(self.running.request("GET", "/")[:2], (200, "Hello World!"))
        self.assertEqual(self.running.server.delay.seconds(), 0.0)
        self.assertIn("ignoring delay file", self.running.logs[0])

    def test_delay_is_read_at_most_once_a_second(self):
        clock = [100.0]
        delay = app.Delay(self.delay_file, clock=lambda: clock[0])
        self.delay_file.write_text("50")
        self.assertEqual(delay.seconds(), 0.05)
        self.delay_file.write_text("70")
        clock[0] += 0.5
        self.assertEqual(delay.seconds(), 0.05)
        clock[0] += 0.6
        self.assertEqual(delay.seconds(), 0.07)


class GracefulStop(unittest.TestCase):
    def test_in_flight_request_finishes_then_server_stops(self):
        with tempfile.TemporaryDirectory() as tmp:
            delay_file = Path(tmp, "delay_ms")
            delay_file.write_text("400")
            running = Running(delay_file=delay_file)
            self.addCleanup(running.close)
            result = {}
            client = threading.Thread(target=lambda: result.update(got=running.request("GET", "/")[:2]))
            client.start()
            deadline = time.monotonic() + 10    # until the request is sleeping in the handler
            while not any(not h.idle for h in list(running.server._handlers)):
                self.assertLess(time.monotonic(), deadline, "the request never reached the handler")
                time.sleep(0.01)
            running.server.stop()
            running.server.server_close()   # waits for the in-flight request
            client.join(5)
            self.assertEqual(result.get("got"), (200, "Hello World!"))
            with self.assertRaises(OSError):
                running.request("GET", "/healthz", timeout=2)

    def test_sigterm_exits_zero_after_answering(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HELLO_")}
        proc = subprocess.Popen(
            [sys.executable, str(APP), "--port", "0", "--bind", "127.0.0.1"],
            stderr=subprocess.PIPE, text=True, env={**env, "HELLO_VERSION": "v-sig"},
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        first = proc.stderr.readline()
        self.assertIn("listening on 127.0.0.1:", first)
        port = int(first.rsplit(":", 1)[1].split(",")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/version")
        self.assertEqual(conn.getresponse().read(), b"v-sig")
        conn.close()
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        proc.stderr.close()


if __name__ == "__main__":
    unittest.main()
