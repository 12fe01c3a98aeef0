"""Service manifests (fabfile/services/manifest.py) and service repositories (fabfile/services/repo.py)."""
from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from gate import pack_and_test

from fabfile.core.errors import ConfigError, UsageError
from fabfile.services import manifest as services
from fabfile.services import repo as servicerepo
from fabfile.services.repo import RepoError

HELLO_DIR = Path(__file__).resolve().parent.parent / "service" / "hello"

GOOD_MANIFEST = """\
name: svc
port: 8000
health: /healthz
run: [python3, app.py]
test: [python3, -m, unittest, discover, -s, tests, -t, .]
"""


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTED_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("HELLO_REPO", raising=False)
    monkeypatch.delenv("SVC_REPO", raising=False)
    return tmp_path / "state"


def git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def write_service(root: Path, manifest: str, name: str = "svc", files: dict[str, str] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "service.yaml").write_text(textwrap.dedent(manifest))
    for rel, text in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(textwrap.dedent(text))
    return folder / "service.yaml"


# --------------------------------------------------------------------------- manifests
def test_discover_finds_hello():
    hello = services.discover()["hello"]
    assert (hello.name, hello.port, hello.health) == ("hello", 9999, "/healthz")
    assert hello.run_argv == ("python3", "app.py")
    assert hello.test_argv == ("python3", "-m", "unittest", "discover", "-s", "tests", "-t", ".")
    assert hello.versions == ("v1", "v2")
    assert hello.dir == HELLO_DIR
    assert hello.repo_env == "HELLO_REPO"
    assert "hello" in services.service_names()
    assert services.get("hello") == hello


def test_a_good_manifest_and_its_defaults(tmp_path):
    path = write_service(tmp_path, GOOD_MANIFEST)
    svc = services.load_manifest(path)
    assert (svc.name, svc.port, svc.env, svc.versions, svc.test_timeout_s) == ("svc", 8000, {}, ("v1",), 120.0)
    assert svc.repo_env == "SVC_REPO"
    assert list(services.discover(tmp_path)) == ["svc"]


