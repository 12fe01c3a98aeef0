"""What every task shares: the decorator, config loading, confirmations, image resolution."""
from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any

from invoke import Exit, ParseError
from invoke import task as invoke_task

from fabfile import providers
from fabfile.core import config as config_mod
from fabfile.core import names
from fabfile.core.errors import BootedError, UsageError, user_errors

HELP_FLAGS = ("--help", "-h")


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


@functools.cache
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
                  flag: str = "--image", new: bool = False):
    """(image, environment or None, provider name) for an image named on the command line.

    An image in an environment uses the environment's provider. Any other image is looked up by asking
    every provider whether it holds that name; ``--provider`` is needed only when two do. ``new``: the
    image is about to be made (image-build), so when no provider holds it yet, the one provider the
    environments use is the default.
    """
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
    held, unasked = holders(cfg, image)
    if len(held) == 1:
        return image, None, held[0]
    if len(held) > 1:
        raise UsageError(f"image {image!r} exists in providers {' and '.join(held)}; "
                         f"pass --provider ({' or '.join(held)}) to say which one")
    used = sorted({e.provider for e in cfg.environments.values()})
    if new and len(used) == 1:
        return image, None, used[0]
    if new:
        raise UsageError(f"image {image!r} is in no environment of {cfg.path}; "
                         f"pass --provider ({' or '.join(used)}) to say where to build it")
    detail = f" (could not ask {'; '.join(unasked)})" if unasked else ""
    raise UsageError(f"no provider holds an image {image!r}{detail}; see `fab image-list`")


def holders(cfg: config_mod.Config, image: str) -> tuple[list[str], list[str]]:
    """(providers that hold ``image``, ``"provider: why"`` for those that could not be asked)."""
    held, unasked = [], []
    for name in providers.NAMES:
        try:
            prov = provider_for(cfg, name)
            if prov.installed() and prov.get(image) is not None:  # one not installed here holds nothing
                held.append(name)
        except BootedError as err:
            unasked.append(f"{name}: {err}")
    return held, unasked


def provider_for(cfg: config_mod.Config, name: str) -> providers.Provider:
    return providers.get_provider(name, cfg)


# ---------------------------------------------------------------------------- the command line
def install_usage_errors(program) -> None:
    """Make ``fab``'s parsing follow booted's rules: ``TASK --help`` shows the task's help (even for a task
    with a positional argument, where invoke would take ``--help`` as its value), and every parse error
    (unknown flag, extra or missing argument, flag without its value) is one line with exit code 2
    (invoke exits 1 for them). Called once, on the ``Program`` that is loading this task collection.
    """
    if getattr(program, "_booted_usage_errors", False):
        return
    parse_tasks, parse_cleanup = program.parse_tasks, program.parse_cleanup

    def booted_parse_tasks() -> None:
        tokens = list(program.core.unparsed)
        wanted = help_request(tokens, set(program.collection.task_names))
        if wanted:
            program.parser = program._make_parser()
            program.args.help.value = wanted
            program.tasks = []
            return
        try:
            parse_tasks()
        except ParseError as err:
            raise Exit(usage_line(err), code=2) from None

    def booted_parse_cleanup() -> None:
        try:
            parse_cleanup()
        except ParseError as err:
            raise Exit(usage_line(err), code=2) from None

    program.parse_tasks, program.parse_cleanup = booted_parse_tasks, booted_parse_cleanup
    program._booted_usage_errors = True


def help_request(tokens: list[str], task_names: set[str]) -> str | None:
    """The task whose help ``tokens`` ask for (``TASK ... --help`` or ``-h``), else None."""
    current = None
    for token in tokens:
        if token in task_names:
            current = token
        elif token in HELP_FLAGS and current:
            return current
    return None


def usage_line(err: ParseError) -> str:
    """invoke's parse error as booted's one line, pointing at the task's help."""
    context = getattr(err, "context", None)
    task = getattr(context, "name", None)
    message = str(err)
    missing = [a.name for a in getattr(context, "missing_positional_args", [])] if context else []
    unknown = re.fullmatch(r"No idea what '(.*)' is!", message)
    no_value = re.fullmatch(r"Flag <Argument: (\w+)> needed value and was not given one!", message)
    if missing and "did not receive required positional" in message:
        message = f"{task} needs " + " and ".join(f"--{m.replace('_', '-')} NAME" for m in missing)
    elif unknown:
        word = unknown.group(1)
        message = f"unknown flag {word!r}" if word.startswith("-") else \
            (f"unexpected argument {word!r}" if task else f"no task named {word!r}")
    elif no_value:
        message = f"--{no_value.group(1).replace('_', '-')} needs a value"
    hint = f" (see `fab --help {task}`)" if task else " (see `fab --list`)"
    return f"error: {message}{hint}"
