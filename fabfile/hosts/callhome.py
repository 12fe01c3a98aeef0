"""The call-home contract, control side: secrets, per-host keys, signatures, host config.

Each environment has a random secret in the state dir (mode 0600). A host never sees it: it gets
its own key, ``HMAC(env secret, "host:" + image)``, so a leaked host key can only speak for that
one host. A call home is signed with the host key over ``env|name|mac|addr|ts``; ``hosts-logged``
re-derives the key from the name and checks the signature, and that ``addr`` is the address nginx
saw. The kickstart's %post and the local image builder install the same two files from
``kickstart/firstboot/`` plus the per-host config made here.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

from fabfile.core.state import PROJECT_ROOT, atomic_write, locked, state_path

FIRSTBOOT_DIR = PROJECT_ROOT / "kickstart" / "firstboot"
SCRIPT = FIRSTBOOT_DIR / "booted-callhome"
UNIT = FIRSTBOOT_DIR / "booted-callhome.service"
SCRIPT_PATH = "/usr/local/sbin/booted-callhome"
UNIT_PATH = "/etc/systemd/system/booted-callhome.service"
CONF_PATH = "/etc/booted/callhome.conf"
CALLHOME_PATH = "/booted/callhome"


def env_secret(env: str) -> bytes:
    """The environment's secret, created on first use."""
    path = state_path("secrets", f"{env}.key")
    with locked("secrets"):
        if not path.exists():
            atomic_write(path, secrets.token_hex(32) + "\n", mode=0o600)
        return path.read_text().strip().encode()


def host_key(env: str, image: str) -> str:
    return hmac.new(env_secret(env), f"host:{image}".encode(), hashlib.sha256).hexdigest()


def signature(key: str, env: str, name: str, mac: str, addr: str, ts: str) -> str:
    message = "|".join([env, name, mac, addr, ts]).encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


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
