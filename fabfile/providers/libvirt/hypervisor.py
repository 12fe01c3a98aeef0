"""One libvirt connection (a hypervisor), and the local daemons behind ``qemu:///system``.

The provider holds its hypervisors by name (``default``, the configured ``uri``, or the named ones of
``hypervisors``); each VM's record says which hypervisor holds it.

A hypervisor on another machine can vanish (power, network). libvirt then blocks a call on its open
connection until TCP gives up (over 38 s measured, docs/multi-hypervisor-lab.md), and a new
connection until ssh does. So every connection is opened with a timeout, and a remote one sends
keepalives (libvirt's event loop runs in a thread for them): a dead hypervisor fails a call within
``KEEPALIVE_INTERVAL_S`` x (``KEEPALIVE_COUNT`` + 1) seconds.

Errors from libvirt become one line naming the hypervisor and what to do.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from fabfile.core import localcmd
from fabfile.core.errors import ProviderError
from fabfile.core.output import progress
from fabfile.providers.libvirt.placement import is_remote_uri

try:  # the bindings are an optional dependency: only the libvirt provider needs them
    import libvirt
except ImportError:  # pragma: no cover - depends on the installation
    libvirt = None

INSTALL_BINDINGS = ("the libvirt Python bindings are missing: apt-get install libvirt-dev pkg-config, "
                    "then pip install -e '.[libvirt]' (or run ./quickstart.sh)")
INSTALL_DAEMON = ("apt-get install --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu "
                  "libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils")
START_DAEMON = "mkdir -p /run/libvirt; virtlogd -d; libvirtd -d"
SOCKET = Path("/run/libvirt/libvirt-sock")
PIDFILES = {"virtlogd": Path("/run/virtlogd.pid"), "libvirtd": Path("/run/libvirtd.pid")}


# libvirt's keepalive (libvirt.org "virConnectSetKeepAlive"): a probe every interval, the connection
# closed after ``count`` unanswered ones.
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 2
CONNECT_TIMEOUT_S = 15.0
# After a failed open, calls in this process fail at once for this long instead of each waiting for
# ssh again (one listing touches a hypervisor several times).
RETRY_OPEN_AFTER_S = 10.0

_event_loop_lock = threading.Lock()
_event_loop_started = False


class HypervisorUnreachable(ProviderError):
    """A configured hypervisor does not answer: exit 2, as for the rest of environments.yaml."""

    exit_code = 2


def bindings():
    """The ``libvirt`` module, or a one-line ProviderError saying how to install it."""
    if libvirt is None:
        raise ProviderError(INSTALL_BINDINGS)
    # libvirt prints every error to stderr by default; booted reports them itself, once.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def run_event_loop(lv) -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per process).

    Keepalive needs it; it must be registered before the first connection is opened."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        lv.virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                lv.virEventRunDefaultImpl()

        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


class Hypervisor:
    """A named libvirt connection, opened on first use (with a timeout), reopened after it died."""

    def __init__(self, name: str, uri: str, connect_timeout: float = CONNECT_TIMEOUT_S):
        self.name, self.uri = name, uri
        self.connect_timeout = connect_timeout
        self._conn = None
        self._failed: tuple[float, HypervisorUnreachable] | None = None

    @property
    def local(self) -> bool:
        return not is_remote_uri(self.uri)

    @property
    def where(self) -> str:
        return f"hypervisor {self.name} ({self.uri})" if self.name != "default" else f"libvirt {self.uri}"

    @property
    def conn(self):
        lv = bindings()
        if self._conn is not None:
            try:
                alive = self._conn.isAlive()
            except lv.libvirtError:
                alive = False
            if not alive:  # closed by a keepalive timeout: the next call opens a new one
                self.close()
        if self._conn is None:
            if self._failed and time.monotonic() - self._failed[0] < RETRY_OPEN_AFTER_S:
                raise self._failed[1]
            try:
                self._conn = self._open(lv)
            except HypervisorUnreachable as err:
                self._failed = (time.monotonic(), err)
                raise
            self._failed = None
            if self.local and kvm_device_needs_udev_mode():
                progress("libvirt: /dev/kvm is root-only, so libvirt re-probes QEMU on every call (slow); "
                         "fix: chgrp kvm /dev/kvm; chmod 0660 /dev/kvm")
        return self._conn

    def _open(self, lv):
        """``lv.open(uri)`` in a thread, given up after ``connect_timeout`` (ssh may wait minutes)."""
        if not self.local:
            run_event_loop(lv)
        outcome: dict = {}

        def target() -> None:
            try:
                outcome["conn"] = lv.open(self.uri)
            except lv.libvirtError as err:
                outcome["error"] = err

        opener = threading.Thread(target=target, name=f"libvirt-open-{self.name}", daemon=True)
        opener.start()
        opener.join(self.connect_timeout)
        if opener.is_alive():
            raise HypervisorUnreachable(f"{self.where}: no answer within {self.connect_timeout:g}s")
        if "error" in outcome:
            raise HypervisorUnreachable(self.explain_open_failure(outcome["error"]))
        conn = outcome["conn"]
        if not self.local:
            try:
                conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
            except lv.libvirtError as err:
                conn.close()
                raise HypervisorUnreachable(f"{self.where}: {err.get_error_message()}") from None
        return conn

    def check(self) -> str | None:
        """None if the hypervisor answers now, else why not (one line naming it)."""
        lv = bindings()
        try:
            self.conn.getLibVersion()
        except HypervisorUnreachable as err:
            return str(err)
        except lv.libvirtError as err:
            self.close()
            return f"{self.where}: {err.get_error_message()}"
        return None

    def failure(self, err) -> "HypervisorUnreachable":
        """A libvirt error of a call on this hypervisor as one line; the connection is dropped if dead."""
        message = err.get_error_message() if hasattr(err, "get_error_message") else str(err)
        try:
            alive = self._conn is not None and self._conn.isAlive()
        except Exception:  # noqa: BLE001 - a dead connection may raise anything here
            alive = False
        if not alive:
            self.close()
        return HypervisorUnreachable(f"{self.where}: {message}")

    def explain_open_failure(self, err) -> str:
        message = err.get_error_message() or str(err)
        where = self.where
        if self.uri.startswith("qemu:///"):
            if not daemon_installed():
                return f"{where}: libvirtd is not installed: {INSTALL_DAEMON}"
            if not SOCKET.exists():
                return f"{where}: libvirtd is not running: start it with `{START_DAEMON}`"
        return f"{where}: {message}"

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not hide the real error
                pass
            self._conn = None


def daemon_installed() -> bool:
    return localcmd.which("libvirtd") is not None or Path("/usr/sbin/libvirtd").exists()


def daemons_running() -> bool:
    return _pid("libvirtd") is not None and SOCKET.exists()


def _pid(name: str) -> int | None:
    try:
        pid = int(PIDFILES[name].read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if localcmd.process_alive(pid, name.encode()) else None


KVM_DEVICE = Path("/dev/kvm")


def kvm_device_needs_udev_mode() -> bool:
    """True if /dev/kvm exists but is root-only (no udev gave it group kvm, mode 0660).

    libvirt then finds on every call that the qemu user cannot use KVM although its cached QEMU
    capabilities say KVM works, and probes QEMU again: 8 s per connection, ~50 s per domain define.
    """
    try:
        st = KVM_DEVICE.stat()
    except OSError:
        return False
    return not st.st_mode & 0o060


def give_kvm_device_udev_mode() -> None:
    """What udev does on a normal system: /dev/kvm group kvm, mode 0660."""
    import grp

    try:
        gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return
    os.chown(KVM_DEVICE, 0, gid)
    os.chmod(KVM_DEVICE, 0o660)
    progress("libvirt: gave /dev/kvm group kvm, mode 0660 (as udev would)")


def start_daemons(timeout: float = 60) -> list[str]:
    """Start virtlogd and libvirtd on a machine without systemd as PID 1; return the ones started.

    Returns ``[]`` if both already run. The caller that started them stops them (``stop_daemons``).
    """
    if not daemon_installed():
        raise ProviderError(f"libvirtd is not installed: {INSTALL_DAEMON}")
    if kvm_device_needs_udev_mode():
        give_kvm_device_udev_mode()
    started = []
    os.makedirs("/run/libvirt", exist_ok=True)
    for name in ("virtlogd", "libvirtd"):
        if _pid(name) is None:
            localcmd.run([name, "-d"], timeout=30)
            started.append(name)
    deadline = time.monotonic() + timeout
    lv = bindings()
    while True:  # the first connection after a start takes ~10 s while the QEMU driver probes
        try:
            lv.open("qemu:///system").close()
            break
        except lv.libvirtError as err:
            if time.monotonic() > deadline:
                raise ProviderError(f"libvirtd did not answer within {timeout:g}s: {err.get_error_message()}") from None
            time.sleep(0.5)
    if started:
        progress(f"libvirt: started {', '.join(started)}")
    return started


def stop_daemons(names: list[str], timeout: float = 30) -> None:
    """Stop the daemons ``start_daemons`` started (libvirtd first), waiting until they are gone."""
    import signal

    for name in ("libvirtd", "virtlogd"):
        if name not in names:
            continue
        pid = _pid(name)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while localcmd.process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if localcmd.process_alive(pid):
            os.kill(pid, signal.SIGKILL)
