"""The ``libvirt`` provider: real virtual machines through the libvirt API (QEMU/KVM, or TCG).

* Driven only through the libvirt Python bindings: domains, storage pools and volumes; no ``virsh``.
* Each VM ("image" in booted's words) is, while it runs, a *transient* libvirt domain named
  ``booted-<owner>-<image>`` whose metadata holds booted's record of it (image, address, MAC,
  environment). A stopped VM is no domain at all: its volumes, and booted's record of it
  (``state/libvirt/vms.json``: where it lives, its record, the domain XML booted starts it as).
  So ``env-stop`` leaves nothing in libvirt (no domain, tap or qemu), a VM that powers itself off
  vanishes from libvirt the same way, and ``image-list`` asks the hypervisor which VMs run.
  ``<owner>`` is a tag of booted's state dir, so two state dirs (a user's and a test's) never touch
  each other's VMs. Domains an earlier booted defined persistently are adopted (their XML into the
  record, the definition dropped) the first time booted sees them.
* Disks are volumes in a directory pool over ``storage_dir``: the base image (built once, see
  image.py), and per VM a qcow2 overlay on it plus a small read-only seed disk with its identity.
* Direct kernel boot; ``domain_type`` ``auto`` picks ``kvm`` only where the CPU has hardware
  virtualisation, else ``qemu`` (TCG) with a 64 MiB translation cache.
* Networking: a bridge booted manages (``bridge``, ``subnet``; the gateway address is this machine),
  a static address per VM from the subnet, written to its seed disk. VMs call home to booted's
  nginx on the gateway address; the inventory learns their addresses from there.

Several machines: ``hypervisors`` names libvirt connections (``qemu+ssh://root@hv1/system``); each VM
is placed on one by placement.py's rules when it is first built (an environment's ``placement`` pins
images), and booted's record says where, so the choice is stable across runs and known while that
hypervisor does not answer. A VM on a hypervisor that does not answer is ``unreachable``; starting it
builds it afresh on a hypervisor that answers (same name, address and MAC, a new host key). What is
left of it on the old hypervisor, if that one returns (a running domain, its volumes), is stale and
removed when booted next builds or starts a VM there.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from fabfile.core import names, ssh
from fabfile.core.errors import ProviderError, WaitTimeout
from fabfile.core.output import poll, progress, wait_until
from fabfile.core.state import locked, state_dir
from fabfile.hosts import callhome
from fabfile.providers import bridge, get_provider, rootfs
from fabfile.providers.base import RUNNING, STOPPED, UNREACHABLE, Machine, Provider
from fabfile.providers.libvirt import domainxml, hypervisor, image, install
from fabfile.providers.libvirt.domainxml import DomainPlan, HostRecord
from fabfile.providers.libvirt.hypervisor import Hypervisor, HypervisorUnreachable, bindings
from fabfile.providers.libvirt.placement import (
    DEFAULT_HYPERVISOR,
    HypervisorSpec,
    Placement,
    PlacementError,
    environment_vms,
    hypervisors_from_settings,
    place,
)
from fabfile.providers.libvirt.records import Placed, Vm, VmRecords, domain_of


def owner_tag() -> str:
    """This state dir's tag in domain names and records."""
    return hashlib.sha1(str(state_dir()).encode()).hexdigest()[:8]


