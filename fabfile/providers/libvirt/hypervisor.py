"""One libvirt connection (a hypervisor), and the local daemons behind ``qemu:///system``.

The provider holds its hypervisors by name. Today there is one (``default``, the configured
``uri``); several hypervisors over ``qemu+ssh://`` are the next step, and nothing here assumes a
single one: each VM's record says which hypervisor holds it.

Errors from libvirt become one line naming the hypervisor and what to do.
"""
from __future__ import annotations

import os
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


def bindings():
    """The ``libvirt`` module, or a one-line ProviderError saying how to install it."""
    if libvirt is None:
        raise ProviderError(INSTALL_BINDINGS)
    # libvirt prints every error to stderr by default; booted reports them itself, once.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


class Hypervisor:
    """A named libvirt connection, opened on first use."""

    def __init__(self, name: str, uri: str):
        self.name, self.uri = name, uri
        self._conn = None

    @property
    def local(self) -> bool:
        return not is_remote_uri(self.uri)

    @property
    def conn(self):
        if self._conn is None:
            lv = bindings()
            try:
                self._conn = lv.open(self.uri)
            except lv.libvirtError as err:
                raise ProviderError(self.explain_open_failure(err)) from None
            if self.local and kvm_device_needs_udev_mode():
                progress("libvirt: /dev/kvm is root-only, so libvirt re-probes QEMU on every call (slow); "
                         "fix: chgrp kvm /dev/kvm; chmod 0660 /dev/kvm")
        return self._conn

    def explain_open_failure(self, err) -> str:
        message = err.get_error_message() or str(err)
        where = f"libvirt {self.uri}" + (f" (hypervisor {self.name})" if self.name != "default" else "")
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
