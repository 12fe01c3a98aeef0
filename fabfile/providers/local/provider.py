"""The ``local`` provider: real Debian hosts as systemd-nspawn containers on this machine.

* One base image (debootstrap of Debian with systemd, sshd, python3, curl, nginx), built once and
  cached read-only; ``image-build`` refreshes it when booted's recipe for it changes.
* Each host (an "image" in booted's words) is a writable overlay over the base image, its own
  network namespace with its own IPv4 address on booted's bridge, and its hostname.
* ``start`` runs ``systemd-nspawn --boot`` in the background, inside a cgroup subtree of the host's
  own (see containment.py), and returns once SSH answers; ``stop`` sends nspawn SIGTERM (an orderly
  poweroff inside), waits with a timeout, then kills whatever of the host is left and waits until
  nothing is, and removes the host's network and cgroups.
* ``start`` first cleans what a crashed run left of the host (processes, cgroups, network, overlay
  work directory) and says so in one line.

This machine's PID 1 is not systemd, hence ``--keep-unit --register=no``.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fabfile.core import localcmd, names, ssh
from fabfile.core.config import size_limit
from fabfile.core.errors import ProviderError, WaitTimeout
from fabfile.core.output import progress, wait_until
from fabfile.core.state import atomic_write, atomic_write_json, locked, read_json, state_path, write_tree
from fabfile.hosts import callhome
from fabfile.hosts.provision import USER_SETUP
from fabfile.providers import bridge, rootfs
from fabfile.providers.base import RUNNING, STOPPED, Machine, Provider
from fabfile.providers.local import containment
from fabfile.providers.local import network as localnet

# Run by booted-provision.service on the host's first boot, before sshd and the call home, so a
# build costs no container run of its own (it used to boot a throw-away nspawn per host). Fixed
# text: the values come from files booted wrote into the overlay (PROVISION_DIR), never from here.
# (The host name and /etc/hosts are written straight into the overlay: systemd reads the name
# before any unit runs, and sudo needs it in /etc/hosts or it waits on DNS.)
PROVISION_DIR = "/etc/booted/provision"
HOST_PROVISION = r"""
set -eu
dir=/etc/booted/provision
user=$(cat "$dir/user"); pubkey=$(cat "$dir/authorized_key")
""" + USER_SETUP + r"""rm -rf "$dir"
"""
PROVISION_UNIT = """[Unit]
Description=booted: this host's login user and SSH key (first boot)
ConditionPathExists=/etc/booted/provision/user
After=local-fs.target
Before=ssh.service booted-callhome.service systemd-user-sessions.service

[Service]
Type=oneshot
ExecStart=/bin/sh /etc/booted/provision/run

[Install]
WantedBy=multi-user.target
"""
PROVISION_UNIT_PATH = "/etc/systemd/system/booted-provision.service"
WANTS_DIR = "/etc/systemd/system/multi-user.target.wants"

# Files that make a host itself; a clone gets fresh ones.
IDENTITY_FILES = [
    "etc/ssh/ssh_host_rsa_key", "etc/ssh/ssh_host_rsa_key.pub", "etc/ssh/ssh_host_ecdsa_key",
    "etc/ssh/ssh_host_ecdsa_key.pub", "etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub",
    "etc/hostname", "etc/hosts", "etc/booted/callhome.conf", "etc/machine-id", "var/lib/dbus/machine-id",
]


@dataclass
class LocalHost:
    """A local host's record (host.json in its folder)."""

    name: str
    address: str
    mac: str
    uuid: str
    env: str | None
    created: float

    @property
    def folder(self) -> Path:
        return host_folder(self.name)

    @property
    def upper(self) -> Path:
        return self.folder / "upper"

    @property
    def link(self) -> localnet.HostLink:
        return localnet.HostLink.for_image(self.name)

    @property
    def cgroup_name(self) -> str:
        """Its cgroups' name: the image and the same state-dir digest its network uses (unique per lab)."""
        return f"{self.name}.{self.link.netns.removeprefix('booted-')}"

    def overlay_workdirs(self) -> list[Path]:
        """The overlay work directories nspawn makes next to the upper one (``.#upper<random>``)."""
        return list(self.folder.glob(".#upper*"))

    @property
    def cgroups_record(self) -> Path:
        """Where start records the cgroup directories it made (they depend on the caller's cgroups)."""
        return self.folder / "cgroups.json"


def host_folder(name: str) -> Path:
    return state_path("local", "hosts", name, ".keep").parent


