"""Containment of local hosts: a cgroup subtree of each host's own, and every process of a host found and ended.

Why it is needed. This machine's PID 1 is not systemd, so nspawn runs with ``--keep-unit
--register=no``. Then it takes the cgroup it was started in as the container's: it creates
``<its cgroup>/payload`` for the container and moves itself to ``<its cgroup>/supervisor``
(systemd-nspawn(1) on ``--keep-unit``; ``create_subcgroup`` in systemd's src/nspawn/nspawn-cgroup.c,
which also mirrors that path into the cgroup v2 hierarchy of a hybrid setup). Started straight from
booted, every host shared one ``/payload``, so units of different hosts shared cgroups and fought
over them. And killing nspawn does not end a container: its payload is a PID namespace of its own,
whose init is not nspawn.

So each host's nspawn is moved, before it execs, into ``<caller's cgroup>/booted/<host>`` in every
cgroup hierarchy mounted here (the per-host memory and pids limits live there), and a stop kills that
cgroup (``cgroup.kill`` where cgroup v2 has it) and every process whose root file system is the host's
overlay, and waits until none is left (the Linux kernel's cgroup-v1 and cgroup-v2 documentation
describe the files used here).

Planning (which hierarchies, which directories, which limit files) is pure and tested as tables; the
functions below the line touch /proc and /sys.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from fabfile.core.localcmd import process_alive

GROUP = "booted"  # the directory under the caller's cgroup that holds one cgroup per host
SYSTEMD_KEY = "name=systemd"
UNIFIED_KEY = ""  # cgroup v2 as /proc/self/cgroup names it ("0::/path")

# Moves itself into the cgroups named by its arguments (cgroup.procs files, up to "--"), then execs
# the rest: the host's nspawn starts life, and forks everything, inside the host's cgroups. Fixed
# text; the paths and the command reach it only as arguments.
ENTER_SCRIPT = 'while [ "$1" != "--" ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy, and where the calling process sits in it."""

    key: str  # as /proc/self/cgroup names it: "memory", "cpu,cpuacct", "name=systemd", "" for v2
    mount: str  # a mount point of the hierarchy's root
    own: str  # the caller's cgroup in it, e.g. "/" or "/process_api/1234"

    @property
    def v2(self) -> bool:
        return self.key == UNIFIED_KEY

    def path(self, cgroup: str) -> Path:
        return Path(self.mount) / cgroup.lstrip("/")


@dataclass(frozen=True)
class Limits:
    """Per-host resource limits; None means no limit."""

    memory_bytes: int | None = None
    pids: int | None = None


def _unescape(text: str) -> str:
    """Undo /proc/*/mountinfo's octal escapes (space, tab, newline, backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_hierarchies(mountinfo: str, proc_cgroup: str) -> list[Hierarchy]:
    """The cgroup hierarchies mounted here (from /proc/self/mountinfo) with the caller's cgroup in each
    (from /proc/self/cgroup). A hierarchy that is not mounted at its root is left out."""
    v1: list[tuple[set[str], str]] = []  # (super options, mount point) of each cgroup v1 mount
    v2: str | None = None
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(after) < 3 or fields[3] != "/":
            continue
        if after[0] == "cgroup2" and v2 is None:
            v2 = _unescape(fields[4])
        elif after[0] == "cgroup":
            v1.append((set(after[2].split(",")), _unescape(fields[4])))
    found = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        key, own = parts[1], parts[2]
        if key == UNIFIED_KEY:
            mount = v2
        else:  # "cpu,cpuacct" or "name=systemd": each is among the mount's super options
            mount = next((m for options, m in v1 if set(key.split(",")) <= options), None)
        if mount is not None:
            found.append(Hierarchy(key, mount, own))
    # In a hybrid setup nspawn makes the container's cgroup in cgroup v2 at the path it has in
    # name=systemd, so the host's v2 cgroup must sit at that same path.
    systemd = next((h for h in found if h.key == SYSTEMD_KEY), None)
    if systemd is not None:
        found = [Hierarchy(h.key, h.mount, systemd.own) if h.v2 else h for h in found]
    return found


def host_cgroup(hierarchy: Hierarchy, name: str) -> Path:
    """The directory of host ``name``'s cgroup in ``hierarchy``."""
    return hierarchy.path(hierarchy.own) / GROUP / name


