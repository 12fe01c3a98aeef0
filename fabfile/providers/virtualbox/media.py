"""Install media for VirtualBox images: the kickstart, the install ISO, and a per-VM PXE folder.

A VirtualBox image is installed like this: the VM PXE-boots from VirtualBox's built-in NAT TFTP
server, which serves ``state/tftp/<image>/`` (the provider points ``--nat-tftp-prefix1`` at it);
pxelinux loads the installer kernel and initrd taken from the ISO; the installer fetches
``http://10.0.2.2:<nginx port>/ks/<random>.cfg`` (booted's nginx serves it at a path drawn per build) and
installs from the DVD attached to the VM (``cdrom``). Each VM has its own TFTP folder, so two
builds can run at once, and nothing is copied by hand.

Secrets: BOOTED_PW (optional) only ever becomes a SHA-512 crypt hash, computed by
``openssl passwd -6 -stdin`` with the password on stdin, never on a command line. Without it root
is locked; booted's user has no password and logs in with booted's SSH key.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
import shlex
import shutil
import string
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from fabfile.core import localcmd, names, ssh, state
from fabfile.core.errors import BootedError, CommandError, UsageError
from fabfile.core.http import http_fetch
from fabfile.core.output import progress
from fabfile.hosts import callhome
from fabfile.hosts.endpoint import kickstart_dir, share_with_workers
from fabfile.services import manifest

# From inside a NAT guest VirtualBox's host is 10.0.2.2 (its built-in TFTP server is 10.0.2.4).
NAT_HOST = "10.0.2.2"
# The file the NAT DHCP server offers as boot file (the provider's --nat-tftp-file1), inside the TFTP folder.
BOOT_FILE = "pxelinux.0"
# VirtualBox puts NIC 1 at PCI 00:03.0 and NIC 2 at 00:08.0, which systemd names enp0s3 / enp0s8.
NIC_DEVICES = ("enp0s3", "enp0s8")
TEMPLATE = state.PROJECT_ROOT / "kickstart" / "el9.ks.in"
SUDOERS_PATH = "/etc/sudoers.d/booted"
# Where the installer's kernel and initrd are on every RHEL 9 family DVD and boot ISO.
PXEBOOT_FILES = ("images/pxeboot/vmlinuz", "images/pxeboot/initrd.img")
# (pxelinux.0, ldlinux.c32) pairs, first found wins; both must come from the same syslinux version.
PXELINUX_SEARCH: list[tuple[str, str]] = [
    ("/usr/lib/PXELINUX/pxelinux.0", "/usr/lib/syslinux/modules/bios/ldlinux.c32"),  # Debian, Ubuntu
    ("/usr/share/syslinux/pxelinux.0", "/usr/share/syslinux/ldlinux.c32"),  # Fedora, RHEL
    ("/usr/lib/syslinux/bios/pxelinux.0", "/usr/lib/syslinux/bios/ldlinux.c32"),  # Arch
    ("/usr/share/syslinux/bios/pxelinux.0", "/usr/share/syslinux/bios/ldlinux.c32"),
]
PXELINUX_PACKAGES = "pxelinux and syslinux-common (Debian/Ubuntu) or syslinux-tftpboot / syslinux (Fedora/RHEL)"

_SHA512_CRYPT = re.compile(r"\$6\$(rounds=[0-9]{1,9}\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}")
_OTHER_CRYPT = re.compile(r"\$(1|2[abxy]?|5|y|gy|7|sha1|md5)\$")
_LINUX_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_NIC = re.compile(r"[A-Za-z0-9_.-]{1,15}|([0-9a-f]{2}:){5}[0-9a-f]{2}")
_PUBKEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+={0,3}")


# --------------------------------------------------------------------------- kickstart inputs
def open_ports(env, image: str) -> list[int]:
    """TCP ports the image's firewall opens besides ssh: the service's, and nginx's on load balancers."""
    ports = [manifest.get(env.service).port]
    if image in env.loadbalancers and env.lb_port not in ports:
        ports.append(env.lb_port)
    return ports


