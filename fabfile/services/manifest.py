"""The services booted can deploy: one folder per service under service/, each with a service.yaml.

service.yaml (validated like environments.yaml: one-line errors naming file, line and key)::

    name: hello                     # required; the folder's name, a valid service name
    port: 9999                      # required; the port it listens on (the unit sets <NAME>_PORT)
    health: /healthz                # required; GET path answering 200 when the service can serve
    run: [python3, app.py]          # required; argv, run in the release directory
    test: [python3, -m, unittest]   # required; argv, run in an unpacked release tree before deploying
    test_timeout_s: 120             # optional (default 120)
    env: {NAME: "value"}            # optional; extra environment for run and test

Where a service's code comes from is ``<NAME>_REPO`` (e.g. HELLO_REPO): a git repository, local
path or URL; without it, a local repo booted builds from the service folder (fabfile/services/repo.py),
tagging the versions listed in ``history/versions`` (one a line, oldest first; default: v1 only).
The folder is the newest; ``history/<version>.patch`` is what each later version changed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabfile.core import names as names_mod
from fabfile.core.config import REQUIRED, Checker, kind_of, load_yaml, positive, valid_name, valid_port
from fabfile.core.errors import ConfigError, UsageError
from fabfile.core.state import PROJECT_ROOT, state_path

MANIFEST = "service.yaml"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Service:
    """One deployable service, as its manifest describes it."""

    name: str
    dir: Path                       # the service's folder (service/<name>)
    port: int
    health: str                     # e.g. "/healthz"
    run_argv: tuple[str, ...]       # manifest "run": argv, run in the release directory
    test_argv: tuple[str, ...]      # manifest "test": argv, run in an unpacked release tree
    env: dict[str, str] = field(default_factory=dict, hash=False)
    versions: tuple[str, ...] = ("v1",)   # history/versions: the default repo's tags, oldest first
    test_timeout_s: float = 120.0
    manifest: Path | None = None

    @property
    def repo_env(self) -> str:
        """The environment variable naming this service's git repository, e.g. HELLO_REPO."""
        return f"{self.name.upper()}_REPO"


def services_root() -> Path:
    return PROJECT_ROOT / "service"


def service_names(root: str | os.PathLike | None = None) -> list[str]:
    """The services' names (folders with a service.yaml), without reading the manifests.

    Cheap and never fails on a broken manifest, so task lists can be built from it; ``get`` and
    ``discover`` validate.
    """
    root = Path(root) if root else services_root()
    return sorted(p.parent.name for p in root.glob(f"*/{MANIFEST}") if _valid_name(p.parent.name))


def _valid_name(name: str) -> bool:
    try:
        names_mod.check("service", name)
    except UsageError:
        return False
    return True


def discover(root: str | os.PathLike | None = None) -> dict[str, Service]:
    """Every service/<name>/service.yaml, loaded and validated, by name."""
    root = Path(root) if root else services_root()
    found: dict[str, Service] = {}
    for manifest in sorted(root.glob(f"*/{MANIFEST}")):
        service = load_manifest(manifest)
        found[service.name] = service
    return found


def get(name: str, root: str | os.PathLike | None = None) -> Service:
    """The service called ``name`` (only its manifest is read); one-line error if there is none."""
    names_mod.check("service", name, "service")
    manifest = (Path(root) if root else services_root()) / name / MANIFEST
    if not manifest.is_file():
        raise UsageError(f"unknown service {name!r} (known: {', '.join(service_names(root)) or 'none'})")
    return load_manifest(manifest)