def plan_limits(hierarchy: Hierarchy, limits: Limits, v2_controllers: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(file, value) pairs to write in a host's cgroup of ``hierarchy`` to set ``limits``. On cgroup v2
    a controller counts only if it is enabled for the host's cgroup (``v2_controllers``); in a hybrid
    setup the controllers live in their v1 hierarchies instead."""
    controllers = v2_controllers if hierarchy.v2 else set(hierarchy.key.split(","))
    plan = []
    if limits.memory_bytes is not None and "memory" in controllers:
        plan.append(("memory.max" if hierarchy.v2 else "memory.limit_in_bytes", str(limits.memory_bytes)))
    if limits.pids is not None and "pids" in controllers:
        plan.append(("pids.max", str(limits.pids)))
    return plan


def enter_argv(cgroups: list[Path], argv: list[str]) -> list[str]:
    """``argv`` wrapped so that it runs inside ``cgroups`` from its first instruction."""
    return ["/bin/sh", "-c", ENTER_SCRIPT, "booted-enter", *(str(c / "cgroup.procs") for c in cgroups), "--", *argv]


def root_upperdir(mountinfo: str) -> str | None:
    """The overlay upper directory of a process's root file system, from its /proc/PID/mountinfo."""
    found = None
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if not sep or len(fields) < 5 or fields[4] != "/" or len(after) < 3 or after[0] != "overlay":
            continue
        for option in after[2].split(","):
            if option.startswith("upperdir="):
                found = _unescape(option[len("upperdir="):])
    return found


# ------------------------------------------------------------------------------------------ edges
def hierarchies() -> list[Hierarchy]:
    return parse_hierarchies(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())


def processes_by_upperdir() -> dict[str, set[int]]:
    """Every process on this machine whose root is an overlay, by the overlay's upper directory."""
    by_root: dict[tuple, str | None] = {}  # processes sharing a mount namespace and root share the answer
    real: dict[str, str] = {}  # upper dir as mountinfo names it -> its real path (one lookup per scan)
    found: dict[str, set[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            root = os.stat(f"/proc/{entry}/root")
            key = (os.readlink(f"/proc/{entry}/ns/mnt"), root.st_dev, root.st_ino)
            if key not in by_root:
                upper = root_upperdir(Path(f"/proc/{entry}/mountinfo").read_text())
                # the real path, so a state dir named through a symlink still matches
                if upper and upper not in real:
                    real[upper] = os.path.realpath(upper)
                by_root[key] = real[upper] if upper else None
        except OSError:
            continue  # gone, or a kernel thread
        upper = by_root[key]
        if upper is not None:
            found.setdefault(upper, set()).add(int(entry))
    return found


def cgroup_processes(cgroups: list[Path]) -> set[int]:
    """Every process in ``cgroups`` and the cgroups below them."""
    pids: set[int] = set()
    for top in cgroups:
        for folder, _dirs, _files in os.walk(top):
            try:
                pids.update(int(p) for p in Path(folder, "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
    return pids


@dataclass
class HostProcesses:
    """Everything of one host that can run: its cgroups, its overlay, its nspawn."""

    cgroups: list[Path]
    upper: Path
    pids: tuple[int, ...] = ()  # known by id (its nspawn)

    def running(self, by_upper: dict[str, set[int]] | None = None) -> set[int]:
        by_upper = processes_by_upperdir() if by_upper is None else by_upper
        on_overlay = by_upper.get(os.path.realpath(self.upper), set())
        pids = cgroup_processes(self.cgroups) | on_overlay | set(self.pids)
        return {p for p in pids if process_alive(p)}

    def kill(self, timeout: float = 15.0) -> int:
        """SIGKILL every process of the host, again until none is left; return how many there were.

        Killing the cgroup first (cgroup.kill) leaves no window for a fork; the container's init
        dying then takes its whole PID namespace with it."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            pids = self.running()
            if not pids:
                return len(killed)
            if time.monotonic() > deadline:
                raise ContainmentError(f"{len(pids)} process(es) survive SIGKILL after {timeout:g}s: "
                                       f"{' '.join(str(p) for p in sorted(pids)[:10])}")
            for top in self.cgroups:
                try:
                    (top / "cgroup.kill").write_text("1")
                except OSError:
                    pass  # cgroup v1, or a kernel before 5.14: the signals below do it
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed |= pids
            time.sleep(0.05)


class ContainmentError(Exception):
    """A host's cgroup could not be made, or a process of it could not be ended."""


def create_cgroups(name: str, limits: Limits) -> list[Path]:
    """Make host ``name``'s cgroup in every hierarchy, with its limits; return the directories.

    A read-only or refused controller hierarchy is skipped (then its limit does not apply); the
    name=systemd and v2 hierarchies are required, since nspawn hands them to the host's systemd."""
    made = []
    for hierarchy in hierarchies():
        folder = host_cgroup(hierarchy, name)
        try:
            _make(hierarchy, folder)
        except OSError as err:
            if hierarchy.key in (SYSTEMD_KEY, UNIFIED_KEY):
                raise ContainmentError(f"cannot create cgroup {folder}: {err.strerror}") from err
            continue
        enabled: frozenset[str] = frozenset()
        if hierarchy.v2 and (folder / "cgroup.controllers").exists():
            enabled = frozenset((folder / "cgroup.controllers").read_text().split())
        for filename, value in plan_limits(hierarchy, limits, enabled):
            try:
                (folder / filename).write_text(value)
            except OSError as err:
                raise ContainmentError(f"cannot set {folder / filename} to {value}: {err.strerror}") from err
        made.append(folder)
    return made


def _make(hierarchy: Hierarchy, folder: Path) -> None:
    """mkdir -p ``folder``; a new cpuset cgroup gets its parent's CPUs and memory nodes, without which
    no process may join it; on cgroup v2 the memory and pids controllers are enabled where allowed."""
    base = hierarchy.path(hierarchy.own)
    for level in [base / GROUP, folder]:
        if hierarchy.v2:
            _enable_v2_controllers(level.parent)
        level.mkdir(exist_ok=True)
        if "cpuset" in hierarchy.key.split(","):
            # also when it exists: a start running alongside may have made it and not filled it yet
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if not (level / knob).read_text().strip():
                    (level / knob).write_text((level.parent / knob).read_text().strip() or "\n")


def _enable_v2_controllers(folder: Path) -> None:
    try:
        available = (folder / "cgroup.controllers").read_text().split()
        for controller in ("memory", "pids"):
            if controller in available:
                (folder / "cgroup.subtree_control").write_text(f"+{controller}")
    except OSError:
        pass  # a cgroup with processes of its own may not delegate: the limit then does not apply


def remove_cgroups(cgroups: list[Path]) -> int:
    """Remove host cgroups (emptied first) with the cgroups the host made below them; return how many
    of ``cgroups`` existed."""
    removed = 0
    for top in cgroups:
        if not top.exists():
            continue
        for folder, _dirs, _files in os.walk(top, topdown=False):
            _rmdir(Path(folder))
        removed += 1
    return removed


def _rmdir(folder: Path, timeout: float = 5.0) -> None:
    """rmdir a cgroup; EBUSY while its last processes finish exiting is retried until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise ContainmentError(f"cannot remove cgroup {folder}: {err.strerror}") from err
            time.sleep(0.05)