def root_password_hash(environ=None) -> str | None:
    """SHA-512 crypt hash for root from BOOTED_PW; None (root locked) when BOOTED_PW is unset or empty.

    BOOTED_PW may already be a ``$6$`` hash; anything else is a password and is hashed here.
    """
    value = (os.environ if environ is None else environ).get("BOOTED_PW", "")
    if not value:
        return None
    if value.startswith("$6$"):
        if not _SHA512_CRYPT.fullmatch(value):
            raise UsageError("BOOTED_PW starts like a SHA-512 crypt hash ($6$) but is not a valid one")
        return value
    if _OTHER_CRYPT.match(value):
        raise UsageError("BOOTED_PW is a crypt hash of another kind; give a SHA-512 ($6$) hash or the password")
    if "\n" in value or "\r" in value:
        raise UsageError("BOOTED_PW must be a single line")
    return _sha512_crypt(value)


def _sha512_crypt(password: str) -> str:
    try:
        # The password goes on stdin: a command line is visible to every user in the process list.
        digest = localcmd.run(["openssl", "passwd", "-6", "-stdin"], input=password + "\n", timeout=30).stdout.strip()
    except CommandError as err:
        fallback = _python_crypt(password)
        if fallback is None:
            raise BootedError(f"cannot hash BOOTED_PW: {err} (install openssl)") from None
        digest = fallback
    if not _SHA512_CRYPT.fullmatch(digest):
        raise BootedError("cannot hash BOOTED_PW: openssl passwd -6 gave no SHA-512 crypt hash (needs OpenSSL 1.1.1+)")
    return digest


def _python_crypt(password: str) -> str | None:
    """Python's crypt module where it still exists (deprecated in 3.11, removed in 3.13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            return None
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_SHA512))


def login_user(config) -> str:
    """The account booted logs in as (BOOTED_USER / settings.ssh.user), checked as a Linux user name."""
    name = ssh.user(config)
    if not _LINUX_USER.fullmatch(name):
        raise UsageError(f"invalid login user {name!r} (BOOTED_USER / settings.ssh.user): use a-z, 0-9, '_', '-'")
    if name == "root":
        raise UsageError("the login user (BOOTED_USER / settings.ssh.user) must not be root; booted logs in as its own user")
    return name


def public_key(config) -> str:
    """booted's SSH public key as ``type base64`` plus a fixed comment (the file's comment is dropped)."""
    pub = Path(ssh.keypair(config)[1])
    fields = pub.read_text().split()
    key = " ".join(fields[:2])
    if not _PUBKEY.fullmatch(key):
        raise BootedError(f"{pub}: not an OpenSSH public key")
    return f"{key} booted"


def kickstart_url(config, image: str) -> str:
    """Where the installer fetches the image's kickstart: booted's nginx, through VirtualBox NAT, at
    the random path of the image's current build (``kickstart_token``)."""
    return f"http://{NAT_HOST}:{config.nginx['port']}/ks/{kickstart_token(image)}.cfg"


def kickstart_token(image: str, new: bool = False) -> str:
    """The random name the image's kickstart is served under; ``new`` draws one (each build)."""
    path = state.state_path("kickstart", f"{names.check('image', image)}.token")
    if new or not path.exists():
        state.atomic_write(path, secrets.token_urlsafe(24) + "\n", mode=0o600)
    return path.read_text().strip()


