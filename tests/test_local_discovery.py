"""Local provider and discovery, for real: nginx from the project's templates, three systemd hosts
booting and calling home, the inventory built from the booted log, hostile log lines ignored."""
from __future__ import annotations

import json
import time
import urllib.request

import pytest

pytestmark = pytest.mark.local

DISCO = ["disco-1", "disco-2", "disco-3"]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def disco(lab):
    """nginx running, three disco hosts built and started."""
    lab.fab("restart-nginx", check=True)
    for image in DISCO:
        lab.fab("image-build", "--image", image, check=True, timeout=1500)
    for image in DISCO:
        lab.fab("image-start", "--image", image, check=True)
    yield lab
    for image in DISCO:
        lab.fab("image-stop", "--image", image)
    lab.fab("hosts-clear", "--yes")


def logged_names(lab) -> set[str]:
    log = lab.state / "nginx" / "booted.log"
    return {line.split("name=")[1].split("&")[0] for line in log.read_text().splitlines() if "name=" in line} \
        if log.exists() else set()


def test_restart_nginx_serves_the_callhome_endpoint(lab):
    result = lab.fab("restart-nginx", check=True)
    assert f":{lab.port}" in result.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{lab.port}/healthz", timeout=5) as resp:
        assert resp.status == 200


def test_image_list_shows_hosts_with_state_mac_and_address(disco):
    out = disco.fab("image-list", "--provider", "local", check=True).stdout
    for image in DISCO:
        row = next(line for line in out.splitlines() if line.startswith(image + " "))
        assert "running" in row
        assert disco.host_address(image) in row
    macs = [line.split()[4] for line in out.splitlines() if line.startswith("disco-")]
    assert len(set(macs)) == 3, out


def test_hosts_have_their_own_hostname_address_and_host_keys(disco):
    keys = set()
    pins = [line.split() for line in (disco.state / "ssh" / "known_hosts").read_text().splitlines()]
    for image in DISCO:
        result = disco.ssh(image, "sh", "-c", "hostname; ls /etc/ssh/ | grep '^ssh_host_'; cat /etc/ssh/ssh_host_ed25519_key.pub")
        assert result.returncode == 0, result.stderr
        hostname, *files, key = result.stdout.strip().splitlines()
        assert hostname == image
        # the one key booted made and pinned at build; the host made none of its own at boot
        assert files == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"], files
        assert [p[1:3] for p in pins if p[0] == disco.host_address(image)] == [key.split()[:2]]
        keys.add(key.split()[1])
    assert len(keys) == 3, "clones of one base image must not share SSH host keys"


def test_a_host_calls_home_only_once_it_permits_logins(disco):
    """Called home means ready for booted's login: /run/nologin (PAM refuses all but root while it
    exists) is gone before the call home starts, as the host's own systemd orders and records it."""
    image = DISCO[0]
    result = disco.ssh(image, "sh", "-c", "test ! -e /run/nologin && echo permitted; "
                       "systemctl show -P After booted-callhome.service; "
                       "systemctl show -P ExecMainStartTimestampMonotonic booted-callhome.service; "
                       "systemctl show -P ExecMainExitTimestampMonotonic systemd-user-sessions.service")
    assert result.returncode == 0, result.stderr
    permitted, after, callhome_started, sessions_permitted = result.stdout.strip().splitlines()
    assert permitted == "permitted"
    assert "systemd-user-sessions.service" in after.split()
    assert 0 < int(sessions_permitted) <= int(callhome_started)


