"""booted's ``fab``: fabric's command line, without importing paramiko for tasks that never use SSH.

fabric's own ``fab`` (``fabric.main``) imports fabric, and with it paramiko and cryptography, before
it looks at its arguments: about 0.1 s of every run, a third of what `fab --list` cost (README,
"What users wait for besides the deploy"). booted's tasks open their SSH connections themselves
(``fabfile.core.ssh``, which imports paramiko on the first connection), so most runs need none of it.

This program is fabric's whenever the command line uses anything fabric adds to invoke: its flags
(``-H``, ``-i``, ``-S``, ``-t``, ``--list-agent-keys``, the password prompts), ``--version`` (which
prints paramiko's), the core ``--help`` (which lists fabric's flags), shell completion, or a ``--``
remainder. Otherwise it is invoke's ``Program`` with the same core flags, the same collection
search (``fabfile``, ``-c``, ``-r``) and fabric's configuration prefix (``fabric.yaml``,
``FABRIC_*``). Either way the collection is found as invoke finds it, and booted's package, which
this module is part of, is not run a second time.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from invoke import Config, FilesystemLoader, Program

import fabfile
from fabfile import taskutil

# What fabric's program adds to invoke's (fabric.main.Fab.core_args), by long and short name.
FABRIC_LONG = ("--hosts", "--identity", "--list-agent-keys", "--prompt-for-login-password",
               "--prompt-for-passphrase", "--ssh-config", "--connect-timeout")
FABRIC_SHORT = "HiSt"
# Core output that lists fabric's flags or versions: fabric's program prints it.
CORE_OUTPUT_LONG = ("--version", "--complete", "--print-completion-script")
CORE_OUTPUT_SHORT = "V"
HELP_LONG, HELP_SHORT = "--help", "h"


def needs_fabric(argv: list[str], task_names: set[str]) -> bool:
    """Whether ``argv`` (without the program name) uses anything only fabric's program provides.

    Errs towards fabric: any token that could be one of its flags counts, wherever it is."""
    tokens = list(argv)
    if "--" in tokens:
        return True
    asks_help = False
    for token in tokens:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            if flag in FABRIC_LONG or flag in CORE_OUTPUT_LONG:
                return True
            asks_help |= flag == HELP_LONG
        elif token.startswith("-") and len(token) > 1:
            letters = token[1:]
            if any(c in letters for c in FABRIC_SHORT + CORE_OUTPUT_SHORT):
                return True
            asks_help |= HELP_SHORT in letters
    return asks_help and not any(token in task_names for token in tokens)  # core help lists fabric's flags


class FabricNamedConfig(Config):
    """invoke's configuration under fabric's name: ``fabric.yaml`` files, ``FABRIC_`` variables and
    the ``fabfile`` collection. fabric's SSH settings are not loaded: booted's connections take none
    of them (``fabfile.core.ssh``)."""

    prefix = "fabric"

    @staticmethod
    def global_defaults():
        defaults = Config.global_defaults()
        defaults["tasks"]["collection_name"] = "fabfile"
        return defaults


class ImportedFabfileLoader(FilesystemLoader):
    """invoke's search for the task collection, except that finding this package returns it as
    already imported (this program is part of it) instead of running it a second time."""

    def load(self, name: str | None = None):
        spec = self.find(name if name is not None else self.config.tasks.collection_name)
        origin = Path(spec.origin).resolve() if spec and spec.origin else None
        if origin is None or origin != Path(fabfile.__file__).resolve():
            return super().load(name)
        if str(origin.parent) not in sys.path:  # as invoke's Loader.load does
            sys.path.insert(0, str(origin.parent))
        return fabfile, str(origin.parent.parent)


def make_program(argv: list[str]) -> Program:
    """fabric's program if ``argv`` needs it, else invoke's with fabric's flags' names and config."""
    if needs_fabric(argv[1:], set(fabfile.ns.task_names)):
        import fabric  # the SSH stack, only when the command line asks for fabric's part of it
        from fabric.main import Fab

        program: Program = Fab(name="Fabric", version=fabric.__version__, executor_class=fabric.Executor,
                               config_class=fabric.Config, loader_class=ImportedFabfileLoader)
    else:
        program = Program(name="Fabric", config_class=FabricNamedConfig, loader_class=ImportedFabfileLoader)
    taskutil.install_usage_errors(program)
    return program


def main() -> None:
    try:
        try:
            make_program(sys.argv).run(sys.argv)
        finally:
            # also when run() ends in sys.exit (invoke's way out of --list, --help): left to the
            # interpreter's shutdown, a failed flush printed "Exception ignored ... BrokenPipeError"
            sys.stdout.flush()
    except BrokenPipeError:  # `fab --list | head`: the reader left; that is no error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's docs, "Note on SIGPIPE"
        sys.exit(1)
