"""The VirtualBox provider, driven through `fab` as a user would, against the VBoxManage stand-in.

The stand-in (tests/vboxmanage/VBoxManage) accepts only real VirtualBox 7 syntax, keeps a registry,
writes the files a real VBoxManage writes, and fails like VirtualBox does. Each test gets its own copy of
a world in which lab-web1 has been built (tests/vbox_fixtures.py). `fab` runs in a child process with the
world's environment: forked from pytest (fast), or a cold `python -m fabric` where a test says cold=True.
Scenes are set up, and a few internals checked, in-process through the provider itself.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from fabfile.core.errors import BootedError, ConfigError, ProviderError, UsageError
from fabfile.providers import base
from fabfile.providers.virtualbox.provider import SNAPSHOT, clone_argvs, console_argv, hardware_argv, storage_argvs
from tests.vbox_fixtures import (  # noqa: F401  (the fixtures are used by name)
    IMAGE,
    VBoxLab,
    vbox_lab,
    vbox_provider,
    vbox_template,
)

SETTINGS = {"memory_mb": 2048, "cpus": 2, "nic_type": "82540EM", "hostonly_adapter": "vboxnet0"}


def one_line_error(proc) -> str:
    """The single line a failing task prints (no traceback)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def vm_files(lab: VBoxLab, image: str) -> list[Path]:
    folder = lab.state.resolve() / "virtualbox" / image
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --------------------------------------------------------------------------- command tables (pure)
# Input (VirtualBox version) -> the NIC and "7.x only" part of the one modifyvm call a build makes.
HARDWARE_TABLE = [
    ((6, 1, 50), ["--rtcuseutc", "on", "--audio", "none"],
     ["--nic1", "nat", "--nictype1", "82540EM", "--cableconnected1", "on", "--nattftpprefix1", "/t/x",
      "--nattftpfile1", "pxelinux.0", "--nicbootprio1", "1",
      "--nic2", "hostonly", "--hostonlyadapter2", "vboxnet0", "--nictype2", "82540EM", "--cableconnected2", "on"]),
    ((7, 1, 12), ["--rtc-use-utc", "on", "--audio-enabled", "off"],
     ["--nic1", "nat", "--nic-type1", "82540EM", "--cable-connected1", "on", "--nat-tftp-prefix1", "/t/x",
      "--nat-tftp-file1", "pxelinux.0", "--nic-boot-prio1", "1", "--nat-localhostreachable1", "on",
      "--nic2", "hostonly", "--host-only-adapter2", "vboxnet0", "--nic-type2", "82540EM", "--cable-connected2", "on"]),
    ((7, 2, 4), ["--rtc-use-utc", "on", "--audio-enabled", "off"],
     ["--nic1", "nat", "--nic-type1", "82540EM", "--cable-connected1", "on", "--nat-tftp-prefix1", "/t/x",
      "--nat-tftp-file1", "pxelinux.0", "--nic-boot-prio1", "1", "--nat-localhostreachable1", "on",
      "--nat-enable-tftp1", "on",
      "--nic2", "hostonly", "--host-only-adapter2", "vboxnet0", "--nic-type2", "82540EM", "--cable-connected2", "on"]),
]


@pytest.mark.parametrize("version, rtc_audio, nics", HARDWARE_TABLE, ids=lambda v: ".".join(map(str, v))
                         if isinstance(v, tuple) else None)
def test_hardware_command_per_version(version, rtc_audio, nics):
    assert hardware_argv("U", SETTINGS, version, "/t/x", "pxelinux.0") == [
        "modifyvm", "U", "--memory", "2048", "--cpus", "2", "--ioapic", "on", "--acpi", "on", "--firmware", "bios",
        "--graphicscontroller", "vmsvga", "--vram", "16", *rtc_audio,
        "--boot1", "net", "--boot2", "disk", "--boot3", "none", "--boot4", "none", *nics]


