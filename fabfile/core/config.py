"""environments.yaml: loading, validation, and the typed view the rest of booted uses.

The file replaces the original's environments.py (Python code) with data read by
``yaml.safe_load``'s loader. Every mistake becomes one ``ConfigError`` naming the file, the line,
the key path and what is wrong; nothing else is read from a file that fails validation.

Layout (see environments.yaml for a commented example)::

    settings:   {ssh: {...}, nginx: {...}}        # optional
    providers:  {virtualbox: {...}, local: {...}} # optional, defaults below
    environments:
      NAME: {provider, images, roles: {loadbalancers, workers}, service, version,
             workers: {min, max}, lb_port, monitor: {...}}
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fabfile.core import names
from fabfile.core.errors import ConfigError, UsageError
from fabfile.core.state import PROJECT_ROOT

# A provider's settings: {key: (types, default[, check])}, validated under providers.<name>.
ProviderSpecs = Mapping[str, Mapping[str, tuple]]


# --------------------------------------------------------------------------- YAML with lines
class _Mapping(dict):
    """A dict that remembers the line of itself and of each key (1-based)."""

    line: int | None = None
    key_lines: dict

    def line_of(self, key: str) -> int | None:
        return self.key_lines.get(key, self.line)


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and records line numbers."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)
    result = _Mapping()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise ConfigError(loader.name, "keys must be plain strings", line=key_node.start_mark.line + 1)
        key = str(key)
        if key in result:
            raise ConfigError(
                loader.name,
                f"duplicate key {key!r} (first at line {result.key_lines[key]})",
                line=key_node.start_mark.line + 1,
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found (set BOOTED_CONFIG or create it)") from None
    except OSError as err:
        raise ConfigError(str(path), f"cannot read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), f"not UTF-8 text (byte 0x{raw[err.start]:02x})",
                          line=raw[:err.start].count(b"\n") + 1) from None
    try:
        loader = _Loader(text)  # the reader refuses a NUL or other unprintable character at once
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = getattr(err, "position", None)
        at: int | None = mark.line + 1 if mark else (text[:where].count("\n") + 1 if isinstance(where, int) else None)
        raise ConfigError(str(path), f"not valid YAML: {getattr(err, 'reason', None) or err}", line=at) from None
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        raise ConfigError(str(path), f"not valid YAML: {err.problem or err.context}",
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), f"not valid YAML: {err}") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- schema checking
class Checker:
    """Walks the loaded document with key paths, raising ConfigError at the first mistake."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, keypath: str, message: str, parent: Any = None, key: str | None = None) -> None:
        line = None
        if isinstance(parent, _Mapping):
            line = parent.line_of(key) if key is not None else parent.line
        raise ConfigError(self.path, message, keypath=keypath, line=line)

    def mapping(self, value: Any, keypath: str, parent: Any = None, key: str | None = None) -> _Mapping:
        if value is None:
            value = _Mapping()
            value.line, value.key_lines = None, {}
        if not isinstance(value, dict):
            self.fail(keypath, f"must be a mapping, not {kind_of(value)}", parent, key)
        return value

    def fields(self, mapping: _Mapping, keypath: str, spec: dict[str, tuple]) -> dict[str, Any]:
        """Check ``mapping`` against ``spec``: key -> (types, default or REQUIRED, extra check)."""
        for key in mapping:
            if key not in spec:
                known = ", ".join(sorted(spec))
                self.fail(_join(keypath, key), f"unknown key (known: {known})", mapping, key)
        out = {}
        for key, (types, default, *rest) in spec.items():
            sub = _join(keypath, key)
            if key not in mapping:
                if default is REQUIRED:
                    self.fail(sub, "missing required key", mapping)
                out[key] = default
                continue
            value = mapping[key]
            if types and not _is_type(value, types):
                want = " or ".join(_TYPE_NAMES[t] for t in types)
                self.fail(sub, f"must be {want}, not {kind_of(value)}", mapping, key)
            if rest:
                problem = rest[0](value)
                if problem:
                    self.fail(sub, problem, mapping, key)
            out[key] = value
        return out


REQUIRED = object()
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping", bool: "true/false"}


def _is_type(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    if float in types and isinstance(value, (int, float)):
        return True
    return isinstance(value, tuple(t for t in types if t is not bool))


def kind_of(value: Any) -> str:
    if value is None:
        return "empty"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "a mapping" if isinstance(value, dict) else type(value).__name__
    )


def _join(keypath: str, key: str) -> str:
    return f"{keypath}.{key}" if keypath else key