# How long a pool rescan waits for another volume job in that pool (an upload of a base image
# to a remote hypervisor's pool takes about 20 s per 800 MB).
POOL_BUSY_WAIT_S = 600

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
        self.specs: dict[str, HypervisorSpec] = hypervisors_from_settings(self.settings)
        timeout = float(self.settings.get("connect_timeout_s") or hypervisor.CONNECT_TIMEOUT_S)
        self.hypervisors = {name: Hypervisor(name, spec.uri, timeout) for name, spec in self.specs.items()}
        self._pools: dict[str, object] = {}
        self._base: image.BaseImage | None = None
        self.records = VmRecords()
        self._noted_down: set[str] = set()
        # a kickstart install fetches its kickstart from booted's nginx (the build flow starts it)
        self.build_needs_endpoint = self.settings["install"] == "kickstart"

    # ------------------------------------------------------------------ settings
    @property
    def subnet(self) -> bridge.Subnet:
        return bridge.Subnet.parse(self.settings["subnet"])

    @property
    def bridge(self) -> str:
        return self.settings["bridge"]

    @property
    def storage_dir(self) -> Path:
        return Path(self.settings["storage_dir"])

    def domain_name(self, image_name: str) -> str:
        return f"booted-{owner_tag()}-{names.check('image', image_name)}"

    def hypervisor(self, name: str = DEFAULT_HYPERVISOR) -> Hypervisor:
        if name not in self.hypervisors:
            raise ProviderError(f"hypervisor {name!r} is not configured (known: {', '.join(self.hypervisors)})")
        return self.hypervisors[name]

    def bridge_on(self, hv: Hypervisor) -> str:
        """The bridge VMs on ``hv`` join: its own ``bridge`` setting, else the provider's."""
        return self.specs[hv.name].bridge or self.bridge

    def callhome_address_on(self, hv: Hypervisor) -> str:
        """Where VMs on ``hv`` reach booted's nginx."""
        return self.specs[hv.name].callhome_address or self.booted_address()

    def installed(self) -> bool:
        """Without the bindings, or with no libvirtd answering for a local hypervisor, booted runs no VM
        here (so env-stop of the last other environment may stop booted's nginx)."""
        if hypervisor.libvirt is None:
            return False
        return any(not hv.local or hypervisor.SOCKET.exists() for hv in self.hypervisors.values())

    def booted_address(self) -> str:
        """Where VMs reach booted's nginx: ``callhome_address``, else this machine's address on the
        subnet (its gateway; on several machines, the controller's address on the shared network)."""
        return self.settings.get("callhome_address") or self.subnet.gateway

    def booted_addresses(self) -> list[str]:
        """Every address VMs call home to (a hypervisor may name its own ``callhome_address``)."""
        out = [self.booted_address()]
        for spec in self.specs.values():
            if spec.callhome_address and spec.callhome_address not in out:
                out.append(spec.callhome_address)
        return out

    def installer_networks(self) -> list[str]:
        """A kickstart install fetches its kickstart from booted's nginx over the bridge."""
        return [str(self.subnet.network)] if self.settings["install"] == "kickstart" else []

    def endpoint_ready(self) -> None:
        """booted's bridge, with the gateway address nginx listens on, when VMs run on this machine's
        daemon. For remote hypervisors the user's LAN bridge holds this machine's address (README)."""
        if any(hv.local for hv in self.hypervisors.values()):
            bridge.ensure_bridge(self.bridge, self.subnet)

    # ------------------------------------------------------------------ storage
    def pool(self, hv: Hypervisor):
        """The directory pool over ``storage_dir`` on ``hv`` (defined and started on first use)."""
        if hv.name in self._pools:
            return self._pools[hv.name]
        lv = bindings()
        with locked("libvirt-pool"):  # VMs are built in parallel; one defines the pool
            if hv.name not in self._pools:
                try:
                    self._pools[hv.name] = self._open_pool(hv, lv)
                except lv.libvirtError as err:
                    raise hv.failure(err) from None
            return self._pools[hv.name]

    def refresh_pool(self, hv: Hypervisor) -> None:
        """Rescan ``hv``'s pool for a file booted put in its folder. libvirt refuses while a volume
        job runs in the pool ("pool '...' has asynchronous jobs running": another VM's seed or base
        upload, with VMs built in parallel), so wait for that job instead of failing the build."""
        lv = bindings()
        busy: list = []

        def rescanned() -> bool:
            try:
                self.pool(hv).refresh(0)
                return True
            except lv.libvirtError as err:
                if "asynchronous jobs running" not in (err.get_error_message() or ""):
                    raise
                busy[:] = [err]
                return False

        if not poll(rescanned, timeout=POOL_BUSY_WAIT_S, interval=0.1):
            raise busy[0]

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
            else:
                try:
                    pool.build(lv.VIR_STORAGE_POOL_BUILD_NO_OVERWRITE)  # mkdir on the hypervisor
                except lv.libvirtError:
                    pass  # it exists
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

    def _store_file(self, hv: Hypervisor, src: Path, name: str, link: bool = True):
        """Make a volume ``name`` in ``hv``'s pool holding the bytes of local file ``src`` (replacing one).

        On this machine's own daemon the file is put into the pool's directory (``_put_in_pool``);
        elsewhere it goes through libvirt's stream upload, which serves a remote hypervisor as well.
        """
        lv = bindings()
        pool = self.pool(hv)
        old = self._volume(hv, name)
        if old is not None:
            old.delete(0)
        vol = self._put_in_pool(hv, src, name, link=link)
        if vol is not None:
            return vol
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

    def _rootfs(self) -> tuple[rootfs.DebianRootfs, Path]:
        """The root file system the base image is made of (the local provider's suite), made sure of,
        and the folder the base image is cached in."""
        fs = rootfs.DebianRootfs(self.config.provider_settings("local")["suite"])
        # a rebuild must not pull it from under local hosts running on it (the local provider knows)
        fs.ensure(refresh=False, in_use=lambda: any(m.running for m in get_provider("local", self.config).list()))
        return fs, rootfs.image_cache_dir() / fs.suite / "libvirt"

    def base_image(self) -> image.BaseImage:
        """The VM base image on this machine, built from booted's Debian root file system."""
        if self._base is None:
            fs, cache = self._rootfs()
            self._base = image.ensure_base(fs.root, fs.marker, cache, int(self.settings["disk_mb"]),
                                           image.VM_PROVISION)
        return self._base

    def base_names(self) -> image.BaseImage:
        """The current base image's names (its digest), without building it."""
        if self._base is not None:
            return self._base
        fs, cache = self._rootfs()
        return image.base_files(cache, image.base_digest(fs.marker, int(self.settings["disk_mb"])))

    def ensure_base_volumes(self, hv: Hypervisor) -> dict[str, str]:
        """The base image's volumes on ``hv`` (uploaded there unless it has this exact base): role -> path.

        Only the files ``hv``'s VMs boot go there (``BaseImage.files_for``: the kernel for its domain
        type). The volumes' names carry the base's digest, and a marker volume ``<base>.complete`` is
        made only after they all arrived whole: a hypervisor has this base iff it has the marker and
        them. Without the marker every file is copied again (an upload cut short leaves none); with it,
        only a missing one (the other kernel, after the hypervisor's domain type changed), the marker
        being removed meanwhile."""
        lv = bindings()
        base = self.base_names()  # a hypervisor holding this base needs no copy of it here
        marker = f"booted-base-{base.digest}.complete"
        paths = {}
        # VMs are built in parallel; one copies the base to each hypervisor (two hypervisors at once)
        with locked(f"libvirt-base-volumes-{hv.name}", timeout=1800):
            try:
                domain_type = self.domain_type(hv)
                have = {role: self._volume(hv, src.name) for role, src in base.files_for(domain_type).items()}
                marked = self._volume(hv, marker)
                # without the marker nothing there counts (a copy cut short); with it, only what is missing
                to_copy = [role for role, vol in have.items() if vol is None or marked is None]
                if to_copy:
                    base = self.base_image()
                    if marked is not None:
                        marked.delete(0)  # a copy cut short below must not count as whole
                for role, src in base.files_for(domain_type).items():
                    vol = have[role]
                    if role in to_copy:
                        started = time.monotonic()
                        progress(f"libvirt: copying {src.name} ({src.stat().st_size // 2**20} MB) to the storage "
                                 f"pool on {hv.where}")
                        vol = self._store_file(hv, src, src.name)
                        progress(f"libvirt: {src.name} on {hv.name} in {time.monotonic() - started:.1f}s")
                    paths[role] = vol.path()
                if to_copy:
                    self.pool(hv).createXML(domainxml.render_raw_volume(marker, 0), 0)
                self._drop_stale_bases(hv, keep=base.digest)
            except lv.libvirtError as err:
                raise hv.failure(err) from None
        return paths

    def _drop_stale_bases(self, hv: Hypervisor, keep: str) -> None:
        """Delete base images of older recipes that nothing on ``hv`` uses: no running domain (anyone's)
        boots from one, no overlay in the pool (any state dir's, stopped VMs' too) is backed by one."""
        lv = bindings()
        in_use = {keep}
        try:
            volumes = self.pool(hv).listAllVolumes(0)
            texts = [dom.XMLDesc(0) for dom in hv.conn.listAllDomains(0)]
            texts += [vol.XMLDesc(0) for vol in volumes if not vol.name().startswith("booted-base-")]
        except lv.libvirtError:
            return  # cannot tell: keep everything
        for text in texts:
            in_use.update(part.split(".")[0] for part in text.split("booted-base-")[1:])
        for vol in volumes:
            name = vol.name()
            if name.startswith("booted-base-") and name[len("booted-base-"):].split(".")[0] not in in_use:
                try:
                    vol.delete(0)
                except lv.libvirtError:
                    pass

    # ------------------------------------------------------------------ records
    def _scan(self, only: str | None = None) -> tuple[list[Vm], dict[str, str], dict[str, Placed]]:
        """(vms, down, records): ``vms``: every built VM of this state dir on every hypervisor that
        answers, with its running domain if it runs; ``down``: {name: why} for hypervisors that do not
        answer; ``records``: booted's records as the scan left them. ``only``: that hypervisor alone."""
        lv = bindings()
        tag = owner_tag()
        records = self.records.load()
        vms, down = [], {}
        for hv in self.hypervisors.values():
            if only is not None and hv.name != only:
                continue
            try:
                domains = hv.conn.listAllDomains(0)
            except (HypervisorUnreachable, lv.libvirtError) as err:
                failure = err if isinstance(err, HypervisorUnreachable) else hv.failure(err)
                if len(self.hypervisors) == 1:
                    raise failure from None  # one machine: nothing to fail over to
                down[hv.name] = str(failure)
                continue
            running = {}
            for dom in domains:
                try:
                    record = HostRecord.from_xml(dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, domainxml.NAMESPACE, 0))
                    if not record or record.owner != tag:
                        continue
                    placed = records.get(record.image)
                    if placed is not None and placed.hv != hv.name:
                        continue  # stale: the VM was rebuilt elsewhere while this hypervisor was away
                    if placed is None or not placed.domain or dom.isPersistent():
                        placed = self._adopt(hv, dom, record)
                        if placed is not None:
                            records[record.image] = placed
                    if placed is not None and placed.domain and dom.isActive():
                        running[record.image] = dom
                except lv.libvirtError:
                    continue  # not booted's, or gone between the list and the lookup
            for image_name, placed in records.items():
                if placed.hv == hv.name and placed.domain:
                    vms.append(Vm(hv, placed.record, placed.domain, running.get(image_name)))
        for name in down:
            if name not in self._noted_down:
                self._noted_down.add(name)
                progress(f"libvirt: {down[name]}; its VMs are {UNREACHABLE}")
        return vms, down, records

    def _adopt(self, hv: Hypervisor, dom, record: HostRecord) -> Placed | None:
        """One of this state dir's domains booted has no record of (an earlier booted defined its VMs
        persistently; or the record was lost): its XML goes into booted's record, and a persistent
        definition is dropped (a running VM stays running, as a transient domain). Not an installer's
        domain (install.py, persistent while the install runs): its build owns it."""
        lv = bindings()
        with locked("libvirt-hosts"):
            placed = self.records.load().get(record.image)
            if placed is None or not placed.domain:
                text = dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)
                if not domain_of(text, record) or domainxml.parse_domain(text).cdroms:
                    return placed
                placed = Placed(hv.name, record, text)
                self.records.put(placed)
            if dom.isPersistent():
                dom.undefineFlags(lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        return placed

    def _vms(self) -> list[Vm]:
        return self._scan()[0]

    def _find(self, image_name: str) -> Vm | None:
        names.check("image", image_name)
        placed = self.records.load().get(image_name)
        if placed is None or not placed.domain:
            return None
        vms = self._scan(only=placed.hv if placed.hv in self.hypervisors else None)[0]
        return next((vm for vm in vms if vm.record.image == image_name), None)

    def _require(self, image_name: str) -> Vm:
        found = self._find(image_name)
        if found is None:
            placed = self.records.load().get(image_name)
            if placed and placed.domain:
                why = self.hypervisor(placed.hv).check() if placed.hv in self.hypervisors else None
                if why:
                    raise HypervisorUnreachable(f"{image_name}: its hypervisor does not answer: {why}")
            raise ProviderError("no such libvirt image (build it with `fab image-build --image NAME`)", image=image_name)
        return found

    def _allocate(self, image_name: str) -> tuple[str, str]:
        """A free address and MAC (call under the hosts lock): not a VM's, nor a hypervisor's own."""
        taken = [p.record for p in self.records.load().values()]
        used = {r.address for r in taken} | self._hypervisor_addresses()
        macs = {r.mac for r in taken}
        free = [a for a in self.subnet.host_addresses() if a not in used]
        if not free:
            raise ProviderError(f"no free address left in {self.subnet.network}", image=image_name)
        while True:
            # 52:54:00 is the prefix QEMU and libvirt use for guest NICs
            mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
            if mac not in macs:
                return free[0], mac

    def _hypervisor_addresses(self) -> set[str]:
        return {urlsplit(spec.uri).hostname or "" for spec in self.specs.values()} | set(self.booted_addresses())

    # ------------------------------------------------------------------ placement
    def plan(self, down: set[str] | frozenset[str] = frozenset()) -> Placement:
        """Where every VM of this provider's environments runs (placement.place; pure).

        Current places come from booted's records; ``down``: the hypervisors that do not answer now."""
        current = {image: placed.hv for image, placed in self.records.load().items()}
        vms, pins = [], {}
        memory = int(self.settings["memory_mb"])
        for env in self.config.environments.values():
            if env.provider != self.name:
                continue
            vms += environment_vms(env.images, env.loadbalancers, env.workers, env.name, memory)
            pins.update(env.pins())
        known = {vm.image for vm in vms}
        vms += environment_vms([i for i in current if i not in known], [], [], "", memory)
        return place(self.specs, vms, current, pins, down)

    def down_hypervisors(self) -> dict[str, str]:
        """{name: why} for the configured hypervisors that do not answer now."""
        out = {}
        for hv in self.hypervisors.values():
            why = hv.check()
            if why:
                out[hv.name] = why
        return out

    def _place(self, image_name: str) -> Hypervisor:
        """The hypervisor a new (or lost) VM goes to (call under the hosts lock)."""
        down = self.down_hypervisors()
        if len(self.hypervisors) == 1 and down:
            raise HypervisorUnreachable(next(iter(down.values())))
        plan = self.plan(set(down))
        if image_name not in plan.where:
            why = plan.unplaced.get(image_name, "not in any environment")
            raise PlacementError(f"{image_name}: cannot be placed: {why}")
        where = plan.where[image_name]
        if down:  # say so when a hypervisor that does not answer changed where this VM goes
            meant = self.plan().where.get(image_name)
            if meant in down and meant != where:
                progress(f"{image_name}: placed on {where}, not {meant}: {down[meant]}")
        return self.hypervisor(where)

    def _remove_stale(self, hv: Hypervisor) -> None:
        """Remove what is left on ``hv`` of this state dir's VMs that booted's records place elsewhere
        (a VM rebuilt on another hypervisor while this one was away): a running domain, and volumes."""
        lv = bindings()
        tag = owner_tag()
        placed = {image: p.hv for image, p in self.records.load().items()}

        def elsewhere(image_name: str) -> bool:
            return placed.get(image_name, hv.name) != hv.name

        try:
            domains = hv.conn.listAllDomains(0)
            volumes = self.pool(hv).listAllVolumes(0)
        except (lv.libvirtError, HypervisorUnreachable, ProviderError):
            return
        for dom in domains:
            try:
                record = HostRecord.from_xml(dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, domainxml.NAMESPACE, 0))
                if not record or record.owner != tag or not elsewhere(record.image):
                    continue
                progress(f"libvirt: {record.image} runs on {hv.name} but booted placed it on "
                         f"{placed[record.image]}; stopping the stale copy")
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
            except lv.libvirtError:
                continue
        prefix = f"booted-{tag}-"
        for vol in volumes:
            stem, _, suffix = vol.name().rpartition(".")
            if stem.startswith(prefix) and suffix in ("qcow2", "seed") and elsewhere(stem[len(prefix):]):
                try:
                    vol.delete(0)
                    progress(f"libvirt: removed the stale copy of {stem[len(prefix):]}'s {suffix} from {hv.name}")
                except lv.libvirtError:
                    continue

    # ------------------------------------------------------------------ provider interface
    def build(self, image_name: str, env) -> Machine:
        if self.settings["install"] == "kickstart":
            return install.build(self, image_name, env, owner=owner_tag())
        found = self._find(image_name)
        if found and found.dom is not None:
            raise ProviderError("is running; stop it before rebuilding", image=image_name)
        old = None
        with locked("libvirt-hosts"):
            if found:
                hv = found.hv
                record = replace(found.record, env=env.name if env else found.record.env)
            else:
                hv = self._place(image_name)
                old = self.records.load().get(image_name)
                if old:  # lost with its hypervisor (or a build cut short): the same identity
                    record = replace(old.record, env=env.name if env else old.record.env)
                else:
                    address, mac = self._allocate(image_name)
                    record = HostRecord(image=image_name, owner=owner_tag(), address=address, mac=mac,
                                        env=env.name if env else "", seed_id=str(uuid.uuid4()))
            # placed (parallel builds see it); built once its domain XML is recorded below
            self.records.put(Placed(hv.name, record, found.domain if found else ""))
        self._remove_stale(hv)
        try:
            base = self.ensure_base_volumes(hv)
            domain = self._compose(hv, record, base, overlay_from=None, env=env,
                                   uuid_=domainxml.parse_domain(found.domain).uuid if found else "")
        except BaseException:
            if not found and not old:
                with locked("libvirt-hosts"):
                    self.records.drop(image_name)  # not built: not placed
            raise
        with locked("libvirt-hosts"):
            self.records.put(Placed(hv.name, record, domain))
        return self._machine(self._require(image_name))

    def clone(self, source: str, new: str, env) -> Machine:
        names.check("image", new)
        src = self._require(source)
        if src.dom is not None:
            raise ProviderError("is running; stop it before cloning", image=source)
        if install.disk_booted(src.domain):
            raise ProviderError("was installed by kickstart; cloning such an image is not supported yet "
                                "(build another one)", image=source)
        hv = src.hv  # a clone stays with its source's disk
        base = self.ensure_base_volumes(hv)
        with locked("libvirt-hosts"):
            if new in self.records.load():
                raise ProviderError("already exists", image=new)
            address, mac = self._allocate(new)
            record = HostRecord(image=new, owner=owner_tag(), address=address, mac=mac,
                                env=env.name if env else src.record.env, seed_id=str(uuid.uuid4()))
            self.records.put(Placed(hv.name, record))
            try:
                src_disk = self._volume(hv, f"{self.domain_name(source)}.qcow2")
                domain = self._compose(hv, record, base, overlay_from=src_disk, env=env)
            except BaseException:
                self.records.drop(new)
                raise
            self.records.put(Placed(hv.name, record, domain))
        return self._machine(self._require(new))

    def _compose(self, hv: Hypervisor, record: HostRecord, base: dict[str, str], overlay_from, env,
                 uuid_: str = "") -> str:
        """Create the VM's volumes (its overlay unless it exists; its seed afresh); its domain XML."""
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
            plan = DomainPlan(
                name=dom_name, uuid=uuid_ or str(uuid.uuid4()), domain_type=self.domain_type(hv),
                memory_mb=int(self.settings["memory_mb"]), cpus=int(self.settings["cpus"]), kernel=base["kernel"],
                initrd=base["initrd"], disk=overlay.path(), seed=seed.path(), bridge=self.bridge_on(hv),
                mac=record.mac, console_log=str(self.storage_dir / f"{dom_name}.console.log"), record=record,
                tcg_cache_mb=int(self.settings["tcg_cache_mb"]),
                cmdline=domainxml.vm_cmdline(record.address, self.subnet.prefixlen, self.subnet.gateway, record.mac),
            )
            return domainxml.render_domain(plan)
        except lv.libvirtError as err:
            for vol in made:
                try:
                    vol.delete(0)
                except lv.libvirtError:
                    pass
            raise ProviderError(f"{hv.where}: {err.get_error_message()}", image=record.image) from None

    def _put_in_pool(self, hv: Hypervisor, src: Path, name: str, link: bool = False):
        """On this machine's own daemon: ``src`` as file ``name`` of the pool's directory (hard-linked if
        ``link`` and possible, else copied; replaced atomically), and its volume. None where the pool is
        not a directory here, or the driver does not see the file: the caller uploads or clones instead.
        No link for a file that must keep its owner and mode: libvirt gives pool files to the qemu user."""
        if not (hv.local and self.storage_dir.is_dir()):
            return None
        dest = self.storage_dir / name
        tmp = self.storage_dir / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            if not link:
                raise OSError("copy")
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
        self.refresh_pool(hv)
        vol = self._volume(hv, name)
        if vol is None:
            dest.unlink(missing_ok=True)
        return vol

    def _copy_overlay(self, hv: Hypervisor, source, name: str, xml: str):
        """A copy of a stopped VM's disk: on this machine a copy of its overlay file (a few MB, still
        backed by the base image); elsewhere libvirt's volume clone (a full, flattened copy)."""
        src = Path(source.path())
        vol = self._put_in_pool(hv, src, name) if src.is_file() else None
        return vol if vol is not None else self.pool(hv).createXMLFrom(xml, source, 0)

    def _write_seed(self, hv: Hypervisor, record: HostRecord, env):
        """(Re)write the VM's seed disk from its record and the environment it belongs to."""
        conf = ""
        if env is not None:
            callhome.new_host_key(env.name, record.image)  # a rebuilt VM must not keep its old key
            conf = callhome.host_config(env.name, record.image, callhome.callhome_url(
                self.callhome_address_on(hv), self.config.nginx["port"]))
        hostname = names.hostname_for(record.image)
        host_key = rootfs.HostKey.new(hostname)
        seed = image.Seed(
            identity=record.seed_id, hostname=hostname, user=ssh.user(self.config),
            pubkey=Path(ssh.keypair(self.config)[1]).read_text().strip(), address=record.address,
            prefixlen=self.subnet.prefixlen, gateway=self.subnet.gateway, mac=record.mac, callhome_conf=conf,
            host_key=host_key,
        )
        name = f"{self.domain_name(record.image)}.seed"
        with tempfile.TemporaryDirectory(prefix="booted-seed-") as tmp:
            vol = self._store_file(hv, image.make_seed_disk(seed, Path(tmp) / name), name)
        ssh.pin(record.address, host_key.public)  # checked from the very first connection
        return vol

    def domain_type(self, hv: Hypervisor) -> str:
        try:
            return domainxml.choose_domain_type(self.settings["domain_type"], hv.conn.getCapabilities())
        except ValueError as err:
            raise ProviderError(f"libvirt {hv.uri}: {err}") from None

    def start(self, image_name: str) -> Machine:
        lv = bindings()
        found = self._find(image_name)
        if found is None:
            placed = self.records.load().get(image_name)
            if placed and placed.domain and placed.hv in self.hypervisors and self.hypervisor(placed.hv).check():
                # its hypervisor is gone: build it afresh where placement puts it now
                self.build(image_name, self.config.image_env(image_name))
                progress(f"{image_name}: rebuilt on {self.records.load()[image_name].hv} "
                         f"(its hypervisor {placed.hv} does not answer)")
            found = self._require(image_name)
        if found.dom is not None:
            return self._machine(found)
        if found.hv.local:
            self.endpoint_ready()
        try:
            # transient: the domain exists while the VM runs, and is gone once it is off
            dom = found.hv.conn.createXML(found.domain, 0)
        except lv.libvirtError as err:
            again = self._find(image_name)
            if again is not None and again.dom is not None:
                return self._machine(again)  # another booted started it meanwhile
            console = domainxml.parse_domain(found.domain).console_log
            raise ProviderError(f"did not start: {err.get_error_message()}"
                                + (f" (console: {console})" if console else ""), image=image_name) from None
        return self._machine(replace(found, dom=dom))

    def stop(self, image_name: str, force: bool = False) -> Machine:
        lv = bindings()
        found = self._find(image_name)
        if found is None:
            lost = self._lost(image_name)
            if lost is not None:  # its hypervisor is gone, and it with it
                return lost
            found = self._require(image_name)
        dom = found.dom
        if dom is None:
            return self._machine(found)
        timeout = float(self.settings["stop_timeout_s"])
        if not force:
            try:
                dom.shutdown()  # an ACPI power-button press: the guest's systemd powers off in order
                wait_until(lambda: not _runs(dom), timeout=timeout, what=f"{image_name} to shut down", interval=0.2)
            except lv.libvirtError:
                force = True  # it went away under us, or refuses ACPI: destroy below if still running
            except WaitTimeout:
                progress(f"{image_name}: no clean shutdown within {timeout:g}s; powering it off")
                force = True
        if force and _runs(dom):
            try:
                dom.destroy()
            except lv.libvirtError as err:
                if _runs(dom):
                    raise ProviderError(f"could not power off: {err.get_error_message()}", image=image_name) from None
        return self._machine(replace(found, dom=None))

    def delete(self, image_name: str) -> None:
        vm = self._require(image_name)
        if vm.dom is not None:
            raise ProviderError("is running; stop it first", image=image_name)
        self._remove_volumes(vm)
        with locked("libvirt-hosts"):
            self.records.drop(image_name)
        ssh.forget(vm.record.address)

    def _remove_volumes(self, vm: Vm) -> None:
        """The VM's own volumes (its overlay or disk, its seed) and console log; never the shared base."""
        lv = bindings()
        hv = vm.hv
        self.pool(hv)  # the storage pool must answer before its volumes are removed
        for path in vm.disks:
            if not Path(path).name.startswith(self.domain_name(vm.record.image) + "."):
                continue  # the shared base image and kernel stay
            try:
                hv.conn.storageVolLookupByPath(path).delete(0)
            except lv.libvirtError:
                if hv.local:
                    Path(path).unlink(missing_ok=True)
        console = domainxml.parse_domain(vm.domain).console_log
        if hv.local and console:
            Path(console).unlink(missing_ok=True)

    def list(self) -> list[Machine]:
        vms, down, records = self._scan()
        machines = [self._machine(vm) for vm in vms]
        listed = {m.name for m in machines}
        for image_name, placed in records.items():
            if image_name not in listed and placed.domain and placed.hv in down:
                machines.append(self._lost_machine(placed.hv, placed.record, down[placed.hv]))
        return machines

    def _lost(self, image_name: str) -> Machine | None:
        placed = self.records.load().get(image_name)
        if not placed or placed.hv not in self.hypervisors:
            return None
        why = self.hypervisor(placed.hv).check()
        return self._lost_machine(placed.hv, placed.record, why) if why else None

    def _lost_machine(self, where: str, record: HostRecord, why: str) -> Machine:
        return Machine(name=record.image, provider=self.name, state=UNREACHABLE, macs=[record.mac],
                       addresses=[record.address],
                       detail={"env": record.env or None, "hypervisor": where, "domain": self.domain_name(record.image),
                               "console": "", "taps": [], "unreachable": why})

    # ------------------------------------------------------------------ helpers
    def _machine(self, vm: Vm) -> Machine:
        """What image-list shows: a running VM as its domain says, a stopped one as booted's record says."""
        lv = bindings()
        state, facts = STOPPED, domainxml.parse_domain(vm.domain)
        if vm.dom is not None:
            try:
                state = _states().get(vm.dom.state()[0], "unknown")
                facts = domainxml.parse_domain(vm.dom.XMLDesc(0))
            except lv.libvirtError:
                state = STOPPED  # a transient domain is gone once the VM is off
        return Machine(
            name=vm.record.image, provider=self.name, state=state, macs=facts.macs or [vm.record.mac],
            addresses=[vm.record.address],
            detail={"env": vm.record.env or None, "hypervisor": vm.hv.name, "domain": self.domain_name(vm.record.image),
                    "console": facts.console_log, "taps": facts.taps if state != STOPPED else []},
        )


def _runs(dom) -> bool:
    """Whether a (transient) domain still runs: once the VM is off it is gone, and asking about it fails."""
    try:
        return bool(dom.isActive())
    except bindings().libvirtError:
        return False


PROVIDER = LibvirtProvider
