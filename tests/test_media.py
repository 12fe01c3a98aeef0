"""Install media: kickstarts that validate as RHEL 9, the ISO check and extraction, PXE staging, no secrets."""
from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import pycdlib
import pytest
from pykickstart.constants import DISPLAY_MODE_TEXT, KS_SCRIPT_POST, KS_SHUTDOWN, SELINUX_ENFORCING
from pykickstart.errors import KickstartParseWarning
from pykickstart.parser import KickstartParser
from pykickstart.version import makeVersion

from fabfile.core import localcmd, names, ssh, state
from fabfile.core.errors import BootedError, ConfigError, UsageError
from fabfile.hosts import callhome
from fabfile.hosts.endpoint import kickstart_dir
from fabfile.providers import kickstart, load_config
from fabfile.providers.virtualbox import media
from fabfile.services import manifest
from tests.isofixture import DEFAULT_FILES, make_test_iso

REPO_CONFIG = state.PROJECT_ROOT / "environments.yaml"
PASSWORD = "Correct-Horse-9-battery staple"

CONFIG_TEMPLATE = """\
settings:
  nginx: {{port: 8480}}
providers:
  virtualbox:
    host_address: 192.168.56.1
    iso: "{iso}"
    iso_sha256: "{sha}"
environments:
  prod:
    provider: virtualbox
    images: [prod-lb1, prod-web1, web_2]
    roles: {{loadbalancers: [prod-lb1], workers: [prod-web1, web_2]}}
    service: hello
    version: v1
    lb_port: 8088
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own state dir and none of the user's BOOTED_* settings."""
    monkeypatch.setenv("BOOTED_STATE_DIR", str(tmp_path / "state"))
    for name in ("BOOTED_PW", "BOOTED_USER", "BOOTED_SSH_KEY", "BOOTED_CONFIG", "BOOTED_PXELINUX_DIR"):
        monkeypatch.delenv(name, raising=False)


def write_config(tmp_path, iso="iso/install.iso", sha=""):
    path = tmp_path / "environments.yaml"
    path.write_text(CONFIG_TEMPLATE.format(iso=iso, sha=sha))
    return load_config(path)


@pytest.fixture
def iso(tmp_path):
    return make_test_iso(tmp_path / "dvd.iso")


@pytest.fixture
def cfg(tmp_path, iso):
    return write_config(tmp_path, iso=str(iso), sha=hashlib.sha256(iso.read_bytes()).hexdigest())


@pytest.fixture
def pxelinux(tmp_path, monkeypatch):
    """The system's pxelinux.0 + ldlinux.c32 when installed; stand-ins otherwise (staging logic is the same)."""
    try:
        return media.find_pxelinux()
    except BootedError:
        folder = tmp_path / "syslinux"
        folder.mkdir()
        (folder / "pxelinux.0").write_bytes(b"stand-in pxelinux.0")
        (folder / "ldlinux.c32").write_bytes(b"stand-in ldlinux.c32")
        monkeypatch.setenv("BOOTED_PXELINUX_DIR", str(folder))
        return folder / "pxelinux.0", folder / "ldlinux.c32"


def parse(text):
    """The kickstart as pykickstart's RHEL 9 handler sees it (warnings are errors, as in ksvalidator)."""
    handler = makeVersion("RHEL9")
    with warnings.catch_warnings():
        warnings.simplefilter("error", KickstartParseWarning)
        KickstartParser(handler).readKickstartFromString(text)
    return handler


def ksvalidate(paths):
    """(exit code, output) of ``ksvalidator -v RHEL9`` on ``paths``; its own logic in-process if not installed."""
    exe = shutil.which("ksvalidator")
    if exe:
        # ksvalidator leaves its preprocessed copy of each file behind (pykickstart's
        # preprocessKickstart: mkstemp, never removed): in a folder of the test's own, not /tmp
        with tempfile.TemporaryDirectory(prefix="ksvalidator-") as scratch:
            proc = subprocess.run([exe, "-v", "RHEL9", *map(str, paths)], capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "TMPDIR": scratch})
        return proc.returncode, proc.stdout + proc.stderr
    errors = []
    for path in paths:
        try:
            parse(Path(path).read_text())
        except Exception as err:  # what ksvalidator counts as an error
            errors.append(f"{path}: {err}")
    return len(errors), "\n".join(errors)


