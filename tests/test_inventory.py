"""The inventory: calls matched to images, updates that keep history, concurrent writers, and
every output format (the ansible one checked with the real ansible-inventory when available)."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
import yaml
from configs import two_environments, use_config

from fabfile.core.errors import ConfigError, UsageError
from fabfile.hosts import inventory as inv_mod
from fabfile.hosts import reach
from fabfile.hosts.bootlog import Call
from fabfile.hosts.inventory import HostEntry, Inventory, render
from fabfile.hosts.reach import probe_ssh
from fabfile.providers.base import CloneRecord

CONFIG = two_environments("virtualbox")
MAC = {"prod-lb1": "08:00:27:00:00:10", "prod-web1": "08:00:27:00:00:11", "prod-web2": "08:00:27:00:00:12",
       "dev-box": "08:00:27:00:00:20", "scratch": "08:00:27:00:00:99"}
T0 = 1700000000.0


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    return use_config(tmp_path, monkeypatch, CONFIG)[1]


def clone(name, source):
    """booted's record of a clone it made: its source and the MAC VirtualBox gave it."""
    return CloneRecord(name, source, (MAC[name],))


def call(name, addr, mac=None, at=0.0, env="prod"):
    return Call(env=env, name=name, mac=mac or MAC[name], addr=addr, ts=int(T0 + at), seen_at=T0 + at)


MACHINES = [clone("prod-web2", "prod-web1")]


def test_record_adds_then_updates_and_keeps_first_seen(cfg):
    inv = Inventory()
    summary = inv.record_calls([call("prod-web1", "10.0.0.11", at=5), call("prod-lb1", "10.0.0.10", at=1)], MACHINES, cfg)
    assert (summary.calls, summary.added, summary.updated, summary.unknown) == (2, ["prod-lb1", "prod-web1"], [], 0)
    assert inv.load() == [
        HostEntry("prod-lb1", "prod-lb1", "10.0.0.10", MAC["prod-lb1"], "prod", ["loadbalancers"], T0 + 1, T0 + 1,
                  last_ts=int(T0 + 1)),
        HostEntry("prod-web1", "prod-web1", "10.0.0.11", MAC["prod-web1"], "prod", ["workers"], T0 + 5, T0 + 5,
                  last_ts=int(T0 + 5)),
    ]
    assert inv.mark_reachable({"10.0.0.11": True, "10.0.0.10": False}, checked_at=T0 + 6) == ["prod-lb1", "prod-web1"]

    # a reboot: same host, new lease. first_seen stays, the address moves, the old check is void
    summary = inv.record_calls([call("prod-web1", "10.0.0.21", at=100)], MACHINES, cfg)
    assert (summary.added, summary.updated) == ([], ["prod-web1"])
    web1 = {e.image: e for e in inv.load()}["prod-web1"]
    assert (web1.first_seen, web1.last_seen, web1.address, web1.reachable, web1.checked_at) == (T0 + 5, T0 + 100, "10.0.0.21", None, None)
    assert {e.image: e.reachable for e in inv.load()}["prod-lb1"] is False

    # an older call read again (after hosts-clear, or out of order) does not undo the newer one
    summary = inv.record_calls([call("prod-web1", "10.0.0.11", at=5)], MACHINES, cfg)
    assert summary.updated == [] and {e.image: e.address for e in inv.load()}["prod-web1"] == "10.0.0.21"
    # the same calls again change nothing
    assert inv.record_calls([call("prod-lb1", "10.0.0.10", at=1)], MACHINES, cfg).updated == []


def test_a_clone_is_recorded_under_its_own_image_by_mac(cfg):
    inv = Inventory()
    # prod-web2 was cloned from prod-web1: it calls home as prod-web1, with its own MAC
    clone_call = call("prod-web1", "10.0.0.12", mac=MAC["prod-web2"], at=3)
    summary = inv.record_calls([call("prod-web1", "10.0.0.11", at=1), clone_call], MACHINES, cfg)
    assert summary.added == ["prod-web1", "prod-web2"] and summary.misnamed == ["prod-web2"]
    hosts = {e.image: e for e in inv.load()}
    assert (hosts["prod-web2"].name, hosts["prod-web2"].address, hosts["prod-web2"].hostname_ok) == ("prod-web1", "10.0.0.12", False)
    assert (hosts["prod-web1"].address, hosts["prod-web1"].hostname_ok) == ("10.0.0.11", True)
    assert hosts["prod-web2"].roles == ["workers"]
    # once renamed, its next call home says so
    inv.record_calls([call("prod-web2", "10.0.0.12", at=50)], MACHINES, cfg)
    assert {e.image: e.hostname_ok for e in inv.load()}["prod-web2"] is True


