"""The call-home contract, control side: secrets, per-host keys, signatures, host config.

Each environment has a random secret in the state dir (mode 0600). A host never sees it: it gets
its own key, ``HMAC(env secret, "host:" + image + ":" + generation)``, so a leaked host key can
only speak for that one host. The generation is a random value drawn each time the image is built
(or a clone renamed), kept in ``secrets/<env>.hosts.json``: a rebuilt image gets a new key, and the
old one stops working. A call home is signed with the host key over ``env|name|mac|addr|ts``;
``hosts-logged`` derives the key of the name it claims (only for names booted made a key for:
the environment's declared images and the images it built or renamed) and checks the signature,
and that ``addr`` is the address nginx saw. The kickstart's %post and the local image builder
install the same two files from ``kickstart/firstboot/`` plus the per-host config made here.
"""
from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import secrets

from fabfile.core import names
from fabfile.core.errors import ConfigError
from fabfile.core.state import PROJECT_ROOT, atomic_write, atomic_write_json, locked, read_json, state_path

FIRSTBOOT_DIR = PROJECT_ROOT / "kickstart" / "firstboot"
SCRIPT = FIRSTBOOT_DIR / "booted-callhome"
UNIT = FIRSTBOOT_DIR / "booted-callhome.service"
SCRIPT_PATH = "/usr/local/sbin/booted-callhome"
UNIT_PATH = "/etc/systemd/system/booted-callhome.service"
CONF_PATH = "/etc/booted/callhome.conf"
CALLHOME_PATH = "/booted/callhome"


_SECRET = re.compile(rb"[0-9a-f]{64}")
_GENERATION = re.compile(r"[0-9a-f]{32}")


def env_secret(env: str) -> bytes:
    """The environment's secret, created on first use; a damaged or empty one is an error."""
    path = state_path("secrets", f"{env}.key")
    with locked("secrets"):
        if not path.exists():
            atomic_write(path, secrets.token_hex(32) + "\n", mode=0o600)
        try:
            text = path.read_bytes().strip()
        except OSError as err:
            raise ConfigError(str(path), f"cannot read: {err.strerror}") from None
    if not _SECRET.fullmatch(text):
        raise ConfigError(str(path), "is not an environment secret (64 hex digits): empty or damaged; every "
                                     "host of the environment must be rebuilt once it is replaced")
    return text


def generations(env: str) -> dict[str, str]:
    """image -> the random generation of its current key (images built before generations: none)."""
    path = state_path("secrets", f"{env}.hosts.json")
    doc = read_json(path, {})
    if not isinstance(doc, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _GENERATION.fullmatch(v) for k, v in doc.items()):
        raise ConfigError(str(path), "is not booted's host key record (image -> 32 hex digits)")
    return doc


def derive_key(secret: bytes, image: str, generation: str = "") -> str:
    label = f"host:{image}:{generation}" if generation else f"host:{image}"
    return hmac.new(secret, label.encode(), hashlib.sha256).hexdigest()


def host_key(env: str, image: str) -> str:
    """The current key of ``image`` in ``env``."""
    return derive_key(env_secret(env), image, generations(env).get(image, ""))


def new_host_key(env: str, image: str) -> str:
    """Draw a new key for ``image`` (it is being built, or a clone renamed): the old key stops working."""
    names.check("environment", env)
    names.check("image", image)
    path = state_path("secrets", f"{env}.hosts.json")
    with locked("secrets"):
        table = generations(env)
        table[image] = secrets.token_hex(16)
        atomic_write_json(path, table, mode=0o600)
    return host_key(env, image)


_BLOCK = 64  # SHA-256's block size in bytes
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


class HostSigner:
    """HMAC-SHA256 under one host key (RFC 2104), with the key's two padded blocks hashed once.

    Checking a call is then two state copies and one block each: about a third of what
    ``hmac.digest`` costs per call, which sets the key up again every time. Reading a large log
    checks one signature per line that names a known image, so this is most of what a forged line
    costs. ``signature`` and ``hmac.digest`` agree on every key and message (tests/test_bootlog.py)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: str | bytes):
        raw = key.encode() if isinstance(key, str) else key
        if len(raw) > _BLOCK:
            raw = hashlib.sha256(raw).digest()
        raw = raw.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(raw.translate(_IPAD))
        self._outer = hashlib.sha256(raw.translate(_OPAD))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def verifies(self, message: bytes, sig_hex: bytes | str) -> bool:
        """Whether ``sig_hex`` (64 hex digits, already checked) is this key's signature of ``message``."""
        inner = self._inner.copy()  # digest(), inlined: this runs once per line that names a known image
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return hmac.compare_digest(outer.digest(), binascii.unhexlify(sig_hex))


class Keyring:
    """Host keys for checking many calls home: each environment's secret and key record are read
    once, and a key is derived once per name, only for names booted made a key for (its declared
    images and the ones in the key record). A line naming anything else costs no file access."""

    def __init__(self, config):
        self.config = config
        self._envs: dict[str, tuple[bytes, dict[str, str], set[str], dict[str, str]]] = {}
        self._signers: dict[tuple[str, str], HostSigner] = {}

    def _env(self, env: str) -> tuple[bytes, dict[str, str], set[str], dict[str, str]]:
        entry = self._envs.get(env)
        if entry is None:
            declared = self.config.environments.get(env)
            entry = self._envs[env] = (env_secret(env), generations(env),
                                       set(declared.images) if declared else set(), {})
        return entry

    def names(self, env: str) -> set[str]:
        """Every name ``env`` has a key for: its declared images and the ones in its key record."""
        _, gens, declared_images, _ = self._env(env)
        return declared_images | set(gens)

    def signer(self, env: str, name: str) -> HostSigner | None:
        """The signer of ``name``'s key in ``env``, or None if booted made no key for that name."""
        found = self._signers.get((env, name))
        if found is None:
            key = self.key(env, name)
            if key is None:
                return None
            found = self._signers[(env, name)] = HostSigner(key)
        return found

    def key(self, env: str, name: str) -> str | None:
        secret, gens, declared_images, cache = self._env(env)
        key = cache.get(name)
        if key is None:
            if name not in gens and name not in declared_images:
                return None
            key = cache[name] = derive_key(secret, name, gens.get(name, ""))
        return key


def signature(key: str, env: str, name: str, mac: str, addr: str, ts: str) -> str:
    message = "|".join([env, name, mac, addr, ts]).encode()
    return hmac.digest(key.encode(), message, "sha256").hex()  # hmac.new(...).hexdigest(), one C call


def verify(env: str, name: str, mac: str, addr: str, ts: str, sig: str) -> bool:
    expected = signature(host_key(env, name), env, name, mac, addr, ts)
    return hmac.compare_digest(expected, sig)


def callhome_url(address: str, port: int) -> str:
    return f"http://{address}:{port}{CALLHOME_PATH}"


def host_config(env: str, image: str, url: str) -> str:
    """The contents of /etc/booted/callhome.conf for ``image`` (mode 0600 on the host)."""
    return (
        "# written by booted; the key is this host's own (derived), not the environment secret\n"
        f"URL={url}\nENV={env}\nNAME={image}\nKEY={host_key(env, image)}\n"
    )


def firstboot_files() -> dict[str, tuple[str, int]]:
    """Files every host gets, by path on the host: (contents, mode)."""
    return {SCRIPT_PATH: (SCRIPT.read_text(), 0o755), UNIT_PATH: (UNIT.read_text(), 0o644)}