def test_a_built_host_key_is_pinned_before_the_host_ever_boots(lab):
    lab.fab("image-build", "--image", "disco-pin", "--provider", "local", check=True, timeout=1500)
    try:
        upper = lab.state / "local" / "hosts" / "disco-pin" / "upper" / "etc" / "ssh"
        public = (upper / "ssh_host_ed25519_key.pub").read_text().split()
        address = json.loads((lab.state / "local" / "hosts" / "disco-pin" / "host.json").read_text())["address"]
        pins = [line.split() for line in (lab.state / "ssh" / "known_hosts").read_text().splitlines()]
        assert [p[1:3] for p in pins if p[0] == address] == [public[:2]]
        assert (upper / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    finally:
        lab.fab("image-del", "--image", "disco-pin", "--yes", "--provider", "local", check=True)
    assert address not in (lab.state / "ssh" / "known_hosts").read_text().split()


def test_hosts_logged_then_filter_find_exactly_the_hosts(disco):
    wait_for(lambda: set(DISCO) <= logged_names(disco), 60, "three calls home")
    out = disco.fab("hosts-logged", check=True).stdout
    assert "inventory: added 3" in out, out
    disco.fab("hosts-filter", check=True)
    listed = json.loads(disco.fab("hosts-list", "--format", "json", check=True).stdout)
    images = sorted(h["image"] for h in listed)
    assert images == DISCO
    for host in listed:
        assert host["address"] == disco.host_address(host["image"])
        assert host["reachable"] is True
        assert host["env"] == "disco"


def test_a_stopped_host_drops_out_of_hosts_filter(disco):
    disco.fab("hosts-logged", check=True)
    disco.fab("image-stop", "--image", "disco-3", check=True)
    try:
        out = disco.fab("hosts-filter", check=True).stdout
        assert "2 of 3 hosts answer" in out
        listed = [h["image"] for h in json.loads(disco.fab("hosts-list", "--format", "json", check=True).stdout)]
        assert listed == ["disco-1", "disco-2"]
    finally:
        disco.fab("image-start", "--image", "disco-3", check=True)


def test_spoofed_and_hostile_calls_are_skipped_and_counted(disco):
    """Calls from this machine, with a bad token, or claiming another address never enter the inventory."""
    base = f"http://127.0.0.1:{disco.port}/booted/callhome"
    with urllib.request.urlopen(base + "?env=disco&name=evil&mac=02:00:00:00:00:01&addr=10.0.0.9&ts=1&sig="
                                + "0" * 64, timeout=5) as resp:
        assert resp.status == 200
    for query in ["?name=$(reboot)&env=;rm%20-rf%20/", "?%1b[31mred%1b[0m", ""]:  # junk: refused, not logged
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + query, timeout=5)
        assert refused.value.code == 400
    # from a real host on the bridge: a wrong signature, and a forged address with a copied signature
    gateway = disco.config().provider_settings("local")["subnet"].rsplit(".", 1)[0] + ".1"
    url = f"http://{gateway}:{disco.port}/booted/callhome"
    me = disco.host_address("disco-1")
    now = int(time.time())
    bad_sig = f"{url}?env=disco&name=disco-2&mac=02:00:00:00:00:09&addr={me}&ts={now}&sig={'b' * 64}"
    stale = f"{url}?env=disco&name=disco-2&mac=02:00:00:00:00:09&addr={me}&ts=5&sig={'b' * 64}"
    forged = f"{url}?env=disco&name=disco-1&mac=02:00:00:00:00:01&addr=10.9.9.9&ts=5&sig={'c' * 64}"
    for target in (bad_sig, stale, forged):
        assert disco.ssh("disco-1", "curl", "-sf", "-o", "/dev/null", target).returncode == 0
    disco.fab("hosts-clear", "--yes", check=True)
    out = disco.fab("hosts-reset", "--yes", check=True).stdout
    skipped = out.split("skipped:")[1].splitlines()[0]
    for reason in ("loopback", "bad-signature", "outside-time-window", "forged-address"):
        assert reason in skipped, out
    images = sorted(h["image"] for h in json.loads(disco.fab("hosts-list", "--format", "json", check=True).stdout))
    assert images == DISCO