def test_identity_is_the_key_never_a_claimed_mac_or_address(cfg):
    """A call is the image whose key signed it; a MAC or an address never moves it to another image
    (security finding 1: test-box's key with prod-web1's MAC must not become prod-web1)."""
    inv = Inventory()
    summary = inv.record_calls([
        call("prod-web1", "10.0.0.11", at=1),
        call("dev-box", "10.0.0.50", mac=MAC["prod-web1"], at=2, env="dev-env"),  # dev-box claims web1's MAC
        call("dev-box", "10.0.0.51", mac=MAC["prod-web2"], at=3, env="dev-env"),  # ... and a clone's MAC
        call("prod-lb1", "10.0.0.52", mac=MAC["prod-web2"], at=4),  # another source than the clone's
        call("prod-web1", "10.0.0.53", mac=MAC["prod-web2"], at=5, env="dev-env"),  # a key of another env
    ], MACHINES, cfg)
    hosts = {e.image: e for e in inv.load()}
    assert sorted(hosts) == ["dev-box", "prod-lb1", "prod-web1"]
    assert (hosts["prod-web1"].address, hosts["prod-web1"].env) == ("10.0.0.11", "prod")
    assert (hosts["dev-box"].env, hosts["dev-box"].address, hosts["dev-box"].hostname_ok) == ("dev-env", "10.0.0.51", True)
    assert hosts["prod-lb1"].hostname_ok is True
    assert (summary.unknown, summary.unknown_names) == (1, ["prod-web1"])


def test_a_call_no_newer_than_the_last_recorded_is_a_replay(cfg):
    inv = Inventory()
    inv.record_calls([call("prod-web1", "10.0.0.11", at=10)], MACHINES, cfg)
    replay = Call(env="prod", name="prod-web1", mac=MAC["prod-web1"], addr="10.0.0.66", ts=int(T0 + 10), seen_at=T0 + 99)
    summary = inv.record_calls([replay], MACHINES, cfg)
    assert summary.replayed == 1 and {e.image: e.address for e in inv.load()}["prod-web1"] == "10.0.0.11"


def test_an_address_taken_over_by_another_image_drops_the_stale_entry(cfg):
    inv = Inventory()
    inv.record_calls([call("prod-web1", "10.0.0.11", at=1)], MACHINES, cfg)
    summary = inv.record_calls([call("prod-web2", "10.0.0.11", at=9)], MACHINES, cfg)
    assert summary.superseded == ["prod-web1"] and summary.added == ["prod-web2"]
    assert [e.image for e in inv.load()] == ["prod-web2"]


def test_filters_remove_and_clear(cfg):
    inv = Inventory()
    inv.record_calls([call("prod-lb1", "10.0.0.10"), call("prod-web1", "10.0.0.11"),
                      call("dev-box", "10.0.0.20", env="dev-env")], MACHINES, cfg)
    inv.mark_reachable({"10.0.0.10": True, "10.0.0.11": False})
    images = lambda entries: [e.image for e in entries]  # noqa: E731
    assert images(inv.hosts()) == ["dev-box", "prod-lb1", "prod-web1"]
    assert images(inv.hosts(env="prod")) == ["prod-lb1", "prod-web1"]
    assert images(inv.hosts(role="loadbalancers")) == ["dev-box", "prod-lb1"]
    assert images(inv.hosts(role="workers", env="prod")) == ["prod-web1"]
    assert images(inv.hosts(reachable=True)) == ["prod-lb1"]
    assert images(inv.hosts(reachable=False)) == ["prod-web1"]
    with pytest.raises(UsageError, match="unknown role 'db'"):
        inv.hosts(role="db")
    assert inv.remove("prod-web1") is True and inv.remove("prod-web1") is False
    assert images(inv.load()) == ["dev-box", "prod-lb1"]
    assert inv.clear() == 2 and inv.load() == []


def test_the_file_is_json_written_atomically(cfg, tmp_path):
    inv = Inventory()
    inv.record_calls([call("prod-web1", "10.0.0.11")], MACHINES, cfg)
    assert inv.path == tmp_path / "state" / "inventory.json"
    doc = json.loads(inv.path.read_text())
    assert doc["version"] == 1 and list(doc["hosts"]) == ["prod-web1"]
    assert sorted(p.name for p in inv.path.parent.iterdir() if p.is_file()) == ["inventory.json"]
    # a failing update writes nothing
    before = inv.path.read_bytes()
    with pytest.raises(RuntimeError):
        with inv.update() as hosts:
            hosts.clear()
            raise RuntimeError("boom")
    assert inv.path.read_bytes() == before


