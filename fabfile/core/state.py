"""Where booted keeps what it writes, and how it writes it safely.

Everything booted writes lives under one state directory: ``<project>/state`` unless
``BOOTED_STATE_DIR`` moves it. It holds every environment's secret, so it is mode 0700: other
local users can read nothing in it and cannot open (let alone hold) its lock files. Shared files
are written atomically (temp file in the same directory, fsync, rename) and, where two processes
could collide, under an advisory lock that is waited for with a timeout; a lock file names the
process holding it, so the timeout's message can say who it is.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from fabfile.core.errors import BootedError, ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOCK_TIMEOUT_S = 120.0  # BOOTED_LOCK_TIMEOUT_S overrides it
_PRIVATE: set[Path] = set()  # state dirs already made private by this process


def state_dir() -> Path:
    """The state directory (created on first use, mode 0700)."""
    path = Path(os.environ.get("BOOTED_STATE_DIR") or PROJECT_ROOT / "state").resolve()
    if path not in _PRIVATE:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
            os.chmod(path, 0o700)  # made by an older booted, or by hand: close it
        _PRIVATE.add(path)
    return path


def state_path(*parts: str) -> Path:
    """A path inside the state directory; its parent directory exists afterwards."""
    path = state_dir().joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: Path | str, data: str | bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` so readers see the old or the new file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_tree(root: Path | str, files: dict[str, tuple[str, int]]) -> None:
    """Write ``files`` (a path on the machine, leading slash or not -> (contents, mode)) under
    ``root``, each atomically: a host's overlay, an image being built, a seed disk's tree."""
    for path, (content, mode) in files.items():
        atomic_write(Path(root) / path.lstrip("/"), content, mode=mode)


def atomic_write_json(path: Path | str, obj: Any, mode: int = 0o644) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode)


def read_json(path: Path | str, default: Any = None) -> Any:
    """The JSON document in ``path`` (``default`` if there is none); a one-line error naming the
    file if it is not UTF-8 JSON."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return default
    except UnicodeDecodeError:
        raise ConfigError(str(path), "is not UTF-8 text; remove it or restore it from a backup") from None
    except ValueError as err:
        line = getattr(err, "lineno", None)
        raise ConfigError(str(path), f"is not valid JSON ({getattr(err, 'msg', err)}); remove it or restore it "
                                     "from a backup", line=line) from None
    except OSError as err:
        raise ConfigError(str(path), f"cannot read: {err.strerror}") from None


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, default_flow_style=False, sort_keys=False)


def lock_timeout() -> float:
    try:
        value = float(os.environ.get("BOOTED_LOCK_TIMEOUT_S") or LOCK_TIMEOUT_S)
    except ValueError:
        value = LOCK_TIMEOUT_S
    return value if value > 0 and value != float("inf") else LOCK_TIMEOUT_S


def _holder(fd: int) -> str:
    """Who holds the lock open on ``fd``, as its holder wrote it (``pid N: command``)."""
    try:
        text = os.pread(fd, 300, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "an unknown process"


@contextlib.contextmanager
def locked(name: str, timeout: float | None = None, path: Path | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock named ``name`` (a file under state/locks, or ``path`` for a
    lock on something outside booted's state, shared by every booted on the machine) for the block.

    Waits up to ``timeout`` seconds (default ``BOOTED_LOCK_TIMEOUT_S`` or 120), then raises a
    one-line error naming the process that holds it. The lock file is private (0600, never
    followed through a symlink) and must belong to booted's own user.
    """
    path = path or state_path("locks", f"{name}.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise BootedError(f"cannot open lock file {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
            raise BootedError(f"lock file {path} belongs to uid {st.st_uid}, not to booted's user; remove it")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        limit = lock_timeout() if timeout is None else timeout
        deadline = time.monotonic() + limit
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BootedError(
                        f"lock {name!r} ({path}) is held by {_holder(fd)}; gave up after {limit:g}s "
                        "(wait for it to finish, or stop it)") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}\n".encode(), 0)
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
