"""The EL9 kickstart both VM providers install from: rendering, serving it from booted's nginx, and
the install ISO (its check and its installer kernel and initrd).

A provider says only what differs between hypervisors: the URL its installer fetches the kickstart
from, the call-home URL its hosts use, and the kickstart's ``network`` lines. Everything else (accounts,
firewall, packages, %post that installs booted's first-boot files) is one template,
kickstart/el9.ks.in, rendered here for VirtualBox and libvirt alike.

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

from fabfile.core import localcmd, names, ssh, state
from fabfile.core.errors import BootedError, CommandError, UsageError
from fabfile.core.http import http_fetch
from fabfile.core.output import progress
from fabfile.hosts import callhome
from fabfile.hosts.endpoint import kickstart_dir, share_with_workers
from fabfile.services import manifest

TEMPLATE = state.PROJECT_ROOT / "kickstart" / "el9.ks.in"
SUDOERS_PATH = "/etc/sudoers.d/booted"
# Where the installer's kernel and initrd are on every RHEL 9 family DVD and boot ISO.
PXEBOOT_FILES = ("images/pxeboot/vmlinuz", "images/pxeboot/initrd.img")
# Lease by MAC, not by a DUID made from /etc/machine-id: a VirtualBox clone keeps its source's
# machine-id and would otherwise be given its source's address despite its fresh MAC.
NM_DHCP_PATH = "/etc/NetworkManager/conf.d/90-booted-dhcp.conf"
NM_DHCP_CONF = "# written by booted\n[connection]\nipv4.dhcp-client-id=mac\n"

_SHA512_CRYPT = re.compile(r"\$6\$(rounds=[0-9]{1,9}\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}")
_OTHER_CRYPT = re.compile(r"\$(1|2[abxy]?|5|y|gy|7|sha1|md5)\$")
_LINUX_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_PUBKEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+={0,3}")
# A kickstart URL booted gives an installer: http, an IPv4 address, a port, /ks/<token>.cfg. It goes on a
# kernel command line (space-separated, no quoting) and into the kickstart's comment line.
_KS_URL = re.compile(r"http://(\d{1,3}\.){3}\d{1,3}:\d{1,5}/ks/[A-Za-z0-9_-]{16,64}\.cfg")
# One kickstart line: what a network line may hold (option values are checked by the provider).
_KS_LINE = re.compile(r"[A-Za-z0-9 =:._/-]+")


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


def check_ks_url(url: str) -> str:
    if not _KS_URL.fullmatch(url):
        raise BootedError(f"not a kickstart URL booted makes: {url!r}")
    return url


# --------------------------------------------------------------------------- kickstart
def render_kickstart(config, env, image: str, *, ks_url: str, callhome_url: str, network: Sequence[str]) -> str:
    """The kickstart for ``image`` of ``env`` as text; writes nothing of its own.

    ``ks_url``: where the installer fetches it (named in a comment); ``callhome_url``: what the installed
    host calls home to; ``network``: the provider's ``network`` command lines (checked as plain tokens).
    (First use still creates the environment's call-home secret and booted's SSH key pair.)
    """
    image = names.check("image", image)
    if env is None:
        raise UsageError(f"image {image!r} is in no environment of {config.path}; "
                         "add it to one (the kickstart needs its service and call-home settings)")
    if image not in env.images:
        raise UsageError(f"image {image!r} is not in environment {env.name!r}")
    for line in network:
        if not line.startswith("network ") or not _KS_LINE.fullmatch(line):
            raise BootedError(f"not a kickstart network line booted makes: {line!r}")
    user = login_user(config)
    password_hash = root_password_hash()
    files = dict(callhome.firstboot_files())
    files[callhome.CONF_PATH] = (callhome.host_config(env.name, image, callhome_url), 0o600)
    files[SUDOERS_PATH] = (f"# written by booted: its login user runs sudo without a password (it has none)\n"
                           f"{user} ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    files[NM_DHCP_PATH] = (NM_DHCP_CONF, 0o644)
    values = {
        "image": image,
        "env": env.name,
        "ks_url": check_ks_url(ks_url),
        "network": "\n".join(network),
        "rootpw": f"rootpw --iscrypted {password_hash}" if password_hash else "rootpw --lock",
        "user": user,
        "ssh_key": public_key(config),
        "ports": ",".join(f"{port}:tcp" for port in open_ports(env, image)),
        "install_files": _embedded_files(files),
        "sudoers_path": SUDOERS_PATH,
        "restorecon_paths": " ".join(shlex.quote(p) for p in sorted({*files, *(str(Path(f).parent) for f in files)})),
    }
    return string.Template(TEMPLATE.read_text()).substitute(values)


def kickstart_token(image: str, new: bool = False) -> str:
    """The random name the image's kickstart is served under; ``new`` draws one (each build)."""
    path = state.state_path("kickstart", f"{names.check('image', image)}.token")
    if new or not path.exists():
        state.atomic_write(path, secrets.token_urlsafe(24) + "\n", mode=0o600)
    return path.read_text().strip()


