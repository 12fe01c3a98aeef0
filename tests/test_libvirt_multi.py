"""One environment over two hypervisors, against libvirt's own test driver (no root, fast).

Two in-process fake hypervisors (libvirt.org/drvtest.html): ``test:///default`` and a second one
from a node file of our own, each its own set of domains, pools and volumes. Faked at that boundary,
as in test_libvirt_lifecycle.py: volume uploads (the bytes are kept per hypervisor) and the base
image build. A hypervisor "dies" by having its connection refuse every call, as libvirt's does once
its keepalive gave up; it "returns" with the domains it held (libvirt keeps definitions across a
power cut, docs/multi-hypervisor-lab.md).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (pip install -e '.[test]')")

from libvirt_fakes import fake_base_image  # noqa: E402
from libvirt_testdriver import drop_domains, drop_pools  # noqa: E402

from fabfile.core.config import MonitorSettings  # noqa: E402
from fabfile.core.errors import ConfigError  # noqa: E402
from fabfile.flows import plans  # noqa: E402
from fabfile.hosts.inventory import HostEntry  # noqa: E402
from fabfile.providers import UNREACHABLE, Machine, get_provider, load_config  # noqa: E402
from fabfile.providers.libvirt.hypervisor import Hypervisor, HypervisorUnreachable  # noqa: E402
from fabfile.providers.libvirt.provider import LibvirtProvider  # noqa: E402
from fabfile.scaling.policy import UP, Observation, Policy, Sample  # noqa: E402

CONFIG = textwrap.dedent("""\
    providers:
      libvirt:
        storage_dir: {storage}
        subnet: 10.201.8.0/28
        bridge: btstlv1
        stop_timeout_s: 1
        hypervisors:
          hv1: {{uri: "test:///default", bridge: br-one}}
          hv2: {{uri: "test://{node}", bridge: br-two, callhome_address: 10.201.8.14}}
    environments:
      vms:
        provider: libvirt
        images: [vm-lb, vm-w1, vm-w2]
        roles: {{loadbalancers: [vm-lb], workers: [vm-w1, vm-w2]}}
        service: hello
        version: v1
        workers: {{min: 2, max: 2}}
    {extra}""")


@pytest.fixture
def world(tmp_path, monkeypatch):
    yield from make_world(tmp_path, monkeypatch)


def make_world(tmp_path, monkeypatch, extra: str = ""):
    monkeypatch.setenv("BOOTED_STATE_DIR", str(tmp_path / "state"))
    node = tmp_path / "hv2-node.xml"
    node.write_text("<node>\n</node>\n")
    path = tmp_path / "environments.yaml"
    path.write_text(CONFIG.format(storage=tmp_path / "pool", node=node, extra=extra))
    monkeypatch.setenv("BOOTED_CONFIG", str(path))
    cfg = load_config(path)
    uploads: list[tuple[str, str]] = []  # (hypervisor, volume)
    fake_base_image(tmp_path, monkeypatch, lambda hv, vol, src: uploads.append((hv.name, vol.name())))
    prov = get_provider("libvirt", cfg)
    prov.uploads = uploads
    prov.env = cfg.env("vms")
    yield prov
    for hv in prov.hypervisors.values():  # test:///default lives as long as this process
        if "_open" in vars(hv):
            power_back(prov, hv.name)
        drop_domains(hv.conn)
        drop_pools(hv.conn)


def power_cut(prov, name: str) -> None:
    """The hypervisor stops answering: its open connection is dead, a new one cannot be made."""
    hv = prov.hypervisor(name)
    hv._saved_conn = hv._conn
    hv._conn = None

    def refuse(lv):
        raise HypervisorUnreachable(f"{hv.where}: Cannot recv data: Connection timed out")

    hv._open = refuse


def power_back(prov, name: str) -> None:
    hv = prov.hypervisor(name)
    hv._conn = hv._saved_conn
    hv._failed = None
    del hv._open


def where(prov) -> dict[str, str]:
    return {m.name: m.detail["hypervisor"] for m in prov.list()}


def build_env(prov) -> None:
    for name in ("vm-w1", "vm-lb", "vm-w2"):  # any order: load balancers are placed first all the same
        prov.build(name, prov.env)


def test_load_balancer_and_workers_spread_and_stay_where_they_are(world, tmp_path, monkeypatch):
    build_env(world)
    assert where(world) == {"vm-lb": "hv1", "vm-w1": "hv2", "vm-w2": "hv1"}
    xml = world._require("vm-w1").domain
    assert '<source bridge="br-two" />' in xml  # each hypervisor's own bridge onto the shared network
    assert '<source bridge="br-one" />' in world._require("vm-lb").domain
    # a later run (a new process: a new provider over the same state) keeps every VM where it is
    again = get_provider("libvirt", load_config(world.config.path))
    world.stop("vm-w1")
    again.build("vm-w1", world.env)
    assert where(again) == where(world)


def test_the_base_goes_once_to_each_hypervisor_and_again_only_if_its_copy_is_incomplete(world, monkeypatch):
    build_env(world)
    bases = sorted(u for u in world.uploads if "booted-base-" in u[1])
    assert bases == sorted((hv, f"booted-base-0123456789abcdef.{ext}") for hv in ("hv1", "hv2")
                           for ext in ("qcow2", "vmlinuz", "initrd"))
    # an upload cut short leaves no marker: the next use uploads that base again
    hv2 = world.hypervisor("hv2")
    world._volume(hv2, "booted-base-0123456789abcdef.complete").delete(0)
    world.uploads.clear()
    world.ensure_base_volumes(hv2)
    assert sorted(u for u in world.uploads) == [("hv2", f"booted-base-0123456789abcdef.{ext}")
                                                for ext in ("initrd", "qcow2", "vmlinuz")]
    # a hypervisor that holds this base needs no copy of it on this machine (another booted sharing
    # the image cache may have removed it): nothing is built or uploaded
    world.uploads.clear()
    monkeypatch.setattr(LibvirtProvider, "base_image", lambda self: pytest.fail("the base was built again"))
    world.ensure_base_volumes(hv2)
    assert world.uploads == []
    # a hypervisor now of another domain type boots another kernel (kernel.py): only that is copied
    fake_base = world.base_names()
    monkeypatch.setattr(LibvirtProvider, "base_image", lambda self: fake_base)
    monkeypatch.setattr(LibvirtProvider, "domain_type", lambda self, hv: "qemu")
    paths = world.ensure_base_volumes(hv2)
    assert paths["kernel"].endswith("booted-base-0123456789abcdef.vmlinux")
    assert world.uploads == [("hv2", "booted-base-0123456789abcdef.vmlinux")]
    assert world._volume(hv2, "booted-base-0123456789abcdef.complete") is not None
    # that copy cut short: the base no longer counts as whole there, and is copied whole next time
    world._volume(hv2, "booted-base-0123456789abcdef.vmlinux").delete(0)
    real_store = LibvirtProvider._store_file

    def cut_short(self, hv, src, name, link=True):
        raise KeyboardInterrupt
    monkeypatch.setattr(LibvirtProvider, "_store_file", cut_short)
    with pytest.raises(KeyboardInterrupt):
        world.ensure_base_volumes(hv2)
    assert world._volume(hv2, "booted-base-0123456789abcdef.complete") is None
    monkeypatch.setattr(LibvirtProvider, "_store_file", real_store)
    world.uploads.clear()
    world.ensure_base_volumes(hv2)
    assert sorted(name for _, name in world.uploads) == [f"booted-base-0123456789abcdef.{ext}"
                                                         for ext in ("initrd", "qcow2", "vmlinux")]
    world.uploads.clear()
    assert world.ensure_base_volumes(hv2) == paths and world.uploads == []


def test_pins_are_honoured(tmp_path, monkeypatch):
    gen = make_world(tmp_path, monkeypatch, extra="    placement: {vm-w1: hv1, vm-w2: hv1}\n")
    prov = next(gen)
    try:
        build_env(prov)  # vm-w1 first: the load balancer then goes where fewer VMs run
        assert where(prov) == {"vm-lb": "hv2", "vm-w1": "hv1", "vm-w2": "hv1"}
    finally:
        next(gen, None)


@pytest.mark.parametrize("extra, fragment", [
    ("    placement: {vm-w1: hv9}\n", "environments.vms.placement.vm-w1: unknown hypervisor 'hv9' (known: hv1, hv2)"),
    ("    placement: {vm-x: hv1}\n", "environments.vms.placement.vm-x: names image 'vm-x', which is not in"),
    ("    placement: {vm-w1: [hv1]}\n", "environments.vms.placement.vm-w1: must be a hypervisor name, not a list"),
])
def test_bad_pins_are_one_located_line(tmp_path, extra, fragment):
    node = tmp_path / "n.xml"
    path = tmp_path / "environments.yaml"
    path.write_text(CONFIG.format(storage=tmp_path, node=node, extra=extra))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{path}:18: ") and fragment in str(err.value)


def test_pins_need_named_hypervisors(tmp_path):
    path = tmp_path / "environments.yaml"
    path.write_text(textwrap.dedent("""\
        environments:
          e:
            provider: libvirt
            images: [a]
            roles: {loadbalancers: [a], workers: [a]}
            service: hello
            version: v1
            placement: {a: hv1}
        """))
    with pytest.raises(ConfigError, match=r":8: environments.e.placement.a: providers.libvirt has no hypervisors"):
        load_config(path)


def test_a_lost_hypervisor_shows_its_vms_unreachable_and_they_are_rebuilt_on_a_survivor(world):
    build_env(world)
    for name in ("vm-lb", "vm-w1", "vm-w2"):
        world.start(name)
    address = world.get("vm-w1").addresses
    power_cut(world, "hv2")
    listed = {m.name: m for m in world.list()}
    assert listed["vm-w1"].state == UNREACHABLE and not listed["vm-w1"].running
    assert listed["vm-w1"].detail["hypervisor"] == "hv2" and listed["vm-w1"].addresses == address
    assert listed["vm-lb"].running and listed["vm-w2"].running
    assert world.stop("vm-w1").state == UNREACHABLE  # nothing to stop: it went with its hypervisor
    with pytest.raises(HypervisorUnreachable) as err:
        world.delete("vm-w1")
    assert err.value.exit_code == 2 and "hypervisor hv2 (test://" in str(err.value)

    machine = world.start("vm-w1")  # what the monitor's replacement does
    assert machine.running and machine.detail["hypervisor"] == "hv1" and machine.addresses == address
    assert where(world) == {"vm-lb": "hv1", "vm-w1": "hv1", "vm-w2": "hv1"}

    # hv2 returns (its network was cut: the old copy still runs) with the old volumes: neither is
    # listed, and both go at the next build there
    power_back(world, "hv2")
    hv2 = world.hypervisor("hv2")
    stale = world.domain_name("vm-w1")
    assert [d.name() for d in hv2.conn.listAllDomains(0) if d.name().startswith("booted-")] == [stale]
    assert sorted(v.name() for v in world.pool(hv2).listAllVolumes(0) if v.name().startswith(stale)) \
        == [f"{stale}.qcow2", f"{stale}.seed"]
    assert where(world)["vm-w1"] == "hv1" and [m.detail["hypervisor"] for m in world.list() if m.name == "vm-w1"] == ["hv1"]
    world._remove_stale(hv2)
    assert [d.name() for d in hv2.conn.listAllDomains(0) if d.name().startswith("booted-")] == []
    assert [v.name() for v in world.pool(hv2).listAllVolumes(0) if v.name().startswith(stale)] == []
    assert where(world) == {"vm-lb": "hv1", "vm-w1": "hv1", "vm-w2": "hv1"}


def test_a_new_vm_meant_for_a_hypervisor_that_does_not_answer_goes_to_a_survivor_saying_so(world, capsys):
    power_cut(world, "hv2")
    build_env(world)
    assert where(world) == {"vm-lb": "hv1", "vm-w1": "hv1", "vm-w2": "hv1"}
    err = capsys.readouterr().err
    assert "vm-w1: placed on hv1, not hv2: hypervisor hv2 (test://" in err, err
    placed = [line for line in err.splitlines() if ": placed on " in line]
    assert placed and all(": placed on hv1, not hv2: hypervisor hv2 (" in line for line in placed), placed


def test_image_list_shows_the_hypervisor_and_exits_2_naming_one_that_does_not_answer(world, monkeypatch, capsys):
    from invoke import Exit

    from fabfile import hostbuilder

    build_env(world)
    monkeypatch.setattr(hostbuilder, "load_config", lambda: world.config)
    monkeypatch.setattr(hostbuilder, "provider_for", lambda cfg, name: world)
    hostbuilder.image_list.body(None, provider="libvirt")
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0][-1] == "HYPERVISOR" and {r[0]: r[-1] for r in rows[1:]} == {
        "vm-lb": "hv1", "vm-w1": "hv2", "vm-w2": "hv1"}
    power_cut(world, "hv2")
    with pytest.raises(Exit) as err:
        hostbuilder.image_list.body(None, provider="libvirt")
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert {r[0]: (r[3], r[-1]) for r in rows[1:]}["vm-w1"] == (UNREACHABLE, "hv2")  # the table still comes
    assert err.value.code == 2 and "\n" not in str(err.value.message)
    assert str(err.value.message).startswith("error: hypervisor hv2 (test://")


def test_call_home_address_per_hypervisor_and_nginx_listens_on_each(world):
    assert world.booted_addresses() == ["10.201.8.1", "10.201.8.14"]
    assert world.callhome_address_on(world.hypervisor("hv2")) == "10.201.8.14"
    assert world.callhome_address_on(world.hypervisor("hv1")) == "10.201.8.1"
    # VM addresses skip the controller's and the hypervisors' own
    taken = world._hypervisor_addresses()
    assert "10.201.8.14" in taken


def test_an_unreachable_hypervisor_at_use_time_is_one_line_naming_it(tmp_path):
    hv = Hypervisor("hv9", "qemu+ssh://root@192.0.2.1/system?command=/bin/false", connect_timeout=10)
    why = hv.check()
    assert why is not None and "\n" not in why and why.startswith("hypervisor hv9 (qemu+ssh://root@192.0.2.1/system")


# ---------------------------------------------------------------------------- failover decisions (pure)
def entry(image: str) -> HostEntry:
    return HostEntry(image=image, name=image, address="10.0.0.1", mac="", env="vms", roles=["workers"])


def machine(name: str, state: str) -> Machine:
    return Machine(name=name, provider="libvirt", state=state)


# (inventory, machine states, first seen unreachable, lost at t=100 with lost_after_s 30, since' )
@pytest.mark.parametrize("inventory, machines, since, lost, since_after", [
    (["w1", "w2"], {"w1": "running", "w2": "running"}, {}, [], {}),
    (["w1", "w2"], {"w1": UNREACHABLE, "w2": "running"}, {}, [], {"w1": 100}),  # first look: not yet
    (["w1", "w2"], {"w1": UNREACHABLE, "w2": "running"}, {"w1": 80}, [], {"w1": 80}),  # 20 s: not yet
    (["w1", "w2"], {"w1": UNREACHABLE, "w2": "running"}, {"w1": 70}, ["w1"], {"w1": 70}),  # 30 s: lost
    (["lb", "w1"], {"lb": UNREACHABLE, "w1": UNREACHABLE}, {"lb": 1, "w1": 1}, ["lb", "w1"], {"lb": 1, "w1": 1}),
    (["w1"], {"w1": "running"}, {"w1": 1}, [], {}),  # it answers again: forgiven, the clock restarts
    (["w1"], {"w1": "poweroff"}, {"w1": 1}, [], {}),  # stopped is not lost: the monitor's rules handle it
    (["w1"], {}, {}, [], {}),  # not listed at all is no proof of a loss
    ([], {"w1": UNREACHABLE}, {"w1": 1}, [], {}),  # already out of the inventory
])
def test_lost_hosts(inventory, machines, since, lost, since_after):
    assert plans.lost_hosts({i: entry(i) for i in inventory}, {n: machine(n, s) for n, s in machines.items()},
                            since, now=100, after_s=30) == (lost, since_after)


@pytest.mark.parametrize("machines, in_doubt, up", [
    ({"w1": "running", "w2": "running"}, set(), {"w1", "w2"}),
    ({"w1": UNREACHABLE, "w2": "running"}, {"w1"}, {"w1", "w2"}),  # in doubt: counted, not replaced
    ({"w1": UNREACHABLE, "w2": "running"}, set(), {"w2"}),  # lost (or not in the inventory): not counted
    ({"w1": "poweroff", "w2": "running"}, set(), {"w2"}),
    ({"w2": "running"}, set(), {"w2"}),  # not listed at all
])
def test_workers_up(machines, in_doubt, up):
    assert plans.workers_up(["w1", "w2"], {n: machine(n, s) for n, s in machines.items()}, in_doubt) == up


def test_lost_at_once_with_no_grace():
    assert plans.lost_hosts({"w1": entry("w1")}, {"w1": machine("w1", UNREACHABLE)}, {}, now=5, after_s=0) \
        == (["w1"], {"w1": 5})


def test_the_policy_replaces_a_lost_worker_at_once_below_the_minimum():
    policy = Policy(MonitorSettings(), ("w1", "w2"), 2, 2)
    decision = policy.decide(1000.0, Observation(Sample(5, 0.0, 8), frozenset({"w2"}), {"w2": True},
                                                 lost=frozenset({"w1"})))
    assert decision.action == UP and decision.images == ("w1",)
    assert any("w1 was lost with the machine running it" in note for note in decision.notes)


def test_inventory_entry_shape_is_what_the_table_uses():
    # the table above builds HostEntry by keyword: a renamed field must fail here, not silently
    assert entry("w1").image == "w1"


ROOT = Path(__file__).resolve().parent.parent


def test_the_seed_service_and_the_vm_provision_script_agree_on_their_arguments():
    """booted-seed passes user, key and hostname as arguments (set, then the script sourced): the
    provision script in the base image must take them so (the local provider's reads files instead;
    sharing it left VMs with no user)."""
    from fabfile.providers.libvirt import image

    for name in ("user", "pubkey", "hostname"):
        assert f'read -r {name} < "$mnt/{name}"' in image.SEED_SCRIPT
    assert 'set -- "$user" "$pubkey" "$hostname"\n    . /usr/local/lib/booted/provision' in image.SEED_SCRIPT
    assert 'user="$1"; pubkey="$2"; hostname="$3"' in image.VM_PROVISION
    assert "/etc/booted/provision" not in image.VM_PROVISION