@pytest.mark.parametrize("manifest, where, problem", [
    # missing key: the mapping's line
    ("name: svc\nhealth: /h\nrun: [a]\ntest: [b]\n", "1: port", "missing required key"),
    # unknown key: its own line
    (GOOD_MANIFEST + "colour: red\n", "6: colour", "unknown key (known: env, health, name, port, run, test, test_timeout_s)"),
    # wrong types
    (GOOD_MANIFEST.replace("port: 8000", "port: eighty"), "2: port", "must be an integer, not a string"),
    (GOOD_MANIFEST.replace("run: [python3, app.py]", "run: python3 app.py"), "4: run", "must be a list, not a string"),
    (GOOD_MANIFEST.replace("run: [python3, app.py]", "run: [python3, 3]"), "4: run", "item 1 must be a string (quote numbers), not an integer"),
    (GOOD_MANIFEST.replace("run: [python3, app.py]", "run: []"), "4: run", "must be a non-empty list of arguments"),
    (GOOD_MANIFEST + "test_timeout_s: soon\n", "6: test_timeout_s", "must be an integer or a number, not a string"),
    (GOOD_MANIFEST + "env: {PORT: 80}\n", "6: env.PORT", "must be a string (quote it), not an integer"),
    (GOOD_MANIFEST + "env: {1X: a}\n", "6: env.1X", "is not an environment variable name"),
    (GOOD_MANIFEST + "env: [a]\n", "6: env", "must be a mapping, not a list"),
    # wrong values
    (GOOD_MANIFEST.replace("port: 8000", "port: 70000"), "2: port", "must be a TCP port (1-65535)"),
    (GOOD_MANIFEST.replace("health: /healthz", "health: healthz"), "3: health", "must be a URL path like /healthz"),
    (GOOD_MANIFEST.replace("name: svc", "name: other"), "1: name", "is 'other', but the folder is 'svc' (they must match)"),
    (GOOD_MANIFEST.replace("name: svc", "name: Svc"), "1: name", "invalid service name 'Svc'"),
    # not a manifest at all
    (GOOD_MANIFEST + "port: 1\n", "6", "duplicate key 'port' (first at line 2)"),
    ("name: [unclosed\n", "2", "not valid YAML"),
    ("", "", "file is empty"),
    ("- a\n", "", "must be a mapping, not a list"),
])
def test_bad_manifests_are_one_line_errors_naming_file_line_and_key(tmp_path, manifest, where, problem):
    path = write_service(tmp_path, manifest)
    with pytest.raises(ConfigError) as err:
        services.discover(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    prefix = f"{path}:{where}" if where else str(path)
    assert message.startswith(prefix), message
    assert problem in message


@pytest.mark.parametrize("versions, line, problem", [
    ("v1\nv1\n", 2, "'v1' is listed twice"),
    ("# oldest first\nv1\n-rf\n", 3, "invalid version name '-rf'"),
    ("v1\nv2\n", 2, "'v2' needs history/v2.patch (what it changed)"),
    ("# nothing\n", None, "lists no version"),
])
def test_bad_history_versions_are_one_line_errors(tmp_path, versions, line, problem):
    path = write_service(tmp_path, GOOD_MANIFEST, files={"history/versions": versions})
    where = path.parent / "history" / "versions"
    with pytest.raises(ConfigError) as err:
        services.load_manifest(path)
    message = str(err.value)
    assert message.startswith(f"{where}:{line}: " if line else f"{where}: ") and problem in message
    assert "\n" not in message


def test_history_versions_with_their_patches(tmp_path):
    path = write_service(tmp_path, GOOD_MANIFEST, files={"history/versions": "v1\nv2  # json\n", "history/v2.patch": ""})
    assert services.load_manifest(path).versions == ("v1", "v2")


def test_names_lists_services_without_reading_manifests(tmp_path):
    write_service(tmp_path, "port: [broken", name="svc")
    (tmp_path / "not_a_service").mkdir()
    (tmp_path / "Bad-Name").mkdir()
    (tmp_path / "Bad-Name" / "service.yaml").write_text(GOOD_MANIFEST)
    assert services.service_names(tmp_path) == ["svc"]
    with pytest.raises(ConfigError):
        services.get("svc", tmp_path)


def test_get_unknown_service_names_the_known_ones(tmp_path):
    write_service(tmp_path, GOOD_MANIFEST)
    with pytest.raises(UsageError, match=r"^unknown service 'nope' \(known: svc\)$"):
        services.get("nope", tmp_path)
    with pytest.raises(UsageError, match="invalid service name"):
        services.get("../svc", tmp_path)


def test_repo_for_is_the_env_var_else_the_default_repo(state, monkeypatch):
    hello = services.get("hello")
    assert services.repo_for(hello) == str(state / "repos" / "hello.git")
    monkeypatch.setenv("HELLO_REPO", "https://git.example.test/hello.git")
    assert services.repo_for(hello) == "https://git.example.test/hello.git"
    assert not services.uses_default_repo(hello)


# --------------------------------------------------------------------------- the default hello repo
@pytest.fixture
def hello_copy(tmp_path):
    """A copy of service/hello to edit, and its Service."""
    root = tmp_path / "services"
    shutil.copytree(HELLO_DIR, root / "hello", ignore=shutil.ignore_patterns("__pycache__"))
    return services.get("hello", root)


def tags(repo: Path) -> dict[str, str]:
    lines = git("-C", str(repo), "for-each-ref", "--format=%(refname:short) %(objectname) %(*objectname)", "refs/tags")
    return {name: commit for name, _tag, commit in (line.split() for line in lines.splitlines())}


def test_ensure_local_repo_tags_v1_and_v2_idempotently(state):
    hello = services.get("hello")
    repo = servicerepo.ensure_local_repo(hello)
    assert repo == state / "repos" / "hello.git"
    first = tags(repo)
    assert set(first) == {"v1", "v2"}
    assert git("-C", str(repo), "rev-parse", "v2^") == first["v1"]      # v2 follows v1
    assert git("-C", str(repo), "log", "-1", "--format=%an <%ae> %aI", "v1") == "booted <booted@localhost> 2017-01-01T00:00:00+00:00"
    mark = (repo / servicerepo.SOURCE_MARK).stat()

    assert servicerepo.ensure_local_repo("hello") == repo               # a name works too
    assert (repo / servicerepo.SOURCE_MARK).stat().st_ino == mark.st_ino   # not rebuilt
    assert servicerepo.ensure_local_repo(hello, rebuild=True) == repo
    assert tags(repo) == first                                           # reproducible commits and tags
    assert [p.name for p in repo.parent.iterdir()] == ["hello.git"]     # no temp dirs left


def test_the_default_repo_follows_the_service_folder(hello_copy):
    repo = servicerepo.ensure_local_repo(hello_copy)
    before = tags(repo)
    with open(hello_copy.dir / "CHANGES.md", "a") as fh:
        fh.write("\nA note that is not in any patch.\n")
    servicerepo.ensure_local_repo(hello_copy)
    after = tags(repo)
    assert after["v2"] != before["v2"] and after["v1"] != before["v1"]
    assert "A note that is not in any patch." in git("-C", str(repo), "show", "v2:CHANGES.md")


def test_adding_a_version_with_history_patch_keeps_the_old_ones(hello_copy):
    repo = servicerepo.ensure_local_repo(hello_copy)
    before = tags(repo)
    app = hello_copy.dir / "app.py"
    app.write_text(app.read_text().replace('return "hello"', 'return "hello/3"'))
    patch = servicerepo.history_patch(hello_copy, "v2")
    assert '-        return "hello"\n+        return "hello/3"' in patch
    (hello_copy.dir / "history" / "v3.patch").write_text(patch)
    with open(hello_copy.dir / "history" / "versions", "a") as fh:
        fh.write("v3\n")
    servicerepo.ensure_local_repo(services.load_manifest(hello_copy.manifest))
    after = tags(repo)
    assert (after["v1"], after["v2"]) == (before["v1"], before["v2"])
    assert git("-C", str(repo), "rev-parse", "v3^") == after["v2"]
    assert 'return "hello/3"' in git("-C", str(repo), "show", "v3:app.py")


def test_a_stale_history_patch_is_a_one_line_error_and_leaves_no_repo(hello_copy, state):
    app = hello_copy.dir / "app.py"
    app.write_text(app.read_text().replace("import json\n", "import json  # edited\n"))
    with pytest.raises(RepoError) as err:
        servicerepo.ensure_local_repo(hello_copy)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{hello_copy.dir / 'history' / 'v2.patch'}: does not apply in reverse")
    assert list((state / "repos").iterdir()) == []


# --------------------------------------------------------------------------- pack and the test gate
def serve(tree: Path):
    """Start an unpacked hello tree (its own VERSION file), return (process, port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELLO_")}
    proc = subprocess.Popen([sys.executable, "app.py", "--port", "0", "--bind", "127.0.0.1"], cwd=tree,
                            env={**env, "PYTHONDONTWRITEBYTECODE": "1"}, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    return proc, int(line.split(" listening on ", 1)[1].split(",")[0].rsplit(":", 1)[1])


def post_json(port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/", body='{"name": "Ann"}', headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize("version, json_answer", [
    ("v1", (415, "unsupported Content-Type 'application/json': send name=NAME as a form")),
    ("v2", (200, "Hello Ann World!")),
])
def test_packed_versions_pass_their_tests_and_differ(tmp_path, version, json_answer):
    hello = services.get("hello")
    tarball = servicerepo.pack(hello, version, tmp_path / "out" / f"hello-{version}.tar.gz")
    assert tarball.is_file() and tarball.name == f"hello-{version}.tar.gz"
    tree = servicerepo.unpack(tarball, tmp_path / "tree")
    assert not (tree / "history").exists()
    ok, output = servicerepo.run_tests(hello, tree)
    assert ok, output
    assert output.splitlines()[-1] == "OK"
    assert not list(tree.rglob("__pycache__"))      # the manifest's env keeps the tree clean

    proc, port = serve(tree)
    try:
        assert get(port, "/version") == version      # VERSION filled in by git archive
        assert post_json(port) == json_answer
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        proc.stderr.close()


def test_pack_and_test_reports_commit_and_result(tmp_path):
    got = pack_and_test("hello", "v1", tmp_path)
    assert got.ok, got.output
    assert got.commit == servicerepo.resolve("hello", "v1")
    assert len(got.commit) == 40 and got.tarball.is_file()
    assert (servicerepo.unpack(got.tarball, tmp_path / "tree") / "app.py").is_file()


def test_unknown_version_is_a_one_line_error(state, tmp_path):
    with pytest.raises(RepoError) as err:
        servicerepo.pack("hello", "v9", tmp_path / "x.tar.gz")
    assert str(err.value) == f"version v9 not found in {state / 'repos' / 'hello.git'}"
    assert not (tmp_path / "x.tar.gz").exists()
    assert list(tmp_path.glob(".x.tar.gz*")) == []


@pytest.mark.parametrize("version", ["-v1", "v1..v2", "v1 v2", "", "v1;ls"])
def test_bad_version_names_never_reach_git(tmp_path, version):
    with pytest.raises(UsageError, match="invalid version name"):
        servicerepo.pack("hello", version, tmp_path / "x.tar.gz")


# --------------------------------------------------------------------------- any repository
TOY_APP = {
    "app.py": "print('toy')\n",
    "tests/__init__.py": "",
    "tests/test_toy.py": """\
        import unittest
        from pathlib import Path

        class Toy(unittest.TestCase):
            def test_marker(self):
                self.assertEqual(Path("marker").read_text().strip(), "good")
        """,
}


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A service 'svc' whose repo (a plain checkout) has a passing tag 'good' and a failing 'broken'."""
    manifest = write_service(tmp_path / "services", GOOD_MANIFEST + "test_timeout_s: 30\n")
    svc = services.load_manifest(manifest)
    work = tmp_path / "toy-repo"
    work.mkdir()
    for rel, text in {**TOY_APP, "marker": "good\n"}.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(textwrap.dedent(text))
    git("init", "--quiet", str(work))
    git("add", "-A", cwd=work)
    git("commit", "--quiet", "-m", "good", cwd=work)
    git("tag", "good", cwd=work)
    (work / "marker").write_text("bad\n")
    git("commit", "--quiet", "-am", "broken", cwd=work)
    git("tag", "broken", cwd=work)
    monkeypatch.setenv("SVC_REPO", str(work))
    return svc, work


def test_run_tests_detects_a_version_whose_tests_fail(toy, tmp_path):
    svc, work = toy
    good = pack_and_test(svc, "good", tmp_path / "g")
    assert good.ok, good.output
    broken = pack_and_test(svc, "broken", tmp_path / "b")
    assert not broken.ok
    assert "FAILED (failures=1)" in broken.output and "'bad' != 'good'" in broken.output
    assert broken.commit == git("rev-parse", "broken", cwd=work)


def test_a_commit_id_is_a_version(toy, tmp_path):
    svc, work = toy
    commit = git("rev-parse", "good", cwd=work)
    tree = servicerepo.unpack(servicerepo.pack(svc, commit[:12], tmp_path / "c.tar.gz"), tmp_path / "c")
    assert (tree / "marker").read_text() == "good\n"


def test_a_url_repo_is_mirrored_in_the_cache_and_fetched_again(toy, tmp_path, state, monkeypatch):
    svc, work = toy
    monkeypatch.setenv("SVC_REPO", work.as_uri())
    assert servicerepo.resolve(svc, "good") == git("rev-parse", "good", cwd=work)
    cached = list((state / "repos" / "cache").iterdir())
    assert [p.suffix for p in cached] == [".git"]
    # a version tagged after the first clone is found (fetched), and packs from the cache
    (work / "marker").write_text("good\n")
    git("commit", "--quiet", "-am", "fixed", cwd=work)
    git("tag", "fixed", cwd=work)
    tested = pack_and_test(svc, "fixed", tmp_path / "f")
    assert tested.ok, tested.output
    with pytest.raises(RepoError, match=rf"^version nope not found in {work.as_uri()}$"):
        servicerepo.resolve(svc, "nope")


def test_a_folder_that_is_not_a_repo_is_refused_even_inside_one(toy, monkeypatch):
    svc, work = toy
    (work / "tests").mkdir(exist_ok=True)
    monkeypatch.setenv("SVC_REPO", str(work / "tests"))   # inside the toy checkout
    with pytest.raises(RepoError, match=r"^SVC_REPO=.*/tests: not a git repository$"):
        servicerepo.resolve(svc, "good")
    monkeypatch.setenv("SVC_REPO", str(work / "missing"))
    with pytest.raises(RepoError, match=r"^SVC_REPO=.*/missing: no such directory$"):
        servicerepo.resolve(svc, "good")


def test_url_passwords_are_masked_in_errors(toy, monkeypatch):
    svc, _ = toy
    monkeypatch.setenv("SVC_REPO", "http://ann:s3cret@127.0.0.1:9/svc.git")
    with pytest.raises(RepoError) as err:
        servicerepo.resolve(svc, "good")
    assert "s3cret" not in str(err.value)
    assert str(err.value).startswith("cannot clone http://ann:***@127.0.0.1:9/svc.git: ")


def test_tests_that_hang_are_stopped_at_the_manifest_timeout(tmp_path):
    manifest = write_service(tmp_path, GOOD_MANIFEST.replace(
        "test: [python3, -m, unittest, discover, -s, tests, -t, .]",
        "test: [python3, -c, 'import time; time.sleep(30)']") + "test_timeout_s: 1\n")
    svc = services.load_manifest(manifest)
    started = time.monotonic()
    ok, output = servicerepo.run_tests(svc, tmp_path)
    assert not ok
    assert output == "svc tests: timed out after 1s: python3 -c import time; time.sleep(30)"
    assert time.monotonic() - started < 10


def _tar_with(path: Path, member: str) -> Path:
    """A release tarball holding app.py and one more member of the kind ``member`` names."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        good = tarfile.TarInfo("app.py")
        good.size = 6
        tar.addfile(good, io.BytesIO(b"print\n"))
        info = tarfile.TarInfo({"parent": "../evil", "absolute": "/tmp/evil"}.get(member, "extra"))
        if member in ("parent", "absolute", "setuid"):
            info.size, info.mode = 4, (0o4755 if member == "setuid" else 0o644)
            tar.addfile(info, io.BytesIO(b"evil"))
        elif member in ("symlink-out", "symlink-up", "symlink-in"):
            info.type = tarfile.SYMTYPE
            info.linkname = {"symlink-out": "/etc/passwd", "symlink-up": "../../etc", "symlink-in": "app.py"}[member]
            tar.addfile(info)
        elif member == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(info)
    return path


# Python before 3.11.4 (Debian 12's python3 is 3.11.2) has no tarfile extraction filters: unpack
# then makes the "data" filter's checks itself. Both ways must refuse and accept the same members.
@pytest.mark.parametrize("with_filter", [True, False], ids=["tarfile-filter", "own-checks"])
@pytest.mark.parametrize("member, accepted", [
    ("plain", True), ("symlink-in", True), ("setuid", True), ("absolute", True),
    ("parent", False), ("symlink-out", False), ("symlink-up", False), ("device", False),
])
def test_unpack_refuses_members_that_leave_the_release(tmp_path, monkeypatch, with_filter, member, accepted):
    import tarfile

    if not with_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile extraction filters")
    tarball = _tar_with(tmp_path / "rel.tar.gz", member)
    dest = tmp_path / "out"
    if accepted:
        servicerepo.unpack(tarball, dest)
        assert (dest / "app.py").read_bytes() == b"print\n"
        if member == "setuid":
            assert (dest / "extra").stat().st_mode & 0o7000 == 0
        if member == "absolute":
            assert (dest / "tmp" / "evil").exists()
    else:
        with pytest.raises(RepoError, match="cannot unpack"):
            servicerepo.unpack(tarball, dest)
        assert not (tmp_path / "evil").exists()
    assert not Path("/tmp/evil").exists()
