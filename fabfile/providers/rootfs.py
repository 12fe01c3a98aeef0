"""The Debian root file system booted's hosts are made of: local hosts run on it as overlays
(systemd-nspawn), and the libvirt provider's VM base image is built from it.

Built once with debootstrap (from the mirror apt on this machine already uses), customised in a
chroot by fixed text, and cached read-only in ``BOOTED_IMAGE_CACHE`` (shared by test runs) or the
state dir; a marker file holds its recipe, and a changed recipe rebuilds it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fabfile.core import localcmd
from fabfile.core.errors import ProviderError
from fabfile.core.output import progress
from fabfile.core.state import atomic_write, locked, state_path

PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "curl", "iproute2", "sudo",
    "nginx-light", "procps",
]
# Bump when the recipe below changes: image-build then rebuilds the cached base image.
RECIPE_VERSION = "3"

# Run once inside the new base image (chroot). Fixed text; no data is interpolated.
BASE_CUSTOMIZE = r"""
set -eu
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
# nginx only runs on load balancer hosts, which booted configures and enables itself.
rm -f /etc/systemd/system/multi-user.target.wants/nginx.service
rm -rf /var/cache/apt/archives/*.deb /var/lib/apt/lists/*
mkdir -p /etc/systemd/system/ssh.service.d /etc/booted
# Each host makes its own SSH host keys on first boot (clones must not share them).
cat > /etc/systemd/system/ssh.service.d/booted-keygen.conf <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
EOF
cat > /etc/ssh/sshd_config.d/booted.conf <<'EOF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
PrintMotd no
MaxStartups 100:30:200
EOF
"""


# A machine whose SSH host key booted made (one ed25519 key, written in before its first boot and
# pinned before the first connection) makes no keys of its own: sshd serves that key only, and
# ssh.service skips the base image's `ssh-keygen -A`. An RSA key alone costs a local host 1-3 s of
# CPU at boot (measured: ssh.service 1.1-2.9 s of a 4-host bring-up) and tens of seconds under TCG.
HOST_KEY_PATH = "/etc/ssh/ssh_host_ed25519_key"
SSHD_OWN_KEY_DROPIN = """[Service]
ExecStartPre=
ExecStartPre=/usr/sbin/sshd -t
"""
SSHD_OWN_KEY_CONFIG = f"HostKey {HOST_KEY_PATH}\n"
SSHD_OWN_KEY_DROPIN_PATH = "/etc/systemd/system/ssh.service.d/booted-keygen.conf"  # replaces the base image's


@dataclass(frozen=True)
class HostKey:
    """An SSH host key booted made for a machine: the private key file's text and its public line."""

    private: str
    public: str

    @classmethod
    def new(cls, hostname: str) -> HostKey:
        with tempfile.TemporaryDirectory(prefix="booted-hostkey-") as tmp:
            path = Path(tmp) / "key"
            localcmd.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{hostname}", "-f", str(path)],
                         timeout=30)
            return cls(path.read_text(), (Path(tmp) / "key.pub").read_text().strip())

    def files(self) -> dict[str, tuple[str, int]]:
        """The key's files by path on the machine: (contents, mode)."""
        return {HOST_KEY_PATH: (self.private, 0o600), f"{HOST_KEY_PATH}.pub": (self.public + "\n", 0o644)}


def own_host_key_config(sshd_config_name: str) -> dict[str, tuple[str, int]]:
    """sshd's and ssh.service's settings for a machine that has a HostKey's files."""
    return {SSHD_OWN_KEY_DROPIN_PATH: (SSHD_OWN_KEY_DROPIN, 0o644),
            f"/etc/ssh/sshd_config.d/{sshd_config_name}": (SSHD_OWN_KEY_CONFIG, 0o644)}


def name_files(hostname: str) -> dict[str, str]:
    """/etc/hostname and /etc/hosts of a machine booted from this root file system.

    Its own name must resolve from /etc/hosts (127.0.1.1, as Debian's installer writes it): sudo and
    libvirtd look it up, and through DNS that waits for a resolver the machine may not reach (the
    image's resolv.conf is the build machine's; 20 s per lookup measured in the hypervisor lab)."""
    return {"/etc/hostname": f"{hostname}\n", "/etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"}


def image_cache_dir() -> Path:
    """Where the base image lives: ``BOOTED_IMAGE_CACHE`` (shared by test runs) or the state dir."""
    override = os.environ.get("BOOTED_IMAGE_CACHE")
    path = Path(override) if override else state_path("local", "image", ".keep").parent
    path.mkdir(parents=True, exist_ok=True)
    return path


def apt_mirror(suite: str) -> str | None:
    """The Debian mirror apt on this machine already uses, if it serves ``suite``; else debootstrap's default."""
    candidates = []
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        block: dict[str, str] = {}
        for line in sources.read_text().splitlines() + [""]:
            if not line.strip():
                if suite in block.get("Suites", "").split() and "deb" in block.get("Types", "").split():
                    candidates += block.get("URIs", "").split()
                block = {}
            elif not line.startswith("#") and ":" in line:
                key, _, value = line.partition(":")
                block[key.strip()] = value.strip()
    listfile = Path("/etc/apt/sources.list")
    if listfile.exists():
        for line in listfile.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                candidates.append(parts[1] if not parts[1].startswith("[") else parts[2])
    for uri in candidates:
        if uri.startswith(("http://", "https://")):
            return uri
    return None


class DebianRootfs:
    """The cached root file system of one Debian suite."""

    def __init__(self, suite: str):
        self.suite = suite  # validated by the settings (providers.local.suite): a path part

    @property
    def root(self) -> Path:
        return image_cache_dir() / self.suite / "rootfs"

    @property
    def marker(self) -> str:
        """Its recipe: what it was built from and how (a different one means a rebuild)."""
        return json.dumps({"recipe": RECIPE_VERSION, "packages": PACKAGES, "suite": self.suite}, sort_keys=True)

    def current(self) -> bool:
        marker = self.root / "etc" / "booted-image.json"
        return marker.exists() and marker.read_text() == self.marker

    def ensure(self, refresh: bool = False, in_use: Callable[[], bool] = lambda: False) -> Path:
        """Build it unless a current one is cached (``refresh``: rebuild anyway); never under hosts
        that run on it (``in_use``)."""
        root = self.root
        with locked("local-image"):
            if self.current() and not refresh:
                return root
            if root.exists() and in_use():
                raise ProviderError("the base image needs a rebuild but local hosts are running on it; stop them first")
            for tool in ("debootstrap", "systemd-nspawn"):
                if localcmd.which(tool) is None:
                    raise ProviderError(f"{tool} is missing: apt-get install debootstrap systemd-container")
            build = root.parent / f".build-{os.getpid()}"
            shutil.rmtree(build, ignore_errors=True)
            build.parent.mkdir(parents=True, exist_ok=True)
            argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", self.suite, str(build)]
            mirror = apt_mirror(self.suite)
            if mirror:
                argv.append(mirror)
            progress(f"local: building the base image ({self.suite}) with debootstrap; this takes about a minute")
            try:
                localcmd.run_logged(argv, state_path("local", "debootstrap.log"), timeout=1200, what="debootstrap")
                localcmd.run(["chroot", str(build), "/bin/sh", "-c", BASE_CUSTOMIZE], timeout=120)
                atomic_write(build / "etc" / "booted-image.json", self.marker)
            except BaseException:
                shutil.rmtree(build, ignore_errors=True)
                raise
            old = root.parent / f".old-{os.getpid()}"
            if root.exists():
                root.rename(old)
            build.rename(root)
            shutil.rmtree(old, ignore_errors=True)
            progress(f"local: base image ready at {root}")
            return root
