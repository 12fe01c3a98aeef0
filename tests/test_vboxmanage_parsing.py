"""VBoxManage output parsing and the command wrapper's failure/retry rules, as tables of input -> expected.

Inputs are the shapes quoted in docs/virtualbox.md (§1, §3, §5, §7, §13).
"""
from __future__ import annotations

import random
import re

import pytest

from fabfile.core import localcmd
from fabfile.core.errors import ProviderError, UsageError
from fabfile.providers import base
from fabfile.providers.virtualbox.provider import machine_from_info
from fabfile.providers.virtualbox.vboxmanage import (
    INSTALL_HINT,
    VBoxError,
    VBoxFailure,
    VBoxManage,
    backoff,
    broken_install,
    guest_addresses,
    mac_colon,
    parse_failure,
    parse_guestproperties,
    parse_hostonlyifs,
    parse_list_vms,
    parse_machinereadable,
    parse_ostypes,
    parse_snapshot_names,
    parse_version,
    retry_delay,
)

LOCKED = (
    "VBoxManage: error: The machine 'web1' is already locked for a session (or being unlocked)\n"
    "VBoxManage: error: Details: code VBOX_E_INVALID_OBJECT_STATE (0x80bb0007), component MachineWrap, "
    "interface IMachine, callee nsISupports\n"
    'VBoxManage: error: Context: "LockMachine(a->session, LockType_Write)" at line 425 of file VBoxManageModifyVM.cpp\n'
)
NOT_FOUND = (
    "VBoxManage: error: Could not find a registered machine named 'web9'\n"
    "VBoxManage: error: Details: code VBOX_E_OBJECT_NOT_FOUND (0x80bb0001), component VirtualBoxWrap, "
    "interface IVirtualBox, callee nsISupports\n"
)


@pytest.mark.parametrize("text, expected", [
    ("7.1.12r169651\n", (7, 1, 12)),
    ("WARNING: The character device /dev/vboxdrv does not exist.\n7.0.10r158379\n", (7, 0, 10)),
    ("4.1.8r1234_OSE\n", (4, 1, 8)),
    ("4.1.8_MacPortsr1234\n", (4, 1, 8)),
    ("6.1.50_Debianr161033\n", (6, 1, 50)),
])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


@pytest.mark.parametrize("text", ["", "VBoxManage: command not usable\n", "seven\n"])
def test_parse_version_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_version(text)


def test_broken_install_is_recognised():
    text = "WARNING: The vboxdrv kernel module is not loaded. Either there is no module\n7.0.10r158379\n"
    assert broken_install(text) == "WARNING: The vboxdrv kernel module is not loaded. Either there is no module"
    assert broken_install("7.1.12r169651\n") is None


@pytest.mark.parametrize("text, expected", [
    ('"base_worker-1_1684635562437_20054" {b2f02b22-72ee-4e16-9d35-89a2714ca273}\n'
     '"base_worker-2_1684635673520_5423" {416c3df8-3cf6-4c6a-8d01-d355a41e1f1a}\n',
     [("base_worker-1_1684635562437_20054", "b2f02b22-72ee-4e16-9d35-89a2714ca273"),
      ("base_worker-2_1684635673520_5423", "416c3df8-3cf6-4c6a-8d01-d355a41e1f1a")]),
    ('"My VM {copy}" {91d7d8d4-a3c9-4f94-9946-9a277b970381}\n',
     [("My VM {copy}", "91d7d8d4-a3c9-4f94-9946-9a277b970381")]),
    ('"<inaccessible>" {0d15ea5e-0000-4000-8000-000000000000}\n',
     [("<inaccessible>", "0d15ea5e-0000-4000-8000-000000000000")]),
    ("", []),
    ("WARNING: something\n\n", []),
])
def test_parse_list_vms(text, expected):
    assert parse_list_vms(text) == expected


SHOWVMINFO = r'''name="minishift"
UUID="91d7d8d4-a3c9-4f94-9946-9a277b970381"
CfgFile="C:\\MyTestFolder\\minishift\\minishift.vbox"
VMState="poweroff"
VMStateChangeTime="2015-09-28T08:42:38.443000000"
nic1="nat"
Forwarding(0)="ssh,tcp,127.0.0.1,52765,,22"
hostonlyadapter2="VirtualBox Host-Only Ethernet Adapter #6"
macaddress2="080027E34B7A"
cableconnected2="on"
nic2="hostonly"
nictype2="82540EM"
nic3="none"
GuestAdditionsRunLevel=0
"SATA-0-0"="/vms/minishift/disk.vdi"
"SATA-ImageUUID-0-0"="0a1b2c3d-0000-4000-8000-000000000001"
description="a=b, said \"she\""
"key=with=equals"="value"
"quoted \"key\""="v"
not a key value line
'''