@pytest.mark.parametrize("content, where", [
    ("{oops", "not valid JSON"),
    ('{"version": 1, "hosts": []}', '"version": 1'),
    ('{"version": 1, "hosts": {"a": {"image": "a"}}}', "hosts.a.name: missing or of the wrong type"),
    ('{"version": 1, "hosts": {"$(x)": {}}}', "hosts.$(x).image"),
])
def test_a_damaged_file_is_a_one_line_error_naming_it(cfg, content, where):
    inv = Inventory()
    inv.path.write_text(content)
    with pytest.raises(ConfigError) as err:
        inv.load()
    assert str(inv.path) in str(err.value) and where in str(err.value) and "hosts-reset" in str(err.value)
    assert "\n" not in str(err.value)


def _bump(state_dir: str, image: str, times: int) -> None:
    os.environ["BOOTED_STATE_DIR"] = state_dir
    inv = Inventory()
    for _ in range(times):
        with inv.update() as hosts:
            entry = hosts.get(image) or HostEntry(image, image, "10.0.0.1", "08:00:27:00:00:01", "prod")
            entry.last_seen += 1
            hosts[image] = entry


def test_concurrent_writers_lose_no_update(cfg, tmp_path):
    ctx = multiprocessing.get_context("fork")
    state_dir = str(tmp_path / "state")
    workers = [ctx.Process(target=_bump, args=(state_dir, image, 50)) for image in ("prod-web1", "prod-web2")]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert {e.image: e.last_seen for e in Inventory().load()} == {"prod-web1": 50, "prod-web2": 50}
    assert [p.name for p in (tmp_path / "state").iterdir() if p.name.endswith(".tmp")] == []


# --------------------------------------------------------------------------- rendering
@pytest.fixture
def entries(cfg):
    inv = Inventory()
    inv.record_calls([
        call("prod-lb1", "10.0.0.10", at=1), call("prod-web1", "10.0.0.11", at=2),
        call("prod-web1", "10.0.0.12", mac=MAC["prod-web2"], at=3),
        call("dev-box", "10.0.0.20", env="dev-env", at=4),
        call("dev-box", "10.0.0.99", mac=MAC["scratch"], env="dev-env", at=5),
    ], MACHINES + [clone("scratch", "dev-box")], cfg)
    inv.mark_reachable({"10.0.0.10": True, "10.0.0.11": False})
    return inv.load()


def test_table_has_a_header_and_one_row_per_host(entries):
    lines = render(entries, "table").splitlines()
    assert lines[0].split() == ["IMAGE", "ENV", "ROLES", "ADDRESS", "MAC", "REACHABLE", "LAST", "SEEN"]
    assert [line.split()[0] for line in lines[1:]] == ["dev-box", "scratch", "prod-lb1", "prod-web1", "prod-web2"]
    row = {line.split()[0]: line.split() for line in lines[1:]}
    assert row["prod-lb1"][1:6] == ["prod", "loadbalancers", "10.0.0.10", MAC["prod-lb1"], "yes"]
    assert row["prod-web1"][5] == "no" and row["prod-web2"][5] == "-"
    assert row["dev-box"][2] == "loadbalancers,workers" and row["scratch"][2] == "-"
    assert "no hosts" in render([], "table")


def test_json_and_yaml_parse_back_to_the_entries(entries):
    as_dicts = [e.to_dict() for e in entries]
    assert json.loads(render(entries, "json")) == as_dicts
    assert yaml.safe_load(render(entries, "yaml")) == as_dicts
    assert [HostEntry(**d) for d in json.loads(render(entries, "json"))] == entries
    with pytest.raises(UsageError, match="unknown format 'xml'"):
        render(entries, "xml")


EXPECTED_GROUPS = {
    "dev_env": {"children": ["dev_env_loadbalancers", "dev_env_workers"], "hosts": ["scratch"]},
    "dev_env_loadbalancers": {"hosts": ["dev-box"]},
    "dev_env_workers": {"hosts": ["dev-box"]},
    "prod": {"children": ["prod_loadbalancers", "prod_workers"]},
    "prod_loadbalancers": {"hosts": ["prod-lb1"]},
    "prod_workers": {"hosts": ["prod-web1", "prod-web2"]},
}