def load_manifest(path: str | os.PathLike) -> Service:
    """Load and check one service.yaml; the service's folder is the file's directory."""
    path = Path(path)
    where = str(path)
    doc = load_yaml(path)
    if doc is None:
        raise ConfigError(where, "file is empty")
    chk = Checker(where)
    top = chk.mapping(doc, "")
    f = chk.fields(top, "", {
        "name": ((str,), REQUIRED, valid_name("service")),
        "port": ((int,), REQUIRED, valid_port),
        "health": ((str,), REQUIRED, _http_path),
        "run": ((list,), REQUIRED, _argv),
        "test": ((list,), REQUIRED, _argv),
        "test_timeout_s": ((int, float), 120, positive),
        "env": ((dict,), None),
    })
    folder = path.parent.name
    if f["name"] != folder:
        chk.fail("name", f"is {f['name']!r}, but the folder is {folder!r} (they must match)", top, "name")
    env_map = chk.mapping(f["env"], "env", top, "env")
    env: dict[str, str] = {}
    for key, value in env_map.items():
        if not _ENV_NAME.fullmatch(key):
            chk.fail(f"env.{key}", "is not an environment variable name", env_map, key)
        if not isinstance(value, str):
            chk.fail(f"env.{key}", f"must be a string (quote it), not {kind_of(value)}", env_map, key)
        if not _control_free(value):
            chk.fail(f"env.{key}", "holds a control character (newline, tab, ...)", env_map, key)
        env[key] = value
    return Service(
        name=f["name"],
        dir=path.parent.resolve(),
        port=f["port"],
        health=f["health"],
        run_argv=tuple(f["run"]),
        test_argv=tuple(f["test"]),
        env=env,
        versions=load_versions(path.parent),
        test_timeout_s=float(f["test_timeout_s"]),
        manifest=path.resolve(),
    )


def load_versions(folder: Path) -> tuple[str, ...]:
    """history/versions of a service folder: the default repo's tags, oldest first."""
    path = folder / "history" / "versions"
    if not path.exists():
        return ("v1",)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), f"cannot read: {getattr(err, 'strerror', None) or err}") from None
    versions: list[str] = []
    for number, line in enumerate(lines, 1):
        version = line.split("#", 1)[0].strip()
        if not version:
            continue
        try:
            names_mod.check("version", version)
        except UsageError as err:
            raise ConfigError(str(path), str(err), line=number) from None
        if version in versions:
            raise ConfigError(str(path), f"{version!r} is listed twice", line=number)
        if versions and not (folder / "history" / f"{version}.patch").is_file():
            raise ConfigError(str(path), f"{version!r} needs history/{version}.patch (what it changed)", line=number)
        versions.append(version)
    if not versions:
        raise ConfigError(str(path), "lists no version")
    return tuple(versions)


def default_repo(service: Service) -> Path:
    """The local bare repo booted builds from the service folder: state/repos/<name>.git."""
    return state_path("repos", f"{service.name}.git")


def repo_for(service: Service) -> str:
    """Where the service's versions come from: $<NAME>_REPO, else the default local repo."""
    return os.environ.get(service.repo_env, "").strip() or str(default_repo(service))


def uses_default_repo(service: Service) -> bool:
    return not os.environ.get(service.repo_env, "").strip()


# --------------------------------------------------------------------------- value checks
def _http_path(value: Any) -> str | None:
    ok = value.startswith("/") and all(33 <= ord(c) < 127 for c in value)
    return None if ok else "must be a URL path like /healthz"


def _control_free(text: str) -> bool:
    """No control characters: a value becomes part of a systemd unit, where a newline starts a line."""
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _argv(value: Any) -> str | None:
    if not value:
        return "must be a non-empty list of arguments"
    for i, arg in enumerate(value):
        if not isinstance(arg, str):
            return f"item {i} must be a string (quote numbers), not {kind_of(arg)}"
        if not arg:
            return f"item {i} is empty"
        if not _control_free(arg):
            return f"item {i} holds a control character (newline, tab, ...)"
        if arg == ";":
            return f"item {i} is ';', which systemd reads as a command separator"
    if value[0][0] in "@-:+!":
        return f"item 0 must not start with {value[0][0]!r} (a systemd ExecStart= prefix)"
    return None


