"""The one place that builds SSH connections and runs remote commands.

* user: ``BOOTED_USER``, else ``settings.ssh.user`` (default ``booted``);
* key: ``settings.ssh.key`` or ``BOOTED_SSH_KEY``, else a key pair generated once into the state dir;
* a connect timeout, TCP_NODELAY (paramiko leaves Nagle on, which costs ~40 ms per command);
* host keys pinned on first contact into ``state/ssh/known_hosts`` and refused on mismatch;
* nothing from the operator: no ``~/.ssh/config`` or ``/etc/ssh/ssh_config`` (no agent forwarding,
  no foreign identity files, no proxy), no ssh agent, no fabric/invoke config files; port 22.

Remote commands are argument lists; ``run`` quotes every item with ``shlex.quote``.

paramiko and fabric are imported by the functions that need them, not with this module: most tasks
(listing, discovery, probing) never open an SSH connection, and importing the two costs about 0.1 s
of every ``fab`` run (README, "What users wait for besides the deploy").
"""
from __future__ import annotations

import base64
import functools
import hashlib
import io
import os
import shlex
import socket
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabfile.core import localcmd
from fabfile.core.errors import BootedError, HostError
from fabfile.core.localcmd import CommandResult
from fabfile.core.state import atomic_write, locked, state_path

if TYPE_CHECKING:
    import paramiko
    from fabric import Connection

    _Policy = paramiko.MissingHostKeyPolicy
else:
    _Policy = object  # paramiko calls the policy's missing_host_key; it needs no base class

DEFAULT_USER = "booted"
SSH_PORT = 22


def keypair(config=None) -> tuple[str, str]:
    """(private, public) key paths; generated with ssh-keygen on first use."""
    configured = os.environ.get("BOOTED_SSH_KEY") or (config.ssh.get("key") if config else "")
    if configured:
        private = Path(configured).expanduser()
        if not private.exists() or not Path(f"{private}.pub").exists():
            raise BootedError(f"SSH key {private} (or its .pub) does not exist (settings.ssh.key / BOOTED_SSH_KEY)")
        return str(private), f"{private}.pub"
    private = state_path("ssh", "id_ed25519")
    with locked("ssh-keygen"):
        if not private.exists():
            os.chmod(private.parent, 0o700)
            localcmd.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "booted", "-f", str(private)])
    return str(private), f"{private}.pub"


def user(config=None) -> str:
    return os.environ.get("BOOTED_USER") or (config.ssh.get("user") if config else "") or DEFAULT_USER


def known_hosts_path() -> Path:
    return state_path("ssh", "known_hosts")


def _load_pins(path: Path) -> paramiko.HostKeys:
    import paramiko

    keys = paramiko.HostKeys()
    if path.exists():
        try:
            keys.load(str(path))
        except (UnicodeDecodeError, paramiko.SSHException, ValueError) as err:
            raise BootedError(f"{path}: not a known_hosts file ({err}); remove it (pins are made again on next contact)") from None
    return keys