def positive(value: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    return None if value > 0 else "must be greater than 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def valid_port(value: Any) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port (1-65535)"


def valid_name(kind: str):
    def check(value: Any) -> str | None:
        try:
            names.check(kind, value)
        except UsageError as err:
            return str(err)
        return None

    return check


def valid_network(value: Any) -> str | None:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError:
        return f"{value!r} is not a network like 10.77.0.0/24"
    if net.version != 4 or not 16 <= net.prefixlen <= 28:
        return "must be an IPv4 network from /16 to /28"
    return None


def valid_ipv4(value: Any) -> str | None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return f"{value!r} is not an IPv4 address"
    return None


def valid_sha256(value: Any) -> str | None:
    if value == "" or (len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower())):
        return None
    return "must be a SHA-256 hex digest (64 hex digits)"


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def size_limit(value: int | str) -> int | None:
    """A limit as a number: ``1024``, ``"512M"``, ``"2G"`` (powers of 1024); ``"max"``: no limit (None).
    Raises ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().lower() == "max":
        return None
    else:
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
        digits = text[: len(text) - len(unit)]
        if not digits.isdigit():
            raise ValueError(value)
        number = int(digits) * _SIZE_UNITS[unit]
    if number <= 0:
        raise ValueError(value)
    return number


def valid_limit(minimum: int, example: str):
    def check(value: Any) -> str | None:
        try:
            number = size_limit(value)
        except ValueError:
            return f"must be a positive number like {example}, or 'max' for no limit"
        return None if number is None or number >= minimum else f"must be at least {minimum} (or 'max')"

    return check


def valid_ifname(value: Any) -> str | None:
    ok = 1 <= len(value) <= 15 and all(c.isalnum() or c in "-_" for c in value)
    return None if ok else "must be a network interface name (up to 15 letters, digits, '-', '_')"


# --------------------------------------------------------------------------- typed view
@dataclass(frozen=True)
class MonitorSettings:
    latency_high_ms: float = 300.0
    latency_low_ms: float = 60.0
    max_error_rate: float = 0.0
    interval_s: float = 15.0
    probes: int = 8
    probe_timeout_s: float = 3.0
    up_samples: int = 3
    down_window_s: float = 300.0
    up_cooldown_s: float = 60.0
    down_cooldown_s: float = 300.0
    health_failures: int = 3
    warmup_timeout_s: float = 180.0
    # a host whose machine does not answer (its hypervisor) counts as lost only after this long
    lost_after_s: float = 30.0


@dataclass(frozen=True)
class Environment:
    name: str
    provider: str
    images: tuple[str, ...]
    loadbalancers: tuple[str, ...]
    workers: tuple[str, ...]
    service: str
    version: str
    min_workers: int
    max_workers: int
    lb_port: int
    monitor: MonitorSettings
    source: str = ""
    # image -> where its provider must run it (a named hypervisor); images not named are placed by it
    placement: tuple[tuple[str, str], ...] = ()

    def pins(self) -> dict[str, str]:
        return dict(self.placement)

    def roles_of(self, image: str) -> list[str]:
        roles = []
        if image in self.loadbalancers:
            roles.append("loadbalancers")
        if image in self.workers:
            roles.append("workers")
        return roles


@dataclass(frozen=True)
class Config:
    path: str
    environments: dict[str, Environment]
    providers: dict[str, dict[str, Any]]
    ssh: dict[str, Any]
    nginx: dict[str, Any]
    deploy: dict[str, Any] = field(default_factory=dict)

    def env(self, name: str | None) -> Environment:
        """The environment called ``name``; a one-line error names the known ones otherwise."""
        if not name:
            raise UsageError(f"--env is required (known: {', '.join(self.environments) or 'none'})")
        if name not in self.environments:
            known = ", ".join(self.environments) or "none"
            raise ConfigError(self.path, f"unknown environment {name!r} (known: {known})", keypath="environments")
        return self.environments[name]

    def image_env(self, image: str) -> Environment | None:
        """The environment that declares ``image``, if any."""
        for env in self.environments.values():
            if image in env.images:
                return env
        return None

    def provider_settings(self, name: str) -> dict[str, Any]:
        return self.providers[name]


# The monitor block's checks; its keys and defaults are MonitorSettings' fields (one source).
_MONITOR_CHECKS = {
    "latency_high_ms": positive,
    "latency_low_ms": positive,
    "max_error_rate": lambda v: None if 0 <= v < 1 else "must be from 0 up to 1",
    "interval_s": positive,
    "probes": positive,
    "probe_timeout_s": positive,
    "up_samples": positive,
    "down_window_s": non_negative,
    "up_cooldown_s": non_negative,
    "down_cooldown_s": non_negative,
    "health_failures": positive,
    "warmup_timeout_s": positive,
    "lost_after_s": non_negative,
}


def monitor_defaults() -> dict[str, int | float]:
    """The monitor block's keys and their defaults, from MonitorSettings."""
    return {f.name: f.default for f in dataclasses.fields(MonitorSettings)}  # type: ignore[misc]


