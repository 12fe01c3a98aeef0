"""The ``libvirt`` provider: real virtual machines through the libvirt API (QEMU/KVM, or TCG).

* Driven only through the libvirt Python bindings: domains, storage pools and volumes; no ``virsh``.
* Each VM ("image" in booted's words) is a domain named ``booted-<owner>-<image>`` whose metadata
  holds booted's record of it (image, address, MAC, environment): the domain is the record, so
  ``image-list`` reads the hypervisor, not a file that could disagree with it. ``<owner>`` is a tag
  of booted's state dir, so two state dirs (a user's and a test's) never touch each other's VMs.
* Disks are volumes in a directory pool over ``storage_dir``: the base image (built once, see
  image.py), and per VM a qcow2 overlay on it plus a small read-only seed disk with its identity.
* Direct kernel boot; ``domain_type`` ``auto`` picks ``kvm`` only where the CPU has hardware
  virtualisation, else ``qemu`` (TCG) with a 64 MiB translation cache.
* Networking: a bridge booted manages (``bridge``, ``subnet``; the gateway address is this machine),
  a static address per VM from the subnet, written to its seed disk. VMs call home to booted's
  nginx on the gateway address; the inventory learns their addresses from there.

Hypervisors are held by name (today one, ``default``); each VM's record says where it lives, so an
instance can hold several connections later.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

from fabfile.core import names, ssh
from fabfile.core.errors import ProviderError, WaitTimeout
from fabfile.core.output import progress, wait_until
from fabfile.core.state import locked, state_dir
from fabfile.hosts import callhome
from fabfile.providers.base import RUNNING, STOPPED, Machine, Provider
from fabfile.providers.libvirt import domainxml, hypervisor, image, install
from fabfile.providers.libvirt.domainxml import DomainPlan, HostRecord
from fabfile.providers.libvirt.hypervisor import Hypervisor, bindings
from fabfile.providers.libvirt.placement import DEFAULT_HYPERVISOR, hypervisors_from_settings
from fabfile.providers.local import network as localnet
from fabfile.providers.local.provider import HOST_PROVISION, LocalProvider, image_cache_dir


def owner_tag() -> str:
    """This state dir's tag in domain names and records."""
    return hashlib.sha1(str(state_dir()).encode()).hexdigest()[:8]


def _states():
    lv = bindings()
    return {
        lv.VIR_DOMAIN_RUNNING: RUNNING, lv.VIR_DOMAIN_BLOCKED: RUNNING, lv.VIR_DOMAIN_SHUTOFF: STOPPED,
        lv.VIR_DOMAIN_PAUSED: "paused", lv.VIR_DOMAIN_SHUTDOWN: "stopping", lv.VIR_DOMAIN_CRASHED: "crashed",
        lv.VIR_DOMAIN_PMSUSPENDED: "suspended", lv.VIR_DOMAIN_NOSTATE: "unknown",
    }


