"""The libvirt kickstart install, without a VM: the installer's command line, the kickstart booted
serves for a libvirt VM, the domain XML while installing and after, the ISO checks, nginx letting
the installer fetch its kickstart, and the stand-in installer's kickstart checker against pykickstart
(what tests/test_libvirt_kickstart.py boots must refuse exactly what the real installer refuses).
"""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import warnings
import xml.etree.ElementTree as ET

import ks_standin
import pytest
from configs import environment
from pykickstart.constants import KS_SHUTDOWN
from pykickstart.errors import KickstartError, KickstartParseWarning
from pykickstart.parser import KickstartParser
from pykickstart.version import makeVersion

from fabfile.core.errors import BootedError, ConfigError
from fabfile.hosts import endpoint
from fabfile.providers import kickstart, load_config
from fabfile.providers.libvirt import domainxml, install
from fabfile.providers.libvirt.domainxml import DomainPlan, HostRecord

MAC = "52:54:00:ab:cd:ef"
KS_URL = "http://10.78.0.1:8480/ks/" + "A" * 32 + ".cfg"

CONFIG = """\
settings:
  nginx: {{port: 8480}}
providers:
  libvirt:
    install: {install}
    iso: "{iso}"
    iso_sha256: "{sha}"
environments:
  kvm:
    provider: libvirt
    images: [kvm-lb, kvm-w1]
    roles: {{loadbalancers: [kvm-lb], workers: [kvm-w1]}}
    service: hello
    version: v1
    lb_port: 8080
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTED_STATE_DIR", str(tmp_path / "state"))
    for name in ("BOOTED_PW", "BOOTED_USER", "BOOTED_SSH_KEY", "BOOTED_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def config(tmp_path, install_="kickstart", iso="iso/install.iso", sha=""):
    path = tmp_path / "environments.yaml"
    path.write_text(CONFIG.format(install=install_, iso=iso, sha=sha))
    return load_config(path)


# ------------------------------------------------------------------ the installer's command line
def test_installer_cmdline_carries_kickstart_source_and_static_network():
    line = install.installer_cmdline(KS_URL, "10.78.0.5", 24, "10.78.0.1", "kvm-w1", MAC)
    assert line.split() == [
        f"inst.ks={KS_URL}", "inst.repo=cdrom", "inst.text",
        "ip=10.78.0.5::10.78.0.1:255.255.255.0:kvm-w1:bootnet:none", f"ifname=bootnet:{MAC}",
        "console=ttyS0,115200n8",
    ]


@pytest.mark.parametrize("url, address, gateway, hostname, mac", [
    (KS_URL + " init=/bin/sh", "10.78.0.5", "10.78.0.1", "kvm-w1", MAC),
    ("http://10.78.0.1:8480/ks/x.cfg", "10.78.0.5", "10.78.0.1", "kvm-w1", MAC),  # not a token booted makes
    ("https://evil.example/ks.cfg", "10.78.0.5", "10.78.0.1", "kvm-w1", MAC),
    (KS_URL, "10.78.0.5 rd.break", "10.78.0.1", "kvm-w1", MAC),
    (KS_URL, "10.78.0.5", "10.78.0.1:x", "kvm-w1", MAC),
    (KS_URL, "10.78.0.5", "10.78.0.1", "kvm_w1", MAC),
    (KS_URL, "10.78.0.5", "10.78.0.1", "kvm-w1 single", MAC),
    (KS_URL, "10.78.0.5", "10.78.0.1", "kvm-w1", "52:54:00:AB:CD:EF:00"),
])
def test_installer_cmdline_refuses_values_that_could_add_kernel_arguments(url, address, gateway, hostname, mac):
    with pytest.raises((ValueError, BootedError)):
        install.installer_cmdline(url, address, 24, gateway, hostname, mac)


def test_network_line_is_refused_unless_it_is_plain_tokens(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(BootedError, match="not a kickstart network line"):
        kickstart.render_kickstart(cfg, cfg.environments["kvm"], "kvm-w1", ks_url=KS_URL,
                                   callhome_url="http://10.78.0.1:8480/booted/callhome",
                                   network=['network --device=eth0\n%pre\nrm -rf /\n%end'])


def test_libvirt_kickstart_is_the_shared_template_with_a_static_network_and_parses_as_rhel9(tmp_path):
    cfg = config(tmp_path)
    line = install.network_line(MAC, "10.78.0.5", 24, "10.78.0.1", "kvm-w1")
    text = kickstart.render_kickstart(cfg, cfg.environments["kvm"], "kvm-w1", ks_url=KS_URL,
                                      callhome_url="http://10.78.0.1:8480/booted/callhome", network=[line])
    handler = makeVersion("RHEL9")
    with warnings.catch_warnings():
        warnings.simplefilter("error", KickstartParseWarning)
        KickstartParser(handler).readKickstartFromString(text)
    (nic,) = handler.network.network
    assert (nic.device, nic.bootProto, nic.ip, nic.netmask, nic.gateway, nic.hostname) == (
        MAC, "static", "10.78.0.5", "255.255.255.0", "10.78.0.1", "kvm-w1")
    assert "URL=http://10.78.0.1:8480/booted/callhome" in _post_files(text)
    assert handler.cdrom.seen and handler.reboot.action == KS_SHUTDOWN
    assert f"installer fetches this file from {KS_URL}" in text


def _post_files(text: str) -> str:
    import base64

    chunks, out, inside = [], [], False
    for line in text.splitlines():
        if line.startswith("base64 -d"):
            inside, out = True, []
        elif line == "BOOTED_B64":
            inside = False
            chunks.append(base64.b64decode("".join(out)).decode())
        elif inside:
            out.append(line)
    return "\n".join(chunks)


# ------------------------------------------------------------------ the domain while installing, then after
def _plan() -> DomainPlan:
    return DomainPlan(name="booted-0000-kvm-w1", domain_type="qemu", memory_mb=512, cpus=1, kernel="", initrd="",
                      disk="/pool/booted-0000-kvm-w1.qcow2", seed="", bridge="booted1", mac=MAC,
                      console_log="/pool/booted-0000-kvm-w1.console.log",
                      record=HostRecord(image="kvm-w1", owner="0000", address="10.78.0.5", mac=MAC, env="kvm"))


def test_install_domain_boots_the_installer_with_the_iso_attached_and_a_reboot_ends_it():
    cmdline = install.installer_cmdline(KS_URL, "10.78.0.5", 24, "10.78.0.1", "kvm-w1", MAC)
    dom = ET.fromstring(domainxml.render_domain(install.install_plan(
        _plan(), kernel="/pool/inst.vmlinuz", initrd="/pool/inst.initrd", cmdline=cmdline, cdrom="/pool/dvd.iso",
        memory_mb=2048)))
    assert [dom.findtext(f"./os/{t}") for t in ("kernel", "initrd", "cmdline")] == [
        "/pool/inst.vmlinuz", "/pool/inst.initrd", cmdline]
    assert dom.findtext("./memory") == "2048" and dom.findtext("./on_reboot") == "destroy"
    assert dom.findtext("./on_poweroff") == "destroy"
    (cd,) = dom.findall("./devices/disk[@device='cdrom']")
    assert cd.find("source").get("file") == "/pool/dvd.iso" and cd.find("readonly") is not None
    assert cd.find("target").get("bus") == "sata"
    disks = dom.findall("./devices/disk[@device='disk']")
    assert [d.find("source").get("file") for d in disks] == ["/pool/booted-0000-kvm-w1.qcow2"]  # no seed disk
    assert not install.disk_booted(ET.tostring(dom, encoding="unicode"))


def test_installed_domain_boots_its_disk_without_installer_or_iso():
    from dataclasses import replace

    # the plan the install flow redefines from: its own, with the installer's parts still set
    text = domainxml.render_domain(install.disk_boot_plan(replace(
        _plan(), kernel="/k", initrd="/i", cmdline="x", cdrom="/pool/dvd.iso", on_reboot="destroy")))
    dom = ET.fromstring(text)
    assert dom.find("./os/kernel") is None and dom.find("./os/cmdline") is None
    assert dom.find("./os/boot").get("dev") == "hd"
    assert dom.findall("./devices/disk[@device='cdrom']") == []
    assert dom.findtext("./memory") == "512" and dom.findtext("./on_reboot") == "restart"
    assert install.disk_booted(text)
    facts = domainxml.parse_domain(text)
    assert facts.macs == [MAC] and facts.record.address == "10.78.0.5"


def test_last_console_line_is_printable_and_bounded(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"boot\r\n\x1b[2JThe installer will now terminate.\x07" + b"x" * 400 + b"\n\n  \n")
    line = install.last_console_line(log)
    assert line.startswith("[2JThe installer will now terminate.") and len(line) == 160
    assert all(c.isprintable() for c in line)
    assert install.last_console_line(tmp_path / "none") == ""


# ------------------------------------------------------------------ settings and the ISO
def test_install_setting_is_base_or_kickstart(tmp_path):
    with pytest.raises(ConfigError, match="providers.libvirt.install.*must be base or kickstart"):
        config(tmp_path, install_="pxe")
    assert config(tmp_path, install_="base").provider_settings("libvirt")["install"] == "base"


def test_iso_checks_name_the_libvirt_setting(tmp_path):
    cfg = config(tmp_path, iso=str(tmp_path / "missing.iso"))
    settings = cfg.provider_settings("libvirt")
    with pytest.raises(BootedError, match=r"install ISO .*missing.iso not found \(set providers.libvirt.iso in "):
        kickstart.check_iso(kickstart.resolve_iso(settings["iso"]), settings["iso_sha256"], "providers.libvirt", cfg.path)
    iso = tmp_path / "dvd.iso"
    iso.write_bytes(b"not the DVD")
    with pytest.raises(BootedError, match=r"SHA-256 is .* \(providers.libvirt.iso_sha256 in "):
        kickstart.check_iso(iso, "0" * 64, "providers.libvirt", cfg.path)
    assert kickstart.check_iso(iso, hashlib.sha256(b"not the DVD").hexdigest(), "providers.libvirt", cfg.path) == iso
    assert kickstart.resolve_iso("iso/install.iso").is_absolute()


def test_nginx_lets_only_this_machine_and_the_installer_networks_fetch_kickstarts(tmp_path):
    cfg = config(tmp_path)
    plain = endpoint.render(cfg)
    location = plain.split("location /ks/ {", 1)[1].split("}", 1)[0]
    assert [line.strip() for line in location.splitlines() if line.strip().startswith(("allow", "deny"))] == [
        "allow 127.0.0.1;", "deny all;"]
    opened = endpoint.render(cfg, installers=["10.78.0.0/24", "10.78.0.0/24"])
    location = opened.split("location /ks/ {", 1)[1].split("}", 1)[0]
    assert [line.strip() for line in location.splitlines() if line.strip().startswith(("allow", "deny"))] == [
        "allow 10.78.0.0/24;", "allow 127.0.0.1;", "deny all;"]
    with pytest.raises(ValueError):
        endpoint.render(cfg, installers=["10.78.0.0/24; allow all"])
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if shutil.which(nginx):
        conf = endpoint.prefix() / "check.conf"
        conf.write_text(opened)
        endpoint.check(conf)  # nginx -t accepts it


def test_libvirt_opens_kickstart_fetches_to_its_bridge_only_for_kickstart_installs(tmp_path):
    from fabfile.providers import get_provider

    assert get_provider("libvirt", config(tmp_path)).installer_networks() == ["10.78.0.0/24"]
    assert get_provider("libvirt", config(tmp_path, install_="base")).installer_networks() == []
    assert get_provider("libvirt", config(tmp_path)).build_needs_endpoint


# ------------------------------------------------------------------ the stand-in installer's checker
BUSYBOX = shutil.which("busybox")


def _standin_verdict(text: str, tmp_path) -> tuple[bool, str, str]:
    rules = tmp_path / "ks-rules"
    if not rules.exists():
        rules.write_text(ks_standin.kickstart_rules())
    ks = tmp_path / "ks.cfg"
    ks.write_text(text)
    result = subprocess.run([BUSYBOX, "awk", "-v", f"RULES={rules}", "-v", f"OUT={tmp_path}", "-f",
                             str(ks_standin.HERE / "kscheck.awk"), str(ks)], capture_output=True, text=True, timeout=30)
    return result.returncode == 0, result.stdout, result.stderr


def _pykickstart_verdict(text: str) -> tuple[bool, str]:
    try:
        KickstartParser(makeVersion("RHEL9")).readKickstartFromString(text)
    except KickstartError as err:
        return False, str(err)
    return True, ""


@pytest.fixture
def booted_ks(tmp_path):
    cfg = config(tmp_path)
    return kickstart.render_kickstart(cfg, cfg.environments["kvm"], "kvm-w1", ks_url=KS_URL,
                                      callhome_url="http://10.78.0.1:8480/booted/callhome",
                                      network=[install.network_line(MAC, "10.78.0.5", 24, "10.78.0.1", "kvm-w1")])


BROKEN = {
    "unknown command": lambda t: t.replace("\nskipx\n", "\nskipx\nbogus --now\n"),
    "removed command": lambda t: t.replace("\nskipx\n", "\nskipx\ninstall\n"),
    "unknown option": lambda t: t.replace("zerombr\n", "zerombr\nautopart --bogus=1\n").replace("\nautopart\n", "\n"),
    "packages without %end": lambda t: t.replace("sudo\n%end\n", "sudo\n"),
    "post without %end": lambda t: t.rstrip().rsplit("%end", 1)[0],
    "unknown section": lambda t: t + "\n%postinstall\necho\n%end\n",
    "unknown %post option": lambda t: t.replace("%post --log=", "%post --bogus --log="),
}


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)")
@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_standin_refuses_what_pykickstart_refuses_with_its_message(breakage, booted_ks, tmp_path):
    text = BROKEN[breakage](booted_ks)
    ok, message = _pykickstart_verdict(text)
    assert not ok, f"pykickstart accepts the {breakage} variant: the table is wrong"
    accepted, _, error = _standin_verdict(text, tmp_path)
    assert not accepted
    line = message.split("line ", 1)[1].split(" ", 1)[0]
    assert f"line {line} of the kickstart file" in error, (error, message)
    first = next(m for m in message.splitlines()[1:] if m.strip())
    assert first in error, (error, message)


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)")
def test_standin_accepts_booted_kickstart_and_reads_what_it_installs(booted_ks, tmp_path):
    assert _pykickstart_verdict(booted_ks) == (True, "")
    accepted, facts, error = _standin_verdict(booted_ks, tmp_path)
    assert accepted, error
    lines = facts.splitlines()
    assert "missing" in lines and "end poweroff" in lines and "hostname kvm-w1" in lines
    assert any(line.startswith("sshkey booted ssh-ed25519 ") for line in lines)
    (post,) = [line for line in lines if line.startswith("post ")]
    _, log, erroronfail, body = post.split(" ", 1)[1].split(":")
    assert (log, erroronfail) == ("/root/ks-post.log", "1")
    assert "systemctl enable booted-callhome.service" in open(body).read()


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)")
def test_standin_waits_like_anaconda_when_the_kickstart_leaves_required_items_open(booted_ks, tmp_path):
    text = booted_ks.replace("\nautopart\n", "\n").replace("\ncdrom\n", "\n")
    assert _pykickstart_verdict(text)[0]  # valid syntax: Anaconda's hub, not its parser, stops here
    accepted, facts, _ = _standin_verdict(text, tmp_path)
    assert accepted and "missing source storage" in facts.splitlines()


# ------------------------------------------------------------------ the install flow on libvirt's test driver
libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (pip install -e '.[test]')")

FLOW_CONFIG = """\
settings:
  nginx: {{port: 8480}}
