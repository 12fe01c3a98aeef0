"""booted's `fab` (fabfile/program.py): the venv's `fab` is booted's, runs every task and flag as
fabric's own program does, and imports no paramiko unless the command line or a task needs SSH."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fabfile
from fabfile import program

ROOT = Path(__file__).resolve().parent.parent
FAB = Path(sys.executable).with_name("fab")
# fabric's own entry point (what `fab` was before booted had its own), run the same way
FABRIC_FAB = ("import sys; from fabric.main import program; sys.argv[0] = 'fab'; sys.exit(program.run())")
TASKS = set(fabfile.ns.task_names)


@pytest.mark.parametrize("argv, fabric", [
    ([], False),
    (["--list"], False),
    (["-l"], False),
    (["hosts-list"], False),
    (["hosts-list", "--format", "json", "--env", "dev"], False),
    (["hosts-list", "--help"], False),
    (["hosts-list", "-h"], False),
    (["-e", "-d", "hosts-list"], False),
    (["--no-dedupe", "-c", "fabfile", "-r", ".", "--list"], False),
    (["-H", "web1", "hosts-list"], True),
    (["-Hweb1", "hosts-list"], True),
    (["--hosts=web1", "hosts-list"], True),
    (["hosts-list", "--hosts", "web1"], True),  # wherever it is: errs towards fabric
    (["-i", "key", "--list"], True),
    (["-S", "cfg", "--list"], True),
    (["-t", "5", "--list"], True),
    (["--connect-timeout=5", "--list"], True),
    (["--list-agent-keys"], True),
    (["--prompt-for-login-password", "--list"], True),
    (["--prompt-for-passphrase", "--list"], True),
    (["--version"], True),
    (["-V"], True),
    (["--help"], True),
    (["-h"], True),
    (["--complete", "--", "fab", "ho"], True),
    (["--print-completion-script", "bash"], True),
    (["--", "uname"], True),
])
def test_which_command_lines_need_fabrics_program(argv, fabric):
    assert program.needs_fabric(argv, TASKS) is fabric


def run(argv_prefix, args, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTED_")}
    env.update(BOOTED_STATE_DIR=str(tmp_path / "state"), PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.run([*argv_prefix, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    stderr = "".join(line + "\n" for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    return proc.returncode, proc.stdout, stderr, imported


def test_the_venvs_fab_is_booteds():
    assert "from fabfile.program import main" in FAB.read_text()


@pytest.mark.parametrize("args", [
    ["--list"],
    ["hosts-list"],
    ["hosts-list", "--format", "json"],
    ["hosts-list", "--help"],
    ["image-clone", "--image", "x", "--help"],
    ["hosts-list", "--bogus"],
    ["hosts-list", "--format", "xml"],
    ["no-such-task"],
    ["--list", "--list-format", "json"],
    ["-d", "--list"],
])
def test_without_fabrics_flags_it_answers_as_fabric_did_without_paramiko(args, tmp_path):
    code, out, err, imported = run([str(FAB)], args, tmp_path)
    want = run([sys.executable, "-c", FABRIC_FAB], args, tmp_path)
    if args[0] == "-d":  # debug lines name the program's classes; compare the task list only
        assert code == want[0] == 0 and out == want[1]
    else:
        assert (code, out, err) == want[:3]
    assert "paramiko" not in imported and "fabric" not in imported


@pytest.mark.parametrize("args, expect", [
    (["--version"], "Paramiko "),
    (["--help"], "--hosts=STRING"),
    (["-H", "127.0.0.1", "--list"], "hosts-list"),
    (["--list-agent-keys"], ""),
])
def test_fabrics_flags_run_fabrics_program(args, expect, tmp_path):
    code, out, err, imported = run([str(FAB)], args, tmp_path)
    want = run([sys.executable, "-c", FABRIC_FAB], args, tmp_path)
    assert (code, out, err) == want[:3]
    assert code == 0 and expect in out and "paramiko" in imported


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """`fab --list | head -0`: the reader is gone before fab writes (closed before fab starts, so
    the test does not race fab's start-up): exit 1, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTED_")}
    env["BOOTED_STATE_DIR"] = str(tmp_path / "state")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.Popen([str(FAB), "--list"], cwd=ROOT, env=env, stdout=write_end, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
    finally:
        os.close(write_end)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("argv", [["--list"], ["--help"], ["hosts-list"]])
def test_a_reader_that_leaves_midway_gets_no_traceback(tmp_path, argv):
    """`fab --list | head -1`: whenever the reader leaves, fab ends with 0 (all was written) or 1,
    never with Python's "Exception ignored ... BrokenPipeError" and exit 120."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTED_")}
    env["BOOTED_STATE_DIR"] = str(tmp_path / "state")
    proc = subprocess.Popen([str(FAB), *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1) and "Traceback" not in err and "BrokenPipe" not in err, err


def test_output_left_for_the_exit_is_flushed_where_a_gone_reader_is_caught(monkeypatch):
    """invoke leaves --list and --help through sys.exit with output still buffered; a reader that
    left by then must cost exit 1, not the interpreter's "Exception ignored" and exit 120."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(write_end, "w")), line_buffering=False)

    class Program:
        def run(self, argv):
            sys.stdout.write("Available tasks:")  # buffered, not yet written
            sys.exit(0)

    monkeypatch.setattr(program, "make_program", lambda argv: Program())
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        with pytest.raises(SystemExit) as ended:
            program.main()
        assert ended.value.code == 1
    finally:
        stdout.close()  # the write end now points at /dev/null: closes cleanly