def kickstart_url_path(image: str) -> str:
    """The URL path booted's nginx serves the image's current kickstart at."""
    return f"/ks/{kickstart_token(image)}.cfg"


def kickstart_path(image: str) -> Path:
    """The file booted's nginx serves the image's kickstart from (``/ks/<token>.cfg``)."""
    return kickstart_dir() / f"{kickstart_token(image)}.cfg"


def publish_kickstart(image: str, text: str) -> Path:
    """Write the rendered kickstart atomically where nginx serves it (mode 0640, nginx's group)."""
    kickstart_dir(create=True)
    path = state.atomic_write(kickstart_path(image), text, mode=0o640)
    share_with_workers(path)
    return path


def check_kickstart_served(image: str, host: str, port: int, *, shown_url: str = "", timeout: float = 5.0) -> str:
    """Fetch the image's kickstart from booted's nginx at ``host:port`` and check it is the file booted
    wrote; returns the URL asked. Raises a one-line BootedError saying what answered instead (the
    installer would stop there: a real one waits forever for a kickstart it cannot fetch)."""
    path = kickstart_url_path(image)
    url = shown_url or f"http://{host}:{port}{path}"
    try:
        status, body = http_fetch(host, port, "GET", path, timeout=timeout)
    except OSError as reason:
        raise BootedError(f"nothing serves the kickstart at {url} ({reason}); the installer would stop there: "
                          "start booted's nginx (fab restart-nginx)") from None
    if status != 200:
        raise BootedError(f"booted's nginx answers {url} with HTTP {status}, not the kickstart; "
                          "run `fab restart-nginx`")
    if hashlib.sha256(body).digest() != hashlib.sha256(kickstart_path(image).read_bytes()).digest():
        raise BootedError(f"{url} answers with another file than {kickstart_path(image)}: is another "
                          "booted's nginx on this port? (fab restart-nginx says who holds it)")
    return url


def withdraw_kickstart(image: str) -> None:
    """Stop serving the image's kickstart (it holds the host's call-home key); call under the image's lock."""
    token = state.state_path("kickstart", f"{names.check('image', image)}.token")
    if token.exists():
        with contextlib.suppress(FileNotFoundError):
            kickstart_path(image).unlink()
        token.unlink()
        with contextlib.suppress(OSError):
            kickstart_dir().rmdir()  # the last one served: leave nothing behind


# --------------------------------------------------------------------------- the ISO
def resolve_iso(setting: str) -> Path:
    """An ``iso`` setting as a path; a relative one is relative to the project root."""
    path = Path(setting).expanduser()
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


def check_iso(path: Path, expected_sha256: str, where: str, config_path) -> Path:
    """The install ISO at ``path``, checked: it exists, is a file, and matches ``expected_sha256`` if set.

    ``where`` names the settings (e.g. ``providers.<name>``) for the messages.
    """
    setting = f"{where}.iso in {config_path}"
    if not path.exists():
        raise BootedError(f"install ISO {path} not found (set {setting}; see iso/README.md)")
    if not path.is_file():
        raise BootedError(f"install ISO {path} is not a file ({setting})")
    expected = expected_sha256.lower()
    if expected:
        actual = iso_digest(path)
        if actual != expected:
            raise BootedError(f"install ISO {path}: SHA-256 is {actual[:12]}..., expected {expected[:12]}... "
                              f"({where}.iso_sha256 in {config_path}); wrong or damaged file")
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