@pytest.mark.parametrize("version", [row[0] for row in HARDWARE_TABLE], ids=lambda v: ".".join(map(str, v)))
def test_each_version_accepts_the_hardware_command_made_for_it(vbox_lab, version):
    # The stand-in knows which spellings and options each version parses (docs/virtualbox.md §1, §2.2).
    knobs = {"VBOX_STANDIN_VERSION": ".".join(map(str, version)) + "r1"}
    made = vbox_lab.vboxmanage("createvm", "--name", "probe", "--ostype", "RedHat9_64", "--register", env=knobs)
    assert made.returncode == 0, made.stderr
    proc = vbox_lab.vboxmanage(*hardware_argv("probe", SETTINGS, version, "/t/x", "pxelinux.0"), env=knobs)
    assert proc.returncode == 0, proc.stderr
    nic1 = vbox_lab.vm("probe")["nics"]["1"]
    assert (nic1["nattftpprefix"], nic1["nattftpfile"]) == ("/t/x", "pxelinux.0")
    assert nic1.get("natlocalhostreachable") == ("on" if version >= (7, 0) else None)
    assert nic1.get("nat-enable-tftp") == ("on" if version >= (7, 2) else None)
    if version < (7, 2):
        refused = vbox_lab.vboxmanage("modifyvm", "probe", "--nat-enable-tftp1", "on", env=knobs)
        assert refused.returncode == 2 and "Unknown option: --nat-enable-tftp1" in refused.stderr


def test_storage_and_clone_commands():
    assert storage_argvs("U", "/s/vm/vm.vdi", 8192, "/iso/dvd.iso") == [
        ["storagectl", "U", "--name", "SATA", "--add", "sata", "--controller", "IntelAhci", "--portcount", "2",
         "--bootable", "on"],
        ["createmedium", "disk", "--filename", "/s/vm/vm.vdi", "--size", "8192", "--format", "VDI"],
        ["storageattach", "U", "--storagectl", "SATA", "--port", "0", "--device", "0", "--type", "hdd",
         "--medium", "/s/vm/vm.vdi"],
        ["storageattach", "U", "--storagectl", "SATA", "--port", "1", "--device", "0", "--type", "dvddrive",
         "--medium", "/iso/dvd.iso"],
    ]
    assert clone_argvs("S", "new", "N", "/s", (7, 1, 12)) == [
        ["clonevm", "S", "--snapshot", "booted-base", "--options", "link", "--name", "new", "--uuid", "N",
         "--basefolder", "/s", "--register"],
        ["modifyvm", "N", "--mac-address1", "auto", "--mac-address2", "auto", "--nat-localhostreachable1", "off"],
    ]
    assert clone_argvs("S", "new", "N", "/s", (6, 1, 50))[1] == [
        "modifyvm", "N", "--macaddress1", "auto", "--macaddress2", "auto"]


