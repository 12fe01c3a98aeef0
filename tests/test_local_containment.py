"""Local hosts are contained machines: each runs in cgroups of its own, a stop (clean or forced) ends
every process of the host, boots side by side never fail because of a neighbour, and the next start
cleans what a crashed run left. Processes are found by their root file system (the host's overlay),
read from /proc by tests/lab.py independently of the provider's own containment code."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fabfile.core.errors import ConfigError
from fabfile.core.localcmd import process_alive
from fabfile.providers import load_config
from fabfile.providers.local import containment
from fabfile.providers.local.containment import Hierarchy, Limits

# ---------------------------------------------------------------------------- planning, as tables
HYBRID_MOUNTINFO = """\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:6 - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:7 - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:8 - cgroup cgroup rw,memory
35 30 0:31 /sub /mnt/memory-bind rw,relatime shared:9 - cgroup cgroup rw,memory
"""
HYBRID_CGROUP = "4:memory:/jobs/7\n3:cpu,cpuacct:/\n1:name=systemd:/\n0::/\n"
V2_MOUNTINFO = "29 24 0:25 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


@pytest.mark.parametrize("mountinfo, proc_cgroup, expected", [
    (HYBRID_MOUNTINFO, HYBRID_CGROUP, [
        Hierarchy("memory", "/sys/fs/cgroup/memory", "/jobs/7"),
        Hierarchy("cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct", "/"),
        Hierarchy("name=systemd", "/sys/fs/cgroup/systemd", "/"),
        Hierarchy("", "/sys/fs/cgroup/unified", "/"),
    ]),
    # nspawn mirrors the name=systemd path into v2: the host's v2 cgroup follows name=systemd's
    (HYBRID_MOUNTINFO, "1:name=systemd:/a\n0::/b\n", [
        Hierarchy("name=systemd", "/sys/fs/cgroup/systemd", "/a"),
        Hierarchy("", "/sys/fs/cgroup/unified", "/a"),
    ]),
    (V2_MOUNTINFO, "0::/user.slice/session-1.scope\n", [
        Hierarchy("", "/sys/fs/cgroup", "/user.slice/session-1.scope"),
    ]),
    # a hierarchy mounted nowhere (or only below its root) is left out
    (V2_MOUNTINFO, "5:pids:/\n0::/\n", [Hierarchy("", "/sys/fs/cgroup", "/")]),
])
def test_hierarchies_are_read_from_mountinfo_and_proc_cgroup(mountinfo, proc_cgroup, expected):
    assert containment.parse_hierarchies(mountinfo, proc_cgroup) == expected


@pytest.mark.parametrize("hierarchy, v2_controllers, expected", [
    (Hierarchy("memory", "/m", "/"), frozenset(), [("memory.limit_in_bytes", str(768 << 20))]),
    (Hierarchy("pids", "/p", "/"), frozenset(), [("pids.max", "1024")]),
    (Hierarchy("name=systemd", "/s", "/"), frozenset(), []),
    (Hierarchy("", "/u", "/"), frozenset({"hugetlb"}), []),  # hybrid: controllers live in v1
    (Hierarchy("", "/u", "/"), frozenset({"memory", "pids"}), [("memory.max", str(768 << 20)), ("pids.max", "1024")]),
])
def test_limits_go_to_the_hierarchy_that_has_the_controller(hierarchy, v2_controllers, expected):
    assert containment.plan_limits(hierarchy, Limits(768 << 20, 1024), v2_controllers) == expected


def test_host_cgroup_is_below_the_callers_own():
    assert containment.host_cgroup(Hierarchy("memory", "/sys/fs/cgroup/memory", "/jobs/7"), "web1.abc") == \
        Path("/sys/fs/cgroup/memory/jobs/7/booted/web1.abc")


def test_nspawn_enters_the_cgroups_before_it_runs():
    argv = containment.enter_argv([Path("/cg/a"), Path("/cg/b c")], ["systemd-nspawn", "--boot"])
    assert argv[:3] == ["/bin/sh", "-c", containment.ENTER_SCRIPT]
    assert argv[4:] == ["/cg/a/cgroup.procs", "/cg/b c/cgroup.procs", "--", "systemd-nspawn", "--boot"]


def test_enter_script_moves_itself_then_execs(tmp_path):
    """The fixed script writes its own pid into each file, then becomes the command (same pid)."""
    out = subprocess.run(containment.enter_argv([tmp_path], ["sh", "-c", "echo $$"]),
                         capture_output=True, text=True, check=False, cwd=tmp_path)
    # tmp_path has no cgroup.procs: writing creates the file, which is all a plain directory allows
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "cgroup.procs").read_text().strip() == out.stdout.strip()


@pytest.mark.parametrize("mountinfo, expected", [
    ("464 440 0:72 / / rw,relatime shared:149 - overlay overlay rw,lowerdir=/img/rootfs,upperdir=/st/hosts/w1/upper,"
     "workdir=/st/hosts/w1/.#upper1\n", "/st/hosts/w1/upper"),
    ("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 0:5 / /mnt rw - overlay overlay rw,upperdir=/x/upper,workdir=/x/w\n", None),
    ("9 1 0:72 / / rw - overlay overlay rw,lowerdir=/a,upperdir=/my\\040lab/upper,workdir=/w\n", "/my lab/upper"),
])
def test_a_process_root_overlay_is_read_from_its_mountinfo(mountinfo, expected):
    assert containment.root_upperdir(mountinfo) == expected


@pytest.mark.parametrize("value, problem", [
    ("lots", "providers.local.memory_max: must be a positive number like '1G' or '512M', or 'max' for no limit"),
    ("1M", "providers.local.memory_max: must be at least 67108864 (or 'max')"),
    (-5, "providers.local.memory_max: must be a positive number"),
])
def test_limits_are_validated_with_file_line_and_key(tmp_path, value, problem):
    path = tmp_path / "environments.yaml"
    path.write_text("providers:\n  local:\n    memory_max: %s\nenvironments:\n  e: {provider: local, images: [a],"
                    " roles: {loadbalancers: [a], workers: [a]}, service: hello, version: v1}\n" % (value,))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:3: {problem}" in str(err.value)
    assert "\n" not in str(err.value)


def test_limits_accept_sizes_and_max(tmp_path):
    path = tmp_path / "environments.yaml"
    path.write_text("providers:\n  local: {memory_max: 512M, pids_max: max}\nenvironments:\n  e: {provider: local,"
                    " images: [a], roles: {loadbalancers: [a], workers: [a]}, service: hello, version: v1}\n")
    settings = load_config(path).provider_settings("local")
    assert (settings["memory_max"], settings["pids_max"]) == ("512M", "max")


# ---------------------------------------------------------------------------- real hosts
BOXES = ["iso-1", "iso-2", "iso-3", "iso-4"]
CYCLES = 6  # per host, four hosts at once: 24 boots, half stopped cleanly, half forced


def cgroups_of(pid: int) -> dict[str, str]:
    """/proc/PID/cgroup as {hierarchy: path}."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return {key: path for _, key, path in (line.split(":", 2) for line in lines)}


