"""The real-VM tier: one environment of three QEMU virtual machines through libvirt on this machine.

KVM where the CPU has hardware virtualisation, TCG (software emulation) elsewhere: on the CI
machines (PVM, no vmx) the VMs run under TCG, which is slow, so the tier is one environment
brought up once and driven through the whole mission: serve through the load balancer, a rolling
deploy under load, a worker VM forced off under load, the monitor stopping and starting worker VMs,
and env-stop leaving no domain, tap device or qemu process behind. Skipped only where QEMU cannot run
at all, with the reason.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from loadgen import SteadyLoad, rolling_deploy_under_load
from vmlab import ROOT, VmLab, cannot_run_vms, make_vm_lab

pytestmark = pytest.mark.vms

WORKERS = ["vm-w1", "vm-w2"]


@pytest.fixture(scope="module")
def vms(tmp_path_factory) -> VmLab:
    reason = cannot_run_vms()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the libvirt VM tier cannot run here: {reason}")
        pytest.skip(f"libvirt VMs: {reason}")
    from fabfile.providers.libvirt.hypervisor import start_daemons

    lab = make_vm_lab(tmp_path_factory.mktemp("vmlab"))
    try:
        lab.started_daemons = start_daemons()
        started = time.monotonic()
        result = lab.fab("env-start-all", "--env", "vmlab", timeout=1200)
        print(f"\nlibvirt: env-start-all of 3 VMs took {time.monotonic() - started:.0f}s")
        if not result.ok:
            pytest.fail(str(result))
        yield lab
    finally:
        lab.teardown()


def lb_url(lab: VmLab) -> str:
    return f"http://{lab.host_address('vm-lb')}:8080/"


def test_env_start_all_serves_hello_through_the_load_balancer_on_vms(vms):
    with urllib.request.urlopen(lb_url(vms), timeout=10) as resp:
        assert resp.status == 200 and resp.read().decode().strip() == "Hello World!"
    listed = vms.fab("image-list", "--provider", "libvirt", check=True).stdout
    for image in ["vm-lb", *WORKERS]:
        line = next(line for line in listed.splitlines() if line.startswith(image + " "))
        assert " running " in line and "52:54:00:" in line and vms.host_address(image) in line
    # the addresses the inventory holds came from the VMs' signed calls home
    inventory = vms.inventory()
    assert {i: inventory[i]["address"] for i in ["vm-lb", *WORKERS]} == {
        i: vms.host_address(i) for i in ["vm-lb", *WORKERS]}
    # every VM is a real QEMU process under libvirt, on the lab's bridge
    left = vms.leftovers()
    assert len(left["domains"]) == 3 and len(left["taps"]) == 3 and len(left["qemu"]) == 3


def test_ssh_host_keys_were_pinned_before_first_contact_and_match(vms):
    known = (vms.state / "ssh" / "known_hosts").read_text()
    for image in ["vm-lb", *WORKERS]:
        address = vms.host_address(image)
        scanned = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-T", "10", address], capture_output=True,
                                 text=True, timeout=30).stdout.split()
        assert scanned[1:3] == [k for k in next(line for line in known.splitlines()
                                                if line.startswith(address + " ")).split()[1:3]]


def test_rolling_deploy_under_load_drops_no_request(vms):
    rolling_deploy_under_load(vms, lb_url(vms), "vmlab", "v1", "v2", rate=10, max_seconds=400)


def test_worker_vm_forced_off_under_load_drops_no_request(vms):
    with SteadyLoad(lb_url(vms), rate=10, max_seconds=120) as load:
        time.sleep(3)
        stopped = vms.fab("image-stop", "--image", "vm-w2", "--force", timeout=120)
        time.sleep(8)
        seen = load.stop()
    assert stopped.ok, stopped
    assert "vm-w2: poweroff" in stopped.stdout
    assert seen.count > 60
    assert seen.failures == [], seen.failures[:5]
    assert vms.provider_state("vm-w2") == "poweroff"


def test_monitor_starts_and_stops_worker_vms(vms):
    """With latency always above target the monitor brings the stopped worker VM back; with it
    always below, it stops one again (down to workers.min)."""
    vms.write_config(high=0.5, low=0.2)  # any response is "slow": scale up to max
    mon = subprocess.Popen(["fab", "monitor", "--env", "vmlab"], cwd=ROOT, env=vms.env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and vms.provider_state("vm-w2") != "running":
            time.sleep(3)
        assert vms.provider_state("vm-w2") == "running", "the monitor did not start the stopped worker VM"
        wait_for(lambda: _served_by_both(vms), 420, "the load balancer to list both workers")
    finally:
        _stop(mon)
    vms.write_config(high=20000, low=10000)  # any response is "fast": scale down to min
    mon = subprocess.Popen(["fab", "monitor", "--env", "vmlab"], cwd=ROOT, env=vms.env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: sum(vms.provider_state(w) == "running" for w in WORKERS) == 1, 240,
                 "the monitor to stop one worker VM")
    finally:
        out = _stop(mon)
        vms.write_config()
    assert "scale" in out.lower() or "stop" in out.lower(), out[-2000:]


def test_clone_of_a_stopped_worker_boots_and_calls_home_as_itself(vms):
    """A clone of a stopped worker VM boots from its copied disk with its own seed: its own address,
    call-home identity and SSH host key (pinned before it boots), not its source's."""
    source = next(w for w in WORKERS if vms.provider_state(w) == "poweroff")
    cloned = vms.fab("image-clone", "--image", source, "--name", "vm-c1", timeout=120)
    assert cloned.ok, cloned
    try:
        started = time.monotonic()
        assert vms.fab("image-start", "--image", "vm-c1", timeout=120).ok
        address = vms.host_address("vm-c1")
        assert address != vms.host_address(source)

        def called_home() -> bool:
            vms.fab("hosts-logged", timeout=60)
            return vms.inventory().get("vm-c1", {}).get("address") == address

        wait_for(called_home, 300, "the clone to call home as vm-c1 from its own address")
        print(f"\nclone vm-c1 of {source}: start to call home {time.monotonic() - started:.0f}s")
        pinned = {line.split()[0]: line.split()[1:3] for line in (vms.state / "ssh" / "known_hosts").read_text().splitlines()
                  if line.strip()}
        scanned = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-T", "10", address], capture_output=True, text=True,
                                 timeout=30).stdout.split()
        assert scanned[1:3] == pinned[address] and pinned[address] != pinned[vms.host_address(source)]
    finally:
        vms.fab("image-stop", "--image", "vm-c1", "--force", timeout=120)
        vms.fab("image-del", "--image", "vm-c1", "--yes", timeout=120)


def test_env_stop_leaves_no_domain_tap_or_qemu_process(vms):
    result = vms.fab("env-stop", "--env", "vmlab", timeout=300)
    assert result.ok, result
    # each VM powered itself off on the ACPI power button (acpid in the base image): none was cut
    assert "powering it off" not in result.output, result
    # nothing of the environment is left in libvirt or on the machine; the VMs are their disks and
    # booted's records, stopped, and start again from them
    assert vms.leftovers() == {"domains": [], "taps": [], "qemu": []}
    assert all(vms.provider_state(i) == "poweroff" for i in ["vm-lb", *WORKERS])
    for image in ["vm-lb", *WORKERS]:
        assert vms.fab("image-del", "--image", image, "--yes").ok
    assert vms.leftovers() == {"domains": [], "taps": [], "qemu": []}
    assert list(Path(vms.storage).glob(f"{vms.owner_prefix()}*")) == []  # image-del took their volumes


# ------------------------------------------------------------------ helpers
def _served_by_both(lab: VmLab) -> bool:
    conf = lab.ssh("vm-lb", "cat", "/etc/nginx/conf.d/booted-lb.conf").stdout
    return all(f"server {lab.host_address(w)}:" in conf for w in WORKERS)


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out or ""
