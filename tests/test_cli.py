"""The task package as a user meets it: `fab --list`, flags, names validated before anything runs."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("env-start-all env-start-min env-start-worker env-stop hello-deploy hello-start hello-stop hello-test "
         "hosts-clear hosts-filter hosts-list hosts-logged hosts-reset image-build image-clone image-del "
         "image-list image-start image-stop restart-nginx monitor").split()


def fab(*args, tmp_path, **env):
    full = dict(os.environ, BOOTED_STATE_DIR=str(tmp_path / "state"), **env)
    return subprocess.run(["fab", *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


def test_fab_list_shows_every_original_task_flat_and_dashed(tmp_path):
    proc = fab("--list", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = {}
    for line in proc.stdout.splitlines():
        parts = line.split(None, 1)
        if line.startswith("  ") and parts and not line.startswith("   ") and len(parts) == 2:
            listed[parts[0]] = parts[1]
    for name in TASKS:
        assert name in listed, f"{name} missing from fab --list"
        assert listed[name].strip(), f"{name} has no description"
    assert not [n for n in listed if "." in n or "_" in n]
    assert "hello-rollback" in listed


def test_no_task_is_a_stub():
    text = "".join(p.read_text() for p in (ROOT / "fabfile").rglob("*.py"))
    assert "NotAvailable" not in text and "NotImplementedError" not in text


@pytest.mark.parametrize("argv", [
    ["image-build", "--image", "bad name"],
    ["image-start", "../etc"],
    ["image-del", "--image", "x;reboot", "--yes"],
    ["image-clone", "--image", "dev-box", "--name", "$(id)"],
    ["env-start-worker", "--image", "-rf"],
])
def test_bad_image_names_are_refused_before_any_command(tmp_path, argv):
    proc = fab(*argv, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "invalid image name" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "state" / "virtualbox").exists()
    assert not (tmp_path / "state" / "local" / "hosts").exists()


def test_confirmations_need_yes_without_a_terminal(tmp_path):
    proc = fab("hosts-clear", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "pass --yes" in proc.stderr


def test_positional_image_argument_works(tmp_path):
    proc = fab("image-start", "not_declared", tmp_path=tmp_path)
    # an undeclared image no provider holds: one line saying so, after validating the name
    assert proc.returncode == 2
    assert "error: no provider holds an image 'not_declared'" in proc.stderr


def test_hosts_list_formats_on_an_empty_inventory(tmp_path):
    for fmt in ("json", "yaml", "ansible"):
        proc = fab("hosts-list", "--format", fmt, tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr
    proc = fab("hosts-list", "--format", "xml", tmp_path=tmp_path)
    assert proc.returncode == 2 and "--format must be one of" in proc.stderr