def check_kickstart_served(config, image: str, timeout: float = 5.0) -> str:
    """Fetch the image's kickstart the way its installer will, and check it is the file booted wrote.

    From the guest, NAT's 10.0.2.2 is this machine's loopback (``--nat-localhostreachable1``), so the URL
    the VM uses is asked at 127.0.0.1 on the same port and path. Returns that URL; raises a one-line
    BootedError saying what answered instead.
    """
    url = kickstart_url(config, image)
    local = url.replace(f"http://{NAT_HOST}:", "http://127.0.0.1:", 1)
    parts = urlsplit(local)
    try:
        status, body = http_fetch("127.0.0.1", parts.port or 80, "GET", parts.path, timeout=timeout)
    except OSError as reason:
        raise BootedError(f"nothing serves the kickstart at {local} ({reason}); the installer would stop there: "
                          "start booted's nginx (fab restart-nginx)") from None
    if status != 200:
        raise BootedError(f"booted's nginx answers {local} with HTTP {status}, not the kickstart; "
                          "run `fab restart-nginx`")
    if hashlib.sha256(body).digest() != hashlib.sha256(kickstart_path(image).read_bytes()).digest():
        raise BootedError(f"{local} answers with another file than {kickstart_path(image)}: is another "
                          "booted's nginx on this port? (fab restart-nginx says who holds it)")
    return url


def _network_lines(image: str, nics: Sequence[str]) -> list[str]:
    if len(nics) != 2 or len(set(nics)) != 2:
        raise UsageError(f"two different NICs are needed (NAT, host-only), not {list(nics)!r}")
    for nic in nics:
        if not _NIC.fullmatch(nic):
            raise UsageError(f"invalid NIC {nic!r}: give an interface name or a lower-case MAC address")
    nat, hostonly = nics
    return [
        f"network --device={nat} --bootproto=dhcp --onboot=on --activate --hostname={names.hostname_for(image)}",
        f"network --device={hostonly} --bootproto=dhcp --onboot=on --activate --nodefroute",
    ]


def _embedded_files(files: dict[str, tuple[str, int]]) -> str:
    """Shell that recreates ``files`` (path -> (text, mode)) from base64; safe for any contents."""
    out = []
    for path, (text, mode) in files.items():
        quoted, parent = shlex.quote(path), shlex.quote(str(Path(path).parent))
        encoded = base64.encodebytes(text.encode()).decode().rstrip("\n")
        # The delimiter has '_' and base64 never does, so no encoded line can end the heredoc.
        out += [
            f"mkdir -p -m 0755 {parent}",
            f"base64 -d > {quoted} <<'BOOTED_B64'",
            encoded,
            "BOOTED_B64",
            f"chmod {mode:04o} {quoted}",
        ]
    return "\n".join(out)


