"""Placement of VMs over several libvirt hypervisors, and their configuration: tables of input -> expected.

Pure: no libvirt, no root. The rules are in fabfile/providers/libvirt/placement.py's docstring.
"""
from __future__ import annotations

import textwrap

import pytest

from fabfile.core.config import Checker, load_yaml
from fabfile.core.errors import ConfigError
from fabfile.providers.libvirt.placement import (
    DEFAULT_HYPERVISOR,
    LOADBALANCER,
    VM,
    WORKER,
    HypervisorSpec,
    PlacementError,
    check_hypervisors,
    environment_vms,
    hypervisors_from_settings,
    is_remote_uri,
    parse_hypervisors,
    parse_pins,
    place,
    valid_uri,
)


def hvs(*specs: str, **limits) -> dict[str, HypervisorSpec]:
    """hvs("hv1", "hv2", hv1=(capacity_vms, memory_mb)) -> {name: HypervisorSpec}."""
    out = {}
    for name in specs:
        capacity, memory = limits.get(name, (None, None))
        out[name] = HypervisorSpec(name, f"qemu+ssh://root@{name}/system", capacity, memory)
    return out


def env(lbs: str, workers: str, name: str = "e", memory_mb: int = 512) -> list[VM]:
    """env("lb1", "w1 w2"): the VMs of an environment (images in that order: load balancers, then workers)."""
    lb, ws = lbs.split(), workers.split()
    return environment_vms(lb + [w for w in ws if w not in lb], lb, ws, env=name, memory_mb=memory_mb)


