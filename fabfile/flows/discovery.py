"""Host discovery: from the booted log to an inventory of reachable, correctly named hosts."""
from __future__ import annotations

from pathlib import Path

from fabfile.hosts import callhome
from fabfile.core import names
from fabfile.hosts import endpoint as nginxctl
from fabfile.hosts import reach
from fabfile.core import ssh
from fabfile.hosts.bootlog import BootedLog, ReadResult
from fabfile.core.errors import BootedError
from fabfile.hosts.inventory import HostEntry, Inventory, RecordSummary, mark_reachable
from fabfile.core.output import progress
from fabfile.providers import Machine, get_provider

# $1 hostname; stdin: the host's new call-home config. A VirtualBox clone inherits its source's
# name, call-home key and SSH host keys; this gives it its own.
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
"""


def all_machines(cfg, providers: set[str] | None = None) -> list[Machine]:
    """Every machine of the given providers (default: all the config uses); one that can't answer
    is skipped with a note, and its hosts are matched by name."""
    machines: list[Machine] = []
    wanted = providers if providers is not None else {e.provider for e in cfg.environments.values()}
    for name in sorted(wanted):
        try:
            machines += get_provider(name, cfg).list()
        except BootedError as err:
            progress(f"note: cannot list {name} images ({err}); matching by name only")
    return machines


def log_path(override: str | None = None) -> Path:
    return Path(override) if override else nginxctl.booted_log_path()


def read_log(cfg, path: Path, full: bool = False) -> ReadResult:
    log = BootedLog(path, cfg)
    return log.read_all() if full else log.read_new("hosts")


def record(cfg, result: ReadResult) -> RecordSummary:
    """Record the calls of ``result``, matching them through the providers of their environments."""
    providers = {cfg.environments[c.env].provider for c in result.calls if c.env in cfg.environments}
    machines = all_machines(cfg, providers) if providers else []
    return Inventory().record_calls(result.calls, machines, cfg)


def probe_inventory(env: str | None = None, timeout: float = 1.0) -> dict[str, bool]:
    """Probe the SSH port of every inventory host (of ``env``) at once and record the answers."""
    inv = Inventory()
    results = reach.probe_ssh([e.address for e in inv.hosts(env=env)], timeout=timeout)
    inv.mark_reachable(results)
    return results


def filter_reachable(cfg, timeout: float = 1.0) -> dict[str, bool]:
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
    env = cfg.env(entry.env)
    conf = callhome.host_config(env.name, entry.image, get_provider(env.provider, cfg).callhome_url())
    with ssh.connect(entry.address, cfg) as conn:
        ssh.run_with_input(conn, ["sh", "-c", RENAME_SCRIPT, "rename", names.hostname_for(entry.image)],
                           conf.encode(), sudo=True, timeout=30)
    # its new host keys are pinned on the next contact
    ssh.forget(entry.address)