# --------------------------------------------------------------------------- image-build
def test_image_build_installs_by_pxe_and_leaves_a_bootable_vm(vbox_lab):
    proc = vbox_lab.fab("image-build", "--image", "lab-web2", cold=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "built lab-web2 (virtualbox): poweroff"

    state = vbox_lab.state.resolve()
    changes = vbox_lab.changes()
    uuid = changes[0][changes[0].index("--uuid") + 1]
    disk = f"{state}/virtualbox/lab-web2/lab-web2.vdi"
    assert changes == [
        ["createvm", "--name", "lab-web2", "--ostype", "RedHat9_64", "--basefolder", f"{state}/virtualbox",
         "--uuid", uuid, "--register"],
        hardware_argv(uuid, {"memory_mb": 2048, "cpus": 1, "nic_type": "82540EM", "hostonly_adapter": "vboxnet0"},
                      (7, 1, 12), f"{state}/tftp/lab-web2", "pxelinux.0"),
        console_argv(uuid, f"{state}/virtualbox-console/lab-web2.log", (7, 1, 12)),
        *storage_argvs(uuid, disk, 20480, str(vbox_lab.iso)),
        ["startvm", uuid, "--type", "headless"],
        ["modifyvm", uuid, "--boot1", "disk", "--boot2", "none", "--uart1", "off", "--nat-localhostreachable1", "off"],
        ["storageattach", uuid, "--storagectl", "SATA", "--port", "1", "--device", "0", "--medium", "none"],
    ]
    vm = vbox_lab.vm("lab-web2")
    assert vm["state"] == "poweroff" and vm["boot"][:2] == ["disk", "none"]
    assert list(vm["attachments"]) == ["SATA-0-0"], "the install DVD is still attached"
    assert vbox_lab.registry()["media"][vm["attachments"]["SATA-0-0"]["medium"]]["installed"]
    assert Path(disk).is_file()
    # The kickstart (it holds the host's call-home key) and the TFTP folder are gone after the install.
    assert not (state / "tftp" / "lab-web2").exists()
    assert not (state / "kickstart" / "lab-web2.cfg").exists()


def test_build_failing_midway_leaves_nothing_registered(vbox_lab):
    before = vbox_lab.medium_paths()
    proc = vbox_lab.fab("image-build", "--image", "lab-web2", env={"VBOX_STANDIN_FAIL": "storageattach"})
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert line.startswith("error: lab-web2: build failed: VBoxManage storageattach: stand-in: simulated failure")
    assert line.endswith("; removed the half-built VM")
    assert vbox_lab.vm("lab-web2") is None
    assert vbox_lab.medium_paths() == before
    assert vm_files(vbox_lab, "lab-web2") == []
    assert not (vbox_lab.state / "tftp" / "lab-web2").exists()
    assert not (vbox_lab.state / "kickstart" / "lab-web2.cfg").exists()


@pytest.mark.parametrize("knobs, timeout, message", [
    ({"VBOX_STANDIN_FAIL": "startvm"}, 5, "VBoxManage startvm: stand-in: simulated failure"),
    ({"VBOX_STANDIN_INSTALL_SECONDS": "60"}, 0.5,
     "timed out after 0.5s waiting for lab-web2 to finish installing (the kickstart powers it off)"),
], ids=["startvm-fails", "installer-stuck"])
def test_build_cleanup_after_disk_is_attached(vbox_lab, vbox_provider, monkeypatch, knobs, timeout, message):
    for key, value in knobs.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(vbox_provider.settings, "build_timeout_s", timeout)
    with pytest.raises(ProviderError) as err:
        vbox_provider.build("lab-web2", lab_env(vbox_lab))
    assert message in str(err.value) and "; removed the half-built VM" in str(err.value)
    assert vbox_lab.vm("lab-web2") is None
    assert vm_files(vbox_lab, "lab-web2") == []
    assert ["unregistervm"] == [c[0] for c in vbox_lab.changes() if c[0] == "unregistervm"]


def lab_env(lab: VBoxLab):
    from fabfile.providers import load_config as load

    return load(lab.config).environments["lab"]


@pytest.mark.parametrize("knobs, settings, error, message", [
    ({}, {}, ProviderError, r"^lab-web1: already exists; delete it first \(fab image-del --image NAME\)$"),
    ({"VBOX_STANDIN_HOSTONLYIFS": ""}, {}, ConfigError,
     r"providers\.virtualbox\.hostonly_adapter: no host-only interface 'vboxnet0' \(have: none\); create it with "
     r"`VBoxManage hostonlyif create` and `VBoxManage hostonlyif ipconfig vboxnet0 --ip 192\.168\.56\.1 "),
    ({"VBOX_STANDIN_HOSTONLYIFS": "vboxnet1,vboxnet0"}, {}, ConfigError,
     r"providers\.virtualbox\.host_address: is 192\.168\.56\.1, but host-only interface 'vboxnet0' has "
     r"192\.168\.57\.1; hosts could not call home"),
    ({"VBOX_STANDIN_OSTYPES": "Other,Other_64"}, {}, ConfigError,
     r"providers\.virtualbox\.os_type: VirtualBox has no OS type 'RedHat9_64'"),
    ({}, {"iso": "/nonexistent/install.iso"}, BootedError, r"^install ISO /nonexistent/install\.iso not found"),
], ids=["exists", "no-hostonly-if", "host-address", "os-type", "no-iso"])
def test_build_refuses_before_creating_anything(vbox_lab, vbox_provider, monkeypatch, knobs, settings, error,
                                                  message):
    for key, value in knobs.items():
        monkeypatch.setenv(key, value)
    for key, value in settings.items():
        monkeypatch.setitem(vbox_provider.settings, key, value)
    image = IMAGE if not knobs and not settings else "lab-web2"
    with pytest.raises(error, match=message):
        vbox_provider.build(image, lab_env(vbox_lab))
    assert vbox_lab.changes() == []
    assert not (vbox_lab.state / "tftp" / "lab-web2").exists()


def test_build_falls_back_to_the_generic_red_hat_os_type(vbox_lab, vbox_provider, monkeypatch):
    monkeypatch.setenv("VBOX_STANDIN_OSTYPES", "Other,RedHat_64")
    monkeypatch.setenv("VBOX_STANDIN_FAIL", "modifyvm")  # stop right after createvm: only its argv matters
    with pytest.raises(ProviderError, match="build failed: VBoxManage modifyvm"):
        vbox_provider.build("lab-web2", lab_env(vbox_lab))
    createvm = vbox_lab.changes()[0]
    assert createvm[createvm.index("--ostype") + 1] == "RedHat_64"


def test_build_says_what_is_left_when_cleanup_fails(vbox_lab, vbox_provider, monkeypatch):
    monkeypatch.setenv("VBOX_STANDIN_FAIL", "storageattach,closemedium,unregistervm")
    with pytest.raises(ProviderError) as err:
        vbox_provider.build("lab-web2", lab_env(vbox_lab))
    vm = vbox_lab.vm("lab-web2")
    disk = f"{vbox_lab.state.resolve()}/virtualbox/lab-web2/lab-web2.vdi"
    assert vm is not None and Path(disk).exists()  # really left behind, as the message says
    assert str(err.value).startswith("lab-web2: build failed: VBoxManage storageattach: stand-in: simulated failure")
    assert f"left: disk {disk} (" in str(err.value)
    assert f"VBoxManage closemedium disk {disk} --delete" in str(err.value)
    assert str(err.value).endswith(f"VBoxManage unregistervm {vm['uuid']} --delete")


# --------------------------------------------------------------------------- image-list
def test_image_list_shows_every_vm_with_state_macs_and_addresses(vbox_lab, vbox_provider, monkeypatch):
    vbox_provider.start(IMAGE)
    vbox_lab.vboxmanage("createvm", "--name", "not-booted", "--ostype", "Other_64", "--register")
    web1 = vbox_lab.vm(IMAGE)
    macs = ",".join(":".join(web1["nics"][n]["mac"][i:i + 2] for i in range(0, 12, 2)).lower() for n in "12")
    ip = f"192.168.56.{100 + int(web1['nics']['2']['mac'][-2:], 16) % 150}"
    # A VM deleted between `list vms` and `showvminfo` is left out, not an error.
    proc = vbox_lab.fab("image-list", env={"VBOX_STANDIN_GHOST_VM": "gone-vm"})
    assert proc.returncode == 0, proc.stderr
    rows = [re.split(r"\s{2,}", line.strip()) for line in proc.stdout.strip().splitlines()]
    assert rows == [
        ["IMAGE", "PROVIDER", "ENV", "STATE", "MACS", "ADDRESSES", "HYPERVISOR"],
        [IMAGE, "virtualbox", "lab", "running", macs, ip, "-"],
        ["not-booted", "virtualbox", "-", "poweroff", "-", "-", "-"],
    ]


# --------------------------------------------------------------------------- start / stop
def test_image_start_then_clean_stop(vbox_lab):
    proc = vbox_lab.fab("image-start", "--image", IMAGE)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"lab-web1: running \(192\.168\.56\.\d+\)", proc.stdout.strip())
    assert vbox_lab.vm(IMAGE)["state"] == "running"
    vbox_lab.clear_calls()
    proc = vbox_lab.fab("image-stop", "--image", IMAGE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "lab-web1: poweroff"
    assert [c[2] for c in vbox_lab.changes()] == ["acpipowerbutton"]
    assert vbox_lab.vm(IMAGE)["state"] == "poweroff"


def test_image_stop_force_powers_off_at_once(vbox_lab, vbox_provider):
    vbox_provider.start(IMAGE)
    vbox_lab.clear_calls()
    proc = vbox_lab.fab("image-stop", "--image", IMAGE, "--force")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "lab-web1: poweroff"
    assert [c[2] for c in vbox_lab.changes()] == ["poweroff"]


def test_image_stop_powers_off_when_the_guest_ignores_acpi(vbox_lab, vbox_provider):
    vbox_provider.start(IMAGE)
    vbox_lab.clear_calls()
    started = time.monotonic()
    proc = vbox_lab.fab("image-stop", "--image", IMAGE, env={"VBOX_STANDIN_IGNORE_ACPI": "1"})
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started >= 0.5  # stop_timeout_s
    assert "lab-web1: did not shut down within 0.5s; powering it off" in proc.stderr
    assert proc.stdout.strip() == "lab-web1: poweroff"
    assert [c[2] for c in vbox_lab.changes()] == ["acpipowerbutton", "poweroff"]


def test_lock_errors_are_retried(vbox_lab):
    proc = vbox_lab.fab("image-start", "--image", IMAGE, env={"VBOX_STANDIN_LOCKED_ONCE": "startvm"})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"is locked \(VBOX_E_INVALID_OBJECT_STATE\); retrying in 0\.0\d*s \(attempt 2, for up to 0\.3s\)",
                     proc.stderr), proc.stderr
    assert [c[0] for c in vbox_lab.changes()] == ["startvm", "startvm"]
    assert vbox_lab.vm(IMAGE)["state"] == "running"