def _monitor_spec() -> dict[str, tuple]:
    spec = {}
    for name, default in monitor_defaults().items():
        types = (int,) if isinstance(default, int) else (int, float)
        spec[name] = (types, default, _MONITOR_CHECKS[name])
    return spec


def default_config_path() -> Path:
    return Path(os.environ.get("BOOTED_CONFIG") or PROJECT_ROOT / "environments.yaml")


def load(path: str | os.PathLike | None, provider_specs: ProviderSpecs) -> Config:
    """Load and validate environments.yaml (``BOOTED_CONFIG`` or the project's, for ``None``).

    ``provider_specs`` are the settings each known provider takes (the providers' registry,
    ``fabfile.providers.load_config``, passes them)."""
    path = Path(path) if path else default_config_path()
    doc = load_yaml(path)
    where = str(path)
    chk = Checker(where)
    if doc is None:
        raise ConfigError(where, "file is empty")
    top = chk.mapping(doc, "")
    spec = {
        "settings": ((dict,), None),
        "providers": ((dict,), None),
        "environments": ((dict,), REQUIRED),
    }
    top_fields = chk.fields(top, "", spec)

    settings = chk.mapping(top_fields["settings"], "settings", top, "settings")
    s = chk.fields(settings, "settings", {"ssh": ((dict,), None), "nginx": ((dict,), None), "deploy": ((dict,), None)})
    ssh = chk.fields(chk.mapping(s["ssh"], "settings.ssh"), "settings.ssh", {
        "user": ((str,), "booted", lambda v: None if v.replace("-", "").replace("_", "").isalnum() else "must be a user name"),
        "connect_timeout_s": ((int, float), 5, positive),
        "key": ((str,), ""),
    })
    nginx = chk.fields(chk.mapping(s["nginx"], "settings.nginx"), "settings.nginx", {
        "port": ((int,), 8480, valid_port),
        "bind": ((str,), "", lambda v: None if v == "" else valid_ipv4(v)),
    })
    deploy = chk.fields(chk.mapping(s["deploy"], "settings.deploy"), "settings.deploy", {
        "parallel": ((int,), 32, positive),
        "keep_releases": ((int,), 5, lambda v: None if v >= 2 else "must be at least 2"),
        "timeout_s": ((int, float), 120, positive),
    })

    providers_doc = chk.mapping(top_fields["providers"], "providers", top, "providers")
    provs = chk.fields(providers_doc, "providers", {p: ((dict,), None) for p in provider_specs})
    providers = {
        p: chk.fields(chk.mapping(provs[p], f"providers.{p}"), f"providers.{p}", dict(provider_specs[p]))
        for p in provider_specs
    }

    envs_doc = chk.mapping(top_fields["environments"], "environments", top, "environments")
    if not envs_doc:
        chk.fail("environments", "declares no environment", top, "environments")
    environments: dict[str, Environment] = {}
    owner: dict[str, str] = {}
    for name, body in envs_doc.items():
        kp = f"environments.{name}"
        problem = valid_name("environment")(name)
        if problem:
            chk.fail(kp, problem, envs_doc, name)
        env = _load_env(chk, name, chk.mapping(body, kp, envs_doc, name), kp, list(provider_specs))
        _check_placement(chk, env, providers[env.provider], f"providers.{env.provider}", envs_doc[name], kp)
        for image in env.images:
            if image in owner:
                chk.fail(f"{kp}.images", f"image {image!r} is already in environment {owner[image]!r}", envs_doc[name], "images")
            owner[image] = name
        environments[name] = env
    return Config(where, environments, providers, ssh, nginx, deploy)


def _check_placement(chk: Checker, env: Environment, settings: dict[str, Any], where: str, body: _Mapping,
                     kp: str) -> None:
    """An environment's ``placement`` must name machines its provider has (its ``hypervisors``)."""
    if not env.placement:
        return
    known = settings.get("hypervisors")
    pins_map = body["placement"]
    for image, target in env.placement:
        if not isinstance(known, dict):
            chk.fail(f"{kp}.placement.{image}", f"{where} has no hypervisors to place images on "
                     f"(add {where}.hypervisors)", pins_map, image)
            return
        if target not in known:
            chk.fail(f"{kp}.placement.{image}", f"unknown hypervisor {target!r} "
                     f"(known: {', '.join(known)})", pins_map, image)