# (description, hypervisors, vms, current, pins, down, expected where, expected unplaced images)
PLACEMENTS = [
    ("workers spread one per hypervisor",
     hvs("hv1", "hv2", "hv3"), env("", "w1 w2 w3"), {}, {}, (),
     {"w1": "hv1", "w2": "hv2", "w3": "hv3"}, set()),
    ("more workers than hypervisors: round robin, never two while another has none",
     hvs("hv1", "hv2"), env("", "w1 w2 w3 w4 w5"), {}, {}, (),
     {"w1": "hv1", "w2": "hv2", "w3": "hv1", "w4": "hv2", "w5": "hv1"}, set()),
    ("load balancer placed first, workers spread over both (the issue's two-hypervisor test)",
     hvs("hv1", "hv2"), env("lb1", "w1 w2"), {}, {}, (),
     {"lb1": "hv1", "w1": "hv2", "w2": "hv1"}, set()),
    ("load balancers are placed before workers listed ahead of them",
     hvs("hv1", "hv2"), environment_vms(["w1", "w2", "lb1"], ["lb1"], ["w1", "w2"], env="e"), {}, {}, (),
     {"lb1": "hv1", "w1": "hv2", "w2": "hv1"}, set()),
    ("two load balancers on two hypervisors",
     hvs("hv1", "hv2"), env("lb1 lb2", "w1 w2"), {}, {}, (),
     {"lb1": "hv1", "lb2": "hv2", "w1": "hv1", "w2": "hv2"}, set()),
    ("an image both load balancer and worker is one VM",
     hvs("hv1", "hv2"), env("box", "box"), {}, {}, (),
     {"box": "hv1"}, set()),
    ("existing VMs stay, even two workers on one hypervisor while another is empty",
     hvs("hv1", "hv2"), env("", "w1 w2 w3"), {"w1": "hv1", "w2": "hv1"}, {}, (),
     {"w1": "hv1", "w2": "hv1", "w3": "hv2"}, set()),
    ("a new worker goes where its environment has fewest workers, not where fewest VMs run",
     hvs("hv1", "hv2"), env("", "a1 a2", name="a") + env("", "b1 b2 b3", name="b"),
     {"b1": "hv2", "b2": "hv2", "a1": "hv1"}, {}, (),
     {"a1": "hv1", "a2": "hv2", "b1": "hv2", "b2": "hv2", "b3": "hv1"}, set()),
    ("capacity_vms: a full hypervisor takes no more",
     hvs("hv1", "hv2", hv1=(1, None)), env("lb1", "w1 w2 w3"), {}, {}, (),
     {"lb1": "hv1", "w1": "hv2", "w2": "hv2", "w3": "hv2"}, set()),
    ("memory_mb: a VM goes where its memory fits",
     hvs("hv1", "hv2", hv2=(None, 1024)), env("", "w1 w2 w3 w4"), {}, {}, (),
     {"w1": "hv1", "w2": "hv2", "w3": "hv1", "w4": "hv2"}, set()),
    ("everything full: the rest is unplaced",
     hvs("hv1", "hv2", hv1=(1, None), hv2=(1, None)), env("", "w1 w2 w3"), {}, {}, (),
     {"w1": "hv1", "w2": "hv2"}, {"w3"}),
    ("pins are obeyed, the rest spread around them",
     hvs("hv1", "hv2"), env("lb1", "w1 w2 w3"), {}, {"lb1": "hv2", "w1": "hv2"}, (),
     {"lb1": "hv2", "w1": "hv2", "w2": "hv1", "w3": "hv1"}, set()),
    ("a pin to a full hypervisor leaves the VM unplaced rather than elsewhere",
     hvs("hv1", "hv2", hv2=(1, None)), env("", "w1 w2"), {}, {"w1": "hv2", "w2": "hv2"}, (),
     {"w1": "hv2"}, {"w2"}),
    ("a VM running apart from a new pin is not moved",
     hvs("hv1", "hv2"), env("", "w1"), {"w1": "hv1"}, {"w1": "hv2"}, (),
     {"w1": "hv1"}, set()),
    ("lost hypervisor: its workers are placed again on the survivors, spread",
     hvs("hv1", "hv2", "hv3"), env("lb1", "w1 w2 w3 w4"),
     {"lb1": "hv1", "w1": "hv2", "w2": "hv3", "w3": "hv1", "w4": "hv2"}, {}, ("hv2",),
     {"lb1": "hv1", "w2": "hv3", "w3": "hv1", "w1": "hv3", "w4": "hv1"}, set()),
    ("lost hypervisor with no room left: its workers are unplaced",
     hvs("hv1", "hv2", hv1=(2, None)), env("lb1", "w1 w2 w3"),
     {"lb1": "hv1", "w1": "hv2", "w2": "hv1", "w3": "hv2"}, {}, ("hv2",),
     {"lb1": "hv1", "w2": "hv1"}, {"w1", "w3"}),
    ("lost load balancer goes to a survivor too",
     hvs("hv1", "hv2"), env("lb1", "w1 w2"), {"lb1": "hv1", "w1": "hv2", "w2": "hv1"}, {}, ("hv1",),
     {"w1": "hv2", "lb1": "hv2", "w2": "hv2"}, set()),
    ("a VM pinned to a lost hypervisor waits for it",
     hvs("hv1", "hv2"), env("", "w1 w2"), {"w1": "hv1", "w2": "hv2"}, {"w1": "hv1"}, ("hv1",),
     {"w2": "hv2"}, {"w1"}),
    ("every hypervisor down: nothing placed",
     hvs("hv1", "hv2"), env("", "w1"), {}, {}, ("hv1", "hv2"),
     {}, {"w1"}),
    ("a VM on a hypervisor no longer configured is reported, not silently duplicated",
     hvs("hv1"), env("", "w1"), {"w1": "old"}, {}, (),
     {}, {"w1"}),
    ("one hypervisor (the default): everything on it",
     {DEFAULT_HYPERVISOR: HypervisorSpec(DEFAULT_HYPERVISOR, "qemu:///system")}, env("lb1", "w1 w2"), {}, {}, (),
     {"lb1": DEFAULT_HYPERVISOR, "w1": DEFAULT_HYPERVISOR, "w2": DEFAULT_HYPERVISOR}, set()),
]


@pytest.mark.parametrize("what,hypervisors,vms,current,pins,down,expected,unplaced", PLACEMENTS,
                         ids=[p[0] for p in PLACEMENTS])