def test_lock_retries_are_bounded(vbox_lab, vbox_provider, monkeypatch):
    monkeypatch.setenv("VBOX_STANDIN_LOCKED_ALWAYS", "startvm")
    with pytest.raises(ProviderError) as err:
        vbox_provider.start(IMAGE)
    assert str(err.value) == ("lab-web1: VBoxManage startvm: The machine 'lab-web1' is already locked by a session "
                              f"(or being locked or unlocked) [VBOX_E_INVALID_OBJECT_STATE] (after {len(vbox_lab.changes())} "
                              "attempts in 0.3s)")
    assert len(vbox_lab.changes()) >= 2 and {c[0] for c in vbox_lab.changes()} == {"startvm"}


def test_error_on_stderr_at_exit_0_is_a_failure(vbox_lab):
    proc = vbox_lab.fab("image-start", "--image", IMAGE, env={"VBOX_STANDIN_ERROR_AT_EXIT0": "startvm"})
    assert proc.returncode == 1
    assert one_line_error(proc) == (
        "error: lab-web1: VBoxManage startvm: Code NS_ERROR_FAILURE (0x80004005) - Operation failed "
        "(stand-in: error at exit 0) [NS_ERROR_FAILURE]")
    assert vbox_lab.vm(IMAGE)["state"] == "poweroff"


