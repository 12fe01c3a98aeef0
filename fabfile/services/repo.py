"""Where a service's code comes from: a git repository, and versions packed from it as tarballs.

``<NAME>_REPO`` (e.g. HELLO_REPO) names the repository: a local path (archived directly) or a URL
(https://, ssh://, git://, file://, or scp-like host:path; mirrored into state/repos/cache/<hash>.git
and fetched before each use, since ``git archive --remote`` does not work over http). A version is
a tag, branch or commit.

Without ``<NAME>_REPO``, booted builds a local bare repo at state/repos/<name>.git from the service
folder: one commit and annotated tag per version in ``history/versions`` (hello: v1, v2). The
folder is the last version; ``history/<version>.patch`` is what that version changed, applied in
reverse to get the one before (history/ itself is not part of any version). Author, committer and dates are fixed, so the same folder always gives the same commits.
The repo is rebuilt (atomically) when the folder changes.

The deploy gate: ``pack`` a version, ``unpack`` it, ``run_tests`` on the unpacked tree
(``test_packed`` unpacks and tests a packed release).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from fabfile.core import localcmd, names
from fabfile.core.errors import BootedError, CommandError
from fabfile.core.output import progress
from fabfile.core.state import locked, state_path
from fabfile.services import manifest as services
from fabfile.services import sandbox
from fabfile.services.manifest import Service, default_repo, repo_for, uses_default_repo

IDENTITY = ["-c", "user.name=booted", "-c", "user.email=booted@localhost"]
FIRST_DATE = 1483228800            # 2017-01-01T00:00:00Z, the original's year; each version a day later
BUILD_FORMAT = "1"                 # bump when the way the default repo is built changes
SOURCE_MARK = "booted-source"      # file inside the built bare repo: fingerprint of what it was built from
URL_SCHEMES = ("https", "http", "ssh", "git", "file", "git+ssh", "ssh+git")
_SCP_LIKE = re.compile(r"(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9._-]+:(?!:)")
_SKIP = {"__pycache__", ".pytest_cache", ".git", ".mypy_cache"}

FETCH_TIMEOUT_S = 300
GIT_TIMEOUT_S = 120
ACCEPT_NEW_HOSTKEY_ENV = "BOOTED_GIT_ACCEPT_NEW_HOSTKEY"


class RepoError(BootedError):
    """A service repository or version problem; the message is one line."""


def _service(service: Service | str) -> Service:
    """Functions here take a Service or a service name."""
    return service if isinstance(service, Service) else services.get(service)


# --------------------------------------------------------------------------- git
def _git(args: list[str], *, timeout: float = GIT_TIMEOUT_S, env: dict | None = None, cwd=None,
         check: bool = True, isolated: bool = False) -> localcmd.CommandResult:
    """Run git; ``isolated`` ignores the user's and system git config (for reproducible builds)."""
    # Never wait for a person: no credential prompt (GIT_TERMINAL_PROMPT), and ssh asks nothing either
    # (BatchMode) and refuses an unknown host key (StrictHostKeyChecking=yes) unless BOOTED_GIT_ACCEPT_NEW_HOSTKEY
    # says to pin it on first contact (accept-new). Its own process group cannot reach the terminal anyway.
    checking = "accept-new" if os.environ.get(ACCEPT_NEW_HOSTKEY_ENV) == "1" else "yes"
    full_env = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C",
                "GIT_SSH_COMMAND": f"ssh -o BatchMode=yes -o StrictHostKeyChecking={checking}"}
    if isolated:
        full_env.update({"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull})
    full_env.update(env or {})
    try:
        return localcmd.run(["git", *args], check=check, env=full_env, timeout=timeout, cwd=cwd)
    except CommandError as err:
        if err.result is None:   # git missing or timed out
            raise RepoError(str(err)) from None
        raise


# git's closing advice after a failed fetch says nothing about why; the lines before it do.
_GIT_BOILERPLATE = ("Cloning into", "Please make sure you have the correct access rights", "and the repository exists")


def _last_line(result: localcmd.CommandResult) -> str:
    """Why git failed, in one line: its own last lines without the generic advice (ssh's reason and the
    ``fatal:`` line), plus how to accept a new ssh host key when that is the reason."""
    lines = [ln.strip() for ln in (result.stderr.strip() or result.stdout.strip()).splitlines()]
    said = [ln for ln in lines if ln and not ln.startswith(_GIT_BOILERPLATE)]
    text = "; ".join(said[-2:]) if said else f"exit {result.returncode}"
    if "Host key verification failed" in text:
        text += (f" (the server's ssh host key is not in your known_hosts: add it with ssh-keyscan, or set "
                 f"{ACCEPT_NEW_HOSTKEY_ENV}=1 to pin it on first contact)")
    return text


def _repo_git(gitdir: Path) -> list[str]:
    return ["-C", str(gitdir)]


# --------------------------------------------------------------------------- the default local repo
def source_files(service: Service) -> list[Path]:
    """The files of the service folder that go into its repo (relative paths, sorted)."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(service.dir):
        rel_dir = Path(dirpath).relative_to(service.dir)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP and not (rel_dir == Path(".") and d == "history"))
        out.extend(rel_dir / f for f in filenames if not f.endswith((".pyc", ".pyo")))
    return sorted(out)


def fingerprint(service: Service) -> str:
    """Changes whenever anything the default repo is built from changes."""
    h = hashlib.sha256(f"format {BUILD_FORMAT}\nversions {' '.join(service.versions)}\n".encode())
    paths = [service.dir / p for p in source_files(service)]
    paths += [service.dir / "history" / f"{v}.patch" for v in service.versions[1:]]
    for path in paths:
        rel = path.relative_to(service.dir)
        executable = path.lstat().st_mode & stat.S_IXUSR
        data = path.read_bytes() if not path.is_symlink() else os.readlink(path).encode()
        h.update(f"{rel}\0{'x' if executable else '-'}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def ensure_local_repo(service: Service | str, *, rebuild: bool = False) -> Path:
    """The default bare repo state/repos/<name>.git, built from the service folder if missing or stale.

    Idempotent: an up-to-date repo is left alone. A new one is built in a temporary directory and
    renamed into place, so readers never see half a repo.
    """
    service = _service(service)
    with locked(f"repo-{service.name}"):
        return _ensure_local_repo(service, rebuild)


def _ensure_local_repo(service: Service, rebuild: bool) -> Path:
    dest = default_repo(service)
    want = fingerprint(service)
    mark = dest / SOURCE_MARK
    if not rebuild and mark.is_file() and mark.read_text().strip() == want:
        return dest
    progress(f"building {dest} from {service.dir} ({', '.join(service.versions)})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        built = _build(service, tmp)
        (built / SOURCE_MARK).write_text(want + "\n")
        if dest.exists():
            os.rename(dest, tmp / "old")
        os.rename(built, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _copy_source(service: Service, work: Path) -> None:
    work.mkdir()
    for rel in source_files(service):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(service.dir / rel, work / rel, follow_symlinks=False)


def _build(service: Service, tmp: Path) -> Path:
    bare, work, index = tmp / "repo.git", tmp / "work", tmp / "index"
    _git(["-c", "init.defaultBranch=main", "init", "--quiet", "--bare", str(bare)], isolated=True)
    _copy_source(service, work)
    in_repo = ["--git-dir", str(bare), "--work-tree", str(work), *IDENTITY]
    env = {"GIT_INDEX_FILE": str(index)}

    # newest first: the folder is the last version; each patch, reversed, gives the one before
    trees: dict[int, str] = {}
    for i in reversed(range(len(service.versions))):
        _git([*in_repo, "add", "--all", "."], cwd=work, env=env, isolated=True)
        trees[i] = _git([*in_repo, "write-tree"], cwd=work, env=env, isolated=True).stdout.strip()
        if i:
            patch = service.dir / "history" / f"{service.versions[i]}.patch"
            applied = _git([*in_repo, "apply", "--reverse", str(patch)], cwd=work, env=env,
                           isolated=True, check=False)
            if not applied.ok:
                raise RepoError(
                    f"{patch}: does not apply in reverse to {service.dir} any more "
                    f"(regenerate it: the {service.versions[i - 1]} -> {service.versions[i]} diff; see its header): "
                    f"{_last_line(applied)}"
                )

    parent: str | None = None
    for i, version in enumerate(service.versions):
        date = f"@{FIRST_DATE + i * 86400} +0000"
        dated = {**env, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
        message = f"{service.name} {version}"
        args = [*in_repo, "commit-tree", trees[i], "-m", message] + (["-p", parent] if parent else [])
        parent = _git(args, cwd=work, env=dated, isolated=True).stdout.strip()
        _git([*in_repo, "tag", "--annotate", "--message", message, version, parent], cwd=work, env=dated, isolated=True)
    if parent is None:
        raise RepoError(f"{service.dir}: service.yaml declares no versions")
    _git(["--git-dir", str(bare), "update-ref", "refs/heads/main", parent], isolated=True)
    _git(["--git-dir", str(bare), "symbolic-ref", "HEAD", "refs/heads/main"], isolated=True)
    return bare


def history_patch(service: Service | str, base: str) -> str:
    """The diff from ``base`` in the existing default repo to the service folder as it is now.

    For adding a version: edit the folder, save this as history/<new>.patch, append <new> to
    history/versions; the next build keeps ``base`` as it was and tags the folder as <new>.
    """
    service = _service(service)
    names.check("version", base, "version")
    repo = default_repo(service)
    with locked(f"repo-{service.name}"):
        if not (repo / "HEAD").is_file():
            raise RepoError(f"{repo} does not exist yet: build it before editing {service.dir}")
        commit = _commit(repo, base, str(repo))
        with tempfile.TemporaryDirectory(prefix="booted-history-") as tmp:
            work = Path(tmp) / "work"
            _copy_source(service, work)
            in_repo = ["--git-dir", str(repo), "--work-tree", str(work)]
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            _git([*in_repo, "add", "--all", "."], cwd=work, env=env, isolated=True)
            tree = _git([*in_repo, "write-tree"], cwd=work, env=env, isolated=True).stdout.strip()
            return _git([*in_repo, "diff", "--binary", commit, tree], cwd=work, env=env, isolated=True).stdout


# --------------------------------------------------------------------------- any repo
def is_url(repo: str) -> bool:
    """A URL or scp-like address (cloned into the cache), as opposed to a local path."""
    if "://" in repo:
        return True
    if Path(repo).expanduser().exists():
        return False
    return bool(_SCP_LIKE.match(repo))


def display(repo: str) -> str:
    """``repo`` as safe to print: a password in a URL is masked."""
    if "://" not in repo:
        return repo
    parts = urlsplit(repo)
    if parts.password is None:
        return repo
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def cache_dir(url: str) -> Path:
    return state_path("repos", "cache", hashlib.sha256(url.encode()).hexdigest()[:16] + ".git")


# git asks this helper for credentials; the helper prints them from its environment, which only that
# git child gets. So a password in a repository URL never appears in an argv (`ps` shows those to
# every user) or in the mirror's config. Fixed text: no data is ever put into it.
_CREDENTIAL_HELPER = ('!f() { test "$1" = get && printf "username=%s\\npassword=%s\\n" '
                      '"$BOOTED_GIT_USERNAME" "$BOOTED_GIT_PASSWORD"; }; f')


def _split_credentials(url: str) -> tuple[str, list[str], dict[str, str]]:
    """(url without its password, git options, environment) to reach ``url`` with its credentials."""
    if "://" not in url:
        return url, [], {}
    parts = urlsplit(url)
    if parts.password is None:
        return url, [], {}
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host += f":{parts.port}"
    clean = urlunsplit(parts._replace(netloc=host))
    options = ["-c", "credential.helper=", "-c", f"credential.helper={_CREDENTIAL_HELPER}"]
    return clean, options, {"BOOTED_GIT_USERNAME": unquote(parts.username or ""),
                            "BOOTED_GIT_PASSWORD": unquote(parts.password)}


def _mirror(service: Service, url: str) -> Path:
    """A bare mirror of ``url`` under state/repos/cache, fetched now. Call with the cache lock held."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "ssh"
    if scheme not in URL_SCHEMES:
        raise RepoError(f"{service.repo_env}={display(url)}: unsupported URL scheme {scheme!r} "
                        f"(use {', '.join(URL_SCHEMES[:5])} or host:path)")
    cache = cache_dir(url)
    os.chmod(cache.parent, 0o700)
    clean, options, secret_env = _split_credentials(url)
    if (cache / "HEAD").is_file():
        progress(f"fetching {display(url)}")
        fetched = _git([*options, *_repo_git(cache), "fetch", "--quiet", "--prune", "--tags", "origin"],
                       timeout=FETCH_TIMEOUT_S, check=False, env=secret_env)
        if not fetched.ok:
            raise RepoError(f"cannot fetch {display(url)}: {_last_line(fetched)}")
        return cache
    progress(f"cloning {display(url)} into {cache}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        cloned = _git([*options, "clone", "--quiet", "--mirror", "--", clean, str(tmp / "mirror.git")],
                      timeout=FETCH_TIMEOUT_S, check=False, env=secret_env)
        if not cloned.ok:
            raise RepoError(f"cannot clone {display(url)}: {_last_line(cloned)}")
        os.rename(tmp / "mirror.git", cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _local(service: Service, repo: str) -> Path:
    path = Path(repo).expanduser().resolve()
    if not path.is_dir():
        raise RepoError(f"{service.repo_env}={repo}: no such directory")
    # a plain folder inside some other checkout must not be read as that checkout
    toplevel = _git(["-C", str(path), "rev-parse", "--absolute-git-dir"], check=False,
                    env={"GIT_CEILING_DIRECTORIES": str(path.parent)})
    if not toplevel.ok:
        raise RepoError(f"{service.repo_env}={repo}: not a git repository")
    return path


def _commit(gitdir: Path, version: str, shown: str) -> str:
    found = _git([*_repo_git(gitdir), "rev-parse", "--verify", "--quiet", f"{version}^{{commit}}"], check=False)
    if found.returncode == 1:
        raise RepoError(f"version {version} not found in {shown}")
    if not found.ok:
        raise RepoError(f"cannot read {shown}: {_last_line(found)}")
    return found.stdout.strip()


def _with_repo(service: Service, version: str, action):
    """Call ``action(gitdir, commit)`` with the service's repo ready and ``version`` resolved."""
    names.check("version", version, "version")
    repo = repo_for(service)
    if uses_default_repo(service):
        with locked(f"repo-{service.name}"):
            gitdir = _ensure_local_repo(service, rebuild=False)
            return action(gitdir, _commit(gitdir, version, repo))
    if is_url(repo):
        with locked(f"repo-cache-{cache_dir(repo).stem}", timeout=FETCH_TIMEOUT_S + 60):  # another fetch
            gitdir = _mirror(service, repo)
            return action(gitdir, _commit(gitdir, version, display(repo)))
    gitdir = _local(service, repo)
    return action(gitdir, _commit(gitdir, version, repo))


def resolve(service: Service | str, version: str) -> str:
    """The commit id ``version`` names in the service's repo (one-line error if there is none)."""
    return _with_repo(_service(service), version, lambda gitdir, commit: commit)


def pack(service: Service | str, version: str, dest_tar: str | os.PathLike) -> Path:
    """``git archive`` of ``version`` as a .tar.gz at ``dest_tar`` (written atomically)."""
    return _pack(_service(service), version, dest_tar)[0]


def _pack(service: Service, version: str, dest_tar: str | os.PathLike) -> tuple[Path, str]:
    dest = Path(dest_tar).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)

    def archive(gitdir: Path, commit: str) -> tuple[Path, str]:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        try:
            made = _git([*_repo_git(gitdir), "archive", "--format=tar.gz", "-o", tmp, commit], check=False)
            if not made.ok:
                raise RepoError(f"cannot archive {version} ({commit[:12]}): {_last_line(made)}")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest, commit

    return _with_repo(service, version, archive)


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """What the "data" filter lets through: regular files, directories and links that stay inside
    the destination; anything else is an error naming the member."""
    members = []
    for member in tar.getmembers():
        member.name = member.name.lstrip("/")  # as the filter: an absolute name lands inside
        bad = (".." in Path(member.name).parts
               or not (member.isfile() or member.isdir() or member.issym() or member.islnk())
               or ((member.issym() or member.islnk())
                   and (member.linkname.startswith("/") or ".." in Path(member.linkname).parts)))
        if bad:
            raise tarfile.TarError(f"refusing member {member.name!r}")
        member.mode &= 0o755  # no set-id bits, as the data filter
        members.append(member)
    return members


def unpack(tarball: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Extract a packed version into ``dest_dir`` (refusing absolute paths, '..' and devices)."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python before 3.11.4 (Debian 12's 3.11.2) has no extraction filters: the same checks here
                tar.extractall(dest, members=_safe_members(tar))
    except (tarfile.TarError, OSError) as err:
        raise RepoError(f"cannot unpack {tarball}: {err}") from None
    return dest


def run_tests(service: Service | str, tree_dir: str | os.PathLike) -> tuple[bool, str]:
    """Run the manifest's test argv on an unpacked tree, unprivileged (sandbox.py): (passed, output)."""
    service = _service(service)
    tree = Path(tree_dir)
    if not tree.is_dir():
        raise RepoError(f"{tree}: no such directory to test")
    try:
        result = sandbox.run(service.test_argv, tree, timeout=service.test_timeout_s, env=service.env)
    except BootedError as err:   # the test command does not exist
        return False, f"{service.name} tests: {err}"
    if result.returncode is None:
        return False, (f"{service.name} tests: timed out after {service.test_timeout_s:g}s: "
                       f"{' '.join(service.test_argv[:3])}")
    output = result.output.strip()
    if result.returncode < 0:   # cut off mid-run: say so, the output alone ends in a row of dots
        output += f"\n{service.name} tests: killed by signal {-result.returncode} before they finished"
    return result.ok, output


def test_packed(service: Service | str, tarball: str | os.PathLike) -> tuple[bool, str]:
    """The deploy gate on a packed release: unpack it into a private temporary folder and run the
    service's tests there (``run_tests``): (passed, output)."""
    with tempfile.TemporaryDirectory(prefix="booted-gate-") as tmp:
        return run_tests(service, unpack(tarball, tmp))
