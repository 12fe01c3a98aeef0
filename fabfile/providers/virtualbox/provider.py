"""VirtualBox VMs as booted images: kickstart install over NAT TFTP PXE, linked clones, headless runs.

Every VirtualBox fact used here is in docs/virtualbox.md (section numbers below).
VMs live under ``<state>/virtualbox/<image>/`` and are addressed by UUID once created (docs/virtualbox.md §1). Install
media (ISO check, kickstart, per-VM TFTP folder) come from ``fabfile.providers.virtualbox.media``. Which image a linked clone
hangs off is noted in ``<state>/virtualbox.json``, so deleting a clone's source is refused with a clear
message. ``list()`` reports every registered VM, booted's or not.
"""
from __future__ import annotations

import builtins
import os
import shlex
import shutil
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabfile.core import localcmd, names
from fabfile.core.errors import BootedError, ConfigError, ProviderError, UsageError, WaitTimeout
from fabfile.core.output import progress, wait_until
from fabfile.core.state import atomic_write_json, locked, read_json, state_dir, state_path
from fabfile.providers.base import RUNNING, STOPPED, CloneRecord, Machine, Provider
from fabfile.providers.virtualbox import media
from fabfile.providers.virtualbox.vboxmanage import (
    VBoxError,
    VBoxManage,
    guest_addresses,
    mac_colon,
    parse_guestproperties,
    parse_hostonlyifs,
    parse_list_vms,
    parse_machinereadable,
    parse_ostypes,
    parse_snapshot_names,
)

if TYPE_CHECKING:
    from fabfile.core.config import Config, Environment

SNAPSHOT = "booted-base"          # the snapshot of a source image that its linked clones share (docs/virtualbox.md §5)
CONTROLLER = "SATA"
DISK_PORT, DVD_PORT = 0, 1
FALLBACK_OS_TYPE = "RedHat_64"    # generic ID older VirtualBox versions have (docs/virtualbox.md §2.1)
NIC_SLOTS = 8
POWEROFF_TIMEOUT_S = 60           # `controlvm poweroff` pulls the plug; this only covers a very busy host
# States in which a VM holds no running process: safe to delete, nothing to stop (docs/virtualbox.md §3.4).
STOPPED_STATES = {"poweroff", "aborted", "saved", "aborted-saved", "teleported"}
STARTABLE_STATES = {"poweroff", "aborted", "saved", "aborted-saved"}
FAILED_STATES = frozenset({"aborted", "aborted-saved", "gurumeditation"})

# 7.x spells modifyvm options with hyphens; 7.1 still parses the older names (docs/virtualbox.md §1, §2.2). Older versions
# only know the older names, so pick by version.
_LEGACY_SPELLING = {
    "--nic-type": "--nictype",
    "--cable-connected": "--cableconnected",
    "--mac-address": "--macaddress",
    "--host-only-adapter": "--hostonlyadapter",
    "--nat-tftp-prefix": "--nattftpprefix",
    "--nat-tftp-file": "--nattftpfile",
    "--nic-boot-prio": "--nicbootprio",
    "--rtc-use-utc": "--rtcuseutc",
    "--uart-mode": "--uartmode",
}


def _opt(name: str, version: tuple[int, ...], slot: int | None = None) -> str:
    spelled = name if version >= (7, 0) else _LEGACY_SPELLING.get(name, name)
    return f"{spelled}{slot}" if slot is not None else spelled