# --------------------------------------------------------------------------- image-clone
def test_image_clone_is_a_linked_clone_with_fresh_macs(vbox_lab):
    proc = vbox_lab.fab("image-clone", "--image", IMAGE, "--name", "lab-web2")
    assert proc.returncode == 0, proc.stderr
    source, clone = vbox_lab.vm(IMAGE), vbox_lab.vm("lab-web2")
    assert clone is not None, "clone is not registered"
    snapshot = [s for s in source["snapshots"] if s["name"] == SNAPSHOT]
    assert len(snapshot) == 1
    assert clone["linked_from"] == {"vm": source["uuid"], "snapshot": snapshot[0]["uuid"]}
    clone_macs = {clone["nics"][n]["mac"] for n in "12"}
    assert len(clone_macs) == 2 and clone_macs.isdisjoint({source["nics"][n]["mac"] for n in "12"})
    shown = proc.stdout.strip().split("MACs: ")[1].split(", ")
    assert {m.replace(":", "").upper() for m in shown} == clone_macs
    changes = vbox_lab.changes()
    state = vbox_lab.state.resolve()
    new_uuid = clone["uuid"]
    assert changes == [
        ["snapshot", source["uuid"], "take", SNAPSHOT, "--description",
         "booted: the state its linked clones start from"],
        *clone_argvs(source["uuid"], "lab-web2", new_uuid, f"{state}/virtualbox", (7, 1, 12)),
    ]