@pytest.mark.parametrize("key, value", [
    ("name", "minishift"),
    ("CfgFile", r"C:\MyTestFolder\minishift\minishift.vbox"),
    ("VMState", "poweroff"),
    ("Forwarding(0)", "ssh,tcp,127.0.0.1,52765,,22"),
    ("hostonlyadapter2", "VirtualBox Host-Only Ethernet Adapter #6"),
    ("GuestAdditionsRunLevel", "0"),
    ("SATA-0-0", "/vms/minishift/disk.vdi"),
    ("description", 'a=b, said "she"'),
    ("key=with=equals", "value"),
    ('quoted "key"', "v"),
])
def test_parse_machinereadable(key, value):
    assert parse_machinereadable(SHOWVMINFO)[key] == value


def test_parse_machinereadable_skips_lines_it_cannot_read():
    info = parse_machinereadable(SHOWVMINFO + 'broken="no end\n=novalue\n')
    assert "not a key value line" not in info and "broken" not in info and "" not in info


@pytest.mark.parametrize("stderr, expected", [
    (LOCKED, VBoxFailure("The machine 'web1' is already locked for a session (or being unlocked)",
                         "VBOX_E_INVALID_OBJECT_STATE")),
    (NOT_FOUND, VBoxFailure("Could not find a registered machine named 'web9'", "VBOX_E_OBJECT_NOT_FOUND")),
    ("VBoxManage.exe: error: Cannot unregister the machine 'x' while it is locked\n",
     VBoxFailure("Cannot unregister the machine 'x' while it is locked", "")),
    ("0%...10%...100%\n", None),
    ("", None),
])
def test_parse_failure(stderr, expected):
    assert parse_failure(stderr) == expected


@pytest.mark.parametrize("failure, retryable", [
    (parse_failure(LOCKED), True),
    (VBoxFailure("The machine 'x' is already locked by a session (or being locked or unlocked)"), True),
    (VBoxFailure("Cannot unregister the machine 'x' while it is locked", ""), True),
    (parse_failure(NOT_FOUND), False),
    (VBoxFailure("Invalid clone options 'x'"), False),
])
def test_which_failures_are_retried(failure, retryable):
    assert failure.retryable == retryable


@pytest.mark.parametrize("text, expected", [
    ("/VirtualBox/GuestInfo/Net/0/V4/IP = '10.0.2.15' @ 2025-01-01T00:00:00.000000000Z TRANSIENT, TRANSRESET\n"
     "/VirtualBox/GuestInfo/Net/1/V4/IP = '192.168.56.21' @ 2025-01-01T00:00:00.000000000Z TRANSIENT\n",
     {"/VirtualBox/GuestInfo/Net/0/V4/IP": "10.0.2.15", "/VirtualBox/GuestInfo/Net/1/V4/IP": "192.168.56.21"}),
    ("Name: /VirtualBox/GuestInfo/Net/1/V4/IP, value: 192.168.56.22, timestamp: 1690000000, flags: TRANSIENT\n",
     {"/VirtualBox/GuestInfo/Net/1/V4/IP": "192.168.56.22"}),
    ("No properties found.\n", {}),
])
def test_parse_guestproperties(text, expected):
    assert parse_guestproperties(text) == expected


@pytest.mark.parametrize("props, expected", [
    ({"/VirtualBox/GuestInfo/Net/1/V4/IP": "192.168.56.21", "/VirtualBox/GuestInfo/Net/0/V4/IP": "10.0.2.15"},
     ["192.168.56.21"]),
    ({"/VirtualBox/GuestInfo/Net/2/V4/IP": "192.168.57.9", "/VirtualBox/GuestInfo/Net/1/V4/IP": "192.168.56.21"},
     ["192.168.56.21", "192.168.57.9"]),
    ({"/VirtualBox/GuestInfo/Net/1/V4/IP": "0.0.0.0", "/VirtualBox/GuestInfo/Net/2/V4/IP": "192.168.56.1",
      "/VirtualBox/GuestInfo/Net/1/MAC": "080027E34B7A", "/VirtualBox/GuestInfo/Net/Count": "3"}, []),
    ({}, []),
])
def test_guest_addresses(props, expected):
    assert guest_addresses(props) == expected