def test_ansible_inventory_structure(entries):
    doc = yaml.safe_load(render(entries, "ansible", ssh_user="booted", ssh_key="/keys/id_ed25519"))
    children = doc["all"]["children"]
    assert sorted(children) == ["dev_env", "prod"]
    assert children["prod"] == {"children": {
        "prod_loadbalancers": {"hosts": {"prod-lb1": {"ansible_host": "10.0.0.10", "ansible_user": "booted",
                                                      "ansible_ssh_private_key_file": "/keys/id_ed25519"}}},
        "prod_workers": {"hosts": {
            "prod-web1": {"ansible_host": "10.0.0.11", "ansible_user": "booted", "ansible_ssh_private_key_file": "/keys/id_ed25519"},
            "prod-web2": {"ansible_host": "10.0.0.12", "ansible_user": "booted", "ansible_ssh_private_key_file": "/keys/id_ed25519"},
        }},
    }}
    assert sorted(children["dev_env"]["children"]) == ["dev_env_loadbalancers", "dev_env_workers"]
    assert list(children["dev_env"]["hosts"]) == ["scratch"]
    assert yaml.safe_load(render([], "ansible")) == {"all": {}}


def test_ansible_group_names_are_valid_and_never_collide(cfg):
    assert inv_mod.ansible_group("dev-env") == "dev_env"
    assert inv_mod.ansible_group("all") == "env_all"
    clash = [HostEntry("a", "a", "10.0.0.1", "08:00:27:00:00:01", "a", ["workers"]),
             HostEntry("b", "b", "10.0.0.2", "08:00:27:00:00:02", "a-workers", [])]
    with pytest.raises(inv_mod.BootedError, match="both map to the ansible group 'a_workers'"):
        render(clash, "ansible")


def _ansible_inventory_command() -> str | None:
    return os.environ.get("BOOTED_ANSIBLE_INVENTORY") or shutil.which("ansible-inventory")


@pytest.mark.skipif(
    not _ansible_inventory_command() and not os.environ.get("BOOTED_REQUIRE_ANSIBLE"),
    reason="ansible-inventory not found: pip install ansible-core==2.18.19 into a venv and set "
           "BOOTED_ANSIBLE_INVENTORY=<venv>/bin/ansible-inventory (BOOTED_REQUIRE_ANSIBLE=1 turns this skip into a failure)",
)
def test_real_ansible_inventory_reads_the_ansible_format(entries, tmp_path):
    command = _ansible_inventory_command()
    assert command, "BOOTED_REQUIRE_ANSIBLE is set but ansible-inventory was not found"
    path = tmp_path / "hosts.yml"
    path.write_text(render(entries, "ansible", ssh_user="booted", known_hosts=str(tmp_path / "known hosts")))
    env = {
        **os.environ, "ANSIBLE_HOME": str(tmp_path / "ansible"), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        # only the YAML plugin, and a file it cannot parse is an error, not a warning with exit 0
        "ANSIBLE_INVENTORY_ENABLED": "yaml", "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
        "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "True", "ANSIBLE_NOCOLOR": "1",
    }
    proc = subprocess.run([command, "-i", str(path), "--list"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr  # e.g. "Invalid characters were found in group names"
    listed = json.loads(proc.stdout)
    hostvars = listed.pop("_meta")["hostvars"]
    groups = {name: {k: sorted(v) for k, v in body.items()} for name, body in listed.items()}
    assert sorted(groups.pop("all")["children"]) == ["dev_env", "prod", "ungrouped"]
    groups.pop("ungrouped", None)
    assert groups == EXPECTED_GROUPS
    assert {h: v["ansible_host"] for h, v in hostvars.items()} == {
        "dev-box": "10.0.0.20", "scratch": "10.0.0.99", "prod-lb1": "10.0.0.10", "prod-web1": "10.0.0.11", "prod-web2": "10.0.0.12"}
    assert {v["ansible_user"] for v in hostvars.values()} == {"booted"}
    assert hostvars["prod-lb1"]["ansible_ssh_common_args"] == (
        f"-o UserKnownHostsFile='{tmp_path}/known hosts' -o StrictHostKeyChecking=yes")


# --------------------------------------------------------------------------- reachability (fabfile/hosts/reach.py)
class Listeners:
    """Real sockets on one port: listening, silent (accept queue full: SYNs are dropped), closed."""

    def __init__(self):
        self.sockets: list[socket.socket] = []
        self.port = 0

    def listen(self, address: str, backlog: int = 8) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, self.port))
        sock.listen(backlog)
        self.port = sock.getsockname()[1]
        self.sockets.append(sock)
        return sock

    def silent(self, address: str) -> None:
        self.listen(address, backlog=0)
        for _ in range(3):  # fill the accept queue; later connects get no answer at all
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((address, self.port))
            self.sockets.append(filler)

    def close(self):
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def listeners():
    made = Listeners()
    yield made
    made.close()


