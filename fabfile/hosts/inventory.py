"""The inventory: the hosts booted knows about, learned from the booted log.

A JSON file, ``state/inventory.json`` (data, never code: the original wrote a Python module),
changed only under the ``inventory`` lock and written atomically, so concurrent tasks lose no
update and a reader never sees half a file. Entries are keyed by image name, which is unique
across environments.

A call home names the image the host is, and is signed with that image's own key (bootlog.py
checked it). That proof decides the image, never a MAC or an address the host claims: a host can
only ever be recorded as the image whose key it holds, in that key's environment. The one
exception is a clone: a VirtualBox clone inherits its source's name and key, so a call signed by
the source's key is recorded as the clone if, and only if, it comes with the MAC booted recorded
for that clone of that source when it made it (``clones``: the providers' clone records). A call
no newer (by the host's clock) than the last one recorded for its image is a replay and ignored.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shlex
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from operator import attrgetter
from pathlib import Path
from typing import Any

from fabfile.core import names
from fabfile.core.config import Config
from fabfile.core.errors import BootedError, ConfigError, UsageError
from fabfile.core.output import table
from fabfile.core.state import atomic_write_json, dump_yaml, locked, state_path
from fabfile.hosts.bootlog import Call

FORMAT_VERSION = 1
FORMATS = ("table", "json", "yaml", "ansible")
ROLES = ("loadbalancers", "workers")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")


@dataclass
class HostEntry:
    image: str  # the image this host is (the inventory key)
    name: str  # the name it called home as; differs from image on a clone not yet renamed
    address: str
    mac: str
    env: str
    roles: list[str] = field(default_factory=list)  # of ROLES, from the environment
    first_seen: float = 0.0  # epoch seconds of its first and latest call home (nginx's clock)
    last_seen: float = 0.0
    reachable: bool | None = None  # answered on SSH at checked_at; None: not checked since it moved
    checked_at: float | None = None
    hostname_ok: bool = True  # name == image
    last_ts: int = 0  # the host's clock in its latest recorded call: older calls are replays

    def to_dict(self) -> dict[str, Any]:
        # (not dataclasses.asdict: it deep-copies field by field, 70 µs an entry; roles is the one
        # mutable field, and the inventory writes every entry on each change)
        data = dict(self.__dict__)
        data["roles"] = list(self.roles)
        return data


@dataclass
class RecordSummary:
    """What ``record_calls`` did, for one summary line."""

    calls: int = 0
    added: list[str] = field(default_factory=list)  # images new to the inventory
    updated: list[str] = field(default_factory=list)  # images already there whose entry changed
    misnamed: list[str] = field(default_factory=list)  # images whose host called home under another name
    superseded: list[str] = field(default_factory=list)  # dropped: another image called home later from their address
    unknown: int = 0  # calls refused: an image declared in another environment than the key's
    unknown_names: list[str] = field(default_factory=list)
    replayed: int = 0  # calls no newer than the last recorded for their image (not recorded)


# --------------------------------------------------------------------------- matching calls
def apply_calls(hosts: dict[str, HostEntry], calls: Iterable[Call], clones: Iterable[Any],
                config: Config) -> RecordSummary:
    """Record ``calls`` into ``hosts`` (image -> HostEntry), each under the image it proved to be.

    ``clones``: the providers' clone records (``image``, ``source``, ``macs``: what booted made).
    Calls apply in the order they arrived; an older call never overwrites what a newer one recorded.
    """
    summary = RecordSummary()
    clone_of_mac: dict[tuple[str, str], str] = {}  # (source, mac) -> clone image
    for clone in clones:
        for mac in clone.macs:
            clone_of_mac[(clone.source, mac.lower())] = clone.image
    before = {image: HostEntry(**entry.to_dict()) for image, entry in hosts.items()}
    unknown_names: set[str] = set()
    image_env: dict[str, Any] = {}  # config.image_env, once per image for many calls
    for env in config.environments.values():
        for declared_image in env.images:
            image_env.setdefault(declared_image, env)

    for call in sorted(calls, key=attrgetter("seen_at")):
        summary.calls += 1
        image = clone_of_mac.get((call.name, call.mac), call.name)
        declared = image_env.get(image)
        source_env = image_env.get(call.name)
        if (declared is not None and declared.name != call.env) or (
                source_env is not None and source_env.name != call.env):
            summary.unknown += 1  # a key of one environment never speaks for another's image
            unknown_names.add(call.name)
            continue
        entry = hosts.get(image)
        if entry is not None and call.ts <= entry.last_ts:
            if call.seen_at > entry.last_seen:
                summary.replayed += 1
            continue
        if entry is None:
            entry = hosts[image] = HostEntry(
                image=image, name=call.name, address=call.addr, mac=call.mac, env=call.env,
                first_seen=call.seen_at, last_seen=call.seen_at,
            )
        entry.env = call.env
        entry.roles = declared.roles_of(image) if declared else []
        entry.first_seen = min(entry.first_seen, call.seen_at)
        entry.last_ts = call.ts
        if call.seen_at >= entry.last_seen:
            if call.addr != entry.address:  # an old SSH check says nothing about the new address
                entry.reachable, entry.checked_at = None, None
            entry.last_seen = call.seen_at
            entry.name, entry.address, entry.mac = call.name, call.addr, call.mac
            entry.hostname_ok = call.name == image

    # One address, one host: the image that called home from it last holds it.
    holder: dict[str, HostEntry] = {}
    for entry in sorted(hosts.values(), key=lambda e: e.last_seen):
        previous = holder.get(entry.address)
        if previous is not None:
            del hosts[previous.image]
            summary.superseded.append(previous.image)
        holder[entry.address] = entry

    for image, entry in sorted(hosts.items()):
        if image not in before:
            summary.added.append(image)
        elif entry != before[image]:
            summary.updated.append(image)
        if not entry.hostname_ok and (image not in before or entry != before[image]):
            summary.misnamed.append(image)
    summary.superseded.sort()
    summary.unknown_names = sorted(unknown_names)
    return summary


def mark_reachable(hosts: dict[str, HostEntry], results: dict[str, bool], checked_at: float | None = None) -> list[str]:
    """Set ``reachable`` from ``results`` (address -> bool, as ``reach.probe_ssh`` returns); the images changed."""
    now = time.time() if checked_at is None else checked_at
    changed = []
    for image, entry in sorted(hosts.items()):
        if entry.address in results:
            entry.reachable, entry.checked_at = bool(results[entry.address]), now
            changed.append(image)
    return changed


# --------------------------------------------------------------------------- the file
class Inventory:
    """The inventory file (``state/inventory.json`` unless ``path`` is given)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else state_path("inventory.json")

    def load(self) -> list[HostEntry]:
        """Every entry, sorted by environment and image."""
        return _sorted(self._read().values())

    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, HostEntry]]:
        """``with inv.update() as hosts:`` change ``hosts`` (image -> HostEntry); written on exit.

        The lock is held from the read to the write, so concurrent updates all land. If the block
        raises, nothing is written.
        """
        with locked("inventory"):
            hosts = self._read()
            yield hosts
            self._write(hosts)

    def hosts(self, env: str | None = None, role: str | None = None, reachable: bool | None = None) -> list[HostEntry]:
        """Entries filtered by environment, role (``loadbalancers``/``workers``) and reachability."""
        if role is not None and role not in ROLES:
            raise UsageError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
        return [
            e for e in self.load()
            if (env is None or e.env == env)
            and (role is None or role in e.roles)
            and (reachable is None or e.reachable is reachable)
        ]

    def clear(self) -> int:
        """Forget every host; the number forgotten."""
        with self.update() as hosts:
            count = len(hosts)
            hosts.clear()
        return count

    def remove(self, image: str) -> bool:
        """Forget ``image``; False if it was not there."""
        with self.update() as hosts:
            return hosts.pop(image, None) is not None

    def record_calls(self, calls: Iterable[Call], clones: Iterable[Any], config: Config) -> RecordSummary:
        """``apply_calls`` on the stored inventory, under the lock; written only if an entry changed
        (a re-read that found nothing new, or only replays, costs no write)."""
        calls, clones = list(calls), list(clones)
        if not calls:
            return RecordSummary()
        with locked("inventory"):
            hosts = self._read()
            summary = apply_calls(hosts, calls, clones, config)
            if summary.added or summary.updated or summary.superseded:
                self._write(hosts)
            return summary

    def mark_reachable(self, results: dict[str, bool], checked_at: float | None = None) -> list[str]:
        with self.update() as hosts:
            return mark_reachable(hosts, results, checked_at)

    # -- internals
    def _read(self) -> dict[str, HostEntry]:
        where = str(self.path)
        try:
            text = self.path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return {}
        except UnicodeDecodeError:
            raise _corrupt(where, "not UTF-8 text") from None
        except OSError as err:
            raise BootedError(f"cannot read the inventory {where}: {err.strerror}") from None
        try:
            doc = json.loads(text)
        except ValueError as err:
            raise _corrupt(where, f"not valid JSON ({getattr(err, 'msg', err)})", line=getattr(err, "lineno", None)) from None
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION or not isinstance(doc.get("hosts"), dict):
            raise _corrupt(where, f'expected {{"version": {FORMAT_VERSION}, "hosts": {{...}}}}')
        return {image: _entry_from(where, image, body) for image, body in doc["hosts"].items()}

    def _write(self, hosts: dict[str, HostEntry]) -> None:
        for image, entry in hosts.items():
            if image != entry.image:
                raise ValueError(f"inventory key {image!r} holds the entry of {entry.image!r}")
        atomic_write_json(self.path, {
            "version": FORMAT_VERSION,
            "hosts": {image: hosts[image].to_dict() for image in sorted(hosts)},
        })


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "image": (str,), "name": (str,), "address": (str,), "mac": (str,), "env": (str,), "roles": (list,),
    "first_seen": (int, float), "last_seen": (int, float), "reachable": (bool, type(None)),
    "checked_at": (int, float, type(None)), "hostname_ok": (bool,), "last_ts": (int,),
}
_OPTIONAL = {"last_ts"}  # added later: files written before it lack it