def test_snapshot_ostype_hostonlyif_and_mac_parsers():
    snaps = 'SnapshotName="booted-base"\nSnapshotUUID="u1"\nSnapshotName-1="later"\nSnapshotUUID-1="u2"\n' \
            'CurrentSnapshotName="later"\n'
    assert parse_snapshot_names(snaps) == ["booted-base", "later"]
    ostypes = ("ID:          RedHat9_64\nDescription: Red Hat 9.x (64-bit)\nFamily ID:   Linux\n\n"
               "ID:               RedHat_64\nDescription: Red Hat (64-bit)\n")
    assert parse_ostypes(ostypes) == ["RedHat9_64", "RedHat_64"]
    ifs = ("Name:            vboxnet0\nIPAddress:       192.168.56.1\nNetworkMask:     255.255.255.0\n"
           "IPV6Address:\nStatus:          Up\n\nName:            vboxnet1\nStatus:          Down\n")
    assert parse_hostonlyifs(ifs) == [
        {"Name": "vboxnet0", "IPAddress": "192.168.56.1", "NetworkMask": "255.255.255.0", "IPV6Address": "",
         "Status": "Up"},
        {"Name": "vboxnet1", "Status": "Down"}]
    assert mac_colon("080027E34B7A") == "08:00:27:e3:4b:7a"


@pytest.mark.parametrize("vmstate, state, running", [
    ("running", base.RUNNING, True),
    ("poweroff", base.STOPPED, False),
    ("aborted", "aborted", False),
    ("saved", "saved", False),
    ("gurumeditation", "gurumeditation", False),
])
def test_machine_from_showvminfo(vmstate, state, running):
    info = parse_machinereadable(SHOWVMINFO.replace('VMState="poweroff"', f'VMState="{vmstate}"'))
    machine = machine_from_info(info, {"/VirtualBox/GuestInfo/Net/1/V4/IP": "192.168.56.30"})
    assert (machine.name, machine.provider, machine.state, machine.running) == ("minishift", "virtualbox", state,
                                                                               running)
    # NIC 1 is NAT but has no macaddress line here; NIC 3 is off: only NIC 2's MAC is listed.
    assert machine.macs == ["08:00:27:e3:4b:7a"]
    assert machine.addresses == ["192.168.56.30"]
    assert machine.detail["uuid"] == "91d7d8d4-a3c9-4f94-9946-9a277b970381"


# --------------------------------------------------------------------------- the wrapper's rules
class FakeRuns:
    """Stands in for localcmd.run: returns the given results in order and records each argv."""

    def __init__(self, *results):
        self.results, self.argvs, self.envs = list(results), [], []

    def __call__(self, argv, *, check=True, env=None, **_):
        self.argvs.append(argv)
        self.envs.append(env)
        code, out, err = self.results.pop(0)
        return localcmd.CommandResult(list(argv), code, out, err)


class FakeClock:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Longest(random.Random):
    """Jitter that always picks the longest wait (the worst case for how many attempts fit)."""

    def uniform(self, a, b):
        return b


@pytest.fixture
def wrapper(monkeypatch):
    monkeypatch.setattr(localcmd, "which", lambda name: f"/usr/bin/{name}")
    clock = FakeClock()
    vbox = VBoxManage(delay=1.0, window=60.0, sleep=clock.sleep, clock=clock.time, rng=Longest())
    vbox.sleeps = clock.sleeps
    return vbox


def test_wrapper_runs_with_c_locale_and_retries_locks_with_backoff(wrapper, monkeypatch):
    fake = FakeRuns((1, "", LOCKED), (1, "", LOCKED), (0, "ok\n", ""))
    monkeypatch.setattr(localcmd, "run", fake)
    assert wrapper.run("modifyvm", "web1", "--memory", "1024", image="web1").stdout == "ok\n"
    assert fake.argvs == [["VBoxManage", "modifyvm", "web1", "--memory", "1024"]] * 3
    assert fake.envs[0] == {"LANG": "C", "LC_ALL": "C"}
    assert wrapper.sleeps == [1.0, 2.0]


def test_wrapper_retries_for_a_bounded_time_not_a_count(wrapper, monkeypatch):
    monkeypatch.setattr(localcmd, "run", FakeRuns(*[(1, "", LOCKED)] * 50))
    with pytest.raises(VBoxError) as err:
        wrapper.run("modifyvm", "web1", image="web1")
    assert str(err.value) == ("web1: VBoxManage modifyvm: The machine 'web1' is already locked for a session "
                              "(or being unlocked) [VBOX_E_INVALID_OBJECT_STATE] (after 9 attempts in 60s)")
    # doubling from 1 s, capped at 10 s; one more 10 s wait would end past the 60 s window
    assert wrapper.sleeps == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]


