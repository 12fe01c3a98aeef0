"""Validation of the names booted passes to commands: images, environments, services, versions.

Each check runs before any command is built, so a bad name never reaches VBoxManage, nspawn,
git or a remote shell.
"""
from __future__ import annotations

import ipaddress
import re

from fabfile.core.errors import UsageError

_PATTERNS = {
    # the rule: letters, digits, '.', '-', '_'; must start with a letter or digit
    "image": re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"),
    "environment": re.compile(r"[a-z][a-z0-9-]{0,31}"),
    "service": re.compile(r"[a-z][a-z0-9_]{0,31}"),
    # a git tag, branch or commit; no '..', no leading '-', no whitespace or shell characters
    "version": re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}"),
}


def check(kind: str, value: object, where: str = "") -> str:
    """Return ``value`` if it is a valid ``kind`` name, else raise a one-line UsageError."""
    pattern = _PATTERNS[kind]
    text = value if isinstance(value, str) else ""
    bad = not text or not pattern.fullmatch(text) or ".." in text or text.endswith((".lock", "/"))
    if bad:
        rule = {
            "image": "letters, digits, '.', '-', '_' (up to 63, starting with a letter or digit)",
            "environment": "lower-case letters, digits and '-' (starting with a letter)",
            "service": "lower-case letters, digits and '_' (starting with a letter)",
            "version": "a git tag or commit: letters, digits, '.', '_', '-', '+'",
        }[kind]
        prefix = f"{where}: " if where else ""
        raise UsageError(f"{prefix}invalid {kind} name {value!r}: use {rule}")
    return text


def hostname_for(image: str) -> str:
    """The hostname an image's host gets: the image name, with '_' (not valid in hostnames) as '-'."""
    return check("image", image).replace("_", "-")


def check_address(value: object, where: str = "") -> str:
    """Return ``value`` as a canonical IPv4 or IPv6 address (what booted pins host keys under), else a UsageError."""
    text = value.strip() if isinstance(value, str) else ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        prefix = f"{where}: " if where else ""
        raise UsageError(f"{prefix}invalid address {value!r}: give a host's IPv4 or IPv6 address, "
                         "as `fab hosts-list` shows it") from None