def test_hosts_list_ansible_format_groups_by_env_and_role(disco):
    import yaml

    disco.fab("hosts-logged", check=True)
    doc = yaml.safe_load(disco.fab("hosts-list", "--format", "ansible", check=True).stdout)
    groups = doc["all"]["children"]["disco"]["children"]
    assert set(groups["disco_workers"]["hosts"]) == set(DISCO)
    assert set(groups["disco_loadbalancers"]["hosts"]) == {"disco-1"}


def test_stop_is_clean_and_start_is_quick(disco):
    disco.fab("image-stop", "--image", "disco-2", check=True)
    console = (disco.state / "local" / "hosts" / "disco-2" / "console.log").read_text(errors="replace")
    # the container's systemd went through an orderly shutdown (a kill would show neither line)
    assert "System Shutdown" in console and "Halting system." in console
    t0 = time.monotonic()
    disco.fab("image-start", "--image", "disco-2", check=True)
    assert disco.ssh("disco-2", "true").returncode == 0
    assert time.monotonic() - t0 < 30


def test_host_keys_are_pinned_and_a_changed_key_is_refused(disco):
    """booted pins each host's key (a local host's at build); a host that changes its key is refused."""
    disco.fab("hosts-logged", check=True)
    disco.fab("hello-deploy", "--env", "disco", check=True, timeout=300)
    known = (disco.state / "ssh" / "known_hosts").read_text()
    addr = disco.host_address("disco-2")
    assert addr in known
    # give disco-2 new host keys, as a rebuilt or impostor host would have
    disco.ssh("disco-2", "sudo", "sh", "-c", "rm -f /etc/ssh/ssh_host_* && ssh-keygen -A >/dev/null && systemctl restart ssh")
    result = disco.fab("hello-test", "--env", "disco")  # plain HTTP: unaffected
    assert result.ok, result
    result = disco.fab("hello-start", "--env", "disco")
    assert not result.ok
    assert "host key does not match" in result.output
    assert "Traceback" not in result.output
    disco.fab("hosts-forget", "--host", addr, check=True)
    disco.fab("hello-start", "--env", "disco", check=True)


def test_a_host_holding_another_images_key_is_never_given_its_own(disco):
    """A host that calls home with disco-1's key (copied, as a VirtualBox clone inherits it) from
    disco-3's MAC is disco-1 as far as booted knows: no clone record says otherwise, so it is never
    renamed to disco-3 nor sent disco-3's key (security finding 1)."""
    src, clone = disco.state / "local" / "hosts" / "disco-1" / "upper", disco.state / "local" / "hosts" / "disco-3" / "upper"
    disco.fab("image-stop", "--image", "disco-3", check=True)
    import shutil

    for rel in ("etc/booted/callhome.conf", "etc/hostname"):
        shutil.copy2(src / rel, clone / rel)
    disco.fab("hosts-clear", "--yes", check=True)
    disco.fab("restart-nginx", check=True)  # a fresh booted log: only calls from now on
    disco.fab("image-start", "--image", "disco-3", check=True)
    wait_for(lambda: "disco-1" in logged_names(disco), 60, "the impostor's call home")
    out = disco.fab("hosts-logged", check=True).stdout
    assert "to rename" not in out
    assert "disco-3" not in disco.inventory()
    assert disco.inventory()["disco-1"]["address"] == disco.host_address("disco-3")
    out = disco.fab("hosts-filter", check=True).stdout
    assert "hostname set" not in out
    conf = disco.ssh("disco-3", "sudo", "cat", "/etc/booted/callhome.conf").stdout
    assert "NAME=disco-1" in conf and "NAME=disco-3" not in conf
    # rebuilding disco-3 gives it back its own identity (and a new key)
    disco.fab("image-stop", "--image", "disco-3", check=True)
    disco.fab("image-build", "--image", "disco-3", check=True, timeout=600)
    disco.fab("image-start", "--image", "disco-3", check=True)
    wait_for(lambda: "disco-3" in logged_names(disco), 60, "the rebuilt host's call home")
    disco.fab("hosts-logged", check=True)
    assert disco.inventory()["disco-3"]["hostname_ok"] is True
