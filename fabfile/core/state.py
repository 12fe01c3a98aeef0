"""Where booted keeps what it writes, and how it writes it safely.

Everything booted writes lives under one state directory: ``<project>/state`` unless
``BOOTED_STATE_DIR`` moves it. Shared files are written atomically (temp file in the same
directory, fsync, rename) and, where two processes could collide, under an advisory lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    """The state directory (created on first use)."""
    path = Path(os.environ.get("BOOTED_STATE_DIR") or PROJECT_ROOT / "state").resolve()
    path.mkdir(parents=True, exist_ok=True)
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


def atomic_write_json(path: Path | str, obj: Any, mode: int = 0o644) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode)


def read_json(path: Path | str, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, default_flow_style=False, sort_keys=False)


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold an exclusive advisory lock named ``name`` (a file under state/locks) for the block."""
    path = state_path("locks", f"{name}.lock")
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
