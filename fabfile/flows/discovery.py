"""Host discovery: from the booted log to an inventory of reachable, correctly named hosts."""
from __future__ import annotations

from pathlib import Path

from fabfile.core import names, ssh
from fabfile.core.errors import BootedError
from fabfile.core.output import progress
from fabfile.hosts import callhome, reach
from fabfile.hosts import endpoint as nginxctl
from fabfile.hosts.bootlog import BootedLog, ReadResult
from fabfile.hosts.inventory import HostEntry, Inventory, RecordSummary, mark_reachable
from fabfile.providers import CloneRecord, get_provider

# $1 hostname; stdin: the host's new call-home config. A VirtualBox clone inherits its source's
# name, call-home key and SSH host keys; this gives it its own, and prints its new public host keys
# (booted pins them: they come over the channel the old, pinned key authenticated).
RENAME_SCRIPT = r"""
set -eu
cat > /etc/booted/callhome.conf.new
chmod 600 /etc/booted/callhome.conf.new
mv /etc/booted/callhome.conf.new /etc/booted/callhome.conf
printf '%s\n' "$1" > /etc/hostname
hostname "$1"
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
ssh-keygen -A >/dev/null
systemctl restart sshd 2>/dev/null || systemctl restart ssh
cat /etc/ssh/ssh_host_*_key.pub
"""


def clone_records(cfg, providers: set[str]) -> list[CloneRecord]:
    """The clones the given providers made (with the MACs booted gave them)."""
    records: list[CloneRecord] = []
    for name in sorted(providers):
        records += get_provider(name, cfg).clone_records()
    return records


def endpoint_addresses(cfg) -> list[str]:
    """The addresses the configured environments' hosts call home to, made ready on this machine
    (booted's nginx listens on these and on 127.0.0.1 only)."""
    addresses = []
    for name in sorted({env.provider for env in cfg.environments.values()}):
        provider = get_provider(name, cfg)
        try:
            provider.endpoint_ready()
        except BootedError as err:
            progress(f"note: {name} hosts cannot reach booted yet: {err}")
        addresses += [a for a in provider.booted_addresses() if a not in addresses]
    return addresses


def installer_networks(cfg) -> list[str]:
    """The networks the configured providers' installers fetch kickstarts from (booted's nginx allows them)."""
    return [n for name in sorted({env.provider for env in cfg.environments.values()})
            for n in get_provider(name, cfg).installer_networks()]


def log_path(override: str | None = None) -> Path:
    return Path(override) if override else nginxctl.booted_log_path()


def read_log(cfg, path: Path, full: bool = False) -> ReadResult:
    log = BootedLog(path, cfg)
    return log.read_all() if full else log.read_new("hosts")


def record(cfg, result: ReadResult) -> RecordSummary:
    """Record the calls of ``result``, matching them through the providers of their environments."""
    providers = {cfg.environments[c.env].provider for c in result.calls if c.env in cfg.environments}
    return Inventory().record_calls(result.calls, clone_records(cfg, providers), cfg)


def probe_inventory(env: str | None = None, timeout: float = 1.0) -> dict[str, bool]:
    """Probe the SSH port of every inventory host (of ``env``) at once and record the answers."""
    inv = Inventory()
    results = reach.probe_ssh([e.address for e in inv.hosts(env=env)], timeout=timeout)
    inv.mark_reachable(results)
    return results


def filter_reachable(cfg, timeout: float = reach.TIMEOUT_S) -> dict[str, bool]:
    """Probe every inventory host's SSH port at once; drop the ones that don't answer (one write)."""
    inv = Inventory()
    results = reach.probe_ssh([e.address for e in inv.hosts()], timeout=timeout)
    with inv.update() as hosts:
        mark_reachable(hosts, results)
        for image in [i for i, e in hosts.items() if not e.reachable]:
            del hosts[image]
    return results


def fix_hostnames(cfg) -> list[tuple[str, str]]:
    """Give each host whose call-home name is not its image (a VirtualBox clone) its own name.

    Over SSH: the hostname, and a call-home config with the image's own key. Returns
    ``[(image, problem or "")]``.
    """
    inv = Inventory()
    todo = [e for e in inv.load() if not e.hostname_ok and e.reachable is not False]
    done = []
    for entry in todo:
        try:
            rename_host(cfg, entry)
            with inv.update() as hosts:
                if entry.image in hosts:
                    hosts[entry.image].name = entry.image
                    hosts[entry.image].hostname_ok = True
            done.append((entry.image, ""))
        except BootedError as err:
            done.append((entry.image, str(err)))
    return done


def rename_host(cfg, entry: HostEntry) -> None:
    """Give a clone its own name, call-home key and SSH host keys, once it proved it is that clone.

    The proof, all checked again here before any key leaves booted: the inventory recorded it as
    the clone (a call signed by its source's key, with the MAC booted recorded for the clone); the
    provider still reports that MAC for the clone; and over SSH it presents its source's pinned
    host key (a clone inherits it), if that source was ever pinned.
    """
    env = cfg.env(entry.env)
    provider = get_provider(env.provider, cfg)
    record = next((r for r in provider.clone_records() if r.image == entry.image), None)
    if record is None or record.source != entry.name or entry.mac not in record.macs:
        raise BootedError(f"not renamed: booted has no record of {entry.image} as a clone of {entry.name} "
                          f"with MAC {entry.mac}")
    machine = provider.get(entry.image)
    if machine is None or entry.mac not in machine.macs:
        raise BootedError(f"not renamed: {env.provider} no longer reports MAC {entry.mac} for {entry.image}")
    source = {e.image: e for e in Inventory().load()}.get(entry.name)
    like = source.address if source is not None and ssh.pinned(source.address) else None
    with ssh.connect(entry.address, cfg, like=like) as conn:
        conn.open()  # proves the host key before the new key is drawn
        callhome.new_host_key(env.name, entry.image)
        conf = callhome.host_config(env.name, entry.image, provider.callhome_url())
        result = ssh.run_with_input(conn, ["sh", "-c", RENAME_SCRIPT, "rename", names.hostname_for(entry.image)],
                                    conf.encode(), sudo=True, timeout=30)
    ssh.repin(entry.address, result.stdout)