def _load_env(chk: Checker, name: str, body: _Mapping, kp: str, known: list[str]) -> Environment:
    f = chk.fields(body, kp, {
        "provider": ((str,), REQUIRED, lambda v: None if v in known else f"unknown provider {v!r} (known: {', '.join(known)})"),
        "images": ((list,), REQUIRED),
        "roles": ((dict,), REQUIRED),
        "service": ((str,), REQUIRED, valid_name("service")),
        "version": ((str, int, float), REQUIRED),
        "workers": ((dict,), None),
        "lb_port": ((int,), 8080, valid_port),
        "monitor": ((dict,), None),
        "placement": ((dict,), None),
    })
    images = f["images"]
    if not images:
        chk.fail(f"{kp}.images", "must list at least one image", body, "images")
    seen = set()
    for i, image in enumerate(images):
        if not isinstance(image, str):
            chk.fail(f"{kp}.images[{i}]", f"must be a string, not {kind_of(image)}", body, "images")
        problem = valid_name("image")(image)
        if problem:
            chk.fail(f"{kp}.images[{i}]", problem, body, "images")
        if image in seen:
            chk.fail(f"{kp}.images[{i}]", f"image {image!r} is listed twice", body, "images")
        seen.add(image)
    roles_map = body["roles"]
    roles = chk.fields(roles_map, f"{kp}.roles", {"loadbalancers": ((list,), REQUIRED), "workers": ((list,), REQUIRED)})
    for role, members in roles.items():
        rkp = f"{kp}.roles.{role}"
        if not members:
            chk.fail(rkp, "must name at least one image", roles_map, role)
        for i, image in enumerate(members):
            if not isinstance(image, str):
                chk.fail(f"{rkp}[{i}]", f"must be an image name, not {kind_of(image)}", roles_map, role)
            if image not in seen:
                chk.fail(f"{rkp}[{i}]", f"names image {image!r}, which is not in {kp}.images", roles_map, role)
        if len(set(members)) != len(members):
            chk.fail(rkp, "names an image twice", roles_map, role)
    version = str(f["version"])
    problem = valid_name("version")(version)
    if problem:
        chk.fail(f"{kp}.version", problem, body, "version")
    workers_map = chk.mapping(f["workers"], f"{kp}.workers", body, "workers")
    w = chk.fields(workers_map, f"{kp}.workers", {
        "min": ((int,), 1, lambda v: None if v >= 1 else "must be at least 1"),
        "max": ((int,), len(roles["workers"]), positive),
    })
    if w["max"] < w["min"]:
        chk.fail(f"{kp}.workers.max", f"is {w['max']}, below workers.min ({w['min']})", workers_map, "max")
    if w["max"] > len(roles["workers"]):
        chk.fail(f"{kp}.workers.max", f"is {w['max']}, but roles.workers names only {len(roles['workers'])} images", workers_map, "max")
    pins_map = chk.mapping(f["placement"], f"{kp}.placement", body, "placement")
    for image, where in pins_map.items():
        if image not in seen:
            chk.fail(f"{kp}.placement.{image}", f"names image {image!r}, which is not in {kp}.images", pins_map, image)
        if not isinstance(where, str):
            chk.fail(f"{kp}.placement.{image}", f"must be a hypervisor name, not {kind_of(where)}", pins_map, image)
    mon_map = chk.mapping(f["monitor"], f"{kp}.monitor", body, "monitor")
    spec = _monitor_spec()
    mon = chk.fields(mon_map, f"{kp}.monitor", spec)
    if mon["latency_low_ms"] >= mon["latency_high_ms"]:
        chk.fail(f"{kp}.monitor.latency_low_ms", "must be below latency_high_ms", mon_map, "latency_low_ms")
    return Environment(
        name=name,
        provider=f["provider"],
        images=tuple(images),
        loadbalancers=tuple(roles["loadbalancers"]),
        workers=tuple(roles["workers"]),
        service=f["service"],
        version=version,
        min_workers=w["min"],
        max_workers=w["max"],
        lb_port=f["lb_port"],
        monitor=MonitorSettings(**{k: (float(v) if isinstance(spec[k][1], float) else v)  # type: ignore[arg-type]
                                   for k, v in mon.items()}),
        source=f"{chk.path}:{body.line}" if body.line else chk.path,
        placement=tuple((str(k), v) for k, v in pins_map.items()),
    )