def test_backoff_has_jitter_between_half_and_all_of_the_delay():
    rng = random.Random(7)
    waits = [backoff(3, 0.5, rng) for _ in range(200)]
    assert min(waits) >= 1.0 and max(waits) <= 2.0 and len(set(waits)) == 200
    assert backoff(30, 0.5, Longest()) == 5.0  # capped


def test_default_retry_window_outlasts_a_30_percent_lock_rate(monkeypatch):
    """With the shipped defaults even the longest waits leave >= 15 attempts in the window, so a call fails
    at a 30% lock-error rate with probability <= 0.3**15; 20000 simulated calls at that rate all succeed."""
    monkeypatch.setattr(localcmd, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.delenv("BOOTED_VBOX_RETRY_DELAY", raising=False)
    monkeypatch.delenv("BOOTED_VBOX_RETRY_WINDOW", raising=False)
    clock = FakeClock()
    worst = VBoxManage(sleep=clock.sleep, clock=clock.time, rng=Longest())
    monkeypatch.setattr(localcmd, "run", FakeRuns(*[(1, "", LOCKED)] * 100))
    with pytest.raises(VBoxError) as err:
        worst.run("modifyvm", "web1")
    attempts = int(re.search(r"after (\d+) attempts in 60s", str(err.value)).group(1))
    assert attempts >= 15 and 0.3 ** attempts < 2e-8

    faults = random.Random(2026)

    def flaky(argv, **_):
        locked = faults.random() < 0.3
        return localcmd.CommandResult(list(argv), 1 if locked else 0, "" if locked else "ok\n", LOCKED if locked else "")

    monkeypatch.setattr(localcmd, "run", flaky)
    clock = FakeClock()
    vbox = VBoxManage(sleep=clock.sleep, clock=clock.time, rng=random.Random(1))
    for _ in range(20000):
        assert vbox.run("modifyvm", "web1").stdout == "ok\n"


@pytest.mark.parametrize("result, message, code", [
    ((0, "", NOT_FOUND), "Could not find a registered machine named 'web9'", "VBOX_E_OBJECT_NOT_FOUND"),
    ((2, "", "Usage: VBoxManage showvminfo <uuid|vmname>\nSyntax error: bad option\n"),
     "Syntax error: bad option", ""),
    ((1, "", ""), "exit status 1", ""),
])
def test_wrapper_failures_are_one_line_provider_errors(wrapper, monkeypatch, result, message, code):
    monkeypatch.setattr(localcmd, "run", FakeRuns(result))
    with pytest.raises(VBoxError) as err:
        wrapper.run("showvminfo", "web9", image="web9")
    assert isinstance(err.value, ProviderError)
    assert err.value.vbox_message == message and err.value.code == code
    assert err.value.gone == (code == "VBOX_E_OBJECT_NOT_FOUND")
    assert "\n" not in str(err.value) and wrapper.sleeps == []
    assert err.value.result.returncode == result[0]


def test_wrapper_success_predicate_overrides_exit_status(wrapper, monkeypatch):
    # Vagrant's startvm rule (docs/virtualbox.md §3.1): the success text counts even with exit status 1.
    monkeypatch.setattr(localcmd, "run", FakeRuns((1, 'VM "web1" has been successfully started.\n', "")))
    result = wrapper.run("startvm", "web1", success=lambda r: "successfully started" in r.stdout)
    assert result.returncode == 1


def test_wrapper_without_vboxmanage_says_how_to_install(monkeypatch):
    monkeypatch.setattr(localcmd, "which", lambda name: None)
    with pytest.raises(ProviderError) as err:
        VBoxManage(delay=0).run("list", "vms")
    assert str(err.value) == INSTALL_HINT and "\n" not in INSTALL_HINT


@pytest.mark.parametrize("raw, expected", [("", 0.5), ("0", 0.0), ("0.25", 0.25)])
def test_retry_delay_from_environment(monkeypatch, raw, expected):
    monkeypatch.setenv("BOOTED_VBOX_RETRY_DELAY", raw)
    assert retry_delay() == expected


@pytest.mark.parametrize("raw", ["soon", "-1"])
def test_retry_delay_rejects_bad_values(monkeypatch, raw):
    monkeypatch.setenv("BOOTED_VBOX_RETRY_DELAY", raw)
    with pytest.raises(UsageError, match="BOOTED_VBOX_RETRY_DELAY"):
        retry_delay()