def host_cgroup_dirs(pid: int, image: str) -> list[Path]:
    """The host-level cgroup directories a process of ``image`` is in (one per mounted hierarchy)."""
    mounts = {"": "/sys/fs/cgroup/unified" if Path("/sys/fs/cgroup/unified").is_dir() else "/sys/fs/cgroup"}
    for key in cgroups_of(pid):
        if key:
            mounts[key] = f"/sys/fs/cgroup/{key.removeprefix('name=')}"
    dirs = []
    for key, path in cgroups_of(pid).items():
        parts = path.split("/")
        at = next((i for i, part in enumerate(parts) if part.startswith(f"{image}.")), None)
        if at is not None:
            dirs.append(Path(mounts[key] + "/".join(parts[: at + 1])))
    return dirs


def netns_of(pid: int) -> str | None:
    out = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True)
    return out.stdout.strip() or None


def fab_in_parallel(lab, argvs: list[list[str]]) -> list:
    results = [None] * len(argvs)

    def run(i):
        results[i] = lab.fab(*argvs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(argvs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def payload(lab, image: str):
    """The host's processes other than its nspawn (by their root file system)."""
    return [p for p in lab.leftover_processes(image) if not p.nspawn]


def init_of(lab, image: str) -> int:
    """The host's PID 1 (its systemd), as a pid of this machine."""
    for proc in payload(lab, image):
        status = Path(f"/proc/{proc.pid}/status").read_text()
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()
        if nspid[-1] == "1":
            return proc.pid
    raise AssertionError(f"{image} has no init")


@pytest.fixture(scope="module")
def boxes(lab):
    for image in BOXES:
        lab.fab("image-build", "--image", image, check=True, timeout=1500)
    yield lab
    fab_in_parallel(lab, [["image-stop", "--image", image, "--force"] for image in BOXES])


@pytest.mark.local
def test_each_host_runs_in_cgroups_of_its_own_with_its_limits(boxes):
    lab = boxes
    for result in fab_in_parallel(lab, [["image-start", "--image", image] for image in BOXES[:2]]):
        assert result.ok, result
    try:
        paths = {}
        for image in BOXES[:2]:
            procs = lab.leftover_processes(image)
            assert len(procs) >= 5, procs  # nspawn, systemd, journald, dbus, logind, sshd...
            for proc in procs:
                for key, path in cgroups_of(proc.pid).items():
                    assert f"/booted/{image}." in path, (proc, key, path)
            paths[image] = {(k, p) for proc in procs for k, p in cgroups_of(proc.pid).items()}
            limits = {}
            for d in host_cgroup_dirs(init_of(lab, image), image):
                for knob in ("memory.limit_in_bytes", "memory.max", "pids.max"):
                    if (d / knob).exists():
                        limits[knob] = (d / knob).read_text().strip()
            assert str(768 << 20) in (limits.get("memory.limit_in_bytes"), limits.get("memory.max")), limits
            assert limits.get("pids.max") == "1024", limits
        assert not paths[BOXES[0]] & paths[BOXES[1]], "two hosts share a cgroup"

        # A unit's cgroup holds only its own host's processes, so systemd can signal all of them.
        neighbour = [p.pid for p in payload(lab, BOXES[1]) if "systemd-logind" in p.command]
        killed = lab.ssh(BOXES[0], "sudo", "systemctl", "kill", "-s", "KILL", "systemd-logind.service")
        assert killed.returncode == 0, killed.stderr
        assert neighbour and all(os.path.exists(f"/proc/{pid}") for pid in neighbour)
    finally:
        fab_in_parallel(lab, [["image-stop", "--image", image, "--force"] for image in BOXES[:2]])


@pytest.mark.local
def test_parallel_boot_and_stop_cycles_always_log_in_and_leave_nothing(boxes):
    """Four hosts boot and stop side by side, again and again, half the stops forced: every boot
    lets booted log in with no failed unit, and every stop leaves no process, cgroup or namespace."""
    lab = boxes
    failures: list[str] = []
    counts = {"boots": 0, "clean": 0, "forced": 0}
    lock = threading.Lock()

    def cycles(k: int, image: str) -> None:
        for i in range(CYCLES):
            try:
                one_cycle(k, image, i)
            except Exception as err:  # noqa: BLE001 - a thread's failure must reach the assertion below
                with lock:
                    failures.append(f"{image} cycle {i}: {type(err).__name__}: {err}")

    def one_cycle(k: int, image: str, i: int) -> None:
        force = (i + k) % 2 == 1
        started = lab.fab("image-start", "--image", image)
        if not started.ok:
            with lock:
                failures.append(f"{image} cycle {i}: start failed: {started.output.strip()[-300:]}")
            lab.fab("image-stop", "--image", image, "--force")
            return
        state = lab.ssh(image, "systemctl", "is-system-running", "--wait", timeout=90)
        failed = lab.ssh(image, "systemctl", "--failed", "--plain", "--no-legend")
        nspawn = [p for p in lab.leftover_processes(image) if p.nspawn]
        dirs = host_cgroup_dirs(payload(lab, image)[0].pid, image) if payload(lab, image) else []
        netns = netns_of(payload(lab, image)[0].pid) if payload(lab, image) else None
        stopped = lab.fab("image-stop", "--image", image, *(["--force"] if force else []))
        left = lab.leftover_processes(image)
        with lock:
            counts["boots"] += 1
            counts["forced" if force else "clean"] += 1
            if state.returncode != 0 or state.stdout.strip() != "running" or failed.stdout.strip():
                failures.append(f"{image} cycle {i}: state {state.stdout.strip()!r} {state.stderr.strip()!r};"
                                f" failed units {failed.stdout.strip()!r}")
            if not stopped.ok:
                failures.append(f"{image} cycle {i}: stop failed: {stopped.output.strip()[-300:]}")
            if left:
                failures.append(f"{image} cycle {i} ({'forced' if force else 'clean'} stop) left: {left}")
            if not nspawn or not dirs or not netns:
                failures.append(f"{image} cycle {i}: no nspawn, cgroup or namespace seen while running")
            if [d for d in dirs if d.exists()]:
                failures.append(f"{image} cycle {i}: cgroups left: {[str(d) for d in dirs if d.exists()]}")
            if netns and Path("/run/netns", netns).exists():
                failures.append(f"{image} cycle {i}: network namespace {netns} left")

    start = time.monotonic()
    threads = [threading.Thread(target=cycles, args=(k, image)) for k, image in enumerate(BOXES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{counts['boots']} boots ({counts['clean']} clean stops, {counts['forced']} forced) in "
          f"{time.monotonic() - start:.0f}s; {len(failures)} failures")
    assert counts["boots"] == len(BOXES) * CYCLES
    assert not failures, "\n".join(failures)


@pytest.mark.local
def test_a_host_whose_nspawn_died_shows_running_and_its_stop_ends_it(boxes):
    lab, image = boxes, BOXES[2]
    lab.fab("image-start", "--image", image, check=True)
    nspawn = [p for p in lab.leftover_processes(image) if p.nspawn]
    assert len(nspawn) == 1
    os.kill(nspawn[0].pid, signal.SIGKILL)  # what a crash of nspawn (or of the old forced stop) does
    while any(p.nspawn for p in lab.leftover_processes(image)):
        time.sleep(0.05)
    orphans = payload(lab, image)
    assert orphans, "the host's payload should outlive its nspawn (else this test proves nothing)"
    listing = lab.fab("image-list", check=True).stdout
    assert next(line for line in listing.splitlines() if line.startswith(image + " ")).split()[3] == "running", listing
    lab.fab("image-stop", "--image", image, check=True)
    assert lab.leftover_processes(image) == []
    listing = lab.fab("image-list", check=True).stdout
    assert next(line for line in listing.splitlines() if line.startswith(image + " ")).split()[3] == "poweroff", listing


@pytest.mark.local
def test_start_cleans_what_a_crashed_run_left_and_says_so(boxes):
    lab, image = boxes, BOXES[3]
    # 1. nspawn died, its host still runs: the next start ends the old host before booting anew
    lab.fab("image-start", "--image", image, check=True)
    nspawn = next(p for p in lab.leftover_processes(image) if p.nspawn)
    os.kill(nspawn.pid, signal.SIGKILL)
    old = {p.pid for p in payload(lab, image)}
    assert old
    started = lab.fab("image-start", "--image", image, check=True)
    lines = [line for line in started.stderr.splitlines() if "cleaned up" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{image}: cleaned up after an earlier run: "), started.stderr
    assert "process(es)" in lines[0] and "cgroup" in lines[0] and "network namespace" in lines[0], lines[0]
    assert not [pid for pid in old if process_alive(pid)]
    assert lab.ssh(image, "true").returncode == 0

    # 2. the machine "died": every process gone, cgroups, network namespace and overlay work dir left
    procs = lab.leftover_processes(image)
    dirs = host_cgroup_dirs(payload(lab, image)[0].pid, image)
    netns = netns_of(payload(lab, image)[0].pid)
    for proc in procs:
        os.kill(proc.pid, signal.SIGKILL)
    while lab.leftover_processes(image):
        time.sleep(0.05)
    assert all(d.exists() for d in dirs) and Path("/run/netns", netns).exists()
    started = lab.fab("image-start", "--image", image, check=True)
    lines = [line for line in started.stderr.splitlines() if "cleaned up" in line]
    assert len(lines) == 1, started.stderr
    assert "process" not in lines[0] and "cgroup" in lines[0] and netns in lines[0], lines[0]
    assert lab.ssh(image, "true").returncode == 0

    # 3. an orderly stop leaves nothing, so the next start has nothing to say
    lab.fab("image-stop", "--image", image, check=True)
    assert lab.leftover_processes(image) == [] and not any(d.exists() for d in dirs)
    started = lab.fab("image-start", "--image", image, check=True)
    assert "cleaned up" not in started.stderr, started.stderr
    lab.fab("image-stop", "--image", image, "--force", check=True)
    assert lab.leftover_processes(image) == []


@pytest.mark.local
def test_a_host_that_does_not_shut_down_is_killed_after_the_stop_timeout(boxes, tmp_path):
    lab, image = boxes, BOXES[0]
    quick = tmp_path / "environments.yaml"
    quick.write_text(lab.config_path.read_text().replace("stop_timeout_s: 20", "stop_timeout_s: 2"))
    assert quick.read_text() != lab.config_path.read_text()
    lab.fab("image-start", "--image", image, check=True)
    os.kill(init_of(lab, image), signal.SIGSTOP)  # its systemd never sees the poweroff request
    stopped = lab.fab("image-stop", "--image", image, BOOTED_CONFIG=str(quick))
    assert stopped.ok, stopped
    assert f"{image}: no clean shutdown within 2s; killing it" in stopped.stderr
    assert lab.leftover_processes(image) == []
