"""Hostile hosts, hostile tags and other local users get nothing (issue 14).

One test (at least) per finding of the security review; each fails on the code before the fix.
Black-box where it can be: `fab` as a user runs it, a real second user (`runuser -u nobody`), a
real nginx with booted's own rendered config, a real git tag.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from configs import two_environments, use_config
from gate import pack_and_test

from fabfile.hosts import bootlog, callhome
from fabfile.hosts.bootlog import BootedLog
from fabfile.providers import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = two_environments("virtualbox", "test", "test-box")
MACS = {"prod-web1": "08:00:27:00:00:11", "prod-web3": "08:00:27:00:00:13", "test-box": "08:00:27:00:00:20"}


def fab(state: Path, config: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, BOOTED_STATE_DIR=str(state), BOOTED_CONFIG=str(config), **env)
    for key in ("BOOTED_LOG", "HELLO_REPO"):
        full.pop(key, None)
    full.update(env)
    fab_exe = shutil.which("fab") or str(Path(sys.executable).with_name("fab"))
    return subprocess.run([fab_exe, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def world(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # as an older booted (or a checkout) left it
    return (state, *use_config(tmp_path, monkeypatch, CONFIG, state))


def call_line(env, name, mac, addr, *, ts=None, key=None, msec=None) -> str:
    """A call home as nginx logs it, signed as booted-callhome signs it."""
    ts = str(int(time.time()) if ts is None else ts)
    key = key if key is not None else callhome.host_key(env, name)
    sig = callhome.signature(key, env, name, mac, addr, ts)
    query = urllib.parse.urlencode({"env": env, "name": name, "mac": mac, "addr": addr, "ts": ts, "sig": sig})
    msec = f"{time.time():.3f}" if msec is None else msec
    return f'booted1 {addr} {msec} "{query}"\n'


def inventory(state: Path) -> dict:
    path = state / "inventory.json"
    return json.loads(path.read_text())["hosts"] if path.exists() else {}


# --------------------------------------------------------------------------- 1: identity
def test_a_host_cannot_take_over_another_image_by_claiming_its_mac(world, tmp_path):
    """Finding 1: test-box's own key with prod-web1's MAC (and a recorded clone's MAC) stays test-box."""
    state, config, _ = world
    # booted made prod-web3 as a clone of prod-web1 and recorded the MAC it gave it
    (state / "virtualbox.json").write_text(json.dumps({"images": {"prod-web3": {
        "uuid": "u3", "clone_of": {"image": "prod-web1", "uuid": "u1", "snapshot": "booted-base"},
        "macs": [MACS["prod-web3"]]}}}))
    log = tmp_path / "booted.log"
    log.write_text(
        call_line("test", "test-box", MACS["prod-web1"], "192.168.56.50")
        + call_line("test", "test-box", MACS["prod-web3"], "192.168.56.51")
        + call_line("prod", "prod-web1", MACS["prod-web3"], "192.168.56.53")  # the real clone
    )
    result = fab(state, config, "hosts-logged", "--booted-log", str(log))
    assert result.returncode == 0, result.stderr
    hosts = inventory(state)
    assert "prod-web1" not in hosts, hosts
    assert (hosts["test-box"]["env"], hosts["test-box"]["roles"]) == ("test", ["loadbalancers", "workers"])
    assert (hosts["prod-web3"]["name"], hosts["prod-web3"]["env"], hosts["prod-web3"]["address"]) == \
        ("prod-web1", "prod", "192.168.56.53")


def test_a_clone_is_never_sent_a_key_without_its_recorded_mac(world, monkeypatch):
    """Finding 1: the rename (which sends the image's key) refuses a host booted did not make as that clone."""
    state, config, cfg = world
    from fabfile.core import ssh
    from fabfile.core.errors import BootedError
    from fabfile.flows import discovery
    from fabfile.hosts.inventory import HostEntry

    sent = []
    monkeypatch.setattr(ssh, "connect", lambda *a, **k: sent.append(a) or pytest.fail("connected to an unproven host"))
    entry = HostEntry("prod-web3", "prod-web1", "192.168.56.53", MACS["prod-web3"], "prod")
    with pytest.raises(BootedError, match="no record of prod-web3 as a clone of prod-web1"):
        discovery.rename_host(cfg, entry)
    assert sent == []


# --------------------------------------------------------------------------- 6: time window, replay, rebuild
def test_calls_outside_the_time_window_replays_and_old_keys_are_refused(world, tmp_path):
    state, config, cfg = world
    addr, mac = "192.168.56.60", MACS["prod-web1"]
    now = int(time.time())
    log = tmp_path / "booted.log"
    log.write_text(call_line("prod", "prod-web1", mac, addr, ts=0) + call_line("prod", "prod-web1", mac, addr, ts=999999999999))
    result = BootedLog(log, cfg, control=()).read_all()
    assert result.calls == [] and result.skipped[bootlog.TS_WINDOW] == 2

    # a genuine call, then the same call replayed later: recorded once, the replay refused
    genuine = call_line("prod", "prod-web1", mac, addr, ts=now)
    log.write_text(genuine)
    assert fab(state, config, "hosts-logged", "--booted-log", str(log)).returncode == 0
    replay = genuine.replace(f" {genuine.split()[2]} ", f" {time.time() + 5:.3f} ")
    with open(log, "a") as fh:
        fh.write(replay.replace(addr, "192.168.56.61").replace(f"booted1 {addr}", "booted1 192.168.56.61"))
    fab(state, config, "hosts-logged", "--booted-log", str(log))
    assert inventory(state)["prod-web1"]["address"] == addr

    # rebuilding an image changes its key: calls signed with the old one stop counting
    old_key = callhome.host_key("prod", "prod-web1")
    callhome.new_host_key("prod", "prod-web1")
    assert callhome.host_key("prod", "prod-web1") != old_key
    stale = call_line("prod", "prod-web1", mac, addr, key=old_key)
    assert bootlog.parse_line(stale, cfg) == bootlog.BAD_SIGNATURE


# --------------------------------------------------------------------------- 15: state dir and locks
def test_state_dir_is_private_and_a_held_lock_times_out_naming_its_holder(world, tmp_path):
    state, config, cfg = world
    (tmp_path / "booted.log").write_text("")
    assert fab(state, config, "hosts-logged", "--booted-log", str(tmp_path / "booted.log")).returncode == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    if os.geteuid() == 0 and shutil.which("runuser"):
        # another local user can neither read the secrets nor open (so hold) booted's locks
        other = subprocess.run(["runuser", "-u", "nobody", "--", "flock", "-n", str(state / "locks" / "bootlog.lock"),
                                "true"], capture_output=True, text=True, timeout=30)
        assert other.returncode != 0
        other = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(state / "secrets" / "prod.key")],
                               capture_output=True, text=True, timeout=30)
        assert other.returncode != 0 and "Permission denied" in other.stderr
    # a booted process holding the lock: the next one gives up with a message naming it
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; sys.argv = ['fab', 'hosts-logged']\n"
        "from fabfile.core.state import locked\n"
        "with locked('bootlog'):\n    print('held', flush=True); time.sleep(60)\n")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, BOOTED_STATE_DIR=str(state)))
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = fab(state, config, "hosts-logged", "--booted-log", str(tmp_path / "booted.log"),
                     BOOTED_LOCK_TIMEOUT_S="2")
        assert result.returncode == 1 and time.monotonic() - started < 30
        assert f"held by pid {holder.pid}: fab hosts-logged" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- 11: the operator's ssh config
