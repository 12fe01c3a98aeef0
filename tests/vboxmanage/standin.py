"""A stand-in for VirtualBox 7's VBoxManage, for booted's tests; ``VBoxManage`` next to this file runs it.

It accepts only real VBoxManage subcommands and options, as documented in
docs/virtualbox.md (both spellings where its §1/§2.2 say both parse), keeps its registry in
``$VBOX_STANDIN_HOME/state.json`` (VMs, snapshots, NICs, storage, media) and writes the files a real one
would (``.vbox``, ``.vdi``, ``Logs/``) so tests can check that deletion removes them. Failures use the
three-line ``VBoxManage: error:`` form with VirtualBox's codes; exit 1 on failure, 2 on bad arguments (docs/virtualbox.md §1).
Where docs/virtualbox.md does not quote VirtualBox's wording the message is marked ``[stand-in wording]``.
Every call is appended to ``$VBOX_STANDIN_HOME/invocations.jsonl`` (one JSON list per line).

Real subcommands it does not implement fail with exit 2 and say so, so a test notices a provider using one.
Modelled behaviour beyond the syntax: commands that change a VM need its session lock, which a running VM
holds (docs/virtualbox.md §10); a linked clone's disk is a child of its source's, so unregistervm of the source is refused;
an installed guest that runs reports its addresses like Guest Additions do (docs/virtualbox.md §7): 10.0.2.15 on a NAT NIC,
192.168.56.<100 + last MAC byte % 150> on a host-only NIC.

Time-dependent state is computed when read (no daemon): a running VM stores when it started and when it
will power itself off.

Simulation knobs (environment variables):
  VBOX_STANDIN_HOME             required: where the registry, log and default "VirtualBox VMs" live
  VBOX_STANDIN_VERSION          ``--version`` output (default 7.1.12r169651); < 7.0 rejects 7.x-only options
  VBOX_STANDIN_HOSTONLYIFS      comma-separated host-only interfaces (default vboxnet0); the n-th (from 0)
                                has address 192.168.<56+n>.1
  VBOX_STANDIN_OSTYPES          comma-separated OS type IDs this VirtualBox knows (default: a built-in list)
  VBOX_STANDIN_INSTALL_SECONDS  a VM started with boot1=net that finds its PXE loader in the NAT TFTP
                                directory and has a DVD attached fetches the inst.ks= URL of its PXE entry
                                (as the EL9 installer does; 10.0.2.2 is the host's loopback only with
                                --nat-localhostreachable1 on), then "installs" and powers off after this
                                long (default 0.2); without them, or if the kickstart does not answer, it
                                keeps running (a stuck installer). With --uart1 on and --uart-mode1 file PATH
                                the guest's console lines go to PATH.
  VBOX_STANDIN_ACPI_SECONDS     an installed guest powers off this long after acpipowerbutton (default 0.1)
  VBOX_STANDIN_IGNORE_ACPI      set: acpipowerbutton does nothing
  VBOX_STANDIN_NO_GA            set: guests report no guest properties (no Guest Additions)
  VBOX_STANDIN_LOCKED_ONCE      SUB or "any": the next session-locking SUB call fails once with the lock error
  VBOX_STANDIN_LOCKED_ALWAYS    SUB or "any": every session-locking SUB call fails with the lock error
  VBOX_STANDIN_LOCKED_RATE      0..1: each session-locking call fails with the lock error with this probability
                                (another client holding the VM's session lock, docs/virtualbox.md §10)
  VBOX_STANDIN_FAIL             SUB[,SUB]: those subcommands fail (exit 1, NS_ERROR_FAILURE)
  VBOX_STANDIN_ERROR_AT_EXIT0   SUB[,SUB]: those subcommands print an error, do nothing, and exit 0
  VBOX_STANDIN_GHOST_VM         NAME: ``list vms`` also shows a VM that showvminfo cannot find (deleted meanwhile)
"""
import fcntl
import json
import os
import re
import sys
import time

# fnmatch and shutil are imported where used; pathlib, random and uuid are avoided (pathlib alone costs a
# quarter of a call's start-up, and tests make hundreds of calls).

CODES = {
    "VBOX_E_OBJECT_NOT_FOUND": "0x80bb0001",
    "VBOX_E_INVALID_VM_STATE": "0x80bb0002",
    "VBOX_E_FILE_ERROR": "0x80bb0004",
    "VBOX_E_INVALID_OBJECT_STATE": "0x80bb0007",
    "VBOX_E_OBJECT_IN_USE": "0x80bb000c",
    "E_INVALIDARG": "0x80070057",
    "NS_ERROR_FAILURE": "0x80004005",
}
SUBCOMMANDS = {
    # implemented here
    "list", "createvm", "modifyvm", "storagectl", "createmedium", "createhd", "createvdi", "storageattach",
    "closemedium", "startvm", "controlvm", "showvminfo", "snapshot", "clonevm", "unregistervm", "guestproperty",
    # real ones this stand-in does not implement (they fail with exit 2 and say so)
    "registervm", "import", "export", "movevm", "discardstate", "adoptstate", "modifymedium",
    "modifyhd", "modifyvdi", "clonemedium", "clonehd", "clonevdi", "showmediuminfo", "showhdinfo", "showvdiinfo",
    "mediumproperty", "hdproperty", "hostonlyif", "hostonlynet", "natnetwork", "dhcpserver", "unattended",
    "guestcontrol", "sharedfolder", "extpack", "setproperty", "usbfilter", "metrics", "debugvm", "bandwidthctl",
    "cloud", "cloudprofile", "encryptvm", "checkmediumpwd", "convertfromraw", "mediumio", "signova",
    "setextradata", "getextradata", "updatecheck", "modifynvram",
}
OSTYPES = [
    ("Other", "Other/Unknown", "Other", False), ("Other_64", "Other/Unknown (64-bit)", "Other", True),
    ("RedHat_64", "Red Hat (64-bit)", "Linux", True), ("RedHat8_64", "Red Hat 8.x (64-bit)", "Linux", True),
    ("RedHat9_64", "Red Hat 9.x (64-bit)", "Linux", True), ("Oracle9_64", "Oracle Linux 9.x (64-bit)", "Linux", True),
    ("Debian12_64", "Debian 12 Bookworm (64-bit)", "Linux", True),
    ("Windows10_64", "Windows 10 (64-bit)", "Windows", True),
]
def ostypes():
    known = [o for o in os.environ.get("VBOX_STANDIN_OSTYPES", "").split(",") if o]
    return [o for o in OSTYPES if not known or o[0] in known]


BOOT_DEVICES = ("none", "floppy", "dvd", "disk", "net")
NIC_MODES = ("none", "null", "nat", "natnetwork", "bridged", "intnet", "hostonly", "hostonlynet", "generic", "cloud")
NIC_TYPES = ("Am79C970A", "Am79C973", "82540EM", "82543GC", "82545EM", "virtio")
STOPPED = ("poweroff", "aborted", "saved", "aborted-saved")
PROGRESS = "0%...10%...20%...30%...40%...50%...60%...70%...80%...90%...100%"


class Failure(Exception):
    def __init__(self, message, code=None, component="MachineWrap", interface="IMachine", context=None):
        super().__init__(message)
        self.code, self.component, self.interface, self.context = code, component, interface, context


class Syntax(Exception):
    """Bad arguments: exit 2 (RTEXITCODE_SYNTAX)."""


def now():
    return time.time()