class LocalProvider(Provider):
    name = "local"

    # ------------------------------------------------------------------ base image
    @property
    def suite(self) -> str:
        return self.settings["suite"]

    @property
    def rootfs(self) -> rootfs.DebianRootfs:
        return rootfs.DebianRootfs(self.suite)

    def image_root(self) -> Path:
        return self.rootfs.root

    def ensure_image(self, refresh: bool = False) -> Path:
        """The base image, built with debootstrap unless a current one is cached."""
        return self.rootfs.ensure(refresh, in_use=lambda: any(h.running for h in self.list()))

    # ------------------------------------------------------------------ host records
    @property
    def subnet(self) -> bridge.Subnet:
        return bridge.Subnet.parse(self.settings["subnet"])

    def booted_address(self) -> str:
        return self.subnet.gateway

    def endpoint_ready(self) -> None:
        bridge.ensure_bridge(self.bridge, self.subnet)  # the gateway address lives on the bridge

    @property
    def bridge(self) -> str:
        return self.settings["bridge"]

    def _hosts(self) -> list[LocalHost]:
        root = state_path("local", "hosts", ".keep").parent
        hosts = []
        for folder in sorted(root.iterdir()) if root.exists() else []:
            data = read_json(folder / "host.json")
            if data:
                hosts.append(LocalHost(**data))
        return hosts

    def _host(self, image: str) -> LocalHost:
        names.check("image", image)
        data = read_json(host_folder(image) / "host.json")
        if not data:
            raise ProviderError("no such local image (build it with `fab image-build --image NAME`)", image=image)
        return LocalHost(**data)

    def _new_host(self, image: str, env_name: str | None) -> LocalHost:
        """Allocate an address and a MAC for a new host and write its record."""
        with locked("local-hosts"):
            used = {h.address for h in self._hosts()}
            free = [a for a in self.subnet.host_addresses() if a not in used]
            if not free:
                raise ProviderError(f"no free address left in {self.subnet.network}", image=image)
            mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
            host = LocalHost(image, free[0], mac, str(uuid.uuid4()), env_name, time.time())
            host.upper.mkdir(parents=True, exist_ok=True)
            atomic_write_json(host.folder / "host.json", asdict(host))
            return host

    # ------------------------------------------------------------------ provider interface
    def build(self, image: str, env) -> Machine:
        names.check("image", image)
        self.ensure_image(refresh=False)
        existing = read_json(host_folder(image) / "host.json")
        if existing:
            host = LocalHost(**existing)
            if self._running(host):
                raise ProviderError("is running; stop it before rebuilding", image=image)
        else:
            host = self._new_host(image, env.name if env else None)
        try:
            self._provision(host, env)
        except BaseException:
            if not existing:
                shutil.rmtree(host.folder, ignore_errors=True)
            raise
        # nothing of a host made just now can run: no scan of every process for it
        return self._machine(host, None if existing else {})

    def _provision(self, host: LocalHost, env) -> None:
        """Write the host's own files into its overlay: call-home config, first-boot unit, user, login
        key, SSH host key (pinned here)."""
        upper = host.upper
        files = dict(callhome.firstboot_files())
        if env is not None:
            callhome.new_host_key(env.name, host.name)  # a rebuilt host must not keep its old key
            files[callhome.CONF_PATH] = (callhome.host_config(env.name, host.name, self.callhome_url()), 0o600)
        pubkey = Path(ssh.keypair(self.config)[1]).read_text().strip()
        files[PROVISION_UNIT_PATH] = (PROVISION_UNIT, 0o644)
        files[f"{PROVISION_DIR}/run"] = (HOST_PROVISION, 0o700)
        files[f"{PROVISION_DIR}/user"] = (ssh.user(self.config), 0o600)
        files[f"{PROVISION_DIR}/authorized_key"] = (pubkey, 0o600)
        # its SSH host key: made here and pinned before the first connection, so the host makes none
        host_key = rootfs.HostKey.new(names.hostname_for(host.name))
        files.update(host_key.files())
        files.update(rootfs.own_host_key_config("booted-host.conf"))
        # the name must be in place before the host's systemd reads /etc/hostname at boot
        for path, content in rootfs.name_files(names.hostname_for(host.name)).items():
            files[path] = (content, 0o644)
        write_tree(upper, files)
        # enabled the way `systemctl enable` would (their [Install] says multi-user.target)
        wants = upper / WANTS_DIR.lstrip("/")
        wants.mkdir(parents=True, exist_ok=True)
        for unit in (PROVISION_UNIT_PATH, callhome.UNIT_PATH):
            link = wants / Path(unit).name
            if not link.is_symlink():
                link.symlink_to(unit)
        ssh.pin(host.address, host_key.public)

    def clone(self, source: str, new: str, env) -> Machine:
        src = self._host(source)
        names.check("image", new)
        if self._running(src):
            raise ProviderError("is running; stop it before cloning", image=source)
        if read_json(host_folder(new) / "host.json"):
            raise ProviderError("already exists", image=new)
        host = self._new_host(new, env.name if env else src.env)
        try:
            shutil.rmtree(host.upper)
            localcmd.run(["cp", "-a", "--", str(src.upper), str(host.upper)])
            for rel in IDENTITY_FILES:
                (host.upper / rel).unlink(missing_ok=True)
            self._provision(host, env)
        except BaseException:
            shutil.rmtree(host.folder, ignore_errors=True)
            raise
        return self._machine(host)

    def start(self, image: str) -> Machine:
        host = self._host(image)
        if not self.image_root().exists():
            raise ProviderError("the base image is missing; run `fab image-build --image NAME` first", image=image)
        if self._pid(host):
            return self._machine(host)
        ensure_inotify_limits()
        self._clean_stale(host)
        bridge.ensure_bridge(self.bridge, self.subnet)
        try:
            localnet.host_up(host.link, self.bridge, self.subnet, host.address, host.mac)
            cgroups = self._make_cgroups(host)
        except BaseException:
            self._end(host, None, force=True)  # leave no half-made host behind
            raise
        root = self.image_root()
        argv = [
            "systemd-nspawn", "--boot", "--quiet", "--keep-unit", "--register=no",
            "-D", str(root), f"--overlay={root}:{host.upper}:/",
            f"--machine={names.hostname_for(image)}", f"--hostname={names.hostname_for(image)}",
            f"--uuid={host.uuid}", f"--network-namespace-path=/run/netns/{host.link.netns}",
            "--link-journal=no", "--resolv-conf=off", "--timezone=off", "--console=read-only",
        ]
        console = open(host.folder / "console.log", "wb")
        try:
            proc = subprocess.Popen(containment.enter_argv(cgroups, argv), stdin=subprocess.DEVNULL, stdout=console,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=localcmd.child_environ())
        finally:
            console.close()
        atomic_write(host.folder / "nspawn.pid", f"{proc.pid}\n")
        timeout = float(self.settings["boot_timeout_s"])

        def ssh_ready() -> bool:
            if proc.poll() is not None:
                raise ProviderError(f"systemd-nspawn exited ({proc.returncode}): {_last_error(host.folder / 'console.log')}"
                                    f"; see {host.folder / 'console.log'}", image=image)
            try:
                with socket.create_connection((host.address, 22), timeout=0.5):
                    return True
            except OSError:
                return False

        try:
            wait_until(ssh_ready, timeout=timeout, what=f"{image} to answer on SSH ({host.address})", interval=0.1,
                       hint=f"see {host.folder / 'console.log'}")
        except BaseException:
            self._end(host, proc.pid, force=True)
            raise
        return self._machine(host)

    def stop(self, image: str, force: bool = False) -> Machine:
        host = self._host(image)
        self._end(host, self._pid(host), force=force)
        return self._machine(host)

    def _end(self, host: LocalHost, pid: int | None, force: bool) -> list[str]:
        """End every process of the host (``force``: at once; else an orderly poweroff first, killed
        after stop_timeout_s), wait until none is left, then remove its network, cgroups and overlay
        work directory. Returns, in words, what of the host it found and removed."""
        if pid and not force:
            # nspawn turns SIGTERM into SIGRTMIN+3 for the container's systemd: an orderly poweroff.
            self._signal(pid, signal.SIGTERM)
            nspawn = pid
            try:
                wait_until(lambda: not localcmd.process_alive(nspawn), timeout=float(self.settings["stop_timeout_s"]),
                           what=f"{host.name} to shut down", interval=0.05)
            except WaitTimeout:
                progress(f"{host.name}: no clean shutdown within {self.settings['stop_timeout_s']}s; killing it")
            pid = self._pid(host)  # still its nspawn, not a reused pid
        processes = self._processes(host, pid)
        network = localnet.host_present(host.link)
        workdirs = host.overlay_workdirs()  # an orderly nspawn exit removes it; a killed one cannot
        try:
            killed = processes.kill()
            cgroups = containment.remove_cgroups(processes.cgroups)
        except containment.ContainmentError as err:
            raise ProviderError(str(err), image=host.name) from err
        localnet.host_down(host.link)
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)
        (host.folder / "nspawn.pid").unlink(missing_ok=True)
        host.cgroups_record.unlink(missing_ok=True)
        removed = [f"{killed} process(es)" if killed else "", f"its cgroup in {cgroups} hierarchies" if cgroups else "",
                   f"network namespace {host.link.netns}" if network else "",
                   "overlay work directory" if workdirs else ""]
        return [r for r in removed if r]

    def _clean_stale(self, host: LocalHost) -> None:
        """Remove what a crashed run left of a host whose nspawn is gone (processes, cgroups, network,
        overlay work directory), saying in one line what was cleaned."""
        cleaned = self._end(host, None, force=True)
        if cleaned:
            progress(f"{host.name}: cleaned up after an earlier run: {', '.join(cleaned)}")

    def _make_cgroups(self, host: LocalHost) -> list[Path]:
        limits = containment.Limits(memory_bytes=size_limit(self.settings["memory_max"]),
                                    pids=size_limit(self.settings["pids_max"]))
        try:
            cgroups = containment.create_cgroups(host.cgroup_name, limits)
        except containment.ContainmentError as err:
            raise ProviderError(str(err), image=host.name) from err
        atomic_write_json(host.cgroups_record, [str(c) for c in cgroups])
        return cgroups

    def _processes(self, host: LocalHost, pid: int | None = None) -> containment.HostProcesses:
        """What of the host can run: the cgroups start recorded, the ones this caller would make, its
        overlay, its nspawn."""
        recorded = [Path(p) for p in read_json(host.cgroups_record, [])]
        current = [containment.host_cgroup(h, host.cgroup_name) for h in containment.hierarchies()]
        cgroups = list(dict.fromkeys(recorded + [c for c in current if c.exists()]))
        return containment.HostProcesses(cgroups, host.upper, (pid,) if pid else ())

    def _running(self, host: LocalHost, by_upper: dict[str, set[int]] | None = None) -> bool:
        """Does any process of the host run (its nspawn, or anything left in its cgroups or on its overlay)?"""
        return self._pid(host) is not None or bool(self._processes(host).running(by_upper))

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def delete(self, image: str) -> None:
        host = self._host(image)
        if self._running(host):
            raise ProviderError("is running; stop it first", image=image)
        self._clean_stale(host)
        shutil.rmtree(host.folder)
        ssh.forget(host.address)

    def list(self) -> list[Machine]:
        by_upper = containment.processes_by_upperdir()
        return [self._machine(h, by_upper) for h in self._hosts()]

    # ------------------------------------------------------------------ helpers
    def _machine(self, host: LocalHost, by_upper: dict[str, set[int]] | None = None) -> Machine:
        # Running while anything of it runs, even with its nspawn gone: a stop then ends the rest.
        running = self._running(host, by_upper)
        return Machine(
            name=host.name, provider=self.name, state=RUNNING if running else STOPPED,
            macs=[host.mac], addresses=[host.address],
            detail={"env": host.env, "folder": str(host.folder), "netns": host.link.netns},
        )

    def _pid(self, host: LocalHost) -> int | None:
        """The host's nspawn process id if it is alive (not a zombie) and really its nspawn."""
        try:
            pid = int((host.folder / "nspawn.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not localcmd.process_alive(pid, b"systemd-nspawn"):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if f"--uuid={host.uuid}".encode() not in cmdline:  # not a reused pid
            return None
        return pid


# Each container's systemd takes several inotify instances; the kernel's default of 128 per user
# runs out at a few dozen hosts ("Failed to allocate manager object: Too many open files").
INOTIFY_MINIMUMS = {"max_user_instances": 2048, "max_user_watches": 524288}


def ensure_inotify_limits() -> None:
    for name, minimum in INOTIFY_MINIMUMS.items():
        path = Path("/proc/sys/fs/inotify") / name
        try:
            if int(path.read_text()) < minimum:
                path.write_text(f"{minimum}\n")
                progress(f"local: raised fs.inotify.{name} to {minimum} so many hosts can boot")
        except (OSError, ValueError):
            pass  # not root or no procfs: nspawn will say so if it matters


def _last_error(console: Path) -> str:
    """The last line of a console log that looks like an error, without terminal colours."""
    import re

    try:
        lines = console.read_text(errors="replace").splitlines()
    except OSError:
        return "no console output"
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in lines]
    errors = [line for line in plain if line and ("Fail" in line or "rror" in line) and "symlink" not in line]
    return (errors or [line for line in plain if line] or ["no console output"])[-1][:160]
PROVIDER = LocalProvider