def post_script(text):
    [post] = [s for s in parse(text).scripts if s.type == KS_SCRIPT_POST]
    return post


def embedded_files(text):
    """path -> (bytes, mode) for every file the %post section writes."""
    found = {}
    pattern = re.compile(r"^base64 -d > (\S+) <<'BOOTED_B64'\n(.*?)\nBOOTED_B64\nchmod ([0-7]{4}) \1$", re.M | re.S)
    for path, blob, mode in pattern.findall(text):
        found[path] = (base64.b64decode(blob), int(mode, 8))
    return found


@pytest.fixture(autouse=True)
def _remove_served_kickstarts(monkeypatch):  # (torn down before monkeypatch restores the env)
    """Kickstarts are served from outside the state dir (as root); a test's must not outlive it."""
    yield
    if os.environ.get("BOOTED_STATE_DIR"):
        shutil.rmtree(kickstart_dir(), ignore_errors=True)


def all_staged_bytes():
    """Every file booted staged (kickstarts, TFTP folders), plus the decoded files inside kickstarts."""
    out = {}
    for top in (state.state_dir() / "kickstart", state.state_dir() / "tftp", kickstart_dir()):
        for path in top.rglob("*"):
            if path.is_file():
                out[str(path)] = path.read_bytes()
                if path.suffix == ".cfg" and top == kickstart_dir():
                    for inner, (data, _) in embedded_files(path.read_text()).items():
                        out[f"{path}!{inner}"] = data
    return out


# --------------------------------------------------------------------------- kickstart
def test_every_environment_and_image_renders_a_valid_rhel9_kickstart(tmp_path):
    cfg = load_config(REPO_CONFIG)
    paths = []
    for env in cfg.environments.values():
        for image in env.images:
            path = tmp_path / f"{image}.cfg"
            path.write_text(media.render_kickstart(cfg, env, image))
            paths.append(path)
    assert len(paths) == sum(len(e.images) for e in cfg.environments.values()) >= 4
    rc, out = ksvalidate(paths)
    assert rc == 0, out
    # The same validator rejects a RHEL 6 habit, so a pass above means something.
    bad = tmp_path / "bad.cfg"
    bad.write_text(paths[0].read_text() + "install\n")
    rc, out = ksvalidate([bad])
    assert rc != 0 and "install has been removed" in out


def test_kickstart_installs_from_dvd_with_two_dhcp_nics_key_login_and_firewall(cfg):
    env = cfg.env("prod")
    text = media.render_kickstart(cfg, env, "prod-lb1")
    ks = parse(text)
    assert ks.displaymode.displayMode == DISPLAY_MODE_TEXT
    assert ks.method.method == "cdrom"
    nets = ks.network.network
    assert [n.device for n in nets] == list(media.NIC_DEVICES)
    assert all(n.bootProto == "dhcp" and n.onboot and n.activate for n in nets)
    assert nets[0].hostname == "prod-lb1" and not nets[0].nodefroute and nets[1].nodefroute
    assert ks.rootpw.lock and not ks.rootpw.password
    [user] = ks.user.userList
    assert (user.name, user.groups, user.password, user.lock) == ("booted", ["wheel"], "", True)
    [key] = ks.sshkey.sshUserList
    pub = Path(ssh.keypair(cfg)[1]).read_text().split()
    assert key.username == "booted" and key.key.split()[:2] == pub[:2]
    assert ks.firewall.enabled and ks.firewall.services == ["ssh"]
    assert ks.firewall.ports == ["9999:tcp", "8088:tcp"]
    assert ks.selinux.selinux == SELINUX_ENFORCING
    assert ks.reboot.action == KS_SHUTDOWN
    assert "python3" in ks.packages.packageList
    assert not re.search(r"^\s*(install|authconfig|auth|vnc)\b", text, re.M)
    # A worker opens only ssh and the service port; '_' in an image name becomes '-' in its hostname.
    worker = parse(media.render_kickstart(cfg, env, "web_2"))
    assert worker.firewall.ports == ["9999:tcp"]
    assert worker.network.network[0].hostname == names.hostname_for("web_2") == "web-2"


