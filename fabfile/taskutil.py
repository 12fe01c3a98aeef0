"""What every task shares: the decorator, config loading, confirmations, image resolution."""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from invoke import task as invoke_task

from fabfile import providers
from fabfile.core import config as config_mod
from fabfile.core import names
from fabfile.core.errors import UsageError, user_errors


def task(*args: Any, **kwargs: Any) -> Any:
    """``invoke.task`` with booted's error handling and long flags only.

    Auto short flags are off: a task's ``--env`` would otherwise take ``-e`` from ``--echo``.
    """
    kwargs.setdefault("auto_shortflags", False)

    def decorate(func: Callable[..., Any]) -> Any:
        return invoke_task(user_errors(func), **kwargs)

    if args and callable(args[0]) and not kwargs.get("name"):
        return decorate(args[0])
    return decorate


@functools.lru_cache(maxsize=None)
def _load(path: str) -> config_mod.Config:
    return providers.load_config(path)


def load_config() -> config_mod.Config:
    return _load(str(config_mod.default_config_path()))


def interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def confirm(question: str, yes: bool) -> None:
    """Ask on a terminal; with no terminal (CI, scripts) require ``--yes`` instead of prompting."""
    if yes:
        return
    if not interactive():
        raise UsageError(f"{question} needs confirmation: pass --yes (no terminal to ask on)")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UsageError("cancelled")


def resolve_image(cfg: config_mod.Config, image: str | None, provider: str | None = None,
                  flag: str = "--image"):
    """(image, environment or None, provider name) for an image named on the command line."""
    if not image:
        raise UsageError(f"{flag} NAME is required")
    image = names.check("image", image, flag)
    env = cfg.image_env(image)
    if provider:
        if provider not in providers.NAMES:
            raise UsageError(f"unknown provider {provider!r} (known: {', '.join(providers.NAMES)})")
        if env and env.provider != provider:
            raise UsageError(f"image {image!r} belongs to environment {env.name!r}, whose provider is {env.provider}")
        return image, env, provider
    if env:
        return image, env, env.provider
    used = sorted({e.provider for e in cfg.environments.values()})
    if len(used) == 1:
        return image, None, used[0]
    raise UsageError(f"image {image!r} is in no environment of {cfg.path}; pass --provider ({' or '.join(used)})")


def provider_for(cfg: config_mod.Config, name: str) -> providers.Provider:
    return providers.get_provider(name, cfg)
