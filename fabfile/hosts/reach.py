"""Which hosts answer on SSH: a TCP connect to port 22 of every address at once.

No ICMP (it needs privileges and says nothing about sshd), no DNS (addresses only). All the
connects run together on one selector, so checking 50 hosts takes about as long as checking one:
at most ``timeout`` for each batch of ``BATCH`` addresses.

A probe can also be begun early, in the background (``begin``): `fab hosts-filter` begins its own
before Python has imported the rest of booted (``begin_for``, from the top of the package), so the
imports happen while the probe waits on the hosts that do not answer, instead of before it. The
later ``probe_ssh`` of those addresses takes the early answers.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import selectors
import socket
import threading
import time
from collections.abc import Iterable

from fabfile.core.state import state_dir

BATCH = 256  # sockets open at once; stays well under the usual 1024 open-files limit
TIMEOUT_S = 1.0  # how long hosts-filter waits for a host to answer


def probe_ssh(addresses: Iterable[str], port: int = 22, timeout: float = TIMEOUT_S) -> dict[str, bool]:
    """``{address: True if a TCP connection to address:port was accepted within timeout}``.

    An entry that is not an IP address is False (it is never resolved). If a probe of these
    addresses (or more) with the same port and timeout was begun (``begin``), its answers.
    """
    results = {address: False for address in addresses}
    early = _take_early(set(results), port, timeout)
    if early is not None:
        return {address: early[address] for address in results}
    valid = [a for a in results if _is_ip(a)]
    for i in range(0, len(valid), BATCH):
        results.update(_probe_batch(valid[i:i + BATCH], port, timeout))
    return results


class _Early(threading.Thread):
    def __init__(self, addresses: list[str], port: int, timeout: float):
        super().__init__(name="early-probe", daemon=True)
        self.key = (frozenset(addresses), port, timeout)
        self.results: dict[str, bool] | None = None

    def run(self) -> None:
        addresses, port, timeout = self.key
        try:
            self.results = probe_ssh(addresses, port, timeout)
        except OSError:  # out of sockets, say: the task's own probe meets it again, and reports it
            self.results = None


_early: _Early | None = None


def begin(addresses: Iterable[str], port: int = 22, timeout: float = TIMEOUT_S) -> None:
    """Begin ``probe_ssh(addresses, port, timeout)`` in the background, for a later ``probe_ssh``."""
    global _early
    _early = _Early(list(addresses), port, timeout)
    _early.start()


def begin_for(argv: list[str]) -> None:
    """If ``argv`` is `fab hosts-filter`, ``begin`` its probe of the inventory's addresses.

    Runs before the rest of booted is imported, so it reads the inventory without it: anything
    unexpected there and nothing is begun (hosts-filter then reads, checks and probes as always)."""
    if argv[1:] != ["hosts-filter"]:
        return
    try:
        with open(state_dir() / "inventory.json", "rb") as fh:  # Inventory()'s path
            addresses = [entry["address"] for entry in json.load(fh)["hosts"].values()]  # inventory.py's format
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    if addresses and all(isinstance(a, str) for a in addresses):
        begin(addresses)


def _take_early(addresses: set[str], port: int, timeout: float) -> dict[str, bool] | None:
    """The begun probe's answers, if it covers ``addresses`` with ``port`` and ``timeout`` (once)."""
    global _early
    early = _early
    if early is None or early is threading.current_thread():
        return None
    covered, early_port, early_timeout = early.key
    if early_port != port or early_timeout != timeout or not addresses <= covered:
        return None
    _early = None
    early.join()
    return early.results  # None if it failed: then probed again


def _probe_batch(addresses: list[str], port: int, timeout: float) -> dict[str, bool]:
    results = {a: False for a in addresses}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        try:
            for address in addresses:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex((address, port))
                if err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
                    selector.register(sock, selectors.EVENT_WRITE, address)
                else:  # 0: connected at once; anything else: refused or unreachable at once
                    results[address] = err == 0
                    sock.close()
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(remaining):
                    done: socket.socket = key.fileobj  # type: ignore[assignment]  # only sockets are registered
                    results[key.data] = done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    selector.unregister(done)
                    done.close()
        finally:
            for key in list(selector.get_map().values()):
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]  # only sockets are registered
    return results


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