def _corrupt(where: str, message: str, keypath: str = "", line: int | None = None) -> ConfigError:
    return ConfigError(where, f"{message}; `fab hosts-reset` rebuilds it from the booted log", keypath=keypath, line=line)


def _entry_from(where: str, image: str, body: Any) -> HostEntry:
    keypath = f"hosts.{image}"
    if not isinstance(body, dict):
        raise _corrupt(where, "must be a mapping", keypath)
    known = {f.name for f in fields(HostEntry)}
    for key in body:
        if key not in known:
            raise _corrupt(where, "unknown key", f"{keypath}.{key}")
    for key, types in _FIELD_TYPES.items():
        value = body.get(key)
        if key not in body and key in _OPTIONAL:
            continue
        if key not in body or (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise _corrupt(where, "missing or of the wrong type", f"{keypath}.{key}")
    try:
        names.check("image", image)
    except UsageError as err:
        raise _corrupt(where, str(err), keypath) from None
    try:
        if ipaddress.ip_address(body["address"]).version != 4:
            raise ValueError
    except ValueError:
        raise _corrupt(where, f"address {body['address']!r} is not an IPv4 address", keypath) from None
    if not _MAC.fullmatch(body["mac"]):
        raise _corrupt(where, f"mac {body['mac']!r} is not a MAC address", keypath)
    if body["image"] != image or not all(r in ROLES for r in body["roles"]):
        raise _corrupt(where, "image does not match its key, or an unknown role", keypath)
    return HostEntry(**body)


def _sorted(entries: Iterable[HostEntry]) -> list[HostEntry]:
    return sorted(entries, key=lambda e: (e.env, e.image))


# --------------------------------------------------------------------------- rendering
def render(entries: Sequence[HostEntry], format: str = "table", *, ssh_user: str | None = None,
           ssh_key: str | None = None, known_hosts: str | None = None) -> str:
    """``entries`` as text: ``table`` (for people), ``json``, ``yaml``, or ``ansible``.

    ``ansible`` is a YAML inventory that ``ansible-inventory -i FILE`` reads as it is: group
    ``<env>`` with children ``<env>_loadbalancers`` and ``<env>_workers`` ('-' becomes '_');
    ``ssh_user``, ``ssh_key`` and ``known_hosts`` become connection variables when given.
    """
    entries = _sorted(entries)
    if format == "table":
        return table(
            ["image", "env", "roles", "address", "mac", "reachable", "last seen"],
            [[e.image, e.env, ",".join(e.roles) or "-", e.address, e.mac, _yes_no(e.reachable), _when(e.last_seen)]
             for e in entries],
            empty="(no hosts in the inventory; `fab hosts-logged` reads the booted log)",
        )
    if format == "json":
        return json.dumps([e.to_dict() for e in entries], indent=2) + "\n"
    if format == "yaml":
        return dump_yaml([e.to_dict() for e in entries])
    if format == "ansible":
        return dump_yaml(ansible_inventory(entries, ssh_user=ssh_user, ssh_key=ssh_key, known_hosts=known_hosts))
    raise UsageError(f"unknown format {format!r} (known: {', '.join(FORMATS)})")


def ansible_inventory(entries: Iterable[HostEntry], *, ssh_user: str | None = None, ssh_key: str | None = None,
                      known_hosts: str | None = None) -> dict[str, Any]:
    """The ansible YAML inventory as a dict (see ``render``)."""
    connection: dict[str, str] = {}
    if ssh_user:
        connection["ansible_user"] = ssh_user
    if ssh_key:
        connection["ansible_ssh_private_key_file"] = ssh_key
    if known_hosts:
        connection["ansible_ssh_common_args"] = (
            f"-o UserKnownHostsFile={shlex.quote(known_hosts)} -o StrictHostKeyChecking=yes"
        )
    children: dict[str, Any] = {}
    owner: dict[str, str] = {}  # group -> environment, to refuse two environments on one group

    def claim(group: str, env: str) -> None:
        if owner.setdefault(group, env) != env:
            raise BootedError(f"environments {owner[group]!r} and {env!r} both map to the ansible group {group!r}; rename one")

    for entry in _sorted(entries):
        env_group = ansible_group(entry.env)
        claim(env_group, entry.env)
        env_node = children.setdefault(env_group, {})
        host_vars = {"ansible_host": entry.address, **connection}
        if not entry.roles:
            env_node.setdefault("hosts", {})[entry.image] = dict(host_vars)
        for role in entry.roles:
            role_group = f"{env_group}_{role}"
            claim(role_group, entry.env)
            sub = env_node.setdefault("children", {}).setdefault(role_group, {"hosts": {}})
            sub["hosts"][entry.image] = dict(host_vars)
    return {"all": {"children": children}} if children else {"all": {}}


def ansible_group(env: str) -> str:
    """An ansible group name for environment ``env``: '-' -> '_', reserved names prefixed."""
    group = env.replace("-", "_")
    return f"env_{group}" if group in ("all", "ungrouped") else group


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"