def test_placement(what, hypervisors, vms, current, pins, down, expected, unplaced):
    plan = place(hypervisors, vms, current, pins, down)
    assert plan.where == expected
    assert set(plan.unplaced) == unplaced
    assert set(plan.where) | set(plan.unplaced) == {vm.image for vm in vms}  # every VM accounted for once
    assert not set(plan.where) & set(plan.unplaced)


def test_converging_twice_changes_nothing():
    hypervisors, vms = hvs("hv1", "hv2", "hv3"), env("lb1 lb2", "w1 w2 w3 w4 w5")
    first = place(hypervisors, vms, {})
    again = place(hypervisors, vms, first.where)
    assert again.where == first.where
    assert again.kept == tuple(vm.image for vm in vms) and again.new == ()


def test_adding_a_worker_keeps_the_others_where_they_are():
    hypervisors = hvs("hv1", "hv2")
    before = place(hypervisors, env("lb1", "w1 w2"), {})
    after = place(hypervisors, env("lb1", "w1 w2 w3"), before.where)
    assert {k: after.where[k] for k in before.where} == before.where
    assert after.new == ("w3",) and after.where["w3"] == "hv2"  # hv2 had one worker, hv1 one worker + lb


def test_a_new_hypervisor_takes_new_vms_but_none_move_to_it():
    before = place(hvs("hv1"), env("", "w1 w2"), {})
    after = place(hvs("hv1", "hv2"), env("", "w1 w2 w3"), before.where)
    assert after.where == {"w1": "hv1", "w2": "hv1", "w3": "hv2"} and after.kept == ("w1", "w2")


def test_lost_vms_are_listed_and_placed_again():
    plan = place(hvs("hv1", "hv2"), env("lb1", "w1 w2"), {"lb1": "hv1", "w1": "hv2", "w2": "hv1"}, down=["hv2"])
    assert plan.lost == ("w1",) and plan.new == ("w1",) and plan.where["w1"] == "hv1"
    assert plan.kept == ("lb1", "w2")


def test_unplaced_reasons_name_the_hypervisor_and_the_limit():
    plan = place(hvs("hv1", "hv2", hv1=(1, None), hv2=(None, 600)), env("", "w1 w2 w3"), {})
    assert plan.where == {"w1": "hv1", "w2": "hv2"}
    why = plan.unplaced["w3"]
    assert "hv1 is full (1 of capacity_vms 1)" in why
    assert "hv2 lacks memory (512 of memory_mb 600 MB used, w3 needs 512 MB)" in why
    with pytest.raises(PlacementError, match=r"^w3: no room: hv1 is full") as err:
        plan.require_all()
    assert "\n" not in str(err.value)
    place(hvs("hv1"), env("", "w1"), {}).require_all()  # all placed: no error


def test_misplaced_vm_is_reported_with_its_pin():
    plan = place(hvs("hv1", "hv2"), env("", "w1"), {"w1": "hv1"}, {"w1": "hv2"})
    assert plan.misplaced == {"w1": "hv2"} and plan.where == {"w1": "hv1"}


def test_pinned_to_a_down_hypervisor_says_so():
    plan = place(hvs("hv1", "hv2"), env("", "w1"), {"w1": "hv1"}, {"w1": "hv1"}, down=["hv1"])
    assert plan.unplaced == {"w1": "pinned to hypervisor 'hv1', which is down"}


def test_on_lists_a_hypervisors_vms():
    plan = place(hvs("hv1", "hv2"), env("lb1", "w1 w2"), {})
    assert plan.on("hv1") == ["lb1", "w2"] and plan.on("hv2") == ["w1"]


def test_environment_vms_roles():
    vms = {vm.image: vm.roles for vm in environment_vms(["box", "w"], ["box"], ["box", "w"])}
    assert vms == {"box": frozenset({LOADBALANCER, WORKER}), "w": frozenset({WORKER})}


