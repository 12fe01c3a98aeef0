"""A bounded HTTP client for tests: steady requests to one URL from a thread, results recorded.

It sends only to the lab's own addresses, stops by itself after ``max_seconds`` or ``max_requests``,
and never retries: every failure a user would see is recorded.
"""
from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    statuses: list = field(default_factory=list)  # (t, status or error string, body)

    @property
    def failures(self) -> list:
        return [s for s in self.statuses if s[1] != 200]

    @property
    def count(self) -> int:
        return len(self.statuses)

    def bodies(self) -> list[str]:
        return [s[2] for s in self.statuses if s[1] == 200]


class SteadyLoad:
    def __init__(self, url: str, rate: float = 20.0, max_seconds: float = 120.0, max_requests: int = 5000,
                 path: str | None = None, timeout: float = 10.0):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = path or parts.path or "/"
        self.interval = 1.0 / rate
        self.max_seconds, self.max_requests, self.timeout = max_seconds, max_requests, timeout
        self.result = LoadResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SteadyLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 5)
        return self.result

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - start < self.max_seconds \
                and self.result.count < self.max_requests:
            t = time.monotonic()
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                self.result.statuses.append((t - start, resp.status, resp.read().decode(errors="replace").strip()))
            except OSError as err:
                self.result.statuses.append((t - start, f"{type(err).__name__}: {err}", ""))
            finally:
                conn.close()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t)))


def rolling_deploy_under_load(lab, url: str, env: str, before: str, after: str, rate: float,
                              max_seconds: float) -> None:
    """`hello-deploy --version AFTER` while a steady client asks the load balancer (``url``) for
    /version: the deploy is rolling, no request fails, and the answers go from BEFORE to AFTER."""
    with SteadyLoad(url + "version", rate=rate, max_seconds=max_seconds) as load:
        time.sleep(1)
        result = lab.fab("hello-deploy", "--env", env, "--version", after, timeout=600)
        time.sleep(1)
        seen = load.stop()
    assert result.ok, result
    assert "rolling deploy" in result.stdout
    assert seen.failures == [], seen.failures[:5]
    versions = seen.bodies()
    assert versions[0] == before and versions[-1] == after
