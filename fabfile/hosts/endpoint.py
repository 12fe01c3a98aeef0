"""booted's own nginx: render its config from nginx/booted.conf, check it, start, reload, rotate.

It runs from the state dir with its own prefix, pid file and logs, so the system's nginx
configuration is never touched and a test's nginx never meets a user's.
"""
from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import ipaddress
import os
import re
import shlex
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fabfile.core import localcmd, templates
from fabfile.core.errors import BootedError
from fabfile.core.output import poll, progress
from fabfile.core.state import PROJECT_ROOT, atomic_write, locked, state_dir, state_path
from fabfile.hosts import callhome
from fabfile.hosts.bootlog import control_addresses

TEMPLATE = PROJECT_ROOT / "nginx" / "booted.conf"


def booted_log_path() -> Path:
    """BOOTED_LOG, else the state dir's nginx/booted.log."""
    path = Path(os.environ.get("BOOTED_LOG") or state_path("nginx", "booted.log"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def prefix() -> Path:
    path = state_path("nginx", "nginx.conf").parent
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (path / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    return path


WORKER_USER, WORKER_GROUP = "nobody", "nogroup"
LOOPBACK = "127.0.0.1"  # always listened on: this machine's own checks, and VirtualBox NAT's kickstart fetch
KEEP_ROTATED = 5  # rotated booted logs kept; older ones are removed at the next rotation


def kickstart_dir(create: bool = False) -> Path:
    """Where booted's nginx serves kickstarts from (``/ks/<random>.cfg``); made if ``create``.

    As root, nginx's workers run as nobody and cannot enter the 0700 state dir, so the folder is a
    root-owned 0711 one under /run (or the temp dir) named after the state dir: its files can be
    read only by name, and the names are random. Otherwise the workers are booted's own user and
    the folder is in the state dir.
    """
    if os.geteuid() != 0:
        path = state_dir() / "nginx" / "ks"
        if create:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path
    base = Path("/run") if Path("/run").is_dir() else Path(tempfile.gettempdir())
    path = base / f"booted-ks-{hashlib.sha256(str(state_dir()).encode()).hexdigest()[:16]}"
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o711)
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise BootedError(f"{path} is not a folder owned by root; remove it (booted serves kickstarts from it)")
        os.chmod(path, 0o711)
    return path


def kickstart_log_path() -> Path:
    """nginx's log of kickstart fetches (address, time, status, bytes; see nginx/booted.conf)."""
    return prefix() / "kickstart.log"


def share_with_workers(path: Path) -> None:
    """Let nginx's workers (not root) read a 0640 file they serve: give it their group."""
    if os.geteuid() == 0:
        try:
            os.chown(path, 0, grp.getgrnam(WORKER_GROUP).gr_gid)
        except KeyError:
            pass


def nginx_path(path: Path | str, *, trailing_slash: bool = False) -> str:
    """``path`` as an nginx string: double-quoted; refused if it holds what nginx would read as
    syntax or a variable (a quote, backslash, ``$``, ``;``, braces, control characters)."""
    text = str(path) + ("/" if trailing_slash else "")
    bad = sorted({c for c in text if c in '"\\$;{}\'' or ord(c) < 0x20 or ord(c) == 0x7F})
    if bad:
        raise BootedError(f"path {text!r} cannot go into booted's nginx config: it holds {''.join(bad)!r} "
                          "(move the state dir or BOOTED_LOG)")
    return f'"{text}"'


def listen_addresses(config, reach: Iterable[str]) -> list[str]:
    """Where nginx listens: 127.0.0.1 and the addresses hosts call home to (``reach``, each if this
    machine has it now), or ``settings.nginx.bind`` if set; never every address (0.0.0.0)."""
    bind = config.nginx.get("bind") or ""
    wanted = [bind] if bind else list(dict.fromkeys(reach))
    present = control_addresses()
    addresses = [LOOPBACK] + [a for a in wanted if a != LOOPBACK and a in present]
    for missing in [a for a in wanted if a not in present and a != LOOPBACK]:
        progress(f"note: no interface here has {missing} (yet): booted's nginx does not listen there")
    return addresses


def render(config, addresses: Sequence[str] = (LOOPBACK,), installers: Iterable[str] = ()) -> str:
    """booted's nginx config; ``installers``: networks (CIDR) whose installers may fetch kickstarts."""
    port = config.nginx["port"]
    allow = "".join(f"allow {ipaddress.IPv4Network(n, strict=False)};\n            " for n in dict.fromkeys(installers))
    base = prefix()
    return templates.render(TEMPLATE, dict(
        # Workers only read kickstarts and write nothing; as root, drop them to nobody.
        user_line=f"user {WORKER_USER} {WORKER_GROUP};" if os.geteuid() == 0 else "",
        pid_file=nginx_path(base / "nginx.pid"),
        error_log=nginx_path(base / "error.log"),
        **{f"{kind}_temp": nginx_path(base / "tmp" / kind) for kind in ("body", "proxy", "fastcgi", "uwsgi", "scgi")},
        listen="\n        ".join(f"listen {ipaddress.IPv4Address(a)}:{int(port)};" for a in addresses),
        callhome_path=callhome.CALLHOME_PATH,
        booted_log=nginx_path(booted_log_path()),
        kickstart_dir=nginx_path(kickstart_dir(), trailing_slash=True),
        installer_allow=allow,
        kickstart_log=nginx_path(kickstart_log_path()),
    ))


@dataclass
class NginxStatus:
    running: bool
    pid: int | None
    conf: Path
    url: str


def _nginx() -> str:
    exe = localcmd.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not exe:
        raise BootedError("nginx is not installed: apt-get install nginx-light (booted runs its own instance)")
    return exe


def conf_path() -> Path:
    return prefix() / "nginx.conf"


def _pid() -> int | None:
    try:
        pid = int((prefix() / "nginx.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not localcmd.process_alive(pid, b"nginx"):
        return None
    return pid


def status(config) -> NginxStatus:
    pid = _pid()
    return NginxStatus(pid is not None, pid, conf_path(), f"http://127.0.0.1:{config.nginx['port']}")


def check(conf: Path) -> None:
    result = localcmd.run([_nginx(), "-t", "-q", "-p", str(prefix()), "-c", str(conf)], check=False)
    if not result.ok:
        lines = [line for line in result.stderr.strip().splitlines() if "emerg" in line or "error" in line] or result.stderr.strip().splitlines()
        raise BootedError(f"nginx rejected the config {conf}: {lines[0] if lines else 'nginx -t failed'}")


def restart(config, rotate: bool = True, reach: Iterable[str] = (),
            installers: Iterable[str] = ()) -> tuple[str, Path | None]:
    """Render, check, rotate the booted log, then start or reload. Returns (action, rotated log).

    ``reach``: the addresses hosts call home to (see ``listen_addresses``); ``installers``: the networks
    installers fetch kickstarts from (see ``render``). A rotated log is
    complete when this returns: nginx has closed it (every call home written before or during the
    restart is in it or in the new log), so a reader can finish it from its cursor.
    """
    with locked("nginx"):
        text = render(config, listen_addresses(config, reach), installers)
        candidate = prefix() / "nginx.conf.new"
        atomic_write(candidate, text, mode=0o600)
        try:
            check(candidate)
        except BootedError:
            candidate.unlink(missing_ok=True)
            raise
        os.replace(candidate, conf_path())
        rotated = None
        log = booted_log_path()
        if rotate and log.exists() and log.stat().st_size > 0:
            rotated = log.with_name(f"{log.name}.{time.strftime('%Y%m%d-%H%M%S')}")
            n = 1
            while rotated.exists():
                rotated = log.with_name(f"{log.name}.{time.strftime('%Y%m%d-%H%M%S')}.{n}")
                n += 1
            os.replace(log, rotated)
        pid = _pid()
        if pid:
            os.kill(pid, signal.SIGHUP)  # reload: new workers with the new config and fresh log files
            action = "reloaded"
        else:
            started = localcmd.run([_nginx(), "-p", str(prefix()), "-c", str(conf_path())], check=False)
            if not started.ok:
                if "Address already in use" in started.stderr:
                    raise BootedError(port_taken(config))
                lines = [line for line in started.stderr.strip().splitlines() if "emerg" in line] or started.stderr.strip().splitlines()
                raise BootedError(f"nginx did not start: {lines[-1] if lines else f'exit {started.returncode}'}")
            action = "started"
        _wait_listening(config)
        if rotated is not None:
            _wait_closed(rotated)
            _prune_rotated(log)
        return action, rotated


def running_config_differs(config, reach: Iterable[str] = (), installers: Iterable[str] = ()) -> bool:
    """True if the config booted would render now is not the one nginx runs (listen set changed)."""
    try:
        return conf_path().read_text() != render(config, listen_addresses(config, reach), installers)
    except OSError:
        return True


def _wait_closed(path: Path, timeout: float = 10.0) -> None:
    """Wait until no nginx process (master or worker, old or new) has ``path`` open."""
    target = str(path)
    if poll(lambda: not any(_holds(pid, target) for pid in _nginx_processes()), timeout=timeout, interval=0.02):
        return
    progress(f"note: nginx still writes to {path} after {timeout:g}s; calls home it writes later are read "
             "with `fab hosts-reset`")


def _nginx_processes() -> list[int]:
    master = _pid()
    if master is None:
        return []
    found = [master]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(master):
                    found.append(int(entry))
            except (OSError, IndexError):
                continue
    return found


def _holds(pid: int, target: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def _prune_rotated(log: Path) -> None:
    rotated = sorted((p for p in log.parent.glob(f"{log.name}.*") if p.is_file()), key=lambda p: p.stat().st_mtime)
    for old in rotated[:-KEEP_ROTATED]:
        old.unlink(missing_ok=True)


def _wait_listening(config, timeout: float = 5.0) -> None:
    port = config.nginx["port"]

    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    if poll(listening, timeout=timeout):
        return
    raise BootedError(f"nginx did not start listening on port {port} (see {prefix() / 'error.log'})")


def stop() -> bool:
    """Stop booted's nginx (graceful quit); True if one was running."""
    pid = _pid()
    if not pid:
        return False
    os.kill(pid, signal.SIGQUIT)
    if not poll(lambda: not _pid(), timeout=10):
        os.kill(pid, signal.SIGKILL)
    return True


# ---------------------------------------------------------------------------- who else needs it
def _users_dir() -> Path:
    return state_path("nginx", "users", ".keep").parent


@contextlib.contextmanager
def serving(user: str) -> Iterator[None]:
    """Mark booted's nginx as needed by ``user`` (an image being installed) for the block.

    The mark is a lock held by this process, so it disappears with it, even if it is killed; ``users``
    sees it and ``nginx-stop`` / ``env-stop`` leave nginx running meanwhile.
    """
    path = _users_dir() / f"{user}.lock"
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def users() -> list[str]:
    """What needs booted's nginx right now (images being installed); stale marks are removed."""
    found = []
    for path in sorted(_users_dir().glob("*.lock")):
        try:
            fh = open(path, "a+")
        except FileNotFoundError:
            continue
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                found.append(path.name[: -len(".lock")])
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # its holder is gone
    return found


# ---------------------------------------------------------------------------- a port someone else holds
@dataclass(frozen=True)
class PortHolder:
    pid: int
    command: str
    booted_state_dir: Path | None  # set when the holder is another booted's nginx


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXADDR:HEXPORT; state 0A is LISTEN (see proc(5), /proc/net/tcp)
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


_NGINX_PREFIX = re.compile(r"^nginx: master process .*? -p (.+?)/? -c ")


def port_holder(port: int) -> PortHolder | None:
    """The process listening on TCP ``port`` on this machine, if it can be found."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) not in inodes:
                    continue
            except OSError:
                continue
            pid = int(proc.name)
            command = _cmdline(pid)
            if command.startswith("nginx: worker process"):  # its master holds the same socket
                parent = _parent(pid)
                if parent and _cmdline(parent).startswith("nginx: master process"):
                    pid, command = parent, _cmdline(parent)
            match = _NGINX_PREFIX.match(command)
            state = None
            if match:
                nginx_dir = Path(match.group(1))
                if nginx_dir.name == "nginx" and (nginx_dir / "nginx.conf").is_file():
                    with contextlib.suppress(OSError):
                        if "booted's own nginx" in (nginx_dir / "nginx.conf").read_text(errors="replace")[:400]:
                            state = nginx_dir.parent
            return PortHolder(pid, command, state)
    return None


def port_taken(config) -> str:
    """One line saying who holds booted's nginx port and what to do about it."""
    port = config.nginx["port"]
    change = f"or give this booted another port (settings.nginx.port in {config.path})"
    holder = port_holder(port)
    if holder is None:
        return f"port {port} is in use by another program (not visible from here); stop it, {change}"
    if holder.booted_state_dir is not None:
        how = f"BOOTED_STATE_DIR={shlex.quote(str(holder.booted_state_dir))} fab nginx-stop"
        return (f"port {port} is in use by another booted's nginx (pid {holder.pid}, state dir "
                f"{holder.booted_state_dir}); stop it with `{how}`, {change}")
    return f"port {port} is in use by pid {holder.pid} ({holder.command[:80]}); stop it, {change}"
