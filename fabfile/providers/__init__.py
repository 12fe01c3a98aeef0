"""Providers by name, loaded only when used (VirtualBox code is never imported for `local`)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import UsageError
from .base import RUNNING, STOPPED, CloneRecord, Machine, Provider

if TYPE_CHECKING:
    from ..config import Config

PROVIDERS = {
    "virtualbox": "fabfile.providers.virtualbox.VirtualBoxProvider",
    "local": "fabfile.providers.local.LocalProvider",
}

__all__ = ["CloneRecord", "Machine", "Provider", "RUNNING", "STOPPED", "get_provider", "PROVIDERS"]


def get_provider(name: str, config: "Config") -> Provider:
    try:
        dotted = PROVIDERS[name]
    except KeyError:
        raise UsageError(f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})") from None
    module, _, cls = dotted.rpartition(".")
    return getattr(importlib.import_module(module), cls)(config)
