"""Running code booted does not trust (a service's tests, from whatever a git tag holds).

Whoever can push a tag chooses what the deploy gate runs, so it runs:

* as ``booted-test``, a system account with no login, no home and no groups, made on first use
  (``useradd``), through ``setpriv`` (util-linux) with no new privileges; never as root;
* on a private copy of the tree, owned by that account, outside the state dir (which is 0700, so
  the account can read nothing of booted's: no secret, key, inventory or lock);
* with an environment made from nothing: PATH, HOME, LANG, TMPDIR and the manifest's ``env``,
  never booted's own (BOOTED_PW, repository URLs with credentials, SSH agent sockets);
* in its own session, with a time limit; at the limit, and when it ends, every process left in
  its process group, and every process of the account, is killed;
* one run at a time on the machine (a lock in /run, whatever booted's state dir): the account is
  the machine's, so ending one run by killing the account's processes would kill another booted's
  tests running at the same moment (two environments deploying, a test lab next to a real one:
  the other gate failed with its output cut off after the dots).

Without root (booted run by a normal user) there is no account to switch to: the code runs as the
caller with the same scrubbed environment and private copy, and ``run`` says so.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from fabfile.core import localcmd
from fabfile.core.errors import BootedError
from fabfile.core.state import locked

USER = "booted-test"
# In /run, where only root creates files (the sandbox account exists only when booted runs as root).
MACHINE_LOCK = Path("/run/booted-sandbox.lock")
# How long a gate waits for another booted's gate before giving up, beyond its own time limit.
LOCK_WAIT_S = 300
PATH = "/usr/local/bin:/usr/bin:/bin"
_MAX_OUTPUT = 1 << 20  # the last MiB of output is kept


@dataclass
class SandboxResult:
    returncode: int | None  # None: killed at the time limit
    output: str  # stdout and stderr, interleaved
    user: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def account() -> pwd.struct_passwd | None:
    """The unprivileged account untrusted code runs as (made if missing); None if not root.
    Called with the machine lock held (``run``)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    nologin = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if Path(p).exists()), "/bin/false")
    localcmd.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                  "--shell", nologin, "--comment", "booted untrusted service tests", USER])
    return pwd.getpwnam(USER)


def run(argv: Sequence[str], tree: Path, *, timeout: float, env: Mapping[str, str] | None = None) -> SandboxResult:
    """Run ``argv`` in a private copy of ``tree`` as the sandbox account; see the module doc."""
    machine_wide = locked("sandbox", timeout=timeout + LOCK_WAIT_S, path=MACHINE_LOCK) if os.geteuid() == 0 \
        else nullcontext()
    with machine_wide:
        return _run(argv, tree, timeout=timeout, env=env)


def _run(argv: Sequence[str], tree: Path, *, timeout: float, env: Mapping[str, str] | None) -> SandboxResult:
    user = account()
    work = Path(tempfile.mkdtemp(prefix="booted-sandbox-"))
    try:
        copy = work / "tree"
        shutil.copytree(tree, copy, symlinks=True)
        (work / "tmp").mkdir()
        if user is not None:
            for dirpath, dirnames, filenames in os.walk(work):
                for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                    os.lchown(name, user.pw_uid, user.pw_gid)
        child_env = {"PATH": PATH, "HOME": str(work), "LANG": "C.UTF-8", "TMPDIR": str(work / "tmp"),
                     **(env or {})}
        prefix: list[str] = []
        if user is not None:
            prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                      "--no-new-privs", "--"]
        # Output goes to a file, not a pipe: a process the code leaves behind would hold a pipe open.
        log = work / "output"
        with open(log, "wb") as out:
            try:
                proc = subprocess.Popen([*prefix, *argv], cwd=copy, env=child_env, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            except FileNotFoundError:
                raise BootedError(f"command not found: {(prefix or argv)[0]}") from None
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _kill_group(proc.pid)
            if user is not None:
                _kill_user(user.pw_uid)
            proc.wait()
        output = log.read_bytes()[-_MAX_OUTPUT:].decode("utf-8", "replace")
        return SandboxResult(code, output, user.pw_name if user else "this user")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_user(uid: int) -> None:
    """Kill every process of the sandbox account (a test may have left one in a new session)."""
    for _ in range(20):
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}").st_uid == uid and localcmd.process_alive(int(entry)):
                        found.append(int(entry))
                except OSError:
                    continue
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
