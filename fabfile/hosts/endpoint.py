"""booted's own nginx: render its config from nginx/booted.conf, check it, start, reload, rotate.

It runs from the state dir with its own prefix, pid file and logs, so the system's nginx
configuration is never touched and a test's nginx never meets a user's.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from fabfile.hosts import callhome
from fabfile.core import localcmd
from fabfile.core import templates
from fabfile.core.errors import BootedError
from fabfile.core.state import PROJECT_ROOT, atomic_write, locked, state_path
import grp

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


def share_with_workers(path: Path) -> None:
    """Let nginx's workers (not root) read a 0640 file they serve: give it their group."""
    if os.geteuid() == 0:
        try:
            os.chown(path, 0, grp.getgrnam(WORKER_GROUP).gr_gid)
        except KeyError:
            pass


def render(config) -> str:
    port = config.nginx["port"]
    bind = config.nginx.get("bind") or ""
    return templates.render(TEMPLATE, dict(
        # Workers only read kickstarts and write nothing; as root, drop them to nobody.
        user_line=f"user {WORKER_USER} {WORKER_GROUP};" if os.geteuid() == 0 else "",
        prefix=prefix(),
        listen=f"{bind}:{port}" if bind else str(port),
        callhome_path=callhome.CALLHOME_PATH,
        booted_log=booted_log_path(),
        kickstart_dir=state_path("kickstart", ".keep").parent,
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
        lines = [l for l in result.stderr.strip().splitlines() if "emerg" in l or "error" in l] or result.stderr.strip().splitlines()
        raise BootedError(f"nginx rejected the config {conf}: {lines[0] if lines else 'nginx -t failed'}")


def restart(config, rotate: bool = True) -> tuple[str, Path | None]:
    """Render, check, rotate the booted log, then start or reload. Returns (action, rotated log)."""
    with locked("nginx"):
        text = render(config)
        candidate = prefix() / "nginx.conf.new"
        atomic_write(candidate, text)
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
            localcmd.run([_nginx(), "-p", str(prefix()), "-c", str(conf_path())])
            action = "started"
        _wait_listening(config)
        return action, rotated


def _wait_listening(config, timeout: float = 5.0) -> None:
    import socket

    port = config.nginx["port"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BootedError(f"nginx did not start listening on port {port} (see {prefix() / 'error.log'})")


def stop() -> bool:
    """Stop booted's nginx (graceful quit); True if one was running."""
    pid = _pid()
    if not pid:
        return False
    os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _pid():
        time.sleep(0.05)
    if _pid():
        os.kill(pid, signal.SIGKILL)
    return True
