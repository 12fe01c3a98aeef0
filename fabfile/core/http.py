"""booted's one HTTP client: short requests to hosts and load balancers (stdlib only)."""
from __future__ import annotations

import http.client
import time
from dataclasses import dataclass


def http_fetch(address: str, port: int, method: str, path: str, body: bytes | None = None,
               headers: dict | None = None, timeout: float = 3.0) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body bytes). Raises OSError when nothing answers."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_request(address: str, port: int, method: str, path: str, body: bytes | None = None,
                 headers: dict | None = None, timeout: float = 3.0) -> tuple[int, str]:
    """``http_fetch`` with the body as text."""
    status, data = http_fetch(address, port, method, path, body, headers, timeout)
    return status, data.decode(errors="replace")


@dataclass(frozen=True)
class Probe:
    """One request: did it reach the server, did it succeed, how long did it take."""

    reached: bool  # the TCP connection was made
    ok: bool  # a 2xx/3xx answer, read completely
    ms: float
    detail: str  # the status code, or what went wrong


def probe_once(address: str, port: int, path: str = "/", timeout: float = 3.0) -> Probe:
    """GET ``path`` on a fresh connection (a reused one could hit a keep-alive reset on reload)."""
    start = time.monotonic()
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        try:
            conn.connect()
        except OSError as err:
            return Probe(False, False, _ms_since(start), f"connect: {_why(err)}")
        try:
            conn.request("GET", path, headers={"Connection": "close", "User-Agent": "booted-monitor"})
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as err:
            return Probe(True, False, _ms_since(start), _why(err))
        return Probe(True, 200 <= resp.status < 400, _ms_since(start), str(resp.status))
    finally:
        conn.close()


def _ms_since(start: float) -> float:
    return (time.monotonic() - start) * 1000.0


def _why(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    return getattr(err, "strerror", None) or str(err) or type(err).__name__