def test_probe_ssh_tells_listening_from_closed(listeners):
    listeners.listen("127.0.0.2")
    listeners.listen("127.0.0.5")
    started = time.monotonic()
    result = probe_ssh(["127.0.0.2", "127.0.0.3", "127.0.0.5", "not-an-address", "host.example"],
                       port=listeners.port, timeout=2.0)
    assert result == {"127.0.0.2": True, "127.0.0.3": False, "127.0.0.5": True,
                      "not-an-address": False, "host.example": False}
    assert time.monotonic() - started < 1.0  # nothing silent: no waiting for the timeout
    assert probe_ssh([], port=listeners.port) == {}


def test_probe_ssh_waits_for_silent_hosts_once_not_per_host(listeners):
    silent = [f"127.0.0.{i}" for i in range(20, 25)]
    listeners.listen("127.0.0.2")
    for address in silent:
        listeners.silent(address)
    time.sleep(0.1)
    started = time.monotonic()
    result = probe_ssh(["127.0.0.2", "127.0.0.3", *silent], port=listeners.port, timeout=0.5)
    elapsed = time.monotonic() - started
    assert result == {"127.0.0.2": True, "127.0.0.3": False, **{a: False for a in silent}}
    assert 0.45 <= elapsed < 1.2, f"took {elapsed:.2f}s for 5 silent hosts with a 0.5s timeout"


@pytest.fixture
def no_early_probe(monkeypatch):
    monkeypatch.setattr(reach, "_early", None)


def test_a_probe_begun_early_answers_the_later_probe_of_its_addresses(listeners, no_early_probe):
    listener = listeners.listen("127.0.0.2")
    reach.begin(["127.0.0.2", "127.0.0.3"], port=listeners.port, timeout=2.0)
    reach._early.join()
    listener.close()  # from now on a new probe finds 127.0.0.2 closed
    assert probe_ssh(["127.0.0.2"], port=listeners.port, timeout=1.0) == {"127.0.0.2": False}  # not its timeout
    assert probe_ssh(["127.0.0.2", "127.0.0.4"], port=listeners.port, timeout=2.0)["127.0.0.2"] is False  # not covered
    assert probe_ssh(["127.0.0.2"], port=listeners.port, timeout=2.0) == {"127.0.0.2": True}  # the early answer
    assert probe_ssh(["127.0.0.2"], port=listeners.port, timeout=2.0) == {"127.0.0.2": False}  # taken once only


def test_an_early_probe_that_failed_is_probed_again_without_a_traceback(listeners, monkeypatch, no_early_probe):
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)  # what would print the thread's traceback
    listeners.listen("127.0.0.2")
    real_batch = reach._probe_batch
    monkeypatch.setattr(reach, "_probe_batch", lambda *a: (_ for _ in ()).throw(OSError(24, "Too many open files")))
    reach.begin(["127.0.0.2"], port=listeners.port, timeout=2.0)
    reach._early.join()
    monkeypatch.setattr(reach, "_probe_batch", real_batch)
    assert probe_ssh(["127.0.0.2"], port=listeners.port, timeout=2.0) == {"127.0.0.2": True}
    assert raised == []


def test_only_hosts_filter_begins_its_probe_early_and_only_from_a_sound_inventory(cfg, monkeypatch, no_early_probe):
    begun = []
    monkeypatch.setattr(reach, "begin", lambda addresses, *a, **k: begun.append(sorted(addresses)))
    Inventory().record_calls([call("prod-web1", "10.0.0.11"), call("prod-lb1", "10.0.0.12")], [], cfg)
    reach.begin_for(["fab", "hosts-list"])
    reach.begin_for(["fab", "hosts-filter", "hosts-list"])
    assert begun == []
    reach.begin_for(["/venv/bin/fab", "hosts-filter"])
    assert begun == [["10.0.0.11", "10.0.0.12"]]
    for damaged in ("", "{", "[]", '{"hosts": []}', '{"hosts": {"a": {"address": 5}}}', '{"hosts": {"a": 1}}'):
        Inventory().path.write_text(damaged)
        reach.begin_for(["fab", "hosts-filter"])
    assert begun == [["10.0.0.11", "10.0.0.12"]]
