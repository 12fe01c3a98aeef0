"""The libvirt provider's lifecycle against libvirt's own ``test:///default`` driver (no root, fast).

The test driver is libvirt's in-process fake hypervisor (libvirt.org/drvtest.html): domains, storage
pools, volumes and metadata behave as the API says, guests start and stop at once. Two things it
cannot do are faked at that boundary: volume uploads (``_upload``: the bytes are kept for checks) and
the base image build (small files stand in for the qcow2, kernel and initrd).
"""
from __future__ import annotations

import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (pip install -e '.[test]')")

from configs import environment  # noqa: E402
from libvirt_fakes import fake_base_image  # noqa: E402
from libvirt_testdriver import clear  # noqa: E402

from fabfile.core.errors import ConfigError, ProviderError  # noqa: E402
from fabfile.providers import get_provider, load_config  # noqa: E402
from fabfile.providers.libvirt import domainxml, hypervisor  # noqa: E402

CONFIG = textwrap.dedent("""\
    providers:
      libvirt: {{uri: "test:///default", storage_dir: {storage}, subnet: 10.201.7.0/28, bridge: btstlv0,
                stop_timeout_s: 1}}
    environments:
    """) + environment("vms", "libvirt", ["vm-lb"], ["vm-w1", "vm-w2"]).replace("{", "{{").replace("}", "}}")


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A provider on the test driver with its own state dir, pool and fake base image."""
    monkeypatch.setenv("BOOTED_STATE_DIR", str(tmp_path / "state"))
    storage = tmp_path / "pool"
    path = tmp_path / "environments.yaml"
    path.write_text(CONFIG.format(storage=storage))
    monkeypatch.setenv("BOOTED_CONFIG", str(path))
    cfg = load_config(path)
    uploads: dict[str, bytes] = {}

    def fake_upload(hv, vol, src):
        uploads[vol.name()] = Path(src).read_bytes()

    fake_base_image(tmp_path, monkeypatch, fake_upload)
    prov = get_provider("libvirt", cfg)
    prov.uploads = uploads
    prov.env = cfg.env("vms")
    yield prov
    # the test driver's state lives as long as this process: leave none of ours behind
    clear(prov)


def dom_xml(prov, image_name):
    """The domain XML booted starts the VM as (its record)."""
    return prov._require(image_name).domain


def domains(prov) -> list[tuple[str, bool, bool]]:
    """Every booted domain libvirt has (the test driver has its own, "test"): (name, running, persistent)."""
    return [(d.name(), bool(d.isActive()), bool(d.isPersistent())) for d in prov.hypervisor().conn.listAllDomains(0)
            if d.name().startswith("booted-")]


def debugfs_cat(img: Path, path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(img)], capture_output=True, text=True).stdout


def test_registered_by_name_and_loaded_only_when_used():
    code = ("import sys; from fabfile.providers import get_provider, load_config;"
            "get_provider('local', load_config()); print('fabfile.providers.libvirt.provider' in sys.modules,"
            " 'libvirt' in sys.modules)")
    out = subprocess.run([sys_python(), "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False False", out.stderr


def sys_python():
    import sys

    return sys.executable


ROOT = Path(__file__).resolve().parent.parent


def test_build_makes_a_stopped_vm_with_its_own_disks_mac_and_address_and_no_domain(world):
    machine = world.build("vm-w1", world.env)
    assert machine.state == "poweroff" and machine.provider == "libvirt"
    assert domains(world) == []  # a stopped VM is its volumes and booted's record, nothing in libvirt
    assert machine.macs[0].startswith("52:54:00:") and machine.addresses == ["10.201.7.2"]
    facts = domainxml.parse_domain(dom_xml(world, "vm-w1"))
    name = world.domain_name("vm-w1")
    assert [Path(d).name for d in facts.disks] == [f"{name}.qcow2", f"{name}.seed"]
    xml = dom_xml(world, "vm-w1")
    assert "booted-base-0123456789abcdef.vmlinuz</kernel>" in xml and '<source bridge="btstlv0" />' in xml
    # booted's initrd gives the VM its address from the kernel command line (no networkd at boot)
    assert (f"<cmdline>root=/dev/vda rw console=ttyS0 quiet net.ifnames=0 booted.ip=10.201.7.2/28 "
            f"booted.gw=10.201.7.1 booted.mac={machine.macs[0]}</cmdline>") in xml
    # the base image went to the pool once; the seed carries this VM's identity and call-home config
    assert set(world.uploads) == {"booted-base-0123456789abcdef.qcow2", "booted-base-0123456789abcdef.vmlinuz",
                                  "booted-base-0123456789abcdef.initrd", f"{name}.seed"}
    world.build("vm-w2", world.env)
    assert world.get("vm-w2").addresses == ["10.201.7.3"]
    assert len(world.uploads) == 5  # no second copy of the base


def test_seed_disk_holds_identity_address_and_callhome(world, tmp_path):
    world.build("vm-lb", world.env)
    seed = tmp_path / "seed.img"
    seed.write_bytes(world.uploads[f"{world.domain_name('vm-lb')}.seed"])
    mac = world.get("vm-lb").macs[0]
    network = debugfs_cat(seed, "/files/etc/systemd/network/10-booted.network")
    assert f"MACAddress={mac}" in network and "Address=10.201.7.2/28" in network and "Gateway=10.201.7.1" in network
    conf = debugfs_cat(seed, "/files/etc/booted/callhome.conf")
    assert "NAME=vm-lb" in conf and "ENV=vms" in conf and "URL=http://10.201.7.1:8480/booted/callhome" in conf
    assert debugfs_cat(seed, "/hostname").strip() == "vm-lb"
    stat = subprocess.run(["debugfs", "-R", "stat /files/etc/booted/callhome.conf", str(seed)],
                          capture_output=True, text=True).stdout
    assert "Mode:  0600" in stat  # the host's call-home key is readable by root only


def test_start_returns_running_and_stop_leaves_no_domain(world):
    world.build("vm-w1", world.env)
    first = world.start("vm-w1")
    assert first.state == "running"
    name = world.domain_name("vm-w1")
    assert domains(world) == [(name, True, False)]  # transient: exists while it runs
    assert world.start("vm-w1").state == "running"  # already running: no error
    assert world.stop("vm-w1").state == "poweroff"
    assert domains(world) == [] and world.get("vm-w1").state == "poweroff"
    assert world.stop("vm-w1").state == "poweroff"  # already stopped
    assert world.start("vm-w1").macs == first.macs  # started again from booted's record, the same VM
    world.hypervisor().conn.lookupByName(name).destroy()  # powered off behind booted's back (the guest)
    assert world.get("vm-w1").state == "poweroff" and domains(world) == []


def test_a_persistent_domain_of_an_earlier_booted_is_adopted(world):
    """VMs an earlier booted defined persistently: booted takes their XML into its record and drops
    the definition (a running one keeps running, transient); they stop and start as any other."""
    world.build("vm-w1", world.env)
    world.build("vm-w2", world.env)
    conn = world.hypervisor().conn
    records = world.records.load()
    for image in ("vm-w1", "vm-w2"):
        conn.defineXML(records[image].domain)  # what the earlier booted left: defined domains
    world.records.save({image: replace(p, domain="") for image, p in records.items()})  # its records had no XML
    conn.lookupByName(world.domain_name("vm-w2")).create()
    assert {m.name: m.state for m in world.list()} == {"vm-w1": "poweroff", "vm-w2": "running"}
    assert domains(world) == [(world.domain_name("vm-w2"), True, False)]
    adopted = domainxml.parse_domain(world.records.load()["vm-w1"].domain)
    before = domainxml.parse_domain(records["vm-w1"].domain)
    assert (adopted.record, adopted.disks, adopted.uuid) == (before.record, before.disks, before.uuid)
    assert world.stop("vm-w2").state == "poweroff" and domains(world) == []
    assert world.start("vm-w1").state == "running"


def test_a_build_cut_short_is_not_a_vm_and_is_rebuilt_with_its_identity(world):
    world.build("vm-w1", world.env)
    placed = world.records.load()["vm-w1"]
    world.delete("vm-w1")
    world.records.put(replace(placed, domain=""))  # placed, then the build was killed
    assert world.list() == [] and world.get("vm-w1") is None
    with pytest.raises(ProviderError, match="no such libvirt image"):
        world.start("vm-w1")
    again = world.build("vm-w1", world.env)
    assert again.addresses == [placed.record.address] and again.macs == [placed.record.mac]


def test_stop_powers_off_when_the_guest_ignores_acpi(world, monkeypatch, capsys):
    world.build("vm-w1", world.env)
    world.start("vm-w1")
    monkeypatch.setattr(libvirt.virDomain, "shutdown", lambda self: 0)  # a guest that ignores the button
    assert world.stop("vm-w1").state == "poweroff"
    assert "no clean shutdown within 1s; powering it off" in capsys.readouterr().err


def test_force_stop_destroys_at_once(world, monkeypatch):
    world.build("vm-w1", world.env)
    world.start("vm-w1")
    monkeypatch.setattr(libvirt.virDomain, "shutdown", lambda self: pytest.fail("force must not ask the guest"))
    assert world.stop("vm-w1", force=True).state == "poweroff"


def test_delete_refuses_a_running_vm_then_removes_domain_and_volumes(world):
    world.build("vm-w1", world.env)
    world.build("vm-w2", world.env)
    world.start("vm-w1")
    with pytest.raises(ProviderError, match="vm-w1: is running; stop it first"):
        world.delete("vm-w1")
    assert world.get("vm-w1").running
    world.stop("vm-w1", force=True)
    world.delete("vm-w1")
    assert world.get("vm-w1") is None
    vols = {v.name() for v in world.pool(world.hypervisor()).listAllVolumes(0)}
    name = world.domain_name("vm-w1")
    assert f"{name}.qcow2" not in vols and f"{name}.seed" not in vols
    assert f"{world.domain_name('vm-w2')}.qcow2" in vols and "booted-base-0123456789abcdef.qcow2" in vols


def test_clone_has_fresh_mac_address_and_identity(world, tmp_path):
    world.build("vm-w1", world.env)
    with pytest.raises(ProviderError, match="already exists"):
        world.clone("vm-w1", "vm-w1", world.env)
    world.start("vm-w1")
    with pytest.raises(ProviderError, match="vm-w1: is running; stop it before cloning"):
        world.clone("vm-w1", "vm-w2", world.env)
    world.stop("vm-w1")
    clone = world.clone("vm-w1", "vm-w2", world.env)
    src = world.get("vm-w1")
    assert clone.macs != src.macs and clone.addresses != src.addresses
    seeds = {}
    for n in ("vm-w1", "vm-w2"):
        path = tmp_path / f"{n}.img"
        path.write_bytes(world.uploads[f"{world.domain_name(n)}.seed"])
        seeds[n] = debugfs_cat(path, "/identity")
    assert seeds["vm-w1"] != seeds["vm-w2"] and all(len(s.strip()) == 36 for s in seeds.values())


def callhome_key(world, tmp_path, image_name) -> str:
    seed = tmp_path / f"{image_name}.img"
    seed.write_bytes(world.uploads[f"{world.domain_name(image_name)}.seed"])
    conf = debugfs_cat(seed, "/files/etc/booted/callhome.conf")
    return next(line for line in conf.splitlines() if line.startswith("KEY="))


def test_rebuild_keeps_address_and_identity_and_refuses_running(world, tmp_path):
    first = world.build("vm-w1", world.env)
    first_key = callhome_key(world, tmp_path, "vm-w1")
    world.start("vm-w1")
    with pytest.raises(ProviderError, match="is running; stop it before rebuilding"):
        world.build("vm-w1", world.env)
    world.stop("vm-w1")
    again = world.build("vm-w1", world.env)
    assert (again.macs, again.addresses) == (first.macs, first.addresses)
    assert callhome_key(world, tmp_path, "vm-w1") != first_key  # the old call-home key stops working
    assert len(world.list()) == 1


def test_another_state_dir_does_not_see_or_touch_these_vms(world, tmp_path, monkeypatch):
    world.build("vm-w1", world.env)
    monkeypatch.setenv("BOOTED_STATE_DIR", str(tmp_path / "other-state"))
    other = get_provider("libvirt", load_config(tmp_path / "environments.yaml"))
    assert other.list() == []
    with pytest.raises(ProviderError, match="no such libvirt image"):
        other.delete("vm-w1")


def test_bad_names_never_reach_libvirt(world):
    for call in (lambda: world.build("../x", world.env), lambda: world.start("a b"), lambda: world.clone("vm-w1", "-x", None)):
        with pytest.raises(Exception, match="invalid image name"):
            call()
    assert world.list() == []


def test_missing_bindings_and_daemon_are_one_line(monkeypatch):
    hv = hypervisor.Hypervisor("default", "qemu:///system")
    monkeypatch.setattr(hypervisor, "SOCKET", Path("/nonexistent/libvirt-sock"))
    monkeypatch.setattr(hypervisor, "daemon_installed", lambda: True)
    err = libvirt.libvirtError("Failed to connect socket")
    assert hv.explain_open_failure(err) == (
        "libvirt qemu:///system: libvirtd is not running: start it with `mkdir -p /run/libvirt; virtlogd -d; libvirtd -d`")
    monkeypatch.setattr(hypervisor, "daemon_installed", lambda: False)
    assert "libvirtd is not installed: apt-get install" in hv.explain_open_failure(err)
    monkeypatch.setattr(hypervisor, "libvirt", None)
    with pytest.raises(ProviderError) as info:
        _ = hypervisor.Hypervisor("default", "test:///default").conn
    assert str(info.value).startswith("the libvirt Python bindings are missing: apt-get install libvirt-dev pkg-config")
    assert "\n" not in str(info.value)


def test_unreachable_hypervisor_names_the_uri(tmp_path):
    hv = hypervisor.Hypervisor("default", f"test://{tmp_path}/missing.xml")
    with pytest.raises(ProviderError, match=f"^libvirt test://{tmp_path}/missing.xml: "):
        _ = hv.conn


CAPS = """<capabilities><host><cpu><arch>x86_64</arch>{features}</cpu></host>
<guest><os_type>hvm</os_type><arch name='x86_64'>{domains}</arch></guest></capabilities>"""


@pytest.mark.parametrize("setting, features, domains, expected", [
    ("auto", "<feature name='vmx'/>", "<domain type='qemu'/><domain type='kvm'/>", "kvm"),
    ("auto", "<feature name='svm'/>", "<domain type='qemu'/><domain type='kvm'/>", "kvm"),
    # a /dev/kvm without vmx/svm (PVM, as on the CI machines) would crawl: TCG instead
    ("auto", "", "<domain type='qemu'/><domain type='kvm'/>", "qemu"),
    ("auto", "<feature name='vmx'/>", "<domain type='qemu'/>", "qemu"),
    ("qemu", "<feature name='vmx'/>", "<domain type='qemu'/><domain type='kvm'/>", "qemu"),
    ("kvm", "", "<domain type='qemu'/><domain type='kvm'/>", "kvm"),
    ("auto", "", "<domain type='test'/>", "test"),
])
def test_domain_type_choice(setting, features, domains, expected):
    caps = CAPS.format(features=features, domains=domains)
    assert domainxml.choose_domain_type(setting, caps) == expected


def test_kvm_configured_but_not_offered_is_an_error():
    with pytest.raises(ValueError, match="domain_type 'kvm' is not offered by this hypervisor \\(offers: qemu\\)"):
        domainxml.choose_domain_type("kvm", CAPS.format(features="", domains="<domain type='qemu'/>"))


def plan(**kw):
    record = domainxml.HostRecord("w1", "abcd1234", "10.0.0.2", "52:54:00:00:00:01", "env", "id")
    base = dict(name="booted-abcd1234-w1", domain_type="qemu", memory_mb=512, cpus=1, kernel="/p/k", initrd="/p/i",
                disk="/p/d.qcow2", seed="/p/d.seed", bridge="br0", mac="52:54:00:00:00:01", console_log="/p/c.log",
                record=record)
    base.update(kw)
    return domainxml.DomainPlan(**base)


def test_domain_xml_tcg_cache_only_for_tcg_and_record_round_trips():
    import xml.etree.ElementTree as ET

    xml = domainxml.render_domain(plan())
    dom = ET.fromstring(xml)
    assert dom.get("type") == "qemu" and dom.find("./features/tcg/tb-cache").text == "64"
    assert dom.find("./features/tcg/tb-cache").get("unit") == "MiB"
    assert ET.fromstring(domainxml.render_domain(plan(domain_type="kvm"))).find("./features/tcg") is None
    facts = domainxml.parse_domain(xml)
    assert facts.record == plan().record and facts.macs == ["52:54:00:00:00:01"] and facts.console_log == "/p/c.log"
    assert facts.disks == ["/p/d.qcow2", "/p/d.seed"] and facts.memory_kib == 512 * 1024


def test_domain_xml_gives_every_vm_a_random_number_device_from_the_host():
    import xml.etree.ElementTree as ET

    for domain_type in ("qemu", "kvm"):
        rng = ET.fromstring(domainxml.render_domain(plan(domain_type=domain_type))).find("./devices/rng")
        assert rng.get("model") == "virtio" and rng.find("backend").get("model") == "random"
        assert rng.find("backend").text == "/dev/urandom"


@pytest.mark.parametrize("address, prefixlen, gateway, mac, expected", [
    ("10.0.0.2", 24, "10.0.0.1", "52:54:00:00:00:01",
     "root=/dev/vda rw console=ttyS0 quiet net.ifnames=0 booted.ip=10.0.0.2/24 booted.gw=10.0.0.1 booted.mac=52:54:00:00:00:01"),
    ("192.168.7.14", 28, "192.168.7.1", "52:54:00:ab:cd:ef",
     "root=/dev/vda rw console=ttyS0 quiet net.ifnames=0 booted.ip=192.168.7.14/28 booted.gw=192.168.7.1 "
     "booted.mac=52:54:00:ab:cd:ef"),
    ("10.0.0.2 init=/bin/sh", 24, "10.0.0.1", "52:54:00:00:00:01", ValueError),  # no extra kernel arguments
    ("10.0.0.2", 24, "10.0.0.1 init=/bin/sh", "52:54:00:00:00:01", ValueError),
    ("10.0.0.2", 24, "10.0.0.1", "52:54:00:00:00:01 init=/bin/sh", ValueError),
    ("10.0.0.2", 24, "10.0.1.1", "52:54:00:00:00:01", ValueError),  # gateway off the VM's subnet
    ("10.0.0.1", 24, "10.0.0.1", "52:54:00:00:00:01", ValueError),  # the gateway's own address
    ("10.0.0.2", 31, "10.0.0.3", "52:54:00:00:00:01", ValueError),
    ("fd00::2", 64, "fd00::1", "52:54:00:00:00:01", ValueError),
    ("10.0.0.2", 24, "10.0.0.1", "52:54:00:00:00:0G", ValueError),
])
def test_vm_kernel_command_line_carries_only_a_checked_address(address, prefixlen, gateway, mac, expected):
    if expected is ValueError:
        with pytest.raises(ValueError):
            domainxml.vm_cmdline(address, prefixlen, gateway, mac)
    else:
        assert domainxml.vm_cmdline(address, prefixlen, gateway, mac) == expected


def test_domain_xml_refuses_a_bad_mac():
    with pytest.raises(ValueError, match="not a MAC address"):
        domainxml.render_domain(plan(mac="52:54:00:00:00:01'/><evil"))


LIBVIRT_BAD = [
    ("uri: 'qemu system'", "providers.libvirt.uri: 'qemu system' is not a libvirt URI"),
    ("domain_type: xen", "providers.libvirt.domain_type: must be auto, kvm or qemu"),
    ("storage_dir: relative/dir", "providers.libvirt.storage_dir: must be an absolute directory path"),
    ("storage_dir: /var/../etc", "providers.libvirt.storage_dir: must be an absolute directory path"),
    ("memory_mb: 64", "providers.libvirt.memory_mb: must be at least 256"),
    ("bridge: 'br 0'", "providers.libvirt.bridge: must be a network interface name"),
    ("subnet: 10.0.0.0/8", "providers.libvirt.subnet: must be an IPv4 network from /16 to /28"),
]


@pytest.mark.parametrize("line, message", LIBVIRT_BAD)
def test_libvirt_settings_are_validated_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "e.yaml"
    envs = CONFIG.format(storage="/x").split("environments:\n", 1)[1]
    path.write_text(f"providers:\n  libvirt:\n    cpus: 1\n    {line}\nenvironments:\n{envs}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:4: {message}"), str(info.value)


def test_shipped_kvm_environment_uses_the_libvirt_provider():
    cfg = load_config(ROOT / "environments.yaml")
    kvm = cfg.env("kvm")
    assert kvm.provider == "libvirt" and len(kvm.loadbalancers) == 1 and len(kvm.workers) == 2
    assert cfg.providers["libvirt"]["uri"] == "qemu:///system"


def test_host_key_is_made_by_booted_and_pinned_before_first_contact(world, tmp_path):
    world.build("vm-w1", world.env)
    seed = tmp_path / "seed.img"
    seed.write_bytes(world.uploads[f"{world.domain_name('vm-w1')}.seed"])
    pub = debugfs_cat(seed, "/files/etc/ssh/ssh_host_ed25519_key.pub").split()
    private = debugfs_cat(seed, "/files/etc/ssh/ssh_host_ed25519_key")
    assert pub[0] == "ssh-ed25519" and "OPENSSH PRIVATE KEY" in private
    from fabfile.core import ssh

    pinned = [line.split() for line in ssh.known_hosts_path().read_text().splitlines()]
    assert [p[:3] for p in pinned if p[0] == "10.201.7.2"] == [["10.201.7.2", "ssh-ed25519", pub[1]]]
    world.delete("vm-w1")  # its address may go to another VM: the pin goes with it
    assert "10.201.7.2 " not in ssh.known_hosts_path().read_text()


def test_base_images_of_older_recipes_are_dropped_unless_a_domain_or_a_disk_uses_them(world):
    world.build("vm-w1", world.env)
    pool = world.pool(world.hypervisor())
    for name in ("booted-base-00000000000000aa.qcow2", "booted-base-00000000000000bb.vmlinuz",
                 "booted-base-00000000000000cc.qcow2"):
        pool.createXML(domainxml.render_raw_volume(name, 10), 0)
    # a stopped VM (no domain) of another state dir: its disk is an overlay on the ...cc base
    pool.createXML(domainxml.render_overlay_volume("booted-0ther000-w9.qcow2", 10,
                                                   f"{world.storage_dir}/booted-base-00000000000000cc.qcow2"), 0)
    # another state dir's VM still boots from the ...bb kernel
    world.hypervisor().conn.defineXML(
        "<domain type='test'><name>someone-else</name><memory>65536</memory><os><type>hvm</type>"
        "<kernel>/x/booted-base-00000000000000bb.vmlinuz</kernel></os></domain>")
    try:
        world.build("vm-w2", world.env)
        vols = {v.name() for v in pool.listAllVolumes(0)}
        assert "booted-base-00000000000000aa.qcow2" not in vols
        assert "booted-base-00000000000000bb.vmlinuz" in vols and "booted-base-0123456789abcdef.qcow2" in vols
        assert "booted-base-00000000000000cc.qcow2" in vols
    finally:
        world.hypervisor().conn.lookupByName("someone-else").undefine()


@pytest.mark.parametrize("mode, needs", [(0o600, True), (0o660, False), (0o666, False)])
def test_root_only_dev_kvm_is_detected(tmp_path, monkeypatch, mode, needs):
    dev = tmp_path / "kvm"
    dev.write_text("")
    dev.chmod(mode)
    monkeypatch.setattr(hypervisor, "KVM_DEVICE", dev)
    assert hypervisor.kvm_device_needs_udev_mode() is needs


class _PoolError(libvirt.libvirtError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def get_error_message(self):
        return self.message


@pytest.mark.parametrize("errors, raised", [
    ([], None),
    (["pool 'booted-x' has asynchronous jobs running."] * 3, None),  # another VM's upload: wait for it
    (["cannot open directory '/nowhere'"], "cannot open directory"),  # anything else fails at once
])
def test_pool_rescan_waits_for_another_builds_volume_job(world, monkeypatch, errors, raised):
    hv = world.hypervisor()
    calls = []

    class Pool:
        def refresh(self, flags):
            calls.append(flags)
            if len(calls) <= len(errors):
                raise _PoolError(errors[len(calls) - 1])

    with monkeypatch.context() as patched:   # undone before the fixture clears the real pool
        patched.setattr(world, "pool", lambda _hv: Pool())
        if raised:
            with pytest.raises(libvirt.libvirtError, match=raised):
                world.refresh_pool(hv)
        else:
            world.refresh_pool(hv)
    assert len(calls) == (1 if raised else len(errors) + 1)