providers:
  libvirt: {{uri: "test:///default", storage_dir: {storage}, subnet: 10.201.9.0/28, bridge: btstks0,
            install: kickstart, iso: "{iso}", install_timeout_s: 1}}
environments:
""" + environment("kvm", "libvirt", ["kvm-w1"], ["kvm-w1"]).replace("{", "{{").replace("}", "}}")


@pytest.fixture
def flow(tmp_path, monkeypatch):
    """A kickstart-installing provider on the test driver (guests start and stop at once, uploads kept)."""
    from isofixture import make_test_iso
    from libvirt_testdriver import clear

    from fabfile.providers import get_provider
    from fabfile.providers.libvirt.provider import LibvirtProvider

    iso = make_test_iso(tmp_path / "dvd.iso")
    path = tmp_path / "environments.yaml"
    path.write_text(FLOW_CONFIG.format(storage=tmp_path / "pool", iso=iso))
    cfg = load_config(path)
    monkeypatch.setattr(LibvirtProvider, "_upload", staticmethod(lambda hv, vol, src: None))
    monkeypatch.setattr(LibvirtProvider, "endpoint_ready", lambda self: None)  # no bridge without root
    prov = get_provider("libvirt", cfg)
    prov.env = cfg.env("kvm")
    yield prov
    clear(prov)


def _left(prov) -> tuple[list, list, list]:
    pool = prov.pool(prov.hypervisor())
    pool.refresh(0)
    return ([vm.record.image for vm in prov._vms()],
            sorted(v.name() for v in pool.listAllVolumes(0) if v.name().startswith(prov.domain_name("kvm-w1"))),
            sorted(kickstart.kickstart_path("kvm-w1").parent.glob("*.cfg")) if kickstart.kickstart_path("kvm-w1").parent.exists() else [])


def test_install_does_not_start_the_installer_when_nginx_does_not_serve_the_kickstart(flow):
    from fabfile.core.errors import ProviderError

    with pytest.raises(ProviderError) as caught:
        flow.build("kvm-w1", flow.env)
    message = str(caught.value)
    # (whatever answers at that address on this machine's network, it is not booted's kickstart)
    assert re.match(r"kvm-w1: kickstart install failed: (nothing serves the kickstart at|booted's nginx answers) "
                    r"http://10.201.9.1:8480/ks/[A-Za-z0-9_-]+\.cfg", message), message
    assert "removed the half-built VM" in message
    assert "\n" not in message
    assert _left(flow) == ([], [], [])


def test_install_that_never_powers_off_times_out_and_leaves_nothing(flow, monkeypatch):
    from fabfile.core.errors import ProviderError

    monkeypatch.setattr(kickstart, "check_kickstart_served", lambda image, host, port: f"http://{host}:{port}/ks/x.cfg")
    with pytest.raises(ProviderError) as caught:
        flow.build("kvm-w1", flow.env)
    assert str(caught.value).startswith(
        "kvm-w1: kickstart install failed: timed out after 1s waiting for kvm-w1 to finish installing "
        "(the kickstart powers it off); raise providers.libvirt.install_timeout_s if the install is only slow; "
        "removed the half-built VM")
    assert _left(flow) == ([], [], [])


def test_install_that_powers_off_is_switched_to_disk_boot(flow, monkeypatch):
    seen = {}

    def served(image, host, port):
        seen["ks"] = kickstart.kickstart_path(image).read_text()
        return f"http://{host}:{port}/ks/x.cfg"

    def installer_powers_off(provider, dom, image, console):
        seen["install_xml"] = dom.XMLDesc(0)
        dom.shutdown()  # the test driver: a guest power-off, at once
        assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN]

    monkeypatch.setattr(kickstart, "check_kickstart_served", served)
    monkeypatch.setattr(install, "_wait_for_poweroff", installer_powers_off)
    machine = flow.build("kvm-w1", flow.env)
    assert machine.state == "poweroff" and machine.addresses == ["10.201.9.2"]
    install_dom = ET.fromstring(seen["install_xml"])
    cmdline = install_dom.findtext("./os/cmdline")
    assert f"ip=10.201.9.2::10.201.9.1:255.255.255.240:kvm-w1:bootnet:none ifname=bootnet:{machine.macs[0]}" in cmdline
    assert "inst.ks=http://10.201.9.1:8480/ks/" in cmdline and install_dom.findtext("./memory") == str(2048 * 1024)
    assert install_dom.find("./devices/disk[@device='cdrom']/source").get("file").endswith(".iso")
    assert f"network --device={machine.macs[0]} --bootproto=static --ip=10.201.9.2 " in seen["ks"]
    xml = flow._require("kvm-w1").domain
    assert install.disk_booted(xml) and "cdrom" not in xml and domainxml.parse_domain(xml).memory_kib == 524288
    # the installer's domain is gone: the installed VM runs as a transient domain from now on
    assert [d.name() for d in flow.hypervisor().conn.listAllDomains(0) if d.name().startswith("booted-")] == []
    domains, volumes, served_now = _left(flow)
    assert domains == ["kvm-w1"] and volumes == [flow.domain_name("kvm-w1") + ".qcow2"] and served_now == []
    from fabfile.core.errors import ProviderError

    with pytest.raises(ProviderError, match="already exists; delete it first"):
        flow.build("kvm-w1", flow.env)
    with pytest.raises(ProviderError, match="was installed by kickstart; cloning"):
        flow.clone("kvm-w1", "kvm-w2", flow.env)