# --------------------------------------------------------------------------- command plans (pure)
def hardware_argv(target: str, settings: dict[str, Any], version: tuple[int, ...], tftp_dir: str,
                  boot_file: str) -> list[str]:
    """The one ``modifyvm`` call that sets up a new VM for a PXE kickstart install (docs/virtualbox.md §2.2, §6, §11).

    NIC 1: NAT, whose built-in TFTP server serves ``tftp_dir`` and whose DHCP offers ``boot_file`` (relative
    to ``tftp_dir``, docs/virtualbox.md §6.2); through it the installer fetches its kickstart from the host's nginx at 10.0.2.2,
    which on 7.0+ needs ``--nat-localhostreachable1`` (docs/virtualbox.md §6.1). NIC 2: host-only, where booted reaches the host.
    """
    v = version
    argv = [
        "modifyvm", target,
        "--memory", str(settings["memory_mb"]), "--cpus", str(settings["cpus"]),
        "--ioapic", "on", "--acpi", "on", "--firmware", "bios",
        "--graphicscontroller", "vmsvga", "--vram", "16",
        _opt("--rtc-use-utc", v), "on",
        *(["--audio-enabled", "off"] if v >= (7, 0) else ["--audio", "none"]),
        "--boot1", "net", "--boot2", "disk", "--boot3", "none", "--boot4", "none",
        "--nic1", "nat", _opt("--nic-type", v, 1), settings["nic_type"], _opt("--cable-connected", v, 1), "on",
        _opt("--nat-tftp-prefix", v, 1), tftp_dir, _opt("--nat-tftp-file", v, 1), boot_file,
        _opt("--nic-boot-prio", v, 1), "1",
    ]
    if v >= (7, 0):
        argv += ["--nat-localhostreachable1", "on"]
    if v >= (7, 2):
        # 7.2's NAT engine has a TFTP switch whose default was not established (docs/virtualbox.md §6.2): set it.
        argv += ["--nat-enable-tftp1", "on"]
    argv += [
        "--nic2", "hostonly", _opt("--host-only-adapter", v, 2), settings["hostonly_adapter"],
        _opt("--nic-type", v, 2), settings["nic_type"], _opt("--cable-connected", v, 2), "on",
    ]
    return argv


def storage_argvs(target: str, disk: str, disk_mb: int, iso: str) -> list[list[str]]:
    """Controller, new disk, disk attachment, install DVD attachment (docs/virtualbox.md §2.3)."""
    return [
        ["storagectl", target, "--name", CONTROLLER, "--add", "sata", "--controller", "IntelAhci",
         "--portcount", "2", "--bootable", "on"],
        ["createmedium", "disk", "--filename", disk, "--size", str(disk_mb), "--format", "VDI"],
        ["storageattach", target, "--storagectl", CONTROLLER, "--port", str(DISK_PORT), "--device", "0",
         "--type", "hdd", "--medium", disk],
        ["storageattach", target, "--storagectl", CONTROLLER, "--port", str(DVD_PORT), "--device", "0",
         "--type", "dvddrive", "--medium", iso],
    ]


def console_argv(target: str, console_file: str, version: tuple[int, ...]) -> list[str]:
    """COM1 (I/O 0x3F8, IRQ 4) written to ``console_file`` on this machine: the installer's console output
    (its kernel line says console=ttyS0). VBoxManage modifyvm ``--uartN IOBASE IRQ`` and
    ``--uart-modeN file PATH`` (older spelling ``--uartmodeN``), from VirtualBox's modifyvm option table."""
    return ["modifyvm", target, "--uart1", "0x3F8", "4", _opt("--uart-mode", version, 1), "file", console_file]


def after_install_argvs(target: str, version: tuple[int, ...] = (7, 1)) -> list[list[str]]:
    """Boot from disk from now on (no PXE reinstall loop, docs/virtualbox.md §11), no console file, remove
    the install DVD, and close NAT's way to this machine's loopback: only the installer needed it."""
    return [
        ["modifyvm", target, "--boot1", "disk", "--boot2", "none", "--uart1", "off",
         *(["--nat-localhostreachable1", "off"] if version >= (7, 0) else [])],
        ["storageattach", target, "--storagectl", CONTROLLER, "--port", str(DVD_PORT), "--device", "0",
         "--medium", "none"],
    ]


def clone_argvs(source: str, new: str, new_uuid: str, basefolder: str, version: tuple[int, ...]) -> list[list[str]]:
    """Linked clone of ``source``'s snapshot, then fresh MACs on both NICs (docs/virtualbox.md §5.2, §2.2)."""
    return [
        ["clonevm", source, "--snapshot", SNAPSHOT, "--options", "link", "--name", new,
         "--uuid", new_uuid, "--basefolder", basefolder, "--register"],
        ["modifyvm", new_uuid, _opt("--mac-address", version, 1), "auto", _opt("--mac-address", version, 2), "auto",
         *(["--nat-localhostreachable1", "off"] if version >= (7, 0) else [])],
    ]