# --------------------------------------------------------------------------- configuration
URIS = [
    ("qemu:///system", None),
    ("qemu+ssh://root@hv1/system", None),
    ("qemu+ssh://root@10.0.0.2:2222/system?keyfile=/root/.ssh/booted&no_tty=1", None),
    ("qemu+libssh://root@hv1/system?known_hosts=/var/lib/booted/known_hosts", None),
    ("test:///default", None),
    ("qemu+ssh:///system", "the ssh transport needs a host"),
    ("qemu+rsh://hv1/system", "unknown libvirt transport 'rsh'"),
    ("hv1", "is not a libvirt URI"),
    ("qemu+ssh://root@hv1", "is not a libvirt URI"),
    ("qemu+ssh://root@hv1/system; rm -rf /", "is not a libvirt URI"),
    ("qemu+ssh://root@hv1/sys\ntem", "is not a libvirt URI"),
    ("qemu+ssh://root@hv1:99999/system", "is not a libvirt URI"),
    ("", "is not a libvirt URI"),
]


@pytest.mark.parametrize("uri,problem", URIS, ids=[u[0] or "empty" for u in URIS])
def test_uri_validation(uri, problem):
    result = valid_uri(uri)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result


@pytest.mark.parametrize("uri,remote", [
    ("qemu:///system", False), ("qemu+unix:///system", False), ("test:///default", False),
    ("qemu+ssh://root@hv1/system", True), ("qemu://hv1/system", True), ("qemu+tcp://hv1/system", True),
])
def test_remote_uri(uri, remote):
    assert is_remote_uri(uri) is remote


HV_GOOD = textwrap.dedent("""\
    hypervisors:
      hv1:
        uri: qemu+ssh://root@10.0.0.11/system
        capacity_vms: 4
        memory_mb: 4096
        bridge: br0
      hv2:
        uri: qemu+ssh://root@10.0.0.12/system
    """)

# (description, yaml, expected line, expected message fragment)
HV_BAD = [
    ("uri missing", HV_GOOD.replace("    uri: qemu+ssh://root@10.0.0.12/system\n", "    bridge: br0\n"), 8,
     "hypervisors.hv2.uri: missing required key"),
    ("bad uri", HV_GOOD.replace("root@10.0.0.11/system", "root@10.0.0.11"), 3,
     "hypervisors.hv1.uri: 'qemu+ssh://root@10.0.0.11' is not a libvirt URI"),
    ("capacity zero", HV_GOOD.replace("capacity_vms: 4", "capacity_vms: 0"), 4,
     "hypervisors.hv1.capacity_vms: must be greater than 0"),
    ("capacity not an integer", HV_GOOD.replace("capacity_vms: 4", "capacity_vms: lots"), 4,
     "hypervisors.hv1.capacity_vms: must be an integer, not a string"),
    ("memory too small", HV_GOOD.replace("memory_mb: 4096", "memory_mb: 100"), 5,
     "hypervisors.hv1.memory_mb: must be at least 256"),
    ("bad bridge name", HV_GOOD.replace("bridge: br0", "bridge: 'br0; reboot'"), 6,
     "hypervisors.hv1.bridge: must be a network interface name"),
    ("unknown key", HV_GOOD.replace("bridge: br0", "bridge: br0\n    cpus: 8"), 7,
     "hypervisors.hv1.cpus: unknown key (known: bridge, callhome_address, capacity_vms, memory_mb, uri)"),
    ("bad hypervisor name", HV_GOOD.replace("  hv2:", "  HV 2:"), 7,
     "hypervisors.HV 2: invalid hypervisor name 'HV 2'"),
    ("same uri twice", HV_GOOD.replace("10.0.0.12", "10.0.0.11"), 8,
     "hypervisors.hv2.uri: is also the uri of hypervisor 'hv1'"),
    ("hypervisor not a mapping", HV_GOOD.replace("  hv2:\n    uri: qemu+ssh://root@10.0.0.12/system\n", "  hv2: big\n"), 7,
     "hypervisors.hv2: must be a mapping, not a string"),
    ("empty", "hypervisors: {}\n", 1, "hypervisors: names no hypervisor"),
]