def test_post_installs_callhome_files_conf_and_sudo_and_is_valid_shell(cfg):
    text = media.render_kickstart(cfg, cfg.env("prod"), "prod-web1")
    files = embedded_files(text)
    for path, (contents, mode) in callhome.firstboot_files().items():
        assert files[path] == (contents.encode(), mode)
    conf, mode = files[callhome.CONF_PATH]
    assert mode == 0o600
    assert conf.decode() == callhome.host_config("prod", "prod-web1", "http://192.168.56.1:8480/booted/callhome")
    assert f"KEY={callhome.host_key('prod', 'prod-web1')}" in conf.decode()
    assert files[media.SUDOERS_PATH] == (b"# written by booted: its login user runs sudo without a password (it has none)\n"
                                         b"booted ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    script = post_script(text)
    assert script.errorOnFail
    assert "systemctl enable booted-callhome.service" in script.script
    check = subprocess.run(["bash", "-n"], input=script.script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_post_embedding_survives_contents_that_would_break_a_heredoc(cfg, monkeypatch):
    hostile = "EOF\nBOOTED_B64\n'$(reboot)' `id` \\\n%end\n"
    monkeypatch.setattr(callhome, "firstboot_files", lambda: {"/usr/local/sbin/booted-callhome": (hostile, 0o755)})
    text = media.render_kickstart(cfg, cfg.env("prod"), "prod-web1")
    assert "%end\n" not in post_script(text).script
    assert embedded_files(text)["/usr/local/sbin/booted-callhome"] == (hostile.encode(), 0o755)
    assert parse(text)  # still one valid kickstart


def test_login_user_comes_from_booted_user_and_root_is_refused(cfg, monkeypatch):
    monkeypatch.setenv("BOOTED_USER", "deploy")
    ks_text = media.render_kickstart(cfg, cfg.env("prod"), "prod-web1")
    ks = parse(ks_text)
    assert ks.user.userList[0].name == "deploy" and ks.sshkey.sshUserList[0].username == "deploy"
    assert embedded_files(ks_text)[media.SUDOERS_PATH][0].endswith(b"\ndeploy ALL=(ALL) NOPASSWD: ALL\n")
    monkeypatch.setenv("BOOTED_USER", "root")
    with pytest.raises(UsageError, match="must not be root"):
        media.render_kickstart(cfg, cfg.env("prod"), "prod-web1")


def test_service_port_comes_from_service_yaml(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "services_root", lambda: tmp_path / "service")
    folder = tmp_path / "service" / "hello"
    folder.mkdir(parents=True)
    (folder / "service.yaml").write_text((state.PROJECT_ROOT / "service" / "hello" / "service.yaml").read_text().replace("port: 9999", "port: 7000"))
    assert parse(media.render_kickstart(cfg, cfg.env("prod"), "prod-lb1")).firewall.ports == ["7000:tcp", "8088:tcp"]
    (folder / "service.yaml").write_text((state.PROJECT_ROOT / "service" / "hello" / "service.yaml").read_text().replace("port: 9999", "port: http"))
    with pytest.raises(ConfigError, match=r"service\.yaml.*port"):
        media.render_kickstart(cfg, cfg.env("prod"), "prod-lb1")


def test_render_refuses_an_image_outside_its_environment(cfg):
    with pytest.raises(UsageError, match="in no environment"):
        media.render_kickstart(cfg, None, "stray")
    with pytest.raises(UsageError, match="not in environment 'prod'"):
        media.render_kickstart(cfg, cfg.env("prod"), "other")
    with pytest.raises(UsageError, match="invalid image name"):
        media.render_kickstart(cfg, cfg.env("prod"), "bad;name")


# --------------------------------------------------------------------------- root password
def test_no_booted_pw_locks_root(cfg, monkeypatch):
    for value in (None, ""):
        if value is None:
            monkeypatch.delenv("BOOTED_PW", raising=False)
        else:
            monkeypatch.setenv("BOOTED_PW", value)
        ks = parse(media.render_kickstart(cfg, cfg.env("prod"), "prod-web1"))
        assert ks.rootpw.lock and ks.rootpw.password == ""


def test_plaintext_booted_pw_becomes_a_sha512_hash_made_without_a_command_line(cfg, monkeypatch):
    monkeypatch.setenv("BOOTED_PW", PASSWORD)
    calls = []
    real_run = localcmd.run

    def spy(argv, **kwargs):
        calls.append((list(argv), kwargs.get("input")))
        return real_run(argv, **kwargs)

    monkeypatch.setattr(localcmd, "run", spy)
    text = media.render_kickstart(cfg, cfg.env("prod"), "prod-web1")
    ks = parse(text)
    assert ks.rootpw.isCrypted and not ks.rootpw.lock and ks.rootpw.password.startswith("$6$")
    salt = ks.rootpw.password.split("$")[2]
    again = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"], input=PASSWORD + "\n",
                           capture_output=True, text=True, check=True).stdout.strip()
    assert again == ks.rootpw.password
    assert PASSWORD not in text and all(PASSWORD not in data.decode() for data, _ in embedded_files(text).values())
    hashing = [c for c in calls if c[0][:2] == ["openssl", "passwd"]]
    assert hashing and all(PASSWORD not in " ".join(argv) and PASSWORD in (stdin or "") for argv, stdin in hashing)


def test_booted_pw_hash_is_used_as_given_and_bad_hashes_are_refused(cfg, monkeypatch):
    given = "$6$abcdefgh$" + "x" * 86
    monkeypatch.setenv("BOOTED_PW", given)
    assert parse(media.render_kickstart(cfg, cfg.env("prod"), "prod-web1")).rootpw.password == given
    monkeypatch.setenv("BOOTED_PW", "$6$short$abc")
    with pytest.raises(UsageError, match="not a valid one"):
        media.root_password_hash()
    monkeypatch.setenv("BOOTED_PW", "$1$abc$defghijklmnop")
    with pytest.raises(UsageError, match="SHA-512"):
        media.root_password_hash()


# --------------------------------------------------------------------------- ISO
@pytest.mark.parametrize("naming", [dict(), dict(joliet=True), dict(rock_ridge=False, joliet=True),
                                    dict(rock_ridge=False)], ids=["rock-ridge", "rr+joliet", "joliet", "iso9660"])
def test_extract_pxeboot_gives_byte_identical_files(tmp_path, naming):
    iso = make_test_iso(tmp_path / "dvd.iso", **naming)
    vmlinuz, initrd = media.extract_pxeboot(iso, tmp_path / "out")
    assert (vmlinuz, initrd) == (tmp_path / "out" / "vmlinuz", tmp_path / "out" / "initrd.img")
    assert vmlinuz.read_bytes() == DEFAULT_FILES["images/pxeboot/vmlinuz"]
    assert initrd.read_bytes() == DEFAULT_FILES["images/pxeboot/initrd.img"]


def test_extract_pxeboot_reuses_its_cache_for_the_same_iso(tmp_path, iso, monkeypatch):
    media.extract_pxeboot(iso, tmp_path / "first")

    def no_second_read(*args, **kwargs):
        raise AssertionError("the ISO was read again")

    monkeypatch.setattr(pycdlib.PyCdlib, "open", no_second_read)
    vmlinuz, initrd = media.extract_pxeboot(iso, tmp_path / "second")
    assert vmlinuz.read_bytes() == DEFAULT_FILES["images/pxeboot/vmlinuz"]
    assert initrd.read_bytes() == DEFAULT_FILES["images/pxeboot/initrd.img"]
    # A different ISO is a different cache entry.
    other = make_test_iso(tmp_path / "other.iso", {"images/pxeboot/vmlinuz": b"k2", "images/pxeboot/initrd.img": b"i2"})
    monkeypatch.undo()
    assert media.extract_pxeboot(other, tmp_path / "third")[0].read_bytes() == b"k2"


def test_extract_pxeboot_says_what_is_missing(tmp_path):
    iso = make_test_iso(tmp_path / "data.iso", {"docs/readme.txt": b"not an installer"})
    with pytest.raises(BootedError, match=r"has no images/pxeboot/vmlinuz"):
        media.extract_pxeboot(iso, tmp_path / "out")
    junk = tmp_path / "junk.iso"
    junk.write_bytes(b"\0" * 70000)
    with pytest.raises(BootedError, match="not a readable ISO 9660 image"):
        media.extract_pxeboot(junk, tmp_path / "out")
    assert not list((state.state_dir() / "pxeboot").glob(".*"))  # no half-extracted cache left


def test_check_iso_accepts_the_right_checksum_and_refuses_a_wrong_one(tmp_path, iso):
    digest = hashlib.sha256(iso.read_bytes()).hexdigest()
    assert media.check_iso(write_config(tmp_path, iso=str(iso), sha=digest)) == iso
    assert media.check_iso(write_config(tmp_path, iso=str(iso), sha="")) == iso  # no checksum set: not checked
    wrong = "0" * 64
    with pytest.raises(BootedError) as err:
        media.check_iso(write_config(tmp_path, iso=str(iso), sha=wrong))
    message = str(err.value)
    assert "\n" not in message and str(iso) in message
    assert f"SHA-256 is {digest[:12]}" in message and f"expected {wrong[:12]}" in message


def test_check_iso_resolves_relative_paths_against_the_project_and_names_a_missing_file(tmp_path):
    cfg = write_config(tmp_path, iso="iso/booted-test-no-such.iso")
    assert media.iso_path(cfg) == state.PROJECT_ROOT / "iso" / "booted-test-no-such.iso"
    with pytest.raises(BootedError, match=rf"install ISO {re.escape(str(media.iso_path(cfg)))} not found.*iso/README.md"):
        media.check_iso(cfg)


# --------------------------------------------------------------------------- PXE staging
def read_pxe_entry(folder):
    text = (folder / "pxelinux.cfg" / "default").read_text()
    kernel = re.search(r"^\s*KERNEL (\S+)$", text, re.M).group(1)
    args = re.search(r"^\s*APPEND (.+)$", text, re.M).group(1).split()
    return text, kernel, args


def test_stage_install_prepares_everything_a_bios_pxe_boot_needs(cfg, pxelinux):
    folder = media.stage_install(cfg, cfg.env("prod"), "prod-web1")
    assert folder == state.state_dir() / "tftp" / "prod-web1"
    loader, module = pxelinux
    assert (folder / media.BOOT_FILE).read_bytes() == loader.read_bytes()
    assert (folder / "ldlinux.c32").read_bytes() == module.read_bytes()
    text, kernel, args = read_pxe_entry(folder)
    assert text.count("LABEL ") == 1 and "MENU" not in text and "PASSWD" not in text.upper()
    initrd = [a.split("=", 1)[1] for a in args if a.startswith("initrd=")]
    assert (folder / kernel).read_bytes() == DEFAULT_FILES["images/pxeboot/vmlinuz"]
    assert (folder / initrd[0]).read_bytes() == DEFAULT_FILES["images/pxeboot/initrd.img"]
    assert f"inst.ks=http://10.0.2.2:8480/ks/{media.kickstart_token('prod-web1')}.cfg" in args
    assert {"ip=dhcp", "inst.repo=cdrom", "inst.text"} <= set(args)
    ks = media.kickstart_path("prod-web1")
    assert stat.S_IMODE(ks.stat().st_mode) == 0o640
    assert ks.read_text() == media.render_kickstart(cfg, cfg.env("prod"), "prod-web1")


def test_two_images_get_separate_folders(cfg, pxelinux):
    a = media.stage_install(cfg, cfg.env("prod"), "prod-lb1")
    b = media.stage_install(cfg, cfg.env("prod"), "prod-web1")
    assert a != b and a.parent == b.parent
    assert f"inst.ks=http://10.0.2.2:8480/ks/{media.kickstart_token('prod-lb1')}.cfg" in read_pxe_entry(a)[2]
    assert f"inst.ks=http://10.0.2.2:8480/ks/{media.kickstart_token('prod-web1')}.cfg" in read_pxe_entry(b)[2]
    before = {p: p.read_bytes() for p in a.rglob("*") if p.is_file()}
    media.stage_install(cfg, cfg.env("prod"), "prod-web1")  # restaging one leaves the other alone
    assert {p: p.read_bytes() for p in a.rglob("*") if p.is_file()} == before


def test_a_failed_staging_leaves_no_half_folder(cfg, pxelinux, monkeypatch):
    first = media.stage_install(cfg, cfg.env("prod"), "prod-web1")
    before = sorted(p.relative_to(first) for p in first.rglob("*"))

    def broken(*args, **kwargs):
        raise BootedError("kickstart could not be written")

    monkeypatch.setattr(media, "write_kickstart", broken)
    for image in ("prod-web1", "prod-lb1"):
        with pytest.raises(BootedError, match="could not be written"):
            media.stage_install(cfg, cfg.env("prod"), image)
    tftp = state.state_dir() / "tftp"
    assert sorted(p.name for p in tftp.iterdir()) == ["prod-web1"]  # no prod-lb1, no temporary folders
    assert sorted(p.relative_to(first) for p in first.rglob("*")) == before


def test_missing_pxelinux_names_the_packages(cfg, monkeypatch):
    monkeypatch.setattr(media, "PXELINUX_SEARCH", [])
    with pytest.raises(BootedError, match=r"no pxelinux\.0 \+ ldlinux\.c32 found.*pxelinux and syslinux-common"):
        media.stage_install(cfg, cfg.env("prod"), "prod-web1")
    assert not (state.state_dir() / "kickstart" / "prod-web1.cfg").exists()


def test_stage_install_refuses_a_wrong_iso_before_writing_anything(tmp_path, iso, pxelinux):
    cfg = write_config(tmp_path, iso=str(iso), sha="f" * 64)
    with pytest.raises(BootedError, match="SHA-256 is"):
        media.stage_install(cfg, cfg.env("prod"), "prod-web1")
    assert not (state.state_dir() / "kickstart").exists() and not (state.state_dir() / "tftp").exists()


def test_unstage_install_removes_kickstart_and_folder(cfg, pxelinux):
    folder = media.stage_install(cfg, cfg.env("prod"), "prod-web1")
    media.unstage_install("prod-web1")
    assert not folder.exists() and not media.kickstart_path("prod-web1").exists()
    media.unstage_install("prod-web1")  # nothing left: still fine


# --------------------------------------------------------------------------- secrets
def test_no_plaintext_secret_in_anything_staged(cfg, pxelinux, monkeypatch):
    monkeypatch.setenv("BOOTED_PW", PASSWORD)
    env = cfg.env("prod")
    for image in env.images:
        media.stage_install(cfg, env, image)
    env_secret = (state.state_dir() / "secrets" / "prod.key").read_text().strip()
    assert len(env_secret) >= 32
    staged = all_staged_bytes()
    assert len([k for k in staged if k.endswith("!" + callhome.CONF_PATH)]) == len(env.images)
    for secret in (PASSWORD, env_secret):
        leaks = [where for where, data in staged.items() if secret.encode() in data]
        assert not leaks, f"plaintext secret in {leaks}"


def test_repository_media_files_hold_no_password():
    texts = [media.TEMPLATE.read_text(), Path(media.__file__).read_text(), Path(kickstart.__file__).read_text(),
             (state.PROJECT_ROOT / "iso" / "README.md").read_text()]
    for text in texts:
        assert not re.search(r"--plaintext|--password=|^\s*vnc\b|rootpw[ \t]+(?!--lock|--iscrypted)", text, re.M)