class LibvirtProvider(Provider):
    name = "libvirt"

    def __init__(self, config):
        super().__init__(config)
        self.hypervisors = {name: Hypervisor(name, spec.uri)
                            for name, spec in hypervisors_from_settings(self.settings).items()}
        self._pools: dict[str, object] = {}
        self._base: image.BaseImage | None = None
        # a kickstart install fetches its kickstart from booted's nginx (the build flow starts it)
        self.build_needs_endpoint = self.settings["install"] == "kickstart"

    # ------------------------------------------------------------------ settings
    @property
    def subnet(self) -> localnet.Subnet:
        return localnet.Subnet.parse(self.settings["subnet"])

    @property
    def bridge(self) -> str:
        return self.settings["bridge"]

    @property
    def storage_dir(self) -> Path:
        return Path(self.settings["storage_dir"])

    def domain_name(self, image_name: str) -> str:
        return f"booted-{owner_tag()}-{names.check('image', image_name)}"

    def hypervisor(self, name: str = DEFAULT_HYPERVISOR) -> Hypervisor:
        return self.hypervisors[name]

    def installed(self) -> bool:
        """Without the bindings, or with no libvirtd answering for a local hypervisor, booted runs no VM
        here (so env-stop of the last other environment may stop booted's nginx)."""
        if hypervisor.libvirt is None:
            return False
        return any(not hv.local or hypervisor.SOCKET.exists() for hv in self.hypervisors.values())

    def booted_address(self) -> str:
        """Where VMs reach booted's nginx: this machine's address on the bridge (the subnet's gateway)."""
        return self.subnet.gateway

    def installer_networks(self) -> list[str]:
        """A kickstart install fetches its kickstart from booted's nginx over the bridge."""
        return [str(self.subnet.network)] if self.settings["install"] == "kickstart" else []

    def endpoint_ready(self) -> None:
        """booted's bridge, with the gateway address nginx listens on (on this machine's daemon)."""
        if self.hypervisor().local:
            localnet.ensure_bridge(self.bridge, self.subnet)

    # ------------------------------------------------------------------ storage
    def pool(self, hv: Hypervisor):
        """The directory pool over ``storage_dir`` on ``hv`` (defined and started on first use)."""
        if hv.name in self._pools:
            return self._pools[hv.name]
        lv = bindings()
        with locked("libvirt-pool"):  # VMs are built in parallel; one defines the pool
            if hv.name not in self._pools:
                self._pools[hv.name] = self._open_pool(hv, lv)
            return self._pools[hv.name]

    def _open_pool(self, hv: Hypervisor, lv):
        path = str(self.storage_dir)
        pool_name = "booted-" + hashlib.sha1(path.encode()).hexdigest()[:10]
        try:
            pool = hv.conn.storagePoolLookupByName(pool_name)
        except lv.libvirtError:
            pool = hv.conn.storagePoolDefineXML(domainxml.render_dir_pool(pool_name, path), 0)
            if hv.local:
                # qemu runs as its own user: it must be able to walk into the storage dir
                os.makedirs(path, mode=0o711, exist_ok=True)
        if not pool.isActive():
            try:
                pool.create(0)
            except lv.libvirtError as err:
                raise ProviderError(f"storage pool {path} on {hv.uri}: {err.get_error_message()}") from None
        return pool

    def _volume(self, hv: Hypervisor, name: str):
        lv = bindings()
        try:
            return self.pool(hv).storageVolLookupByName(name)
        except lv.libvirtError:
            return None

    def _store_file(self, hv: Hypervisor, src: Path, name: str):
        """Make a volume ``name`` in ``hv``'s pool holding the bytes of local file ``src`` (replacing one).

        On this machine's own daemon the file is linked (or copied) into the pool's directory; elsewhere
        it goes through libvirt's stream upload, which serves a remote hypervisor as well.
        """
        lv = bindings()
        pool = self.pool(hv)
        old = self._volume(hv, name)
        if old is not None:
            old.delete(0)
        if hv.local and self.storage_dir.is_dir():
            dest = self.storage_dir / name
            tmp = self.storage_dir / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, dest)
            pool.refresh(0)
            vol = self._volume(hv, name)
            if vol is not None:
                return vol
            dest.unlink(missing_ok=True)  # a driver that does not read the directory: upload instead
        size = src.stat().st_size
        vol = pool.createXML(domainxml.render_raw_volume(name, size), 0)
        try:
            self._upload(hv, vol, src)
        except BaseException:
            try:
                vol.delete(0)
            except lv.libvirtError:
                pass
            raise
        return vol

    @staticmethod
    def _upload(hv: Hypervisor, vol, src: Path) -> None:
        lv = bindings()
        stream = hv.conn.newStream(0)
        try:
            vol.upload(stream, 0, src.stat().st_size, 0)
            with open(src, "rb") as fh:
                stream.sendAll(lambda _stream, nbytes, f: f.read(nbytes), fh)
            stream.finish()
        except lv.libvirtError as err:
            try:
                stream.abort()
            except lv.libvirtError:
                pass
            raise ProviderError(f"libvirt {hv.uri}: uploading {src.name}: {err.get_error_message()}") from None

    def base_image(self) -> image.BaseImage:
        """The VM base image on this machine, built from the local provider's root file system."""
        if self._base is None:
            local = LocalProvider(self.config)
            rootfs = local.ensure_image(refresh=False)
            cache = image_cache_dir() / local.suite / "libvirt"
            self._base = image.ensure_base(rootfs, local.image_marker(), cache, int(self.settings["disk_mb"]),
                                           HOST_PROVISION)
        return self._base

    def ensure_base_volumes(self, hv: Hypervisor) -> dict[str, str]:
        """The base image's volumes on ``hv`` (copied there if missing): role -> path there."""
        base = self.base_image()
        paths = {}
        with locked("libvirt-base-volumes", timeout=image.BASE_BUILD_WAIT_S):  # VMs are built in parallel; one copies the base
            for role, src in (("disk", base.disk), ("kernel", base.kernel), ("initrd", base.initrd)):
                vol = self._volume(hv, src.name)
                if vol is None:  # the name carries the digest: a present volume is this base (copies are atomic)
                    progress(f"libvirt: copying {src.name} to the storage pool on {hv.uri}")
                    vol = self._store_file(hv, src, src.name)
                paths[role] = vol.path()
            self._drop_stale_bases(hv, keep=base.digest)
        return paths

    def _drop_stale_bases(self, hv: Hypervisor, keep: str) -> None:
        """Delete base images of older recipes that no domain on ``hv`` (anyone's) boots from."""
        lv = bindings()
        in_use = {keep}
        for dom in hv.conn.listAllDomains(0):
            try:
                text = dom.XMLDesc(0)
            except lv.libvirtError:
                return  # cannot tell: keep everything
            in_use.update(part.split(".")[0] for part in text.split("booted-base-")[1:])
        for vol in self.pool(hv).listAllVolumes(0):
            name = vol.name()
            if name.startswith("booted-base-") and name[len("booted-base-"):].split(".")[0] not in in_use:
                try:
                    vol.delete(0)
                except lv.libvirtError:
                    pass

    # ------------------------------------------------------------------ records
    def _domains(self):
        """(hypervisor, domain, record) for every VM of this state dir, on every hypervisor."""
        lv = bindings()
        tag = owner_tag()
        out = []
        for hv in self.hypervisors.values():
            try:
                domains = hv.conn.listAllDomains(0)
            except lv.libvirtError as err:
                raise ProviderError(f"libvirt {hv.uri}: {err.get_error_message()}") from None
            for dom in domains:
                try:
                    text = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, domainxml.NAMESPACE, 0)
                except lv.libvirtError:
                    continue  # not booted's, or gone between the list and the lookup
                record = HostRecord.from_xml(text)
                if record and record.owner == tag:
                    out.append((hv, dom, record))
        return out

    def _find(self, image_name: str):
        names.check("image", image_name)
        for hv, dom, record in self._domains():
            if record.image == image_name:
                return hv, dom, record
        return None

    def _require(self, image_name: str):
        found = self._find(image_name)
        if found is None:
            raise ProviderError("no such libvirt image (build it with `fab image-build --image NAME`)", image=image_name)
        return found

    def _allocate(self, image_name: str) -> tuple[str, str]:
        """A free address and MAC (call under the hosts lock)."""
        taken = self._domains()
        used = {r.address for _, _, r in taken}
        macs = {r.mac for _, _, r in taken}
        free = [a for a in self.subnet.host_addresses() if a not in used]
        if not free:
            raise ProviderError(f"no free address left in {self.subnet.network}", image=image_name)
        while True:
            # 52:54:00 is the prefix QEMU and libvirt use for guest NICs
            mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
            if mac not in macs:
                return free[0], mac

    # ------------------------------------------------------------------ provider interface
    def build(self, image_name: str, env) -> Machine:
        if self.settings["install"] == "kickstart":
            return install.build(self, image_name, env, owner=owner_tag())
        hv = self.hypervisor()
        found = self._find(image_name)
        if found and found[1].isActive():
            raise ProviderError("is running; stop it before rebuilding", image=image_name)
        base = self.ensure_base_volumes(hv)
        with locked("libvirt-hosts"):
            if found:
                record = replace(found[2], env=env.name if env else found[2].env)
            else:
                address, mac = self._allocate(image_name)
                record = HostRecord(image=image_name, owner=owner_tag(), address=address, mac=mac,
                                    env=env.name if env else "", seed_id=str(uuid.uuid4()))
            self._define(hv, record, base, overlay_from=None, env=env, uuid_=found[1].UUIDString() if found else "")
        return self._machine(hv, self._require(image_name)[1], record)

    def clone(self, source: str, new: str, env) -> Machine:
        names.check("image", new)
        hv, src_dom, src = self._require(source)
        if src_dom.isActive():
            raise ProviderError("is running; stop it before cloning", image=source)
        if install.disk_booted(src_dom.XMLDesc(0)):
            raise ProviderError("was installed by kickstart; cloning such an image is not supported yet "
                                "(build another one)", image=source)
        if self._find(new):
            raise ProviderError("already exists", image=new)
        base = self.ensure_base_volumes(hv)
        with locked("libvirt-hosts"):
            address, mac = self._allocate(new)
            record = HostRecord(image=new, owner=owner_tag(), address=address, mac=mac,
                                env=env.name if env else src.env, seed_id=str(uuid.uuid4()))
            src_disk = self._volume(hv, f"{self.domain_name(source)}.qcow2")
            self._define(hv, record, base, overlay_from=src_disk, env=env)
        return self._machine(hv, self._require(new)[1], record)

    def _define(self, hv: Hypervisor, record: HostRecord, base: dict[str, str], overlay_from, env,
                uuid_: str = "") -> None:
        """Create the VM's volumes (unless they exist) and define (or redefine) its domain."""
        lv = bindings()
        dom_name = self.domain_name(record.image)
        pool = self.pool(hv)
        made = []
        try:
            overlay = self._volume(hv, f"{dom_name}.qcow2")
            if overlay is None:
                capacity = hv.conn.storageVolLookupByPath(base["disk"]).info()[1]
                xml = domainxml.render_overlay_volume(f"{dom_name}.qcow2", capacity, base["disk"])
                if overlay_from is None:
                    overlay = pool.createXML(xml, 0)
                else:
                    overlay = self._copy_overlay(hv, overlay_from, f"{dom_name}.qcow2", xml)
                made.append(overlay)
            seed = self._write_seed(hv, record, env)
            made.append(seed)
            plan = DomainPlan(
                name=dom_name, uuid=uuid_, domain_type=self.domain_type(hv), memory_mb=int(self.settings["memory_mb"]),
                cpus=int(self.settings["cpus"]), kernel=base["kernel"], initrd=base["initrd"], disk=overlay.path(),
                seed=seed.path(), bridge=self.bridge, mac=record.mac,
                console_log=str(self.storage_dir / f"{dom_name}.console.log"), record=record,
                tcg_cache_mb=int(self.settings["tcg_cache_mb"]),
            )
            hv.conn.defineXML(domainxml.render_domain(plan))
        except lv.libvirtError as err:
            for vol in made if not self._find(record.image) else []:
                try:
                    vol.delete(0)
                except lv.libvirtError:
                    pass
            raise ProviderError(f"libvirt {hv.uri}: {err.get_error_message()}", image=record.image) from None

    def _copy_overlay(self, hv: Hypervisor, source, name: str, xml: str):
        """A copy of a stopped VM's disk: on this machine a copy of its overlay file (a few MB, still
        backed by the base image); elsewhere libvirt's volume clone (a full, flattened copy)."""
        src = Path(source.path())
        if hv.local and self.storage_dir.is_dir() and src.is_file():
            tmp = self.storage_dir / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.storage_dir / name)
            self.pool(hv).refresh(0)
            vol = self._volume(hv, name)
            if vol is not None:
                return vol
            (self.storage_dir / name).unlink(missing_ok=True)
        return self.pool(hv).createXMLFrom(xml, source, 0)

    def _write_seed(self, hv: Hypervisor, record: HostRecord, env):
        """(Re)write the VM's seed disk from its record and the environment it belongs to."""
        conf = ""
        if env is not None:
            callhome.new_host_key(env.name, record.image)  # a rebuilt VM must not keep its old key
            conf = callhome.host_config(env.name, record.image, self.callhome_url())
        hostname = names.hostname_for(record.image)
        host_key, host_key_pub = image.new_host_key(hostname)
        seed = image.Seed(
            identity=record.seed_id, hostname=hostname, user=ssh.user(self.config),
            pubkey=Path(ssh.keypair(self.config)[1]).read_text().strip(), address=record.address,
            prefixlen=self.subnet.prefixlen, gateway=self.subnet.gateway, mac=record.mac, callhome_conf=conf,
            host_key=host_key, host_key_pub=host_key_pub,
        )
        name = f"{self.domain_name(record.image)}.seed"
        with tempfile.TemporaryDirectory(prefix="booted-seed-") as tmp:
            vol = self._store_file(hv, image.make_seed_disk(seed, Path(tmp) / name), name)
        ssh.pin(record.address, host_key_pub)  # checked from the very first connection
        return vol

    def domain_type(self, hv: Hypervisor) -> str:
        try:
            return domainxml.choose_domain_type(self.settings["domain_type"], hv.conn.getCapabilities())
        except ValueError as err:
            raise ProviderError(f"libvirt {hv.uri}: {err}") from None

    def start(self, image_name: str) -> Machine:
        lv = bindings()
        hv, dom, record = self._require(image_name)
        if dom.isActive():
            return self._machine(hv, dom, record)
        if hv.local:
            self.endpoint_ready()
        facts = domainxml.parse_domain(dom.XMLDesc(0))
        try:
            dom.create()
        except lv.libvirtError as err:
            raise ProviderError(f"did not start: {err.get_error_message()}"
                                + (f" (console: {facts.console_log})" if facts.console_log else ""),
                                image=image_name) from None
        return self._machine(hv, dom, record)

    def stop(self, image_name: str, force: bool = False) -> Machine:
        lv = bindings()
        hv, dom, record = self._require(image_name)
        if not dom.isActive():
            return self._machine(hv, dom, record)
        timeout = float(self.settings["stop_timeout_s"])
        if not force:
            try:
                dom.shutdown()  # an ACPI power-button press: the guest's systemd powers off in order
                wait_until(lambda: not dom.isActive(), timeout=timeout, what=f"{image_name} to shut down",
                           interval=0.2)
            except lv.libvirtError:
                force = True  # it went away under us, or refuses ACPI: destroy below if still running
            except WaitTimeout:
                progress(f"{image_name}: no clean shutdown within {timeout:g}s; powering it off")
                force = True
        if force and dom.isActive():
            try:
                dom.destroy()
            except lv.libvirtError as err:
                if dom.isActive():
                    raise ProviderError(f"could not power off: {err.get_error_message()}", image=image_name) from None
        return self._machine(hv, dom, record)

    def delete(self, image_name: str) -> None:
        lv = bindings()
        hv, dom, record = self._require(image_name)
        if dom.isActive():
            raise ProviderError("is running; stop it first", image=image_name)
        facts = domainxml.parse_domain(dom.XMLDesc(0))
        try:
            dom.undefineFlags(lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except lv.libvirtError as err:
            raise ProviderError(f"could not undefine: {err.get_error_message()}", image=image_name) from None
        self.pool(hv)  # the storage pool must answer before its volumes are removed
        for path in facts.disks:
            if not Path(path).name.startswith(self.domain_name(image_name) + "."):
                continue  # the shared base image and kernel stay
            try:
                hv.conn.storageVolLookupByPath(path).delete(0)
            except lv.libvirtError:
                if hv.local:
                    Path(path).unlink(missing_ok=True)
        if hv.local and facts.console_log:
            Path(facts.console_log).unlink(missing_ok=True)
        ssh.forget(record.address)

    def list(self) -> list[Machine]:
        return [self._machine(hv, dom, record) for hv, dom, record in self._domains()]

    # ------------------------------------------------------------------ helpers
    def _machine(self, hv: Hypervisor, dom, record: HostRecord) -> Machine:
        lv = bindings()
        try:
            state = _states().get(dom.state()[0], "unknown")
            facts = domainxml.parse_domain(dom.XMLDesc(0))
        except lv.libvirtError:
            state, facts = "gone", None
        return Machine(
            name=record.image, provider=self.name, state=state,
            macs=facts.macs if facts else [record.mac], addresses=[record.address],
            detail={"env": record.env or None, "hypervisor": hv.name, "domain": dom.name(),
                    "console": facts.console_log if facts else "", "taps": facts.taps if facts else []},
        )


PROVIDER = LibvirtProvider