def assert_one_located_line(err, path, line, fragment):
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message, message


def load(tmp_path, text):
    path = tmp_path / "hv.yaml"
    path.write_text(text)
    return path, load_yaml(path)


def test_hypervisors_parse(tmp_path):
    path, doc = load(tmp_path, HV_GOOD)
    got = parse_hypervisors(Checker(str(path)), doc["hypervisors"], "hypervisors", doc, "hypervisors")
    assert list(got) == ["hv1", "hv2"]
    assert got["hv1"] == HypervisorSpec("hv1", "qemu+ssh://root@10.0.0.11/system", 4, 4096, "br0")
    assert got["hv2"] == HypervisorSpec("hv2", "qemu+ssh://root@10.0.0.12/system")
    assert got["hv1"].remote
    assert check_hypervisors(doc["hypervisors"]) is None


@pytest.mark.parametrize("what,text,line,fragment", HV_BAD, ids=[b[0] for b in HV_BAD])
def test_bad_hypervisors_are_one_located_line(tmp_path, what, text, line, fragment):
    path, doc = load(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        parse_hypervisors(Checker(str(path)), doc["hypervisors"], "hypervisors", doc, "hypervisors")
    assert_one_located_line(err, path, line, fragment)
    # The same mistake through the SETTINGS check protocol: one message naming the inner key and its line.
    problem = check_hypervisors(doc["hypervisors"])
    assert problem and "\n" not in problem
    inner = fragment.split(": ", 1)[0].removeprefix("hypervisors").lstrip(".")
    if inner:
        assert problem.startswith(f"{inner} (line {line}): "), problem


PIN_DOC = textwrap.dedent("""\
    placement:
      lb1: hv1
      w1: hv2
    """)

PIN_BAD = [
    ("unknown image", PIN_DOC.replace("w1: hv2", "w9: hv2"), 3,
     "placement.w9: names image 'w9', which is not in this environment's images"),
    ("unknown hypervisor", PIN_DOC.replace("w1: hv2", "w1: hv7"), 3,
     "placement.w1: unknown hypervisor 'hv7' (known: hv1, hv2)"),
    ("not a name", PIN_DOC.replace("w1: hv2", "w1: [hv1, hv2]"), 3,
     "placement.w1: must be a hypervisor name (a string)"),
    ("not a mapping", "placement: [lb1, hv1]\n", 1, "placement: must be a mapping, not a list"),
]


def test_pins_parse(tmp_path):
    path, doc = load(tmp_path, PIN_DOC)
    pins = parse_pins(Checker(str(path)), doc["placement"], "placement", ["lb1", "w1", "w2"], ["hv1", "hv2"])
    assert pins == {"lb1": "hv1", "w1": "hv2"}


@pytest.mark.parametrize("what,text,line,fragment", PIN_BAD, ids=[b[0] for b in PIN_BAD])
def test_bad_pins_are_one_located_line(tmp_path, what, text, line, fragment):
    path, doc = load(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        parse_pins(Checker(str(path)), doc["placement"], "placement", ["lb1", "w1", "w2"], ["hv1", "hv2"],
                   doc, "placement")
    assert_one_located_line(err, path, line, fragment)


def test_hypervisors_from_settings():
    assert hypervisors_from_settings({"uri": "qemu:///system", "hypervisors": None}) == {
        DEFAULT_HYPERVISOR: HypervisorSpec(DEFAULT_HYPERVISOR, "qemu:///system")}
    got = hypervisors_from_settings({"uri": "qemu:///system", "hypervisors": {
        "hv1": {"uri": "qemu+ssh://root@a/system", "capacity_vms": 2}, "hv2": {"uri": "qemu+ssh://root@b/system"}}})
    assert list(got) == ["hv1", "hv2"] and got["hv1"].capacity_vms == 2 and got["hv2"].bridge is None