def test_booted_ssh_ignores_the_operators_ssh_config(world, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_personal").write_text("not booted's key\n")
    (home / ".ssh" / "config").write_text(
        "Host *\n  ForwardAgent yes\n  Port 2222\n  User operator\n  IdentityFile ~/.ssh/id_personal\n"
        "  ProxyJump jump.example\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))
    from fabfile.core import ssh

    conn = ssh.connect("192.168.56.70", world[2])
    assert (conn.port, conn.forward_agent, conn.gateway, conn.user) == (22, False, None, "booted")
    assert conn.connect_kwargs["key_filename"] == [ssh.keypair(world[2])[0]]
    assert conn.connect_kwargs["allow_agent"] is False and conn.connect_kwargs["look_for_keys"] is False


# --------------------------------------------------------------------------- 2: the test gate
def _git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.strip()


SPY_TEST = '''\
import os, subprocess, sys, unittest
from pathlib import Path

class Spy(unittest.TestCase):
    def test_spy(self):
        state = Path(os.environ.get("SPY_STATE", "/nonexistent"))
        try:
            secrets = sorted(p.name for p in (state / "secrets").iterdir())
        except OSError as err:
            secrets = f"denied {type(err).__name__}"
        print("SPY uid", os.getuid(), "euid", os.geteuid(), file=sys.stderr)
        print("SPY pw", os.environ.get("BOOTED_PW"), "repo", os.environ.get("SPY_REPO"), file=sys.stderr)
        print("SPY secrets", secrets, file=sys.stderr)
        # a child in its own session that outlives the test, and one that would outlive the time limit
        subprocess.Popen(["sleep", "300"], start_new_session=True)
        subprocess.Popen(["sleep", "301"])
        if os.environ.get("SPY_HANG"):
            import time; time.sleep(300)
'''


@pytest.fixture
def spy_service(tmp_path, monkeypatch, world):
    """A service whose tag (a real git tag) holds tests that try to read booted's secrets."""
    state = world[0]
    folder = tmp_path / "services" / "spy"
    folder.mkdir(parents=True)
    (folder / "service.yaml").write_text(
        "name: spy\nport: 8000\nhealth: /healthz\nrun: [python3, app.py]\n"
        "test: [python3, -m, unittest, discover, -s, tests, -t, .]\ntest_timeout_s: 20\n"
        f"env: {{SPY_STATE: '{state}'}}\n")
    repo = tmp_path / "spy-repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "app.py").write_text("print('spy')\n")
    (repo / "tests" / "__init__.py").write_text("")
    (repo / "tests" / "test_spy.py").write_text(SPY_TEST)
    _git("init", "--quiet", str(repo))
    _git("add", "-A", cwd=repo)
    _git("commit", "--quiet", "-m", "spy", cwd=repo)
    _git("tag", "v9", cwd=repo)
    monkeypatch.setenv("SPY_REPO", str(repo))
    monkeypatch.setenv("BOOTED_PW", "root-password-123")
    from fabfile.services import manifest as services

    callhome.env_secret("prod")  # a secret exists to be stolen
    return services.load_manifest(folder / "service.yaml")


def _processes(pattern: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", pattern.encode()]:
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="the gate switches to an unprivileged account only as root")
def test_tag_code_runs_unprivileged_without_secrets_or_state(spy_service, tmp_path):
    """Finding 2: the tag's tests see no root, no BOOTED_PW, no repo URL, no state dir; nothing outlives them."""

    before = set(_processes("300") + _processes("301"))
    tested = pack_and_test(spy_service, "v9", tmp_path / "gate")
    assert tested.ok, tested.output
    spied = {line.split()[1]: line for line in tested.output.splitlines() if line.startswith("SPY ")}
    assert " 0" not in spied["uid"] and "euid 0" not in spied["uid"], spied["uid"]
    assert spied["pw"] == "SPY pw None repo None", spied["pw"]
    assert "denied PermissionError" in spied["secrets"], spied["secrets"]
    assert set(_processes("300") + _processes("301")) <= before


@pytest.mark.skipif(os.geteuid() != 0, reason="the gate switches to an unprivileged account only as root")
def test_the_test_time_limit_kills_the_whole_process_group(spy_service, tmp_path, monkeypatch):
    import dataclasses


    hanging = dataclasses.replace(spy_service, test_timeout_s=3.0, env={**spy_service.env, "SPY_HANG": "1"})
    before = set(_processes("300") + _processes("301"))
    started = time.monotonic()
    tested = pack_and_test(hanging, "v9", tmp_path / "gate")
    assert not tested.ok and "timed out after 3s" in tested.output
    assert time.monotonic() - started < 30
    assert set(_processes("300") + _processes("301")) <= before


@pytest.mark.skipif(os.geteuid() != 0, reason="the gate switches to an unprivileged account only as root")
def test_two_gates_at_once_both_run_to_the_end(tmp_path):
    """The sandbox account is the machine's and a gate ends by killing the account's processes: two
    booteds gating at once (each with its own state dir) must not kill each other's tests."""
    import threading

    from fabfile.services import sandbox

    tree = tmp_path / "tree"
    tree.mkdir()
    results: dict[int, sandbox.SandboxResult] = {}

    def gate(n: int, seconds: str) -> None:
        results[n] = sandbox.run(["sh", "-c", f"sleep {seconds}; echo gate {n} done"], tree, timeout=30)

    threads = [threading.Thread(target=gate, args=(n, s)) for n, s in ((1, "0.2"), (2, "1.5"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {n: (r.returncode, r.output.strip()) for n, r in results.items()} == \
        {1: (0, "gate 1 done"), 2: (0, "gate 2 done")}


# --------------------------------------------------------------------------- 13: repository credentials
def test_repo_credentials_never_reach_an_argv_or_the_cached_config(tmp_path, monkeypatch, world):
    """Finding 13: a password in HELLO_REPO reaches git only through a credential helper's environment."""
    import base64
    import http.server
    import threading

    state = world[0]
    bare = tmp_path / "served" / "svc.git"
    work = tmp_path / "svc-work"
    work.mkdir()
    (work / "app.py").write_text("print('svc')\n")
    _git("init", "--quiet", str(work))
    _git("add", "-A", cwd=work)
    _git("commit", "--quiet", "-m", "one", cwd=work)
    _git("tag", "v1", cwd=work)
    _git("clone", "--quiet", "--bare", str(work), str(bare))
    _git("update-server-info", cwd=bare)
    expected = "Basic " + base64.b64encode(b"ann:s3cret-pw").decode()
    root = str(tmp_path / "served")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=root, **k)

        def do_GET(self):
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="t"')
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # a git that records every argv and environment it is started with, then runs the real one
    spy = tmp_path / "bin"
    spy.mkdir()
    real_git = shutil.which("git")
    (spy / "git").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {tmp_path}/argv.log\n"
                             f"env >> {tmp_path}/env.log\nexec {real_git} \"$@\"\n")
    (spy / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{spy}:{os.environ['PATH']}")
    folder = tmp_path / "services" / "svc"
    folder.mkdir(parents=True)
    (folder / "service.yaml").write_text("name: svc\nport: 8000\nhealth: /h\nrun: [python3, app.py]\n"
                                         "test: [python3, -c, pass]\n")
    from fabfile.services import manifest as services
    from fabfile.services import repo as servicerepo

    svc = services.load_manifest(folder / "service.yaml")
    monkeypatch.setenv("SVC_REPO", f"http://ann:s3cret-pw@127.0.0.1:{server.server_address[1]}/svc.git")
    try:
        commit = servicerepo.resolve(svc, "v1")
        servicerepo.resolve(svc, "v1")  # a fetch, with the mirror already there
    finally:
        server.shutdown()
        server.server_close()
    assert commit == _git("rev-parse", "v1", cwd=work)
    assert "s3cret" not in (tmp_path / "argv.log").read_text()
    cached = list((state / "repos" / "cache").iterdir())
    assert "s3cret" not in (cached[0] / "config").read_text()
    assert stat.S_IMODE((state / "repos" / "cache").stat().st_mode) == 0o700
    # and no other child of booted is given the secret-bearing variables at all
    from fabfile.core import localcmd

    env_dump = localcmd.run(["env"]).stdout
    assert "s3cret" not in env_dump and "BOOTED_PW" not in env_dump


# --------------------------------------------------------------------------- 14: unit-file escaping
def _unit_exposure(unit_text: str, tmp_path: Path) -> dict[str, bool]:
    """What systemd itself reads from the unit: `systemd-analyze security --offline` (no PID 1 needed)."""
    unit = tmp_path / "booted-probe.service"
    unit.write_text(unit_text)
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--json=short", str(unit)],
                         capture_output=True, text=True, timeout=60)
    return {item["name"]: item["set"] for item in json.loads(out.stdout)}


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_manifest_values_cannot_inject_unit_lines(tmp_path):
    """Finding 14: an env value with a newline is refused with a located error; % and $ reach the
    service literally; the unit keeps running under a dynamic user whatever the manifest holds."""
    from fabfile.core.errors import ConfigError
    from fabfile.services import manifest as services
    from fabfile.services import release

    folder = tmp_path / "svc"
    folder.mkdir()
    manifest = folder / "service.yaml"
    base = "name: svc\nport: 8000\nhealth: /h\nrun: [python3, app.py]\ntest: [python3, -c, pass]\n"
    manifest.write_text(base + 'env: {GREETING: "hello\\nDynamicUser=no\\nUser=root\\nExecStartPre=/bin/sh -c id"}\n')
    with pytest.raises(ConfigError, match=r"service.yaml:\d+: env.GREETING: holds a control character"):
        services.load_manifest(manifest)
    manifest.write_text(base.replace("run: [python3, app.py]", 'run: ["python3", "app.py", "\\nUser=root"]'))
    with pytest.raises(ConfigError, match="run: item 2 holds a control character"):
        services.load_manifest(manifest)
    # a Service made some other way is still never written with a newline into the unit
    svc = services.Service("svc", folder, 8000, "/h", ("python3", "app.py"), ("true",),
                           env={"X": "a\nUser=root"})
    with pytest.raises(Exception, match="control character"):
        release.unit_text(svc)
    # specifiers and variables: the text the service sees is the text the manifest holds
    manifest.write_text(base.replace("run: [python3, app.py]", 'run: [python3, app.py, "100%", "$HOME", "a\\"b"]')
                        + 'env: {RATE: "50%n $USER \\\\ \\" end"}\n')
    unit = release.unit_text(services.load_manifest(manifest))
    assert 'ExecStart="python3" "app.py" "100%%" "$$HOME" "a\\"b"' in unit, unit
    assert 'Environment="RATE=50%%n $USER \\\\ \\" end"' in unit, unit
    assert _unit_exposure(unit, tmp_path)["User=/DynamicUser="] is True


# --------------------------------------------------------------------------- 10: concurrent deploys
DEPLOY_DRIVER = r'''
import subprocess, sys, os, concurrent.futures
script, tarball, pairs, stub = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
for where in ("/opt", "/etc/systemd/system"):
    subprocess.run(["mount", "-t", "tmpfs", "booted-test", where], check=True)
env = dict(os.environ, PATH=stub + ":" + os.environ["PATH"])
data = open(tarball, "rb").read()
def one(i):
    version = ("v1", "v2")[i % 2]
    proc = subprocess.run(["sh", "-c", script, "deploy", "hello", version, "c" + version, "[Unit]", "3"],
                          input=data, capture_output=True, env=env)
    return proc.returncode, proc.stderr.decode()
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    results = list(pool.map(one, range(2 * pairs)))
failed = [r for r in results if r[0] != 0]
leftovers = [n for n in os.listdir("/opt/booted/hello/releases") if n.startswith(".incoming.")]
print(len(failed), len(leftovers), os.readlink("/opt/booted/hello/current"), (failed[:1] or [(0, "")])[0][1].strip())
'''


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (mount namespace)")
def test_concurrent_deploys_to_one_host_all_succeed(tmp_path):
    """Finding 10: the real deploy script, 40 v1/v2 pairs at once on one host (a private mount
    namespace stands in for the host's /opt and /etc/systemd/system; systemctl is a no-op)."""
    import tarfile

    from fabfile.services import release

    src = tmp_path / "src"
    src.mkdir()
    (src / "app.py").write_text("print('hi')\n" * 100)
    tarball = tmp_path / "rel.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src, arcname=".")
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "systemctl").write_text("#!/bin/sh\nexit 0\n")
    (stub / "systemctl").chmod(0o755)
    # an interrupted deploy left an upload behind: the next deploy removes it
    driver = DEPLOY_DRIVER.replace('data = open(tarball, "rb").read()',
                                   'data = open(tarball, "rb").read()\n'
                                   'os.makedirs("/opt/booted/hello/releases/.incoming.left", exist_ok=True)')
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", driver,
                          release.DEPLOY_SCRIPT, str(tarball), "40", str(stub)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    failed, leftovers, current, first_error = out.stdout.split(" ", 3)
    assert (failed, leftovers) == ("0", "0"), out.stdout
    assert current in ("releases/v1", "releases/v2")


# --------------------------------------------------------------------------- 3, 5: VirtualBox
from tests.vbox_fixtures import vbox_lab, vbox_template  # noqa: E402,F401  (fixtures, used by name)


def test_nat_loopback_is_closed_after_the_install_and_on_clones(vbox_lab):
    """Finding 3: only the installer may reach this machine's 127.0.0.1 through NAT (for its kickstart)."""
    built = vbox_lab.fab("image-build", "--image", "lab-web2")
    assert built.returncode == 0, built.stderr
    assert vbox_lab.vm("lab-web2")["nics"]["1"].get("natlocalhostreachable") == "off"
    cloned = vbox_lab.fab("image-clone", "--image", "lab-web2", "--name", "lab-web3")
    assert cloned.returncode == 0, cloned.stderr
    assert vbox_lab.vm("lab-web3")["nics"]["1"].get("natlocalhostreachable") == "off"


def test_sigterm_during_image_build_removes_the_vm_and_the_kickstart(vbox_lab):
    """Finding 5: a SIGTERM (a CI job cancelled, `kill`) runs the same cleanup as a failed build."""
    env = {**vbox_lab.env, "VBOX_STANDIN_INSTALL_SECONDS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "fabric", "image-build", "--image", "lab-web2"], cwd=ROOT,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not ((vbox_lab.vm("lab-web2") or {}).get("state") == "running"):
            time.sleep(0.1)
        token = (vbox_lab.state / "kickstart" / "lab-web2.token").read_text().strip()
        assert (vbox_lab.vm("lab-web2") or {}).get("state") == "running"
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert vbox_lab.vm("lab-web2") is None
    assert not (vbox_lab.state / "tftp" / "lab-web2").exists()
    assert not (vbox_lab.state / "kickstart" / "lab-web2.token").exists()
    assert not any(Path(p).exists() for p in (f"/run/booted-ks-{d}/{token}.cfg" for d in ("*",))) and \
        not [p for p in Path("/run").glob(f"booted-ks-*/{token}.cfg")]


# --------------------------------------------------------------------------- 4, 8, 9: booted's nginx
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def endpoint(world, monkeypatch):
    """booted's own nginx, started by `fab restart-nginx` from the project's template, on a free port."""
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        pytest.skip("nginx is not installed")
    state, config, _ = world
    port = _free_port()
    config.write_text(f"settings: {{nginx: {{port: {port}}}}}\n" + CONFIG)
    started = fab(state, config, "restart-nginx")
    try:
        assert started.returncode == 0, started.stderr
        yield state, config, port
    finally:
        from fabfile.hosts import endpoint as nginxctl

        nginxctl.stop()


def _get(port: int, target: bytes, address: str = "127.0.0.1") -> int:
    with socket.create_connection((address, port), timeout=5) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.0\r\nHost: booted\r\n\r\n")
        head = sock.recv(64)
    return int(head.split()[1])


def test_nginx_listens_only_where_hosts_reach_it_and_caps_requests(endpoint):
    """Finding 8: not on 0.0.0.0; an 8 KB request of 0xff bytes, or junk, adds nothing to the booted
    log; a flood from one address is rate-limited."""
    from fabfile.hosts.bootlog import control_addresses

    state, config, port = endpoint
    others = [a for a in control_addresses() if ":" not in a and not a.startswith("127.")]
    for address in others:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()
    log = state / "nginx" / "booted.log"
    size = log.stat().st_size if log.exists() else 0
    assert _get(port, b"/booted/callhome?" + b"\xff" * 8192) != 200
    assert _get(port, b"/booted/callhome?x=%3Cscript%3E$(id)`;|" + b"\\" * 20) != 200
    assert _get(port, b"/booted/callhome?" + b"a" * 700) != 200
    assert (log.stat().st_size if log.exists() else 0) == size
    codes = [_get(port, b"/booted/callhome?env=prod&name=x") for _ in range(150)]
    assert codes.count(429) > 0 and codes.count(200) >= 20
    lines = log.read_text().splitlines()
    assert len(lines) == codes.count(200)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root and runuser (a second user)")
def test_a_kickstart_is_served_only_at_its_random_build_path(endpoint):
    """Finding 4: `curl http://127.0.0.1:PORT/ks/<image>.cfg` by any local user gets nothing; the file
    is not readable by another user; the random path stops working when the build ends."""
    state, config, port = endpoint
    from fabfile.providers.virtualbox import media

    cfg = load_config(config)
    media.kickstart_token("prod-web1", new=True)
    served = media.write_kickstart(cfg, cfg.env("prod"), "prod-web1")
    token = media.kickstart_token("prod-web1")
    try:
        other = subprocess.run(["runuser", "-u", "nobody", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{port}/ks/prod-web1.cfg"], capture_output=True, text=True, timeout=30)
        assert other.stdout != "200"
        assert _get(port, b"/ks/") != 200
        for path in (served, state / "kickstart" / "prod-web1.token"):
            read = subprocess.run(["runuser", "-u", "daemon", "--", "cat", str(path)], capture_output=True, timeout=30)
            assert read.returncode != 0
        assert _get(port, f"/ks/{token}.cfg".encode()) == 200  # what VirtualBox NAT fetches for the installer
    finally:
        media.unstage_install("prod-web1")
    assert _get(port, f"/ks/{token}.cfg".encode()) == 404


def test_restart_nginx_loses_no_call_home(endpoint):
    """Finding 9: calls arriving while `restart-nginx` rotates the log are all read (every answered
    call is one line, counted by hosts-logged or by restart-nginx's read of the old log)."""
    import re
    import threading

    state, config, port = endpoint
    answered, stop = [], threading.Event()

    def caller():
        while not stop.is_set():
            try:
                if _get(port, b"/booted/callhome?env=prod&name=loop") == 200:
                    answered.append(1)
            except OSError:
                pass
            time.sleep(0.03)

    read = 0
    thread = threading.Thread(target=caller)
    thread.start()
    try:
        for _ in range(4):
            time.sleep(0.4)
            out = fab(state, config, "restart-nginx")
            assert out.returncode == 0, out.stderr
            found = re.search(r"read the last (\d+) lines", out.stdout)
            read += int(found.group(1)) if found else 0
    finally:
        stop.set()
        thread.join()
    final = fab(state, config, "hosts-logged")
    read += int(re.search(r"read (\d+) lines", final.stdout).group(1))
    assert len(answered) > 20 and read == len(answered), (read, len(answered))
    rotated = list((state / "nginx").glob("booted.log.*"))
    assert 1 <= len(rotated) <= 5


# --------------------------------------------------------------------------- 12: re-keyed clones
def test_a_clone_must_present_its_sources_key_and_is_repinned_from_what_it_sent(world):
    """Finding 12: the first key of a clone's address is accepted only if it is the source's pinned
    key, and after re-keying the pins are the keys the host sent, never whatever answers next."""
    import paramiko

    from fabfile.core import ssh
    from fabfile.core.errors import HostError

    source_key, clone_new_key, stranger = (paramiko.Ed25519Key.from_private_key_file(str(p)) for p in _keys(world[0], 3))
    ssh.PinOnFirstUse().missing_host_key(None, "192.168.56.11", source_key)  # the source, pinned on first use
    with pytest.raises(HostError, match="unlike the one pinned for 192.168.56.11"):
        ssh.PinOnFirstUse(like="192.168.56.11").missing_host_key(None, "192.168.56.13", stranger)
    assert not ssh.pinned("192.168.56.13")
    ssh.PinOnFirstUse(like="192.168.56.11").missing_host_key(None, "192.168.56.13", source_key)
    sent = f"{clone_new_key.get_name()} {clone_new_key.get_base64()} root@clone\n"
    assert ssh.repin("192.168.56.13", sent) == 1
    with pytest.raises(HostError, match="does not match the one pinned"):
        ssh.PinOnFirstUse().missing_host_key(None, "192.168.56.13", source_key)
    ssh.PinOnFirstUse().missing_host_key(None, "192.168.56.13", clone_new_key)  # the re-keyed clone: accepted


def test_what_was_deployed_to_a_host_is_not_claimed_for_the_next_host_at_its_address(world):
    """The deployments record names the host by its pinned keys: after image-del and image-build at
    the same address (pins forgotten, new keys), booted does not wait for the old version to come
    back there (it never will) and hello-test expects no version. Restarting the same host keeps it."""
    import paramiko

    from fabfile.core import ssh
    from fabfile.services import release

    first, rebuilt = (paramiko.Ed25519Key.from_private_key_file(str(p)) for p in _keys(world[0], 2))
    release.record("192.168.56.20", "hello", "v0", "c0")  # deployed before any pin: names no host
    assert release.deployed_versions("hello") == {}
    ssh.pin("192.168.56.20", f"{first.get_name()} {first.get_base64()}")
    release.record("192.168.56.20", "hello", "v1", "c1")
    assert release.deployed_versions("hello") == {"192.168.56.20": "v1"}
    assert release.deployed_versions("other") == {}
    ssh.forget("192.168.56.20")  # the image was deleted
    assert release.deployed_versions("hello") == {}
    ssh.pin("192.168.56.20", f"{rebuilt.get_name()} {rebuilt.get_base64()}")  # built again, same address
    assert release.deployed_version("192.168.56.20", "hello") is None
    release.record("192.168.56.20", "hello", "v2", "c2")
    assert release.deployed_version("192.168.56.20", "hello") == "v2"


def _keys(state: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = state.parent / f"hostkey{i}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- lows
@pytest.mark.parametrize("content, message", [
    (b"environments:\n  prod:\x00\n", "not valid YAML"),
    (b"environments:\n  prod: \xff\xfe\n", "not UTF-8 text"),
    (CONFIG.replace("loadbalancers: [prod-lb1]", "loadbalancers: [[x]]").encode(), "must be an image name"),
    (b"providers: {local: {suite: '../..'}}\n" + CONFIG.encode(), "providers.local.suite: must be a Debian suite"),
], ids=["nul", "utf8", "nested-role", "suite-path"])
def test_bad_config_bytes_are_one_line_errors(world, content, message):
    state, config, _ = world
    config.write_bytes(content)
    result = fab(state, config, "hosts-list")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert str(config) in result.stderr


@pytest.mark.parametrize("name, content, message", [
    ("inventory.json", b"\xff\xfe", "not UTF-8"),
    ("inventory.json", json.dumps({"version": 1, "hosts": {"prod-web1": {
        "image": "prod-web1", "name": "prod-web1", "address": "1.2.3.4;}", "mac": "08:00:27:00:00:11", "env": "prod",
        "roles": [], "first_seen": 0, "last_seen": 0, "reachable": None, "checked_at": None,
        "hostname_ok": True}}}).encode(), "is not an IPv4 address"),
    ("ssh/known_hosts", b"\xff\xfe bad\n", "not a known_hosts file"),
    ("secrets/prod.key", b"", "is not an environment secret"),
    ("deployments.json", b"{not json", "is not valid JSON"),
], ids=["inventory-utf8", "inventory-address", "known-hosts", "empty-secret", "deployments"])
def test_damaged_state_files_are_one_line_errors(world, tmp_path, name, content, message):
    state, config, cfg = world
    path = state / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    from fabfile.core.errors import BootedError

    with pytest.raises(BootedError, match=message) as err:
        if name.startswith("inventory"):
            from fabfile.hosts.inventory import Inventory

            Inventory().load()
        elif name.startswith("ssh"):
            from fabfile.core import ssh

            ssh.pinned("10.0.0.1")
        elif name.startswith("secrets"):
            callhome.host_key("prod", "prod-web1")
        else:
            from fabfile.services import release

            release.deployed_version("10.0.0.1", "hello")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_booted_log_that_is_not_a_file_is_refused(world):
    state, config, _ = world
    result = fab(state, config, "hosts-logged", "--booted-log", "/dev/zero", timeout=30)
    assert result.returncode == 1 and "not a regular file" in result.stderr


def test_monitor_once_fails_when_it_observed_nothing(world):
    from fabfile.flows import monitor as monitord

    class Blind:
        def observe(self, should_stop):
            raise OSError("no route to the load balancer")

    cfg = load_config(world[1])
    env = cfg.env("prod")
    store = monitord.StateStore(env.name, env.workers)
    log = monitord.MonitorLog(env.name, monitord.state_path("monitor", "prod.log"), echo=lambda line: None)
    mon = monitord.Monitor(env, monitord.make_policy(env, store.load()), Blind(), store, log, monitord.Signals())
    try:
        assert mon.run(once=True) == 1
    finally:
        log.close()


# --------------------------------------------------------------------------- 7: forged lines
def test_forged_lines_never_touch_the_secret_files_per_line(world, monkeypatch):
    """Finding 7: wrongly signed lines with 5,000 distinct names read each environment's secret once,
    not once per name under a lock (the cost is measured by bench/forged_lines.py)."""
    state, config, cfg = world
    callhome.env_secret("prod")
    reads = []
    original = callhome.env_secret
    monkeypatch.setattr(callhome, "env_secret", lambda env: reads.append(env) or original(env))
    now = int(time.time())
    lines = [call_line("prod", f"forged-{i}", "02:00:00:00:00:01", f"10.99.{i // 250}.{1 + i % 250}",
                       ts=now, key="0" * 64).encode() for i in range(5000)]
    lines += [call_line("prod", "prod-web1", "02:00:00:00:00:01", "10.98.0.1", ts=now, key="0" * 64).encode()] * 100
    result = bootlog.parse_lines(lines, cfg, ())
    assert result.calls == [] and result.skipped == {bootlog.UNKNOWN_IMAGE: 5000, bootlog.BAD_SIGNATURE: 100}
    assert reads == ["prod"]


@pytest.mark.skipif(not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()), reason="nginx is not installed")
def test_nginx_config_paths_are_quoted_and_syntax_in_them_refused(tmp_path, monkeypatch):
    """Low: a state dir with a space works (nginx -t accepts the rendered config); a BOOTED_LOG that
    would inject a location (`;}`) is refused with one line."""
    from fabfile.core.errors import BootedError
    from fabfile.hosts import endpoint as nginxctl

    state = tmp_path / "my state"
    monkeypatch.setenv("BOOTED_STATE_DIR", str(state))
    config = tmp_path / "environments.yaml"
    config.write_text(CONFIG)
    cfg = load_config(config)
    candidate = nginxctl.prefix() / "candidate.conf"
    candidate.write_text(nginxctl.render(cfg))
    nginxctl.check(candidate)
    monkeypatch.setenv("BOOTED_LOG", str(tmp_path / "x.log booted; } location /etc/ { alias /etc/; } #"))
    with pytest.raises(BootedError, match="cannot go into booted's nginx config"):
        nginxctl.render(cfg)