def machine_from_info(info: dict[str, str], props: dict[str, str] | None = None) -> Machine:
    """A ``Machine`` from ``showvminfo --machinereadable`` (and guest properties, if read)."""
    state = info.get("VMState", "unknown")
    state = {"running": RUNNING, "poweroff": STOPPED}.get(state, state)
    macs = []
    for slot in range(1, NIC_SLOTS + 1):
        if info.get(f"nic{slot}", "none") not in ("none", "null") and info.get(f"macaddress{slot}"):
            macs.append(mac_colon(info[f"macaddress{slot}"]))
    detail = {k: info[key] for k, key in (("uuid", "UUID"), ("settings_file", "CfgFile"), ("ostype", "ostype"))
              if key in info}
    return Machine(name=info.get("name", "?"), provider="virtualbox", state=state, macs=macs,
                   addresses=guest_addresses(props or {}), detail=detail)


def _poll_interval(timeout: float) -> float:
    """Poll often in short waits (tests), every 2 s in long ones (an install takes many minutes)."""
    return max(0.1, min(2.0, timeout / 100))


def _reason(err: BaseException) -> str:
    """An error's message without the ``image: `` prefix ProviderError adds."""
    text = str(err)
    image = getattr(err, "image", None)
    if image and text.startswith(f"{image}: "):
        text = text[len(image) + 2:]
    return text