def test_second_clone_reuses_the_snapshot_and_source_with_clones_is_kept(vbox_lab, vbox_provider):
    vbox_provider.clone(IMAGE, "lab-web2", None)
    vbox_provider.start(IMAGE)  # a running source is fine once the snapshot exists
    third = vbox_provider.clone(IMAGE, "lab-web3", None)
    assert third.state == base.STOPPED
    assert [c[3] for c in vbox_lab.changes() if c[0] == "snapshot"] == [SNAPSHOT]
    vbox_provider.stop(IMAGE, force=True)
    with pytest.raises(ProviderError, match=r"^lab-web1: has linked clones \(lab-web2, lab-web3\); delete them first$"):
        vbox_provider.delete(IMAGE)
    assert vbox_lab.vm(IMAGE) is not None and "unregistervm" not in [c[0] for c in vbox_lab.calls()]
    # VirtualBox itself would refuse too: the clones' disks are children of the source's.
    direct = vbox_lab.vboxmanage("unregistervm", IMAGE, "--delete")
    assert direct.returncode == 1 and "VBOX_E_OBJECT_IN_USE" in direct.stderr


def test_first_clone_needs_the_source_powered_off(vbox_lab, vbox_provider):
    vbox_provider.start(IMAGE)
    with pytest.raises(ProviderError, match=r"^lab-web1: is running; its first clone needs it powered off"):
        vbox_provider.clone(IMAGE, "lab-web2", None)
    assert vbox_lab.vm("lab-web2") is None and vbox_lab.vm(IMAGE)["snapshots"] == []


# --------------------------------------------------------------------------- image-del
def test_image_del_refuses_a_running_image(vbox_lab, vbox_provider):
    vbox_provider.start(IMAGE)
    vbox_lab.clear_calls()
    proc = vbox_lab.fab("image-del", "--image", IMAGE, "--yes")
    assert proc.returncode == 1
    assert one_line_error(proc) == "error: lab-web1: is running; stop it first (fab image-stop --image NAME)"
    assert vbox_lab.vm(IMAGE) is not None and vbox_lab.changes() == []


def test_provider_delete_refuses_a_running_image(vbox_lab, vbox_provider):
    vbox_provider.start(IMAGE)
    with pytest.raises(ProviderError, match=r"^lab-web1: is running; stop it first \(fab image-stop --image lab-web1"):
        vbox_provider.delete(IMAGE)
    assert vbox_lab.vm(IMAGE)["state"] == "running" and "unregistervm" not in [c[0] for c in vbox_lab.calls()]


def test_image_del_without_a_terminal_needs_yes(vbox_lab):
    proc = vbox_lab.fab("image-del", "--image", IMAGE)
    assert proc.returncode == 2
    assert one_line_error(proc) == ("error: delete image lab-web1 and its disks? needs confirmation: pass --yes "
                                    "(no terminal to ask on)")
    assert vbox_lab.vm(IMAGE) is not None and vbox_lab.changes() == []