def _save_pins(keys: paramiko.HostKeys, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    keys.save(str(tmp))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class PinOnFirstUse(_Policy):
    """Accept and record a host key the first time a host is seen; refuse a different one later.

    ``like``: an address whose pinned key the new host must present (a clone, which inherited its
    source's host keys until booted re-keys it); then nothing unlike it is ever pinned.
    """

    def __init__(self, like: str | None = None):
        self.like = like

    def missing_host_key(self, client, hostname, key):
        path = known_hosts_path()
        with locked("known_hosts"):
            keys = _load_pins(path)
            known = keys.lookup(hostname)
            if known:
                stored = known.get(key.get_name())
                if stored is not None and stored == key:
                    return
                raise HostError(
                    hostname,
                    f"host key does not match the one pinned in {path}; if the host was rebuilt, "
                    f"run `fab hosts-forget --host {hostname}`",
                )
            if self.like:
                source = keys.lookup(self.like) or {}
                if source.get(key.get_name()) != key:
                    raise HostError(hostname, f"presents a host key unlike the one pinned for {self.like}, "
                                              "the image it claims to be a clone of; not trusted")
            keys.add(hostname, key.get_name(), key)
            _save_pins(keys, path)


def pinned(address: str) -> bool:
    with locked("known_hosts"):
        return _load_pins(known_hosts_path()).lookup(address) is not None


def pin_ids(addresses: Collection[str]) -> dict[str, str]:
    """address -> an id of the host keys pinned for it (addresses with none are left out), in one
    read of the pins: which host answers there. Records about a host (what booted deployed to it)
    carry it, so they do not outlive the host: one deleted and built again at the same address has
    new keys, and its old pins were forgotten."""
    with locked("known_hosts"):
        keys = _load_pins(known_hosts_path())
    ids = {}
    for address in addresses:
        found = keys.lookup(address)
        if found:
            ids[address] = ",".join(sorted(f"{name}:{hashlib.sha256(found[name].asbytes()).hexdigest()[:16]}"
                                           for name in found.keys()))
    return ids


def repin(address: str, public_keys: str) -> int:
    """Replace the pins of ``address`` with ``public_keys`` (``type base64 [comment]`` lines, read
    from the host over an already authenticated channel); the number pinned."""
    import paramiko

    new = []
    for line in public_keys.splitlines():
        fields = line.split()
        if len(fields) >= 2:
            try:
                new.append(paramiko.PKey.from_type_string(fields[0], base64.b64decode(fields[1])))
            except Exception:  # noqa: BLE001 - a line that is not a key is ignored
                continue
    if not new:
        raise HostError(address, "sent no SSH host key to pin after re-keying")
    path = known_hosts_path()
    with locked("known_hosts"):
        keys = _load_pins(path)
        if address in keys:
            del keys[address]
        for key in new:
            keys.add(address, key.get_name(), key)
        _save_pins(keys, path)
    return len(new)


def forget(address: str) -> int:
    """Drop every pinned key of ``address`` (its host was deleted or rebuilt); returns how many.

    Every line naming it goes: plain, ``[address]:port`` and hashed (``|1|...``) entries, for any key type.
    """
    return _repin(address, None)


def pin(address: str, public_key: str) -> None:
    """Pin ``address``'s host key before first contact, replacing any pinned before.

    ``public_key`` is an OpenSSH public key line; for hosts whose keys booted made itself, so the
    very first connection is checked too.
    """
    import paramiko

    kind, _, rest = public_key.strip().partition(" ")
    try:
        key = paramiko.PKey.from_type_string(kind, base64.b64decode(rest.split()[0], validate=True))
    except (ValueError, IndexError, paramiko.SSHException) as err:
        raise BootedError(f"{address}: not an SSH public key ({err})") from None
    _repin(address, f"{address} {key.get_name()} {key.get_base64()}\n")


def _repin(address: str, line: str | None) -> int:
    """Drop ``address``'s pinned keys and add ``line`` (if any), atomically, under the lock."""
    path = known_hosts_path()
    with locked("known_hosts"):
        if not path.exists() and line is None:
            return 0
        kept, dropped = [], 0
        for old in path.read_text(errors="replace").splitlines(keepends=True) if path.exists() else []:
            fields = old.split()
            if fields and not old.lstrip().startswith("#") and _names_host(fields[0], address):
                dropped += 1
            else:
                kept.append(old if old.endswith("\n") else old + "\n")
        if dropped or line:
            atomic_write(path, "".join(kept) + (line or ""), mode=0o600)
        return dropped


def _names_host(patterns: str, address: str) -> bool:
    """Whether a known_hosts host field (comma-separated names, maybe hashed) names ``address``."""
    for name in patterns.split(","):
        if name.startswith("|1|"):
            import paramiko

            if any(paramiko.HostKeys.hash_host(form, name) == name for form in (address, f"[{address}]:22")):
                return True
            continue
        if name == address or (name.startswith(f"[{address}]:")):
            return True
    return False


def connect(host: str, config=None, user_name: str | None = None, timeout: float | None = None,
            like: str | None = None) -> Connection:
    """A fabric Connection to ``host`` with booted's key, pinned host keys and a TCP_NODELAY socket
    (not yet open: ``open()``, or the first command, connects)."""
    return _connection_class()(host, config, user_name, timeout, like)


@functools.cache
def _connection_class() -> Any:
    """fabric's Connection with booted's settings, made on the first connection (fabric loads then)."""
    import paramiko
    from fabric import Config as FabricConfig
    from fabric import Connection

    class BootedConnection(Connection):
        """A fabric Connection with booted's key, pinned host keys and a TCP_NODELAY socket."""

        def __init__(self, host: str, config=None, user_name: str | None = None, timeout: float | None = None,
                     like: str | None = None):
            connect_timeout = float(timeout or (config.ssh.get("connect_timeout_s") if config else 5) or 5)
            private, _ = keypair(config)
            super().__init__(
                host,
                user=user_name or user(config),
                port=SSH_PORT,
                # lazy: no fabric/invoke config files; no ssh_config: the operator's ForwardAgent,
                # IdentityFile, ProxyJump or Port must not reach managed hosts
                config=FabricConfig(lazy=True, overrides={"load_ssh_configs": False}),
                forward_agent=False,
                gateway=None,
                connect_timeout=connect_timeout,
                connect_kwargs={"key_filename": [private], "look_for_keys": False, "allow_agent": False},
            )
            self.client.set_missing_host_key_policy(PinOnFirstUse(like))
            pins = _load_pins(known_hosts_path())
            for hostname, entry in pins.items():
                for key in entry.values():
                    self.client.get_host_keys().add(hostname, key.get_name(), key)

        def open(self):
            if not self.is_connected:
                try:
                    sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
                except OSError as err:
                    raise HostError(self.host, f"cannot connect to SSH port {self.port}: {err.strerror or err}") from None
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.connect_kwargs["sock"] = sock
            try:
                return super().open()
            except paramiko.BadHostKeyException:
                raise HostError(
                    self.host,
                    f"host key does not match the one pinned in {known_hosts_path()}; if the host was rebuilt, "
                    f"run `fab hosts-forget --host {self.host}`",
                ) from None
            except paramiko.AuthenticationException:
                raise HostError(self.host, f"SSH login as {self.user!r} with booted's key was refused") from None
            except (paramiko.SSHException, OSError) as err:
                raise HostError(self.host, f"SSH failed: {err}") from None
            finally:
                self.connect_kwargs.pop("sock", None)

    return BootedConnection


def quote(argv: Sequence[object]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def run(
    conn: Connection,
    argv: Sequence[object],
    *,
    sudo: bool = False,
    check: bool = True,
    timeout: float | None = None,
    stdin: str | None = None,
) -> CommandResult:
    """Run ``argv`` on ``conn``'s host, every item quoted; ``sudo`` runs it as root (non-interactive)."""
    return run_raw(conn, command_line(conn, argv, sudo), check=check, timeout=timeout, stdin=stdin)


def command_line(conn: Connection, argv: Sequence[object], sudo: bool) -> str:
    """The quoted command for ``argv``, through ``sudo -n`` unless booted logs in as root."""
    command = quote(argv)
    return f"sudo -n -- {command}" if sudo and conn.user != "root" else command


def _checked(result: CommandResult, check: bool) -> CommandResult:
    if check and not result.ok:
        raise HostError(result.host, result.failure("command"), result)
    return result


def run_raw(conn: Connection, command: str, *, check: bool = True, timeout: float | None = None,
            stdin: str | None = None) -> CommandResult:
    in_stream: io.StringIO | bool = io.StringIO(stdin) if stdin is not None else False
    kwargs = {"hide": True, "warn": True, "timeout": timeout, "in_stream": in_stream}
    try:
        res = conn.run(command, **kwargs)
    except BootedError:
        raise
    except Exception as err:  # invoke CommandTimedOut, paramiko errors
        raise HostError(conn.host, f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}") from None
    result = CommandResult([command], res.exited, res.stdout, res.stderr, host=conn.host)
    return _checked(result, check)


def run_with_input(conn: Connection, argv: Sequence[object], data: bytes, *, sudo: bool = False,
                   check: bool = True, timeout: float = 120.0) -> CommandResult:
    """Run ``argv`` with ``data`` on its stdin over one SSH channel (no SFTP round trips).

    Used to ship a release: the tarball streams straight into ``tar -x`` on the host.
    """
    import paramiko

    command = command_line(conn, argv, sudo)
    conn.open()
    try:
        chan = conn.client.get_transport().open_session(timeout=timeout)
        chan.settimeout(timeout)
        chan.exec_command(command)
        if data:
            chan.sendall(data)
        chan.shutdown_write()
        out, err = bytearray(), bytearray()

        def drain() -> None:
            while chan.recv_ready():
                out.extend(chan.recv(65536))
            while chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))

        # Sleep on the exit-status event: it wakes the moment the command ends. Draining every
        # 0.2 s keeps a chatty command from filling the channel window; no 10 ms polling loop.
        deadline = time.monotonic() + timeout
        while not chan.status_event.wait(0.2):
            drain()
            if time.monotonic() > deadline:
                raise HostError(conn.host, f"command timed out after {timeout:g}s")
        drain()
        code = chan.recv_exit_status()
        chan.close()
    except BootedError:
        raise
    except (TimeoutError, paramiko.SSHException, OSError) as exc:
        raise HostError(conn.host, f"SSH failed: {exc}") from None
    result = CommandResult([command], code, out.decode(errors="replace"), err.decode(errors="replace"), host=conn.host)
    return _checked(result, check)