# --------------------------------------------------------------------------- the provider
class VirtualBoxProvider(Provider):
    name = "virtualbox"
    build_needs_endpoint = True  # the installer fetches its kickstart from booted's nginx

    def __init__(self, config: "Config", vbox: VBoxManage | None = None):
        super().__init__(config)
        self.vbox = vbox or VBoxManage()

    def installed(self) -> bool:
        return localcmd.which(self.vbox.executable) is not None

    # ----------------------------------------------------------------- paths and clone notes
    @staticmethod
    def basefolder() -> Path:
        path = state_dir() / "virtualbox"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def console_file(image: str) -> Path:
        """Where a VM being installed writes its serial console (outside its folder: deleting the VM keeps it)."""
        return state_path("virtualbox-console", f"{names.check('image', image)}.log")

    @staticmethod
    def _notes_path() -> Path:
        return state_dir() / "virtualbox.json"

    def _notes(self) -> dict[str, dict]:
        """image -> {"uuid", "clone_of": {"image", "uuid", "snapshot"}} for the clones booted made."""
        return read_json(self._notes_path(), {}).get("images", {})

    def _update_notes(self, change: Callable[[dict[str, dict]], object]) -> None:
        with locked("virtualbox-notes"):
            doc = read_json(self._notes_path(), {})
            images = doc.setdefault("images", {})
            change(images)
            atomic_write_json(self._notes_path(), doc)

    # ----------------------------------------------------------------- reading VirtualBox
    def _registered(self) -> dict[str, str]:
        """name -> UUID of every registered VM (``list vms``, docs/virtualbox.md §3.3)."""
        return {name: uuid for name, uuid in parse_list_vms(self.vbox.run("list", "vms").stdout)}

    def _info(self, target: str, image: str) -> dict[str, str]:
        info = self._info_if_any(target, image)
        if info is None:
            raise ProviderError("no such virtualbox image (see `fab image-list`)", image=image)
        return info

    def _info_if_any(self, target: str, image: str) -> dict[str, str] | None:
        """``showvminfo``, or None if the VM is not (or no longer) registered."""
        try:
            out = self.vbox.run("showvminfo", target, "--machinereadable", image=image)
        except VBoxError as err:
            if not err.gone:
                raise
            return None
        return parse_machinereadable(out.stdout)

    def _guest_props(self, target: str, image: str) -> dict[str, str]:
        """The guest's network properties (Guest Additions report them, docs/virtualbox.md §7); empty if there are none."""
        try:
            out = self.vbox.run("guestproperty", "enumerate", target, "/VirtualBox/GuestInfo/Net/*", image=image)
        except VBoxError as err:
            if err.gone:
                return {}
            raise
        return parse_guestproperties(out.stdout)

    def _machine(self, target: str, image: str, info: dict[str, str] | None = None) -> Machine:
        info = info if info is not None else self._info(target, image)
        props = self._guest_props(target, image) if info.get("VMState") == "running" else {}
        return machine_from_info(info, props)

    def _require(self, image: str) -> tuple[str, dict[str, str]]:
        """(UUID, showvminfo) of a registered image; every command takes a name as well as a UUID (docs/virtualbox.md §1)."""
        names.check("image", image)
        info = self._info(image, image)
        return info.get("UUID", image), info

    def _exists(self, image: str) -> bool:
        return self._info_if_any(image, image) is not None

    def booted_address(self) -> str:
        return self.settings["host_address"]

    def list(self) -> list[Machine]:
        machines = []
        for name, uuid in parse_list_vms(self.vbox.run("list", "vms").stdout):
            # None: deleted by someone else between `list vms` and `showvminfo` (Vagrant ignores these, docs/virtualbox.md §10).
            info = self._info_if_any(uuid, name)
            if info is not None:
                info.setdefault("name", name)
                machines.append(self._machine(uuid, name, info))
        return machines

    def get(self, image: str) -> Machine | None:
        names.check("image", image)
        info = self._info_if_any(image, image)
        return None if info is None else self._machine(info.get("UUID", image), image, info)

    def _wait_state(self, target: str, image: str, *, done: Callable[[str], bool], timeout: float,
                    what: str, hint: str = "", fail: frozenset[str] = frozenset()) -> dict[str, str]:
        """Poll ``showvminfo`` until ``done(VMState)``; return that last showvminfo."""
        def check() -> dict[str, str] | None:
            info = self._info(target, image)
            state = info.get("VMState", "")
            if state in fail:
                raise ProviderError(f"went to state {state!r} while waiting for it {what}", image=image)
            return info if done(state) else None

        found = wait_until(check, timeout=timeout, what=f"{image} {what}", hint=hint,
                           interval=_poll_interval(timeout))
        return found  # type: ignore[return-value]  # check's truthy result: a showvminfo

    # ----------------------------------------------------------------- build
    def _os_type(self) -> str:
        wanted = self.settings["os_type"]
        known = parse_ostypes(self.vbox.run("list", "ostypes").stdout)
        if wanted in known:
            return wanted
        if wanted == "RedHat9_64" and FALLBACK_OS_TYPE in known:
            progress(f"VirtualBox has no OS type RedHat9_64; using {FALLBACK_OS_TYPE}")
            return FALLBACK_OS_TYPE
        raise ConfigError(self.config.path, f"VirtualBox has no OS type {wanted!r} (see `VBoxManage list ostypes`)",
                          keypath="providers.virtualbox.os_type")

    def _check_hostonly(self) -> None:
        """NIC 2's host-only interface exists and has host_address, the address hosts call home to (docs/virtualbox.md §9.1)."""
        adapter, address = self.settings["hostonly_adapter"], self.settings["host_address"]
        interfaces = {b.get("Name", ""): b for b in parse_hostonlyifs(self.vbox.run("list", "hostonlyifs").stdout)}
        ipconfig = f"`VBoxManage hostonlyif ipconfig {adapter} --ip {address} --netmask 255.255.255.0`"
        if adapter not in interfaces:
            raise ConfigError(
                self.config.path,
                f"no host-only interface {adapter!r} (have: {', '.join(interfaces) or 'none'}); create it with "
                f"`VBoxManage hostonlyif create` and {ipconfig}",
                keypath="providers.virtualbox.hostonly_adapter")
        has = interfaces[adapter].get("IPAddress", "")
        if has != address:
            raise ConfigError(
                self.config.path,
                f"is {address}, but host-only interface {adapter!r} has {has or 'no address'}; hosts could not "
                f"call home: change host_address or run {ipconfig}",
                keypath="providers.virtualbox.host_address")

    def build(self, image: str, env: "Environment | None") -> Machine:
        names.check("image", image)
        version = self.vbox.version()
        os_type = self._os_type()
        self._check_hostonly()
        base = self.basefolder()
        vm_uuid = str(uuidlib.uuid4())
        disk = str(base / image / f"{image}.vdi")
        made = {"staged": False, "vm": False, "disk": False, "disk_attached": False}
        try:
            # One builder per name: a second build of the same image must not restage (and, failing,
            # unstage) the TFTP folder and kickstart the first one is installing from.
            with locked(f"virtualbox-create-{image}"):
                if self._exists(image):
                    raise ProviderError("already exists; delete it first (fab image-del --image NAME)", image=image)
                tftp_dir = Path(media.stage_install(self.config, env, image))
                made["staged"] = True
                # The installer stops for good if its inst.ks URL does not answer: check it before any VM exists.
                url = media.check_kickstart_served(self.config, image)
                progress(f"{image}: booted's nginx serves its kickstart at {url}")
                self.vbox.run("createvm", "--name", image, "--ostype", os_type, "--basefolder", str(base),
                              "--uuid", vm_uuid, "--register", image=image)
                made["vm"] = True
            self.vbox.run(*hardware_argv(vm_uuid, self.settings, version, str(tftp_dir), media.BOOT_FILE), image=image)
            console = self.console_file(image)
            console.unlink(missing_ok=True)
            self.vbox.run(*console_argv(vm_uuid, str(console), version), image=image)
            ctl, mkdisk, attach_disk, attach_dvd = storage_argvs(
                vm_uuid, disk, self.settings["disk_mb"], str(media.iso_path(self.config)))
            self.vbox.run(*ctl, image=image)
            self.vbox.run(*mkdisk, image=image)
            made["disk"] = True
            self.vbox.run(*attach_disk, image=image)
            made["disk_attached"] = True
            self.vbox.run(*attach_dvd, image=image)
            timeout = self.settings["build_timeout_s"]
            progress(f"{image}: installing (kickstart over PXE); waiting up to {timeout:g}s for it to power off")
            self.vbox.run("startvm", vm_uuid, "--type", "headless", image=image, success=_started)
            installed = self._wait_state(
                vm_uuid, image, done=lambda s: s == "poweroff", timeout=timeout,
                what="to finish installing (the kickstart powers it off)", fail=FAILED_STATES,
                hint="raise providers.virtualbox.build_timeout_s if the install is only slow")
            for argv in after_install_argvs(vm_uuid, version):
                self.vbox.run(*argv, image=image)
        except (BootedError, KeyboardInterrupt) as err:
            if not any(made.values()):
                raise
            leftover = self._undo_build(image, vm_uuid, made, disk)
            if isinstance(err, KeyboardInterrupt):
                raise
            raise ProviderError(f"build failed: {_reason(err)}; {leftover}", image=image,
                                result=getattr(err, "result", None)) from None
        # The kickstart holds the host's call-home key: it must not stay downloadable once installed.
        media.unstage_install(image)
        self.console_file(image).unlink(missing_ok=True)
        return self._machine(vm_uuid, image, installed)

    def _undo_build(self, image: str, vm_uuid: str, made: dict[str, bool], disk: str) -> str:
        """Remove what a failed build made, after keeping its diagnostics; say where they are and what is
        left (with the command that removes it) if removal fails."""
        media.unstage_install(image)
        if not made["vm"]:
            return "nothing was created"
        progress(f"{image}: build failed; keeping its logs, then removing the half-built VM")
        left = []  # what could not be removed, each with the command that removes it
        try:
            if self._info(vm_uuid, image).get("VMState", "") not in STOPPED_STATES:
                self._poweroff(vm_uuid, image)
        except BootedError as err:
            left.append(f"the VM is still running ({_reason(err)}): VBoxManage controlvm {vm_uuid} poweroff")
        kept = self._keep_diagnostics(image, vm_uuid)
        if made["disk"] and not made["disk_attached"]:  # an attached disk goes with unregistervm --delete
            try:
                self.vbox.run("closemedium", "disk", disk, "--delete", image=image)
            except BootedError as err:
                left.append(f"disk {disk} ({_reason(err)}): VBoxManage closemedium disk {shlex.quote(disk)} --delete")
        try:
            self.vbox.run("unregistervm", vm_uuid, "--delete", image=image)
        except BootedError as err:
            left.append(f"VM {vm_uuid} ({_reason(err)}): VBoxManage unregistervm {vm_uuid} --delete")
        said = "could not remove all of the half-built VM; left: " + "; ".join(left) if left \
            else "removed the half-built VM"
        return f"{said}; its logs and console output are kept in {kept}" if kept else said

    def _keep_diagnostics(self, image: str, vm_uuid: str) -> Path | None:
        """Copy the VM's log folder (VBox.log*, ``LogFldr`` in showvminfo) and its serial console into
        ``<state>/diagnostics/<image>-<time>/`` before ``unregistervm --delete`` removes them."""
        try:
            info = self._info_if_any(vm_uuid, image) or {}
        except BootedError:
            info = {}
        logs = Path(info["LogFldr"]) if info.get("LogFldr") else self.basefolder() / image / "Logs"
        console = self.console_file(image)
        if not logs.is_dir() and not console.exists():
            return None
        dest = state_path("diagnostics", f"{image}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", ".keep").parent
        try:
            if logs.is_dir():
                shutil.copytree(logs, dest / "Logs", dirs_exist_ok=True)
            if console.exists():
                shutil.move(str(console), dest / "console.log")
        except OSError as err:
            progress(f"{image}: could not keep all of its logs ({err})")
        return dest

    # ----------------------------------------------------------------- clone
    def clone(self, source: str, new: str, env: "Environment | None") -> Machine:
        names.check("image", source)
        names.check("image", new)
        if source == new:
            raise UsageError(f"clone of {source!r} needs a different --name")
        version = self.vbox.version()
        src_uuid, _ = self._require(source)
        if self._exists(new):
            raise ProviderError("already exists; delete it first (fab image-del --image NAME)", image=new)
        with locked("virtualbox-snapshot"):
            if SNAPSHOT not in self._snapshots(src_uuid, source):
                state = self._info(src_uuid, source).get("VMState", "")  # now, under the lock
                if state != "poweroff":
                    raise ProviderError(
                        f"is {state}; its first clone needs it powered off, to take snapshot {SNAPSHOT!r} of a "
                        f"consistent disk (fab image-stop --image {source})", image=source)
                self.vbox.run("snapshot", src_uuid, "take", SNAPSHOT, "--description",
                              "booted: the state its linked clones start from", image=source)
        new_uuid = str(uuidlib.uuid4())
        clone_cmd, macs_cmd = clone_argvs(src_uuid, new, new_uuid, str(self.basefolder()), version)
        self.vbox.run(*clone_cmd, image=new)
        try:
            self.vbox.run(*macs_cmd, image=new)
        except (BootedError, KeyboardInterrupt) as err:
            try:
                self.vbox.run("unregistervm", new_uuid, "--delete", image=new)
                leftover = "removed the clone"
            except BootedError as cleanup:
                leftover = (f"could not remove the clone ({_reason(cleanup)}); remove it with "
                            f"`VBoxManage unregistervm {new_uuid} --delete`")
            if isinstance(err, KeyboardInterrupt):
                raise
            raise ProviderError(f"clone failed: {_reason(err)}; {leftover}", image=new) from None
        # The MACs VirtualBox gave the clone (booted's say, not the guest's) are what proves, with its
        # source's key, that a call home is the clone's: record them now.
        made = self._machine(new_uuid, new)
        self._update_notes(lambda notes: notes.__setitem__(
            new, {"uuid": new_uuid, "clone_of": {"image": source, "uuid": src_uuid, "snapshot": SNAPSHOT},
                  "macs": list(made.macs)}))
        return made

    def clone_records(self) -> builtins.list[CloneRecord]:
        return [CloneRecord(image, note["clone_of"]["image"], tuple(note.get("macs", [])))
                for image, note in sorted(self._notes().items())
                if isinstance(note.get("clone_of"), dict) and note.get("macs")]

    def _snapshots(self, target: str, image: str) -> "builtins.list[str]":
        try:
            out = self.vbox.run("snapshot", target, "list", "--machinereadable", image=image)
        except VBoxError as err:
            # A VM without snapshots makes `snapshot list` fail saying it "does not have" any (docs/virtualbox.md §5.1).
            result = err.result
            if result is not None and "does not have" in (result.stdout + result.stderr):
                return []
            raise
        return parse_snapshot_names(out.stdout)

    # ----------------------------------------------------------------- start / stop / delete
    def start(self, image: str) -> Machine:
        vm_uuid, info = self._require(image)
        state = info.get("VMState", "")
        if state == "running":
            return self._machine(vm_uuid, image, info)
        if state not in STARTABLE_STATES:
            raise ProviderError(f"is {state}; it can be started only when powered off, saved or aborted",
                                image=image)
        logs = Path(info.get("CfgFile", ".")).parent / "Logs"
        self.vbox.run("startvm", vm_uuid, "--type", "headless", image=image, success=_started)
        info = self._wait_state(vm_uuid, image, done=lambda s: s == "running", timeout=self.settings["boot_timeout_s"],
                                what="to be running", fail=FAILED_STATES, hint=f"see {logs}")
        return self._machine(vm_uuid, image, info)

    def stop(self, image: str, force: bool = False) -> Machine:
        vm_uuid, info = self._require(image)
        state = info.get("VMState", "")
        if state in STOPPED_STATES:
            return self._machine(vm_uuid, image, info)
        if not force and state == "running":
            self.vbox.run("controlvm", vm_uuid, "acpipowerbutton", image=image)
            timeout = self.settings["stop_timeout_s"]
            try:
                info = self._wait_state(vm_uuid, image, done=lambda s: s in STOPPED_STATES, timeout=timeout,
                                        what="to shut down (ACPI power button)")
                return self._machine(vm_uuid, image, info)
            except WaitTimeout:
                progress(f"{image}: did not shut down within {timeout:g}s; powering it off")
        return self._machine(vm_uuid, image, self._poweroff(vm_uuid, image))

    def _poweroff(self, vm_uuid: str, image: str) -> dict[str, str]:
        try:
            self.vbox.run("controlvm", vm_uuid, "poweroff", image=image)
        except VBoxError:
            # It may have stopped on its own since we looked; only a VM still up is a failure.
            if self._info(vm_uuid, image).get("VMState", "") not in STOPPED_STATES:
                raise
        return self._wait_state(vm_uuid, image, done=lambda s: s in STOPPED_STATES, timeout=POWEROFF_TIMEOUT_S,
                                what="to power off")

    def delete(self, image: str) -> None:
        vm_uuid, info = self._require(image)
        state = info.get("VMState", "")
        if state not in STOPPED_STATES:
            raise ProviderError(f"is {state}; stop it first (fab image-stop --image {image})", image=image)
        clone_uuids = {name: note["uuid"] for name, note in self._notes().items()
                       if note.get("clone_of", {}).get("uuid") == vm_uuid}
        registered = set(self._registered().values()) if clone_uuids else set()
        clones = sorted(name for name, uuid in clone_uuids.items() if uuid in registered)
        if clones:
            raise ProviderError(f"has linked clones ({', '.join(clones)}); delete them first", image=image)
        self.vbox.run("unregistervm", vm_uuid, "--delete", image=image)
        self._update_notes(lambda notes: notes.pop(image, None))
        media.unstage_install(image)  # a build that was interrupted hard may have left its TFTP folder


def _started(result) -> bool:
    """startvm succeeded if it says so, whatever its exit code (Vagrant's rule, docs/virtualbox.md §3.1)."""
    return 'has been successfully started' in result.stdout
PROVIDER = VirtualBoxProvider
