"""Providers by name, loaded only when used (VirtualBox code is never imported for `local`).

Each provider is one package ``fabfile/providers/<name>/`` with ``settings.py`` (``SETTINGS``: the
keys ``providers.<name>`` takes in environments.yaml) and ``provider.py`` (``PROVIDER``: its
``Provider`` subclass). Adding a provider is adding its folder and its name below.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from fabfile.core import config as config_mod
from fabfile.core.errors import UsageError
from fabfile.providers.base import RUNNING, STOPPED, UNREACHABLE, CloneRecord, Machine, Provider

if TYPE_CHECKING:
    from fabfile.core.config import Config

NAMES = ("virtualbox", "local", "libvirt")

__all__ = ["CloneRecord", "Machine", "Provider", "RUNNING", "STOPPED", "UNREACHABLE", "NAMES", "get_provider", "load_config", "settings_specs"]


def _check(name: str) -> str:
    if name not in NAMES:
        raise UsageError(f"unknown provider {name!r} (known: {', '.join(NAMES)})")
    return name


def settings_specs() -> dict[str, dict]:
    """Every provider's settings spec (small modules: no provider code is imported)."""
    return {name: importlib.import_module(f"fabfile.providers.{name}.settings").SETTINGS for name in NAMES}


def load_config(path: str | os.PathLike | None = None) -> "Config":
    """environments.yaml (``BOOTED_CONFIG`` or the project's), validated with every provider's settings."""
    return config_mod.load(path, settings_specs())


def get_provider(name: str, config: "Config") -> Provider:
    module = importlib.import_module(f"fabfile.providers.{_check(name)}.provider")
    return module.PROVIDER(config)