def test_image_del_yes_removes_the_vm_and_its_files(vbox_lab):
    files = vm_files(vbox_lab, IMAGE)
    assert any(f.suffix == ".vdi" for f in files) and any(f.suffix == ".vbox" for f in files)
    proc = vbox_lab.fab("image-del", "--image", IMAGE, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "deleted lab-web1"
    assert vbox_lab.vm(IMAGE) is None
    assert vm_files(vbox_lab, IMAGE) == [] and not (vbox_lab.state / "virtualbox" / IMAGE).exists()
    assert [c[0] for c in vbox_lab.changes()] == ["unregistervm"]


# --------------------------------------------------------------------------- names and a missing VBoxManage
@pytest.mark.parametrize("args", [
    ["image-clone", "--image", IMAGE, "--name", "web;rm -rf ~"],
])
def test_bad_image_names_never_reach_vboxmanage(vbox_lab, args):
    proc = vbox_lab.fab(*args)
    assert proc.returncode == 2
    assert "invalid image name" in one_line_error(proc)
    assert vbox_lab.calls() == []


@pytest.mark.parametrize("call", [
    lambda p: p.build("-rf", None), lambda p: p.clone(IMAGE, "a/b", None), lambda p: p.clone("..", "x", None),
    lambda p: p.start("$(reboot)"), lambda p: p.stop("a b"), lambda p: p.delete("x;y"), lambda p: p.get(""),
])
def test_provider_itself_refuses_bad_names(vbox_lab, vbox_provider, call):
    with pytest.raises(UsageError, match="invalid image name"):
        call(vbox_provider)
    assert vbox_lab.calls() == []


def test_missing_vboxmanage_is_one_line_saying_how_to_install(vbox_lab, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proc = vbox_lab.fab("image-start", "--image", IMAGE, env={"PATH": str(empty)}, cold=True)
    assert proc.returncode == 1
    assert one_line_error(proc) == (
        "error: VBoxManage not found on PATH: install VirtualBox 7 (your distribution's virtualbox package or the "
        "package from virtualbox.org), then check `VBoxManage --version`")
    assert len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- the stand-in itself
def test_standin_fails_like_virtualbox(vbox_lab, vbox_provider):
    vbox_provider.start(IMAGE)
    cases = [
        (["frobnicate"], 2, "Invalid command 'frobnicate'"),
        (["modifyvm", IMAGE, "--no-such-option", "1"], 2, "Unknown option: --no-such-option"),
        (["modifyvm", IMAGE, "--memory", "512"], 1, "VBOX_E_INVALID_OBJECT_STATE"),
        (["startvm", IMAGE, "--type", "headless"], 1, "is already locked by a session"),
        (["unregistervm", IMAGE, "--delete"], 1, "Cannot unregister the machine 'lab-web1' while it is locked"),
        (["createvm", "--name", IMAGE, "--basefolder", str(vbox_lab.state.resolve() / "virtualbox"), "--register"],
         1, "VBOX_E_FILE_ERROR"),
        (["showvminfo", "nope", "--machinereadable"], 1, "VBOX_E_OBJECT_NOT_FOUND"),
    ]
    for argv, code, text in cases:
        proc = vbox_lab.vboxmanage(*argv)
        assert (proc.returncode, text in proc.stderr) == (code, True), (argv, proc.stderr)
        assert proc.stderr.startswith("VBoxManage: error: ")
        if code == 1:
            assert len(proc.stderr.splitlines()) >= 2 and "Details: code " in proc.stderr.splitlines()[1]
    old = vbox_lab.vboxmanage("modifyvm", IMAGE, "--nic-type1", "82540EM", env={"VBOX_STANDIN_VERSION": "6.1.50r1"})
    assert old.returncode == 2 and "Unknown option: --nic-type1" in old.stderr


def test_guests_without_guest_additions_have_no_addresses(vbox_lab, vbox_provider, monkeypatch):
    monkeypatch.setenv("VBOX_STANDIN_NO_GA", "1")
    machine = vbox_provider.start(IMAGE)
    assert machine.running and machine.addresses == [] and len(machine.macs) == 2


def test_errors_are_booted_errors(vbox_provider):
    with pytest.raises(BootedError, match=r"^nope: no such virtualbox image"):
        vbox_provider.start("nope")