# --------------------------------------------------------------------------- kickstart
def render_kickstart(config, env, image: str, *, nics: Sequence[str] = NIC_DEVICES) -> str:
    """The kickstart for ``image`` of ``env`` as text; writes nothing of its own.

    (First use still creates the environment's call-home secret and booted's SSH key pair.)
    """
    image = names.check("image", image)
    if env is None:
        raise UsageError(f"image {image!r} is in no environment of {config.path}; "
                         "add it to one (the kickstart needs its service and call-home settings)")
    if image not in env.images:
        raise UsageError(f"image {image!r} is not in environment {env.name!r}")
    vbox = config.provider_settings("virtualbox")
    user = login_user(config)
    password_hash = root_password_hash()
    url = callhome.callhome_url(vbox["host_address"], config.nginx["port"])
    files = dict(callhome.firstboot_files())
    files[callhome.CONF_PATH] = (callhome.host_config(env.name, image, url), 0o600)
    files[SUDOERS_PATH] = (f"# written by booted: its login user runs sudo without a password (it has none)\n"
                           f"{user} ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    files[NM_DHCP_PATH] = (NM_DHCP_CONF, 0o644)
    values = {
        "image": image,
        "env": env.name,
        "ks_url": kickstart_url(config, image),
        "network": "\n".join(_network_lines(image, nics)),
        "rootpw": f"rootpw --iscrypted {password_hash}" if password_hash else "rootpw --lock",
        "user": user,
        "ssh_key": public_key(config),
        "ports": ",".join(f"{port}:tcp" for port in open_ports(env, image)),
        "install_files": _embedded_files(files),
        "sudoers_path": SUDOERS_PATH,
        "restorecon_paths": " ".join(shlex.quote(p) for p in sorted({*files, *(str(Path(f).parent) for f in files)})),
    }
    return string.Template(TEMPLATE.read_text()).substitute(values)


# Lease by MAC, not by a DUID made from /etc/machine-id: a VirtualBox clone keeps its source's
# machine-id and would otherwise be given its source's address despite its fresh MAC.
NM_DHCP_PATH = "/etc/NetworkManager/conf.d/90-booted-dhcp.conf"
NM_DHCP_CONF = "# written by booted\n[connection]\nipv4.dhcp-client-id=mac\n"


def kickstart_path(image: str) -> Path:
    """The file booted's nginx serves the image's kickstart from (``/ks/<token>.cfg``)."""
    return kickstart_dir() / f"{kickstart_token(image)}.cfg"


def write_kickstart(config, env, image: str, *, nics: Sequence[str] = NIC_DEVICES) -> Path:
    """Render the kickstart and write it atomically where nginx serves it (mode 0640)."""
    text = render_kickstart(config, env, image, nics=nics)
    kickstart_dir(create=True)
    path = state.atomic_write(kickstart_path(image), text, mode=0o640)
    share_with_workers(path)
    return path


# --------------------------------------------------------------------------- the ISO
def iso_path(config) -> Path:
    """The configured install ISO; a relative path is relative to the project root."""
    path = Path(config.provider_settings("virtualbox")["iso"]).expanduser()
    return path if path.is_absolute() else state.PROJECT_ROOT / path


def iso_digest(path: Path | str) -> str:
    """SHA-256 of ``path``, remembered by size, mtime and inode so a DVD is hashed once, not per build."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    cache_file = state.state_path("pxeboot", "digests.json")
    cached = (state.read_json(cache_file, {}) or {}).get(str(path))
    if cached and cached.get("stamp") == stamp:
        return cached["sha256"]
    if st.st_size > 256 * 2**20:
        progress(f"checking {path} ({st.st_size / 2**30:.1f} GiB): computing its SHA-256 once")
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(4 * 2**20), b""):
            sha.update(block)
    digest = sha.hexdigest()
    with state.locked("pxeboot"):
        table = state.read_json(cache_file, {}) or {}
        table[str(path)] = {"stamp": stamp, "sha256": digest}
        state.atomic_write_json(cache_file, table)
    return digest


def check_iso(config) -> Path:
    """The configured install ISO, checked: it exists, and matches iso_sha256 when that is set."""
    path = iso_path(config)
    setting = f"providers.virtualbox.iso in {config.path}"
    if not path.exists():
        raise BootedError(f"install ISO {path} not found (set {setting}; see iso/README.md)")
    if not path.is_file():
        raise BootedError(f"install ISO {path} is not a file ({setting})")
    expected = config.provider_settings("virtualbox").get("iso_sha256", "").lower()
    if expected:
        actual = iso_digest(path)
        if actual != expected:
            raise BootedError(f"install ISO {path}: SHA-256 is {actual[:12]}..., expected {expected[:12]}... "
                              f"(providers.virtualbox.iso_sha256 in {config.path}); wrong or damaged file")
    return path


def _child_names(rec, namespace: str) -> list[str]:
    """Lower-case names a directory record answers to in ``namespace`` (rr, joliet or iso)."""
    ident = rec.file_identifier()
    if namespace == "joliet":
        return [ident.decode("utf-16_be", "replace").lower()]
    text = ident.decode("ascii", "replace")
    # ISO 9660 names are upper-case, carry a ';1' version, and a name without extension ends in '.'.
    plain = text.split(";", 1)[0]
    plain = plain[:-1] if plain.endswith(".") else plain
    found = [plain.lower()]
    if namespace == "rr" and rec.rock_ridge is not None:
        with contextlib.suppress(Exception):
            found.insert(0, rec.rock_ridge.name().decode("utf-8", "replace").lower())
    return found


def _find_on_iso(iso, wanted: str) -> dict | None:
    """Keyword arguments that fetch ``wanted`` (a lower-case path) from the open ISO, or None."""
    namespaces = []
    if iso.has_rock_ridge():
        namespaces.append(("rr", "rr_path"))
    if iso.has_joliet():
        namespaces.append(("joliet", "joliet_path"))
    namespaces.append(("iso", "iso_path"))
    parts = wanted.lower().split("/")
    for namespace, key in namespaces:
        current = ""
        for i, part in enumerate(parts):
            match = None
            for rec in iso.list_children(**{key: current or "/"}):
                if rec.is_dot() or rec.is_dotdot():
                    continue
                if part in _child_names(rec, namespace) and rec.is_dir() == (i < len(parts) - 1):
                    ident = rec.file_identifier()
                    if namespace == "rr" and rec.rock_ridge is not None:
                        name = rec.rock_ridge.name().decode("utf-8")
                    elif namespace == "joliet":
                        name = ident.decode("utf-16_be")
                    else:
                        name = ident.decode("ascii")
                    match = f"{current}/{name}"
                    break
            if match is None:
                break
            current = match
        else:
            return {key: current}
    return None


def extract_pxeboot(iso_path: Path | str, dest_dir: Path | str) -> tuple[Path, Path]:
    """Put the ISO's installer kernel and initrd into ``dest_dir`` as (vmlinuz, initrd.img).

    Read with pycdlib (no mount, no root), so Rock Ridge, Joliet and plain ISO 9660 names all work.
    Extracted once per ISO digest into state/pxeboot/<sha256>/ and hard-linked (or copied) from there.
    """
    import pycdlib
    from pycdlib.pycdlibexception import PyCdlibException

    iso_path, dest_dir = Path(iso_path), Path(dest_dir)
    digest = iso_digest(iso_path)
    cache = state.state_path("pxeboot", digest)
    names_out = [Path(p).name for p in PXEBOOT_FILES]
    with state.locked("pxeboot"):
        if not all((cache / n).is_file() for n in names_out):
            tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{digest[:12]}."))
            try:
                iso = pycdlib.PyCdlib()
                try:
                    iso.open(str(iso_path))
                except (PyCdlibException, OSError) as err:
                    raise BootedError(f"{iso_path} is not a readable ISO 9660 image: {err}") from None
                try:
                    for wanted, name in zip(PXEBOOT_FILES, names_out):
                        where = _find_on_iso(iso, wanted)
                        if where is None:
                            raise BootedError(f"{iso_path} has no {wanted}: is it a Rocky / AlmaLinux / "
                                              "CentOS Stream 9 DVD? (see iso/README.md)")
                        with open(tmp / name, "wb") as out:
                            iso.get_file_from_iso_fp(out, **where)
                finally:
                    iso.close()
                shutil.rmtree(cache, ignore_errors=True)
                os.rename(tmp, cache)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    dest_dir.mkdir(parents=True, exist_ok=True)
    result = []
    for name in names_out:
        target = dest_dir / name
        _link_or_copy(cache / name, target)
        result.append(target)
    return result[0], result[1]


def _link_or_copy(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or links not allowed: copy instead
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


# --------------------------------------------------------------------------- PXE staging
def find_pxelinux() -> tuple[Path, Path]:
    """(pxelinux.0, ldlinux.c32) for a BIOS PXE boot: BOOTED_PXELINUX_DIR, else the system's syslinux."""
    candidates = list(PXELINUX_SEARCH)
    override = os.environ.get("BOOTED_PXELINUX_DIR")
    if override:
        candidates.insert(0, (f"{override}/pxelinux.0", f"{override}/ldlinux.c32"))
    for loader, module in candidates:
        if Path(loader).is_file() and Path(module).is_file():
            return Path(loader), Path(module)
    raise BootedError(f"no pxelinux.0 + ldlinux.c32 found (BIOS PXE boot loader); install {PXELINUX_PACKAGES}, "
                      "or set BOOTED_PXELINUX_DIR to a folder holding both")


def pxelinux_config(config, image: str) -> str:
    """pxelinux.cfg/default: boot the installer at once with the image's kickstart; no menu, no password."""
    # console=ttyS0 last: the kernel's and the installer's output goes to the serial port, which the VM
    # writes to a file on this machine (the build keeps it when an install fails).
    args = (f"initrd=el9/initrd.img ip=dhcp inst.repo=cdrom inst.ks={kickstart_url(config, image)} inst.text "
            "console=tty0 console=ttyS0,115200n8")
    return (
        f"# written by booted for {image}: install it with its kickstart\n"
        "DEFAULT install\n"
        "PROMPT 0\n"
        "TIMEOUT 1\n"
        "LABEL install\n"
        "  KERNEL el9/vmlinuz\n"
        f"  APPEND {args}\n"
        # BOOTIF=<mac of the PXE NIC> on the kernel line: the installer uses the NAT NIC, which
        # reaches booted's nginx at 10.0.2.2, instead of trying DHCP on every NIC.
        "  IPAPPEND 2\n"
    )


def tftp_dir(image: str) -> Path:
    return state.state_path("tftp", names.check("image", image))


def stage_install(config, env, image: str, *, nics: Sequence[str] = NIC_DEVICES) -> Path:
    """Everything the VM needs to install ``image``; returns its TFTP folder (state/tftp/<image>).

    Checks the ISO, writes the kickstart, and builds the TFTP folder (pxelinux.0, ldlinux.c32,
    pxelinux.cfg/default, el9/vmlinuz, el9/initrd.img) in a temporary folder renamed into place,
    so a failure leaves the previous folder (or none), never half of one.
    """
    image = names.check("image", image)
    iso = check_iso(config)
    loader, module = find_pxelinux()
    final = tftp_dir(image)
    with state.locked(f"stage-{image}"):
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{image}."))
        try:
            os.chmod(tmp, 0o755)
            shutil.copyfile(loader, tmp / BOOT_FILE)
            shutil.copyfile(module, tmp / "ldlinux.c32")
            extract_pxeboot(iso, tmp / "el9")
            (tmp / "pxelinux.cfg").mkdir()
            with contextlib.suppress(FileNotFoundError):
                kickstart_path(image).unlink()  # a previous build's kickstart
            kickstart_token(image, new=True)  # this build's own kickstart path
            state.atomic_write(tmp / "pxelinux.cfg" / "default", pxelinux_config(config, image))
            if env is not None:
                callhome.new_host_key(env.name, image)  # a rebuilt image must not keep its old key
            write_kickstart(config, env, image, nics=nics)
            # A folder cannot be renamed over a non-empty one: move the old one aside first.
            old = None
            if final.exists():
                old = final.with_name(f".{image}.old-{os.getpid()}")
                os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                if old is not None:
                    os.rename(old, final)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def unstage_install(image: str) -> None:
    """Remove the image's kickstart and TFTP folder (after its install, or when it is deleted).

    The kickstart holds the host's call-home key, so it should not stay downloadable.
    """
    image = names.check("image", image)
    with state.locked(f"stage-{image}"):
        token = state.state_path("kickstart", f"{image}.token")
        if token.exists():
            with contextlib.suppress(FileNotFoundError):
                kickstart_path(image).unlink()
            token.unlink()
            with contextlib.suppress(OSError):
                kickstart_dir().rmdir()  # the last one served: leave nothing behind
        shutil.rmtree(tftp_dir(image), ignore_errors=True)
