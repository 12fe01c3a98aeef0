"""The command line a new user expects (issue 15): TASK --help, exit 2 for every usage error, hosts-forget,
Python >= 3.11, bench scripts runnable as their README says."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.configs import environment, two_environments
from tests.vbox_fixtures import _forked_fab

ROOT = Path(__file__).resolve().parent.parent


def fab(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTED_")}
    env["BOOTED_STATE_DIR"] = str(tmp_path / "state")
    return _forked_fab(list(args), env, 60)


def task_names(tmp_path) -> list[str]:
    out = fab(tmp_path, "--list").stdout
    return [line.split()[0] for line in out.splitlines()
            if line.startswith("  ") and not line.startswith("   ") and line.strip()]


def test_every_task_has_help(tmp_path):
    names = task_names(tmp_path)
    assert "nginx-stop" in names and "image-build" in names and len(names) > 20
    for name in names:
        for flag in ("--help", "-h") if name == "image-build" else ("--help",):
            proc = fab(tmp_path, name, flag)
            assert proc.returncode == 0, (name, flag, proc.stderr)
            assert proc.stdout.startswith(f"Usage: fab [--core-opts] {name}"), (name, proc.stdout)
    proc = fab(tmp_path, "image-clone", "--image", "x", "--help")
    assert proc.returncode == 0 and "--name=STRING" in proc.stdout


@pytest.mark.parametrize("argv, line", [
    (["image-build"], "error: image-build needs --image NAME (see `fab --help image-build`)"),
    (["image-start"], "error: image-start needs --image NAME (see `fab --help image-start`)"),
    (["hosts-list", "extra"], "error: unexpected argument 'extra' (see `fab --help hosts-list`)"),
    (["image-start", "a", "b"], "error: unexpected argument 'b' (see `fab --help image-start`)"),
    (["hosts-list", "--bogus"], "error: unknown flag '--bogus' (see `fab --help hosts-list`)"),
    (["hosts-list", "--format"], "error: --format needs a value (see `fab --help hosts-list`)"),
    (["hosts-list", "--format", "xml"], "error: --format must be one of table, json, yaml, ansible, not 'xml'"),
    (["no-such-task"], "error: no task named 'no-such-task' (see `fab --list`)"),
    (["--help", "no-such-task"], "error: no task named 'no-such-task' (see `fab --list`)"),
    (["hosts-forget"], "error: --host ADDRESS is required"),
    (["hosts-forget", "--host", "foo bar"],
     "error: --host: invalid address 'foo bar': give a host's IPv4 or IPv6 address, as `fab hosts-list` shows it"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, argv, line):
    proc = fab(tmp_path, *argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == line
    assert proc.stdout == ""


def test_hosts_forget_removes_every_pin_of_the_address(tmp_path):
    known = tmp_path / "state" / "ssh" / "known_hosts"
    known.parent.mkdir(parents=True)
    ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ"
    import paramiko

    hashed = paramiko.HostKeys.hash_host("10.0.0.5")
    known.write_text(f"10.0.0.5 {ed}\n10.0.0.6 {ed}\n10.0.0.5 {rsa}\n[10.0.0.5]:2222 {ed}\n{hashed} {ed}\n")
    proc = fab(tmp_path, "hosts-forget", "--host", "10.0.0.5")
    assert (proc.returncode, proc.stdout.strip()) == (0, "forgot 4 pinned host keys of 10.0.0.5")
    assert known.read_text() == f"10.0.0.6 {ed}\n"
    proc = fab(tmp_path, "hosts-forget", "--host", "10.0.0.5")
    assert (proc.returncode, proc.stdout.strip()) == (0, "no pinned host key of 10.0.0.5 (nothing to forget)")


def test_python_311_and_newer_are_accepted():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    check = re.search(r"python3 -c '([^']+)'", (ROOT / "quickstart.sh").read_text()).group(1)
    for version, ok in (((3, 11, 2), 0), ((3, 12, 0), 0), ((3, 13, 1), 0), ((3, 10, 9), 1)):
        code = f"import sys; sys.version_info = {version!r}\n" + check.replace("import sys; ", "")
        assert subprocess.run(["python3", "-c", code]).returncode == ok, version


@pytest.mark.parametrize("script", ["bench/deploy_bench.py", "bench/deploy_scaling.py"])
def test_bench_scripts_run_with_plain_python3_as_the_readme_says(script, tmp_path):
    """`python3 bench/...` with no venv active and no venv bin on PATH: the script finds the project's venv."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.run(["python3", script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ") and "Traceback" not in proc.stderr
    probe = tmp_path / "probe.py"
    probe.write_text(f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import projectvenv; "
                     "projectvenv.use(); import shutil; print(shutil.which('fab'))\n")
    proc = subprocess.run(["python3", str(probe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == str(ROOT / ".venv" / "bin" / "fab"), proc.stderr


def test_image_list_skips_a_provider_not_installed_unless_asked_for_by_name(tmp_path):
    """After the quick start, VirtualBox is not installed: `image-list` lists what is there and says
    which providers it could not ask; naming that provider is an error that says why."""
    path = "/usr/sbin:/usr/bin:/sbin:/bin"
    assert shutil.which("VBoxManage", path=path) is None
    config = tmp_path / "environments.yaml"
    config.write_text(two_environments("virtualbox") + environment("box", "local", ["box1"], ["box1"]))
    env = {"PATH": f"{Path(sys.executable).parent}:{path}", "BOOTED_STATE_DIR": str(tmp_path / "state"),
           "BOOTED_CONFIG": str(config)}
    listed = _forked_fab(["image-list"], env, 60)
    assert listed.returncode == 0 and listed.stdout.strip() == "no images", listed
    assert listed.stderr.strip() == ("virtualbox: not installed or not running here, so not listed "
                                     "(`fab image-list --provider virtualbox` says why)"), listed.stderr
    named = _forked_fab(["image-list", "--provider", "virtualbox"], env, 60)
    assert named.returncode == 1 and named.stderr.strip().startswith("error: virtualbox: VBoxManage not found"), named
    assert len(named.stderr.strip().splitlines()) == 1