def iso_time(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%09d" % int((t % 1) * 1e9)


def env_float(name, default):
    raw = os.environ.get(name, "")
    return float(raw) if raw else default


def version():
    return os.environ.get("VBOX_STANDIN_VERSION", "7.1.12r169651")


def version_tuple():
    raw = version().split("_")[0].split("r")[0]
    return tuple(int(p) for p in raw.split("."))


def new_uuid():
    raw = bytearray(os.urandom(16))
    raw[6], raw[8] = raw[6] & 0x0F | 0x40, raw[8] & 0x3F | 0x80  # version 4, RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


GHOST_UUID = "0d15ea5e-0000-4000-8000-000000000000"


def new_mac():
    return "080027" + os.urandom(3).hex().upper()


def real(path, home):
    """An absolute, symlink-free path; relative ones are relative to the VirtualBox home."""
    return os.path.realpath(path if os.path.isabs(path) else os.path.join(home, path))


def write_file(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def on_off(option, value):
    if value not in ("on", "off"):
        raise Syntax(f"Invalid {option} argument '{value}' (on or off expected) [stand-in wording]")
    return value


# --------------------------------------------------------------------------- options
class Options:
    """A small RTGetOpt: ``--opt value`` or ``--opt=value``; indexed options have the slot glued on."""

    def __init__(self, argv, spec, indexed=(), positional_max=0):
        self.values, self.positional = [], []
        i = 0
        while i < len(argv):
            arg = argv[i]
            if arg.startswith("-") and arg != "-":
                name, eq, inline = arg.partition("=")
                slot = None
                if name in spec:
                    takes = spec[name]
                else:
                    match = re.fullmatch(r"(--[a-z-]+?)(\d+)", name)
                    if match and match.group(1) in indexed:
                        name, slot, takes = match.group(1), int(match.group(2)), indexed[match.group(1)]
                    else:
                        raise Syntax(f"Unknown option: {arg.split('=')[0]} [stand-in wording]")
                if takes:
                    if eq:
                        value = inline
                    else:
                        i += 1
                        if i >= len(argv):
                            raise Syntax(f"Option {name} needs a value [stand-in wording]")
                        value = argv[i]
                    if callable(takes) and takes(value):  # a second value follows (--uartN IOBASE IRQ)
                        i += 1
                        if i >= len(argv):
                            raise Syntax(f"Missing or invalid argument to '{name}' [stand-in wording]")
                        value = (value, argv[i])
                else:
                    if eq:
                        raise Syntax(f"Option {name} takes no value [stand-in wording]")
                    value = True
                self.values.append((name, slot, value))
            else:
                self.positional.append(arg)
            i += 1
        if len(self.positional) > positional_max:
            raise Syntax(f"Invalid parameter '{self.positional[positional_max]}' [stand-in wording]")

    def get(self, *names, default=None):
        for name, slot, value in reversed(self.values):
            if name in names and slot is None:
                return value
        return default

    def has(self, *names):
        return any(name in names for name, _, _ in self.values)


def spelled(new, old, since7=True):
    """Both spellings of an option; the hyphenated 7.x one only parses on 7.0+ (docs/virtualbox.md §1)."""
    names = [old] if old else []
    if new and (version_tuple() >= (7, 0) or not since7):
        names.append(new)
    return names


# --------------------------------------------------------------------------- registry
class Registry:
    def __init__(self, home):
        self.home = home
        self.path = os.path.join(home, "state.json")
        self.lock = open(os.path.join(home, ".lock"), "a+")
        fcntl.flock(self.lock.fileno(), fcntl.LOCK_EX)
        if os.path.exists(self.path):
            with open(self.path) as fh:
                self.data = json.load(fh)
        else:
            self.data = {"vms": {}, "media": {}, "faults": {}}
        self.settle()

    def save(self):
        tmp = self.path + ".tmp"
        write_file(tmp, json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    # ------------------------------------------------------------- time-based state
    def settle(self):
        t = now()
        for vm in self.data["vms"].values():
            if vm["state"] != "running":
                continue
            if vm.get("install_at") and t >= vm["install_at"]:
                for att in vm["attachments"].values():
                    if att["type"] == "hdd":
                        self.data["media"][att["medium"]]["installed"] = True
                self.set_state(vm, "poweroff", vm["install_at"])
            elif vm.get("acpi_off_at") and t >= vm["acpi_off_at"]:
                self.set_state(vm, "poweroff", vm["acpi_off_at"])

    def set_state(self, vm, state, when=None):
        vm["state"] = state
        vm["state_changed"] = when or now()
        if state != "running":
            vm["install_at"] = vm["acpi_off_at"] = vm["started_at"] = None

    # ------------------------------------------------------------- lookups
    def find_vm(self, ref):
        vms = self.data["vms"]
        if ref in vms:
            return vms[ref]
        stripped = ref.strip("{}")
        if stripped in vms:
            return vms[stripped]
        for vm in vms.values():
            if vm["name"] == ref:
                return vm
        raise Failure(f"Could not find a registered machine named '{ref}'", "VBOX_E_OBJECT_NOT_FOUND",
                      "VirtualBoxWrap", "IVirtualBox",
                      "FindMachine(Bstr(VMNameOrUuid).raw(), machine.asOutParam())")

    def find_medium(self, ref):
        for mid, medium in self.data["media"].items():
            if mid == ref.strip("{}") or medium["path"] == real(ref, self.home):
                return mid, medium
        return None, None

    def attached_to(self, mid):
        return [vm for vm in self.data["vms"].values()
                if any(att.get("medium") == mid for att in vm["attachments"].values())]

    def children(self, mid):
        return [cid for cid, m in self.data["media"].items() if m.get("parent") == mid]


def lock_error(vm, sub):
    if sub == "unregistervm":
        return Failure(f"Cannot unregister the machine '{vm['name']}' while it is locked",
                       "VBOX_E_INVALID_OBJECT_STATE", context="Unregister(CleanupMode_DetachAllReturnHardDisksOnly, "
                       "ComSafeArrayAsOutParam(aMedia))")
    if sub == "startvm":
        return Failure(f"The machine '{vm['name']}' is already locked by a session (or being locked or unlocked)",
                       "VBOX_E_INVALID_OBJECT_STATE",
                       context="LaunchVMProcess(a->session, sessionType.raw(), ComSafeArrayAsInParam(aBstrEnv), "
                               "progress.asOutParam())")
    return Failure(f"The machine '{vm['name']}' is already locked for a session (or being unlocked)",
                   "VBOX_E_INVALID_OBJECT_STATE", context="LockMachine(a->session, LockType_Write)")


def take_write_lock(reg, vm, sub):
    """Commands that change a VM take its session lock (docs/virtualbox.md §10): a running VM holds it; knobs fake a holder."""
    faults = reg.data.setdefault("faults", {})
    always = os.environ.get("VBOX_STANDIN_LOCKED_ALWAYS", "")
    once = os.environ.get("VBOX_STANDIN_LOCKED_ONCE", "")
    if always in (sub, "any"):
        raise lock_error(vm, sub)
    rate = env_float("VBOX_STANDIN_LOCKED_RATE", 0.0)
    if rate and int.from_bytes(os.urandom(4), "big") < rate * 2 ** 32:
        raise lock_error(vm, sub)
    if once in (sub, "any") and not faults.get("locked_once_used"):
        faults["locked_once_used"] = True
        reg.save()
        raise lock_error(vm, sub)
    if vm["state"] not in STOPPED:
        raise lock_error(vm, sub)


# --------------------------------------------------------------------------- subcommands
def cmd_version(reg, args):
    print(version())


def cmd_list(reg, args):
    opts = Options(args, {"--long": False, "-l": False, "--sorted": False, "-s": False}, positional_max=1)
    if not opts.positional:
        raise Syntax("Missing list type [stand-in wording]")
    kind = opts.positional[0]
    vms = list(reg.data["vms"].values())
    if opts.has("--sorted", "-s"):
        vms.sort(key=lambda vm: vm["name"].lower())
    if kind == "vms":
        for vm in vms:
            print(f'"{vm["name"]}" {{{vm["uuid"]}}}')
        ghost = os.environ.get("VBOX_STANDIN_GHOST_VM")
        if ghost:
            print(f'"{ghost}" {{{GHOST_UUID}}}')
    elif kind == "runningvms":
        for vm in vms:
            if vm["state"] == "running":
                print(f'"{vm["name"]}" {{{vm["uuid"]}}}')
    elif kind == "ostypes":
        for oid, desc, family, is64 in ostypes():
            print(f"ID:          {oid}\nDescription: {desc}\nFamily ID:   {family}\nFamily Desc: {family}\n"
                  f"64 bit:      {'true' if is64 else 'false'}\n")
    elif kind == "hostonlyifs":
        names = [n for n in os.environ.get("VBOX_STANDIN_HOSTONLYIFS", "vboxnet0").split(",") if n]
        for i, name in enumerate(names):
            print(f"Name:            {name}\nGUID:            786f6276-656e-4{i:03d}-8000-0a0027000000\n"
                  f"DHCP:            Disabled\nIPAddress:       192.168.{56 + i}.1\n"
                  f"NetworkMask:     255.255.255.0\nIPV6Address:\nIPV6NetworkMaskPrefixLength: 0\n"
                  f"Status:          Up\nVBoxNetworkName: HostInterfaceNetworking-{name}\n")
    elif kind in ("hdds", "dvds", "floppies", "hostonlynets", "natnets", "bridgedifs", "intnets", "systemproperties",
                  "extpacks", "groups", "usbhost", "dhcpservers", "hostinfo", "hostcpuids", "hddbackends",
                  "usbfilters", "webcams", "screenshotformats", "cloudproviders", "cloudprofiles",
                  "cloudnets", "cpu-profiles", "hostdrives", "hostdvds", "hostfloppies",
                  "platformproperties", "execution-engines"):
        raise Syntax(f"stand-in: 'list {kind}' is real but not implemented here")
    else:
        raise Syntax(f"Unknown list type '{kind}' [stand-in wording]")


def cmd_createvm(reg, args):
    spec = {"--name": True, "--basefolder": True, "--register": False, "--uuid": True, "--groups": True,
            "--default": False, "--ostype": True, "--os-type": True}
    if version_tuple() >= (7, 1):
        spec.update({"--platform-architecture": True, "--platform-arch": True})
    opts = Options(args, spec)
    name = opts.get("--name")
    if not name:
        raise Syntax("Parameter --name is required [stand-in wording]")
    ostype = opts.get("--ostype", "--os-type", default="Other")
    if ostype not in [o[0] for o in ostypes()]:
        raise Failure("Unknown or invalid guest OS type given.", "E_INVALIDARG", "VirtualBoxWrap", "IVirtualBox")
    folder = os.path.join(opts.get("--basefolder", default=os.path.join(reg.home, "VirtualBox VMs")), name)
    cfg = os.path.join(folder, f"{name}.vbox")
    if os.path.exists(cfg):
        raise Failure(f"Machine settings file '{cfg}' already exists", "VBOX_E_FILE_ERROR", "MachineWrap",
                      "IMachine", "CreateMachine(bstrSettingsFile.raw(), bstrName.raw(), ...)")
    vm_uuid = opts.get("--uuid") or new_uuid()
    vm_uuid = vm_uuid.strip("{}").lower()
    if vm_uuid in reg.data["vms"]:
        raise Failure(f"Cannot register machine '{name}': a machine with UUID {{{vm_uuid}}} is already registered "
                      "[stand-in wording]", "E_INVALIDARG", "VirtualBoxWrap", "IVirtualBox")
    write_file(cfg, f'<?xml version="1.0"?>\n<VirtualBox><Machine uuid="{{{vm_uuid}}}" name="{name}" '
                    f'OSType="{ostype}"/></VirtualBox>\n')
    vm = {
        "uuid": vm_uuid, "name": name, "cfgfile": cfg, "folder": folder, "ostype": ostype,
        "groups": opts.get("--groups", default="/"), "memory": 128, "cpus": 1, "vram": 8, "ioapic": "off",
        "acpi": "on", "firmware": "bios", "graphicscontroller": "vboxvga", "rtcuseutc": "off", "audio": "on",
        "boot": ["floppy", "dvd", "disk", "none"],
        "nics": {str(i): {"mode": "none", "type": "Am79C973", "mac": new_mac(), "cable": "on"} for i in range(1, 9)},
        "controllers": {}, "attachments": {}, "snapshots": [], "state": "poweroff", "state_changed": now(),
        "install_at": None, "acpi_off_at": None, "started_at": None, "linked_from": None,
    }
    if opts.has("--register"):
        reg.data["vms"][vm_uuid] = vm
        print(f"Virtual machine '{name}' is created and registered.")
    else:
        print(f"Virtual machine '{name}' is created.")
    print(f"UUID: {vm_uuid}\nSettings file: '{cfg}'")


def _modifyvm_spec():
    v7 = version_tuple() >= (7, 0)
    plain = {"--memory": True, "--cpus": True, "--ioapic": True, "--acpi": True, "--firmware": True,
             "--graphicscontroller": True, "--vram": True, "--audio": True, "--name": True}
    for n in spelled("--os-type", "--ostype") + spelled("--rtc-use-utc", "--rtcuseutc"):
        plain[n] = True
    if v7:
        plain["--audio-enabled"] = True
    indexed = {"--boot": True, "--nic": True}
    pairs = [("--nic-type", "--nictype"), ("--cable-connected", "--cableconnected"),
             ("--bridge-adapter", "--bridgeadapter"), ("--host-only-adapter", "--hostonlyadapter"),
             ("--host-only-net", "--hostonlynet"), ("--nat-network", "--natnetwork"),
             ("--mac-address", "--macaddress"), ("--nat-pf", "--natpf"), ("--nat-net", "--natnet"),
             ("--nat-tftp-prefix", "--nattftpprefix"), ("--nat-tftp-file", "--nattftpfile"),
             ("--nat-tftp-server", "--nattftpserver"), ("--nat-dns-host-resolver", "--natdnshostresolver"),
             ("--nic-boot-prio", "--nicbootprio")]
    for new, old in pairs:
        for n in spelled(new, old):
            indexed[n] = True
    # Serial ports (VirtualBox's modifyvm option table): --uartN off | IOBASE IRQ; --uart-modeN (also --uartmodeN)
    # disconnected | server|client|tcpserver|tcpclient|file PATH | DEVICE.
    indexed["--uart"] = lambda first: first.lower() not in ("off", "disable")
    for n in spelled("--uart-mode", "--uartmode"):
        indexed[n] = lambda first: first.lower() in ("server", "client", "tcpserver", "tcpclient", "file")
    if v7:  # new in 7.0, both spellings (docs/virtualbox.md §1, §2.2)
        indexed["--nat-localhostreachable"] = indexed["--natlocalhostreachable"] = True
    if version_tuple() >= (7, 2):  # only in the 2025 man page (docs/virtualbox.md §1, §6.2)
        indexed["--nat-enable-tftp"] = True
    return plain, indexed


_CANON = {"--os-type": "--ostype", "--rtc-use-utc": "--rtcuseutc", "--nic-type": "--nictype",
          "--cable-connected": "--cableconnected", "--bridge-adapter": "--bridgeadapter",
          "--host-only-adapter": "--hostonlyadapter", "--host-only-net": "--hostonlynet",
          "--nat-network": "--natnetwork", "--mac-address": "--macaddress", "--nat-pf": "--natpf",
          "--nat-net": "--natnet", "--nat-tftp-prefix": "--nattftpprefix", "--nat-tftp-file": "--nattftpfile",
          "--nat-tftp-server": "--nattftpserver", "--nat-dns-host-resolver": "--natdnshostresolver",
          "--nic-boot-prio": "--nicbootprio", "--nat-localhostreachable": "--natlocalhostreachable",
          "--uart-mode": "--uartmode"}


def cmd_modifyvm(reg, args):
    if not args or args[0].startswith("-"):
        raise Syntax("Missing VM name or UUID [stand-in wording]")
    plain, indexed = _modifyvm_spec()
    opts = Options(args[1:], plain, indexed)
    vm = reg.find_vm(args[0])
    if vm["state"] == "saved":
        raise Failure("Cannot change VM settings while the machine is in saved state [stand-in wording]",
                      "VBOX_E_INVALID_VM_STATE")
    take_write_lock(reg, vm, "modifyvm")
    nics = vm["nics"]
    for name, slot, value in opts.values:
        name = _CANON.get(name, name)
        if slot is not None and (slot < 1 or (name == "--boot" and slot > 4) or (name != "--boot" and slot > 8)):
            raise Syntax(f"Invalid index {slot} for {name} [stand-in wording]")
        nic = nics.get(str(slot)) if slot else None
        if name == "--memory":
            vm["memory"] = int(value)
        elif name == "--cpus":
            vm["cpus"] = int(value)
        elif name == "--vram":
            vm["vram"] = int(value)
        elif name in ("--ioapic", "--acpi", "--rtcuseutc"):
            vm[name.lstrip("-")] = on_off(name, value)
        elif name == "--firmware":
            if value not in ("bios", "efi", "efi32", "efi64"):
                raise Syntax(f"Invalid --firmware argument '{value}' [stand-in wording]")
            vm["firmware"] = value
        elif name == "--graphicscontroller":
            if value not in ("none", "vboxvga", "vmsvga", "vboxsvga"):
                raise Syntax(f"Invalid --graphicscontroller argument '{value}' [stand-in wording]")
            vm["graphicscontroller"] = value
        elif name == "--audio-enabled":
            vm["audio"] = on_off(name, value)
        elif name == "--audio":
            vm["audio"] = "off" if value == "none" else "on"
        elif name == "--ostype":
            vm["ostype"] = value
        elif name == "--name":
            vm["name"] = value
        elif name == "--boot":
            if value not in BOOT_DEVICES:
                raise Syntax(f"Invalid boot device '{value}' [stand-in wording]")
            vm["boot"][slot - 1] = value
        elif name == "--nic":
            if value not in NIC_MODES:
                raise Syntax(f"Invalid --nic{slot} argument '{value}' [stand-in wording]")
            nic["mode"] = value
        elif name == "--nictype":
            if value not in NIC_TYPES:
                raise Syntax(f"Invalid NIC type '{value}' specified for NIC {slot} [stand-in wording]")
            nic["type"] = value
        elif name == "--macaddress":
            if value == "auto":
                nic["mac"] = new_mac()
            elif re.fullmatch(r"[0-9A-Fa-f]{12}", value):
                nic["mac"] = value.upper()
            else:
                raise Syntax(f"Invalid MAC address '{value}' [stand-in wording]")
        elif name in ("--cableconnected", "--natlocalhostreachable", "--nat-enable-tftp", "--natdnshostresolver"):
            nic[name.lstrip("-")] = on_off(f"{name}{slot}", value)
        elif name == "--nicbootprio":
            if not value.isdigit() or int(value) > 4:
                raise Syntax(f"Invalid --nicbootprio{slot} argument '{value}' [stand-in wording]")
            nic["bootprio"] = int(value)
        elif name == "--natpf":
            nic.setdefault("natpf", []).append(value)
        elif name == "--uart":
            if slot > 4:
                raise Syntax(f"Invalid index {slot} for {name} [stand-in wording]")
            uart = vm.setdefault("uarts", {}).setdefault(str(slot), {})
            if isinstance(value, tuple):
                try:
                    iobase, irq = int(value[0], 0), int(value[1])
                except ValueError:
                    raise Failure(f"Error parsing UART I/O base '{value[0]}'", "E_INVALIDARG") from None
                uart.update(enabled=True, iobase=iobase, irq=irq)
            else:
                uart["enabled"] = False
        elif name == "--uartmode":
            if slot > 4:
                raise Syntax(f"Invalid index {slot} for {name} [stand-in wording]")
            uart = vm.setdefault("uarts", {}).setdefault(str(slot), {})
            uart["mode"] = list(value) if isinstance(value, tuple) else [value]
        else:  # adapters, networks, TFTP settings: stored as given
            nic[name.lstrip("-")] = value
    reg.save()


def cmd_storagectl(reg, args):
    if not args or args[0].startswith("-"):
        raise Syntax("Missing VM name or UUID [stand-in wording]")
    opts = Options(args[1:], {"--name": True, "--add": True, "--controller": True, "--portcount": True,
                              "--hostiocache": True, "--bootable": True, "--rename": True, "--remove": False})
    vm = reg.find_vm(args[0])
    name = opts.get("--name")
    if not name:
        raise Syntax("Storage controller name not specified [stand-in wording]")
    take_write_lock(reg, vm, "storagectl")
    ctls = vm["controllers"]
    if opts.has("--remove"):
        if name not in ctls:
            raise Failure(f"Could not find a controller named '{name}' [stand-in wording]", "VBOX_E_OBJECT_NOT_FOUND")
        del ctls[name]
        vm["attachments"] = {k: v for k, v in vm["attachments"].items() if not k.startswith(f"{name}-")}
        reg.save()
        return
    add = opts.get("--add")
    if add:
        if add not in ("floppy", "ide", "pcie", "sas", "sata", "scsi", "usb", "virtio"):
            raise Syntax(f"Invalid --add argument '{add}' [stand-in wording]")
        if name in ctls:
            raise Failure(f"Storage controller named '{name}' already exists [stand-in wording]",
                          "VBOX_E_OBJECT_IN_USE")
        sata = add == "sata"
        ctls[name] = {"bus": add, "controller": "IntelAhci" if sata else "PIIX4", "ports": 30 if sata else 2,
                      "bootable": "on"}
    if name not in ctls:
        raise Failure(f"Could not find a controller named '{name}' [stand-in wording]", "VBOX_E_OBJECT_NOT_FOUND")
    ctl = ctls[name]
    if opts.get("--controller"):
        if opts.get("--controller") not in ("BusLogic", "I82078", "ICH6", "IntelAhci", "LSILogic", "LSILogicSAS",
                                            "NVMe", "PIIX3", "PIIX4", "USB", "VirtIO"):
            raise Syntax(f"Invalid --controller argument '{opts.get('--controller')}' [stand-in wording]")
        ctl["controller"] = opts.get("--controller")
    if opts.get("--portcount"):
        ctl["ports"] = int(opts.get("--portcount"))
    if opts.get("--bootable"):
        ctl["bootable"] = on_off("--bootable", opts.get("--bootable"))
    if opts.get("--hostiocache"):
        ctl["hostiocache"] = on_off("--hostiocache", opts.get("--hostiocache"))
    reg.save()


def write_disk(path, size_mb, parent=None):
    write_file(path, f"stand-in VDI image, {size_mb} MB" + (f", differencing, parent {parent}" if parent else "") + "\n")


def cmd_createmedium(reg, args, alias=None):
    kind = "disk"
    if alias is None and args and args[0] in ("disk", "dvd", "floppy"):
        kind, args = args[0], args[1:]
    opts = Options(args, {"--filename": True, "--size": True, "--sizebyte": True, "--format": True,
                          "--variant": True, "--diffparent": True, "--property": True, "--property-file": True})
    if kind != "disk":
        raise Syntax(f"stand-in: 'createmedium {kind}' is real but not implemented here")
    filename = opts.get("--filename")
    if not filename:
        raise Syntax("Parameters --filename is required [stand-in wording]")
    fmt = opts.get("--format", default="VDI")
    if fmt.upper() not in ("VDI", "VMDK", "VHD"):
        raise Syntax(f"Invalid --format argument '{fmt}' [stand-in wording]")
    if opts.get("--size"):
        size_mb = int(opts.get("--size"))
    elif opts.get("--sizebyte"):
        size_mb = int(opts.get("--sizebyte")) // (1024 * 1024)
    else:
        raise Syntax("Parameters --size or --sizebyte is required [stand-in wording]")
    path = real(filename, reg.home)
    mid, medium = reg.find_medium(path)
    if medium:
        raise Failure(f"Cannot register the hard disk '{path}' {{{mid}}} because a hard disk '{path}' with UUID "
                      f"{{{mid}}} already exists", "E_INVALIDARG", "VirtualBoxWrap", "IVirtualBox")
    if os.path.exists(path):
        raise Failure(f"Could not create the medium storage unit '{path}': file already exists [stand-in wording]",
                      "VBOX_E_FILE_ERROR", "MediumWrap", "IMedium")
    write_disk(path, size_mb)
    mid = new_uuid()
    reg.data["media"][mid] = {"path": path, "kind": "hdd", "format": fmt.upper(), "size_mb": size_mb,
                              "parent": None, "owner": None, "installed": False}
    reg.save()
    print(PROGRESS, file=sys.stderr)
    print(f"Medium created. UUID: {mid}")


def cmd_storageattach(reg, args):
    if not args or args[0].startswith("-"):
        raise Syntax("Missing VM name or UUID [stand-in wording]")
    opts = Options(args[1:], {"--storagectl": True, "--port": True, "--device": True, "--type": True,
                              "--medium": True, "--mtype": True, "--comment": True, "--nonrotational": True,
                              "--discard": True, "--hotpluggable": True, "--setuuid": True, "--setparentuuid": True,
                              "--passthrough": True, "--tempeject": True, "--forceunmount": False})
    vm = reg.find_vm(args[0])
    ctl_name, medium_ref = opts.get("--storagectl"), opts.get("--medium")
    if not ctl_name or opts.get("--port") is None or medium_ref is None:
        raise Syntax("Mandatory parameters --storagectl, --port and --medium are required [stand-in wording]")
    kind = opts.get("--type")
    if kind is not None and kind not in ("dvddrive", "hdd", "fdd"):
        raise Syntax(f"Invalid --type argument '{kind}' [stand-in wording]")
    # A running VM's DVD can be changed (ejected); everything else needs the write lock.
    if not (vm["state"] == "running" and kind in (None, "dvddrive") and medium_ref in ("none", "emptydrive")):
        take_write_lock(reg, vm, "storageattach")
    ctl = vm["controllers"].get(ctl_name)
    if ctl is None:
        raise Failure(f"Could not find a controller named '{ctl_name}' [stand-in wording]", "VBOX_E_OBJECT_NOT_FOUND")
    port, device = int(opts.get("--port")), int(opts.get("--device", default="0"))
    devices = 2 if ctl["bus"] == "ide" else 1  # IDE: master and slave on each port
    if not (0 <= port < ctl["ports"] and 0 <= device < devices):
        raise Failure(f"The port and/or device parameter are out of range: port={port} (must be in range "
                      f"[0, {ctl['ports'] - 1}]), device={device} [stand-in wording]", "E_INVALIDARG")
    slot = f"{ctl_name}-{port}-{device}"
    if medium_ref == "none":
        vm["attachments"].pop(slot, None)
        reg.save()
        return
    if kind is None:
        raise Syntax("Missing --type argument [stand-in wording]")
    if medium_ref == "emptydrive":
        if kind == "hdd":
            raise Syntax("emptydrive is only for DVD and floppy drives [stand-in wording]")
        vm["attachments"][slot] = {"type": kind, "medium": None}
        reg.save()
        return
    mid, medium = reg.find_medium(medium_ref)
    if medium is None:
        path = real(medium_ref, reg.home)
        if not os.path.isfile(path):
            raise Failure(f"Could not find file for the medium '{path}' (VERR_FILE_NOT_FOUND) [stand-in wording]",
                          "VBOX_E_FILE_ERROR", "MediumWrap", "IMedium")
        mid = new_uuid()
        medium = {"path": path, "kind": "dvd" if kind == "dvddrive" else "hdd", "format": "RAW",
                  "size_mb": 0, "parent": None, "owner": None, "installed": False}
        reg.data["media"][mid] = medium
    if (medium["kind"] == "dvd") != (kind == "dvddrive"):
        raise Failure(f"Medium '{medium['path']}' is not a {kind} image [stand-in wording]", "E_INVALIDARG")
    if kind == "hdd":
        others = [v for v in reg.attached_to(mid) if v["uuid"] != vm["uuid"]]
        if others:
            raise Failure(f"Medium '{medium['path']}' is already attached to '{others[0]['name']}' [stand-in wording]",
                          "VBOX_E_OBJECT_IN_USE", "MediumWrap", "IMedium")
        medium["owner"] = vm["uuid"]
    vm["attachments"][slot] = {"type": kind, "medium": mid}
    reg.save()


def cmd_closemedium(reg, args):
    if args and args[0] in ("disk", "dvd", "floppy"):  # the medium's kind: every kind is closed alike
        args = args[1:]
    opts = Options(args, {"--delete": False}, positional_max=1)
    if not opts.positional:
        raise Syntax("Missing medium UUID or file name [stand-in wording]")
    mid, medium = reg.find_medium(opts.positional[0])
    if medium is None:
        raise Failure(f"Could not find file for the medium '{opts.positional[0]}' [stand-in wording]",
                      "VBOX_E_OBJECT_NOT_FOUND", "VirtualBoxWrap", "IVirtualBox")
    users = reg.attached_to(mid)
    if users:
        raise Failure(f"Medium '{medium['path']}' cannot be closed because it is still attached to "
                      f"{len(users)} virtual machines [stand-in wording]", "VBOX_E_OBJECT_IN_USE", "MediumWrap",
                      "IMedium")
    del reg.data["media"][mid]
    if opts.has("--delete"):
        remove(medium["path"])
        print(PROGRESS, file=sys.stderr)
    reg.save()


def boots_installed_disk(reg, vm):
    return any(att["type"] == "hdd" and att["medium"] and installed(reg, att["medium"])
               for att in vm["attachments"].values())


def installed(reg, mid):
    while mid:
        medium = reg.data["media"].get(mid)
        if medium is None:
            return False
        if medium.get("installed"):
            return True
        mid = medium.get("parent")
    return False


def cmd_startvm(reg, args):
    if not args or args[0].startswith("-"):
        raise Syntax("Missing VM name or UUID [stand-in wording]")
    opts = Options(args[1:], {"--type": True, "--putenv": True, "-E": True})
    kind = opts.get("--type", default="gui")
    if kind not in ("gui", "headless", "sdl", "separate"):
        raise Syntax(f"Invalid session type '{kind}' [stand-in wording]")
    vm = reg.find_vm(args[0])
    take_write_lock(reg, vm, "startvm")
    print(f'Waiting for VM "{vm["name"]}" to power on...')
    t = now()
    was_saved = vm["state"] == "saved"
    reg.set_state(vm, "running", t)
    vm["started_at"] = t
    write_file(os.path.join(vm["folder"], "Logs", "VBox.log"), f"stand-in VBox.log: started {iso_time(t)}\n")
    nic1 = vm["nics"]["1"]
    first = next((b for b in vm["boot"] if b != "none"), "none")
    if first == "net" and not was_saved and nic1["mode"] == "nat":
        prefix = nic1.get("nattftpprefix") or os.path.join(reg.home, "TFTP")
        loader = os.path.join(prefix, nic1.get("nattftpfile") or f"{vm['name']}.pxe")
        dvd = any(att["type"] == "dvddrive" and att["medium"]
                  and os.path.isfile(reg.data["media"][att["medium"]]["path"]) for att in vm["attachments"].values())
        disk = any(att["type"] == "hdd" for att in vm["attachments"].values())
        if os.path.isfile(loader) and dvd and disk:
            console(vm, f"PXE boot: {os.path.basename(loader)} from the NAT TFTP server (10.0.2.4)")
            fetched = fetch_kickstart(vm, prefix)
            if fetched is True:
                vm["install_at"] = t + env_float("VBOX_STANDIN_INSTALL_SECONDS", 0.2)
                console(vm, "anaconda: kickstart fetched; installing")
            else:  # the installer waits at its kickstart for ever (dracut keeps retrying)
                console(vm, f"dracut-initqueue: Warning: failed to fetch kickstart from {fetched}")
    reg.save()
    print(f'VM "{vm["name"]}" has been successfully started.')


def console(vm, line):
    """What the guest writes to COM1, when --uart1 is on with --uart-mode1 file PATH (PortMode_RawFile)."""
    uart = vm.get("uarts", {}).get("1", {})
    mode = uart.get("mode", [])
    if uart.get("enabled") and len(mode) == 2 and mode[0].lower() == "file":
        with open(mode[1], "a") as fh:
            fh.write(line + "\n")


def fetch_kickstart(vm, tftp_prefix):
    """The installer's first step: GET the ``inst.ks=`` URL of the PXE entry (pxelinux.cfg/default).
    True if it answered 200, else the URL and why not. From the guest, 10.0.2.2 is the host; it reaches
    the host's loopback only with --nat-localhostreachable1 on (VirtualBox 7 NAT, docs/virtualbox.md §6.1)."""
    try:
        with open(os.path.join(tftp_prefix, "pxelinux.cfg", "default")) as fh:
            match = re.search(r"inst\.ks=(\S+)", fh.read())
    except OSError:
        match = None
    if not match:
        return "(no inst.ks= in pxelinux.cfg/default)"
    url = match.group(1)
    nic1 = vm["nics"]["1"]
    if url.startswith("http://10.0.2.2:"):
        if nic1.get("natlocalhostreachable") != "on":
            return f"{url} (host loopback not reachable through NAT)"
        url = "http://127.0.0.1:" + url[len("http://10.0.2.2:"):]
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            resp.read()
            return True
    except Exception as err:  # noqa: BLE001 - any failure leaves the installer waiting
        return f"{match.group(1)} ({err})"


def cmd_controlvm(reg, args):
    if len(args) < 2:
        raise Syntax("Not enough parameters [stand-in wording]")
    action = args[1]
    known = ("pause", "resume", "reset", "poweroff", "savestate", "acpipowerbutton", "acpisleepbutton", "shutdown",
             "keyboardputscancode", "keyboardputstring", "natpf1", "nic1", "setlinkstate1", "vrde", "screenshotpng")
    if action not in known:
        raise Syntax(f"Invalid parameter '{action}' [stand-in wording]")
    if action not in ("poweroff", "acpipowerbutton", "savestate"):
        raise Syntax(f"stand-in: 'controlvm {action}' is real but not implemented here")
    Options(args[2:], {})
    vm = reg.find_vm(args[0])
    if vm["state"] != "running":
        raise Failure(f"Machine '{vm['name']}' is not currently running [stand-in wording]", "VBOX_E_INVALID_VM_STATE")
    if action == "poweroff":
        reg.set_state(vm, "poweroff")
        print(PROGRESS, file=sys.stderr)
    elif action == "savestate":
        reg.set_state(vm, "saved")
        print(PROGRESS, file=sys.stderr)
    elif action == "acpipowerbutton":
        guest_listens = vm["acpi"] == "on" and not vm.get("install_at") and boots_installed_disk(reg, vm)
        if guest_listens and not os.environ.get("VBOX_STANDIN_IGNORE_ACPI"):
            vm["acpi_off_at"] = now() + env_float("VBOX_STANDIN_ACPI_SECONDS", 0.1)
    reg.save()


def q(value):
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_showvminfo(reg, args):
    if not args or args[0].startswith("-"):
        raise Syntax("Missing VM name or UUID [stand-in wording]")
    opts = Options(args[1:], {"--machinereadable": False, "--details": False, "--log": True, "--password-id": True,
                              "--password": True})
    vm = reg.find_vm(args[0])
    if not opts.has("--machinereadable"):
        raise Syntax("stand-in: only 'showvminfo --machinereadable' is implemented here")
    desc = {o[0]: o[1] for o in OSTYPES}.get(vm["ostype"], vm["ostype"])
    out = [f"name={q(vm['name'])}", f"groups={q(vm['groups'])}", f"ostype={q(desc)}", f"UUID={q(vm['uuid'])}",
           f"CfgFile={q(vm['cfgfile'])}", f"SnapFldr={q(os.path.join(vm['folder'], 'Snapshots'))}",
           f"LogFldr={q(os.path.join(vm['folder'], 'Logs'))}", f"memory={vm['memory']}", f"vram={vm['vram']}",
           f"cpus={vm['cpus']}", f"acpi={q(vm['acpi'])}", f"ioapic={q(vm['ioapic'])}",
           f"firmware={q(vm['firmware'].upper() if vm['firmware'] == 'bios' else vm['firmware'])}"]
    out += [f"boot{i}={q(dev)}" for i, dev in enumerate(vm["boot"], 1)]
    for n, (cname, ctl) in enumerate(vm["controllers"].items()):
        out += [f"storagecontrollername{n}={q(cname)}", f"storagecontrollertype{n}={q(ctl['controller'])}",
                f"storagecontrollermaxportcount{n}={q(30)}", f"storagecontrollerportcount{n}={q(ctl['ports'])}",
                f"storagecontrollerbootable{n}={q(ctl['bootable'])}"]
        for port in range(ctl["ports"]):
            for device in range(2 if ctl["bus"] == "ide" else 1):
                slot = f"{port}-{device}"
                att = vm["attachments"].get(f"{cname}-{slot}")
                if att is None:
                    out.append(f"{q(f'{cname}-{slot}')}={q('none')}")
                elif att["medium"] is None:
                    out.append(f"{q(f'{cname}-{slot}')}={q('emptydrive')}")
                else:
                    out += [f"{q(f'{cname}-{slot}')}={q(reg.data['media'][att['medium']]['path'])}",
                            f"{q(f'{cname}-ImageUUID-{slot}')}={q(att['medium'])}"]
    for i in range(1, 9):
        nic = vm["nics"][str(i)]
        out.append(f"nic{i}={q(nic['mode'])}")
        if nic["mode"] == "none":
            continue
        if nic["mode"] == "nat":
            out.append(f"natnet{i}={q(nic.get('natnet', 'nat'))}")
            out += [f"Forwarding({k})={q(rule)}" for k, rule in enumerate(nic.get("natpf", []))]
        if nic["mode"] == "hostonly":
            out.append(f"hostonlyadapter{i}={q(nic.get('hostonlyadapter', ''))}")
        out += [f"macaddress{i}={q(nic['mac'])}", f"cableconnected{i}={q(nic['cable'])}",
                f"nictype{i}={q(nic['type'])}"]
    out += [f"VMState={q(vm['state'])}", f"VMStateChangeTime={q(iso_time(vm['state_changed']))}"]
    for k, snap in enumerate(vm["snapshots"]):
        suffix = "" if k == 0 else f"-{k}"
        out += [f"SnapshotName{suffix}={q(snap['name'])}", f"SnapshotUUID{suffix}={q(snap['uuid'])}"]
    ga = 2 if guest_props(reg, vm) else 0
    out.append(f"GuestAdditionsRunLevel={ga}")
    print("\n".join(out))


def cmd_snapshot(reg, args):
    if len(args) < 2:
        raise Syntax("Not enough parameters [stand-in wording]")
    vm = reg.find_vm(args[0])
    action = args[1]
    if action == "take":
        opts = Options(args[2:], {"--description": True, "--live": False, "--uniquename": True}, positional_max=1)
        if not opts.positional:
            raise Syntax("Missing snapshot name [stand-in wording]")
        if vm["state"] in STOPPED:  # a running VM gets an online snapshot instead
            take_write_lock(reg, vm, "snapshot")
        snap_uuid = new_uuid()
        disks = {}
        for slot, att in vm["attachments"].items():
            if att["type"] != "hdd":
                continue
            disks[slot] = att["medium"]
            child = new_uuid()
            path = os.path.join(vm["folder"], "Snapshots", f"{{{child}}}.vdi")
            write_disk(path, 0, att["medium"])
            reg.data["media"][child] = {"path": path, "kind": "hdd", "format": "VDI", "size_mb": 0,
                                        "parent": att["medium"], "owner": vm["uuid"], "installed": False}
            att["medium"] = child
        vm["snapshots"].append({"name": opts.positional[0], "uuid": snap_uuid, "disks": disks,
                                "description": opts.get("--description", default=""),
                                "online": vm["state"] not in STOPPED})
        reg.save()
        print(PROGRESS, file=sys.stderr)
        print(f"Snapshot taken. UUID: {snap_uuid}")
    elif action == "list":
        opts = Options(args[2:], {"--details": False, "--machinereadable": False})
        if not vm["snapshots"]:
            print("This machine does not have any snapshots")
            raise SystemExit(1)
        if not opts.has("--machinereadable"):
            raise Syntax("stand-in: only 'snapshot list --machinereadable' is implemented here")
        for k, snap in enumerate(vm["snapshots"]):
            suffix = "" if k == 0 else f"-{k}"
            print(f"SnapshotName{suffix}={q(snap['name'])}\nSnapshotUUID{suffix}={q(snap['uuid'])}")
        last = vm["snapshots"][-1]
        print(f"CurrentSnapshotName={q(last['name'])}\nCurrentSnapshotUUID={q(last['uuid'])}")
    elif action in ("delete", "restore", "restorecurrent", "edit", "showvminfo"):
        raise Syntax(f"stand-in: 'snapshot {action}' is real but not implemented here")
    else:
        raise Syntax(f"Invalid parameter '{action}' [stand-in wording]")


CLONE_OPTIONS = {"link": "link", "linked": "link", "keepallmacs": "keepallmacs", "keepnatmacs": "keepnatmacs",
                 "keepdisknames": "keepdisknames", "keephwuuids": "keephwuuids", "keephwuuid": "keephwuuids"}


def cmd_clonevm(reg, args):
    if not args or args[0].startswith("-"):
        raise Syntax("Missing VM name or UUID [stand-in wording]")
    opts = Options(args[1:], {"--snapshot": True, "--mode": True, "--options": True, "--name": True,
                              "--groups": True, "--basefolder": True, "--uuid": True, "--register": False})
    flags = set()
    for _, _, value in [v for v in opts.values if v[0] == "--options"]:
        for item in value.split(","):
            if item.strip().lower() not in CLONE_OPTIONS:
                raise Syntax(f"Invalid clone options '{value}'")
            flags.add(CLONE_OPTIONS[item.strip().lower()])
    mode = opts.get("--mode", default="machine")
    if mode not in ("machine", "machineandchildren", "all"):
        raise Syntax(f"Invalid clone mode '{mode}' [stand-in wording]")
    src = reg.find_vm(args[0])
    snap = None
    if opts.get("--snapshot"):
        ref = opts.get("--snapshot")
        snap = next((s for s in src["snapshots"] if ref in (s["name"], s["uuid"])), None)
        if snap is None:
            raise Failure(f"Could not find a snapshot named '{ref}' [stand-in wording]", "VBOX_E_OBJECT_NOT_FOUND")
    if "link" in flags and snap is None:
        raise Failure("Linked clones can only be created from a snapshot [stand-in wording]", "E_INVALIDARG")
    name = opts.get("--name", default=f"{src['name']} Clone")
    folder = os.path.join(opts.get("--basefolder", default=os.path.join(reg.home, "VirtualBox VMs")), name)
    cfg = os.path.join(folder, f"{name}.vbox")
    if os.path.exists(cfg):
        raise Failure(f"Machine settings file '{cfg}' already exists", "VBOX_E_FILE_ERROR")
    clone_uuid = (opts.get("--uuid") or new_uuid()).strip("{}").lower()
    if clone_uuid in reg.data["vms"]:
        raise Failure(f"A machine with UUID {{{clone_uuid}}} is already registered [stand-in wording]", "E_INVALIDARG")
    print(PROGRESS, file=sys.stderr)
    write_file(cfg, f'<?xml version="1.0"?>\n<VirtualBox><Machine uuid="{{{clone_uuid}}}" name="{name}"/>'
                    '</VirtualBox>\n')
    vm = json.loads(json.dumps(src))
    vm.update({"uuid": clone_uuid, "name": name, "cfgfile": cfg, "folder": folder, "snapshots": [],
               "state": "poweroff", "state_changed": now(), "install_at": None, "acpi_off_at": None,
               "started_at": None, "groups": opts.get("--groups", default=src["groups"]),
               "linked_from": {"vm": src["uuid"], "snapshot": snap["uuid"]} if "link" in flags else None})
    for nic in vm["nics"].values():
        if "keepallmacs" in flags or ("keepnatmacs" in flags and nic["mode"] == "nat"):
            continue
        nic["mac"] = new_mac()
    source_disks = snap["disks"] if snap else {
        slot: att["medium"] for slot, att in src["attachments"].items() if att["type"] == "hdd"}
    for slot, parent in source_disks.items():
        child = new_uuid()
        if "link" in flags:
            path = os.path.join(folder, "Snapshots", f"{{{child}}}.vdi")
            write_disk(path, 0, parent)
            medium = {"parent": parent}
        else:
            path = os.path.join(folder, f"{name}.vdi")
            write_disk(path, reg.data["media"][parent]["size_mb"])
            medium = {"parent": None, "installed": installed(reg, parent)}
        reg.data["media"][child] = {"path": path, "kind": "hdd", "format": "VDI", "size_mb": 0,
                                    "owner": clone_uuid, "installed": False, **medium}
        vm["attachments"][slot] = {"type": "hdd", "medium": child}
    if opts.has("--register"):
        reg.data["vms"][clone_uuid] = vm
    reg.save()
    print(f'Machine has been successfully cloned as "{name}"')


def cmd_unregistervm(reg, args):
    if not args or args[0].startswith("-"):
        raise Syntax("Missing VM name or UUID [stand-in wording]")
    spec = {"--delete": False}
    if version_tuple() >= (7, 1):
        spec["--delete-all"] = False
    opts = Options(args[1:], spec)
    vm = reg.find_vm(args[0])
    take_write_lock(reg, vm, "unregistervm")
    owned = [mid for mid, m in reg.data["media"].items() if m.get("owner") == vm["uuid"]]
    for mid in owned:
        foreign = [c for c in reg.children(mid) if reg.data["media"][c].get("owner") != vm["uuid"]]
        if foreign:
            child = reg.data["media"][foreign[0]]
            raise Failure(f"Cannot delete the medium '{reg.data['media'][mid]['path']}' because it has "
                          f"{len(foreign)} child media (linked clone '{child['path']}') [stand-in wording]",
                          "VBOX_E_OBJECT_IN_USE", "MediumWrap", "IMedium")
    del reg.data["vms"][vm["uuid"]]
    for mid in owned:
        medium = reg.data["media"].pop(mid)
        if opts.has("--delete", "--delete-all"):
            remove(medium["path"])
    if opts.has("--delete", "--delete-all"):
        import shutil

        folder = vm["folder"]
        remove(vm["cfgfile"])
        shutil.rmtree(os.path.join(folder, "Logs"), ignore_errors=True)
        for sub in (os.path.join(folder, "Snapshots"), folder):
            try:
                os.rmdir(sub)
            except OSError:
                pass
        print(PROGRESS, file=sys.stderr)
    reg.save()


def guest_props(reg, vm):
    """What Guest Additions in an installed, booted guest report (docs/virtualbox.md §7)."""
    if vm["state"] != "running" or vm.get("install_at") or os.environ.get("VBOX_STANDIN_NO_GA"):
        return {}
    if not boots_installed_disk(reg, vm):
        return {}
    props, n = {}, 0
    for i in range(1, 9):
        nic = vm["nics"][str(i)]
        if nic["mode"] == "none":
            continue
        mac = nic["mac"]
        if nic["mode"] == "nat":
            ip = "10.0.2.15"
        else:
            ip = f"192.168.56.{100 + int(mac[-2:], 16) % 150}"
        props[f"/VirtualBox/GuestInfo/Net/{n}/V4/IP"] = ip
        props[f"/VirtualBox/GuestInfo/Net/{n}/MAC"] = mac
        n += 1
    props["/VirtualBox/GuestInfo/Net/Count"] = str(n)
    return props


def cmd_guestproperty(reg, args):
    if len(args) < 2:
        raise Syntax("Not enough parameters [stand-in wording]")
    action, rest = args[0], args[1:]
    if action == "get":
        opts = Options(rest, {"--verbose": False}, positional_max=2)
        if len(opts.positional) < 2:
            raise Syntax("Missing property name [stand-in wording]")
        vm = reg.find_vm(opts.positional[0])
        value = guest_props(reg, vm).get(opts.positional[1])
        print(f"Value: {value}" if value is not None else "No value set!")
    elif action == "enumerate":
        opts = Options(rest, {"--no-timestamp": False, "--no-flags": False, "--relative": False,
                              "--old-format": False, "--patterns": True}, positional_max=99)
        vm = reg.find_vm(opts.positional[0])
        patterns = opts.positional[1:] + ([opts.get("--patterns")] if opts.get("--patterns") else [])
        import fnmatch

        props = {k: v for k, v in guest_props(reg, vm).items()
                 if not patterns or any(fnmatch.fnmatchcase(k, p) for p in patterns)}
        if not props:
            print("No properties found.")
        stamp = iso_time(vm.get("started_at") or now())
        for key, value in sorted(props.items()):
            if opts.has("--old-format"):
                print(f"Name: {key}, value: {value}, timestamp: 0, flags: TRANSIENT, TRANSRESET")
            else:
                print(f"{key} = '{value}' @ {stamp}Z TRANSIENT, TRANSRESET")
    elif action in ("set", "delete", "unset", "wait"):
        raise Syntax(f"stand-in: 'guestproperty {action}' is real but not implemented here")
    else:
        raise Syntax(f"Invalid parameter '{action}' [stand-in wording]")


HANDLERS = {
    "list": cmd_list, "createvm": cmd_createvm, "modifyvm": cmd_modifyvm, "storagectl": cmd_storagectl,
    "createmedium": cmd_createmedium, "createhd": lambda r, a: cmd_createmedium(r, a, "createhd"),
    "createvdi": lambda r, a: cmd_createmedium(r, a, "createvdi"), "storageattach": cmd_storageattach,
    "closemedium": cmd_closemedium, "startvm": cmd_startvm, "controlvm": cmd_controlvm,
    "showvminfo": cmd_showvminfo, "snapshot": cmd_snapshot, "clonevm": cmd_clonevm,
    "unregistervm": cmd_unregistervm, "guestproperty": cmd_guestproperty,
}


def emit_failure(err):
    lines = [f"VBoxManage: error: {err}"]
    if err.code:
        lines.append(f"VBoxManage: error: Details: code {err.code} ({CODES[err.code]}), component {err.component}, "
                     f"interface {err.interface}, callee nsISupports")
    if err.context:
        lines.append(f'VBoxManage: error: Context: "{err.context}" at line 1 of file VBoxManageStandIn.cpp')
    print("\n".join(lines), file=sys.stderr)


def listed(var, sub):
    return sub in [s.strip() for s in os.environ.get(var, "").split(",") if s.strip()]


def main(argv):
    home = os.environ.get("VBOX_STANDIN_HOME")
    if not home:
        print("VBoxManage (stand-in): VBOX_STANDIN_HOME is not set", file=sys.stderr)
        return 1
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "invocations.jsonl"), "a") as log:
        log.write(json.dumps(argv) + "\n")
    if argv in (["--version"], ["-v"], ["-V"]):
        print(version())
        return 0
    if not argv:
        print("Usage: VBoxManage [<general option>] <command> [stand-in wording]", file=sys.stderr)
        return 2
    sub, args = argv[0], argv[1:]
    if sub not in SUBCOMMANDS:
        print(f"VBoxManage: error: Invalid command '{sub}' [stand-in wording]", file=sys.stderr)
        return 2
    if sub not in HANDLERS:
        print(f"VBoxManage: error: stand-in: '{sub}' is real but not implemented here", file=sys.stderr)
        return 2
    reg = Registry(home)
    if listed("VBOX_STANDIN_ERROR_AT_EXIT0", sub):
        emit_failure(Failure("Code NS_ERROR_FAILURE (0x80004005) - Operation failed (stand-in: error at exit 0)",
                             "NS_ERROR_FAILURE"))
        return 0
    if listed("VBOX_STANDIN_FAIL", sub):
        emit_failure(Failure(f"stand-in: simulated failure of '{sub}'", "NS_ERROR_FAILURE"))
        return 1
    try:
        HANDLERS[sub](reg, args)
        reg.save()
    except Syntax as err:
        print(f"VBoxManage: error: {err}", file=sys.stderr)
        return 2
    except Failure as err:
        emit_failure(err)
        return 1
    except SystemExit as done:
        return int(done.code or 0)
    return 0

