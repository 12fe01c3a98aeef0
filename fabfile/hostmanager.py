"""Hosts: the inventory learned from the booted log, SSH reachability, and booted's nginx."""
from __future__ import annotations

from fabfile.core import names, ssh
from fabfile.core.errors import UsageError
from fabfile.core.output import say
from fabfile.flows import discovery, environment
from fabfile.hosts import endpoint as nginxctl
from fabfile.hosts import inventory
from fabfile.hosts.inventory import Inventory
from fabfile.taskutil import confirm, load_config, task


def _logged(cfg, booted_log, full=False):
    path = discovery.log_path(booted_log)
    result = discovery.read_log(cfg, path, full=full)
    summary = discovery.record(cfg, result)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(result.skipped.items())) or "none"
    say(f"read {result.lines} lines of {path}: {len(result.calls)} calls home; skipped: {skipped}")
    parts = [f"added {len(summary.added)}", f"updated {len(summary.updated)}"]
    if summary.unknown:
        parts.append(f"unknown hosts {summary.unknown} ({', '.join(summary.unknown_names[:5])})")
    if summary.misnamed:
        parts.append(f"to rename {', '.join(summary.misnamed)}")
    say("inventory: " + ", ".join(parts))


def _filter(cfg):
    results = discovery.filter_reachable(cfg)
    up = sorted(a for a, ok in results.items() if ok)
    down = sorted(a for a, ok in results.items() if not ok)
    say(f"ssh: {len(up)} of {len(results)} hosts answer" + (f"; dropped: {', '.join(down)}" if down else ""))
    for image, problem in discovery.fix_hostnames(cfg):
        say(f"{image}: hostname " + (f"not set: {problem}" if problem else "set"))


@task(help={"booted_log": "read this log instead of BOOTED_LOG"})
def hosts_logged(c, booted_log=None):
    """Record every host that called home (booted log) in the inventory."""
    _logged(load_config(), booted_log)


@task
def hosts_filter(c):
    """Keep only the inventory hosts that answer on SSH."""
    _filter(load_config())


@task(help={"format": "table (default), json, yaml or ansible", "env": "only this environment"})
def hosts_list(c, format="table", env=None):
    """List the hosts in the inventory (table, json, yaml, ansible)."""
    cfg = load_config()
    if format not in inventory.FORMATS:
        raise UsageError(f"--format must be one of {', '.join(inventory.FORMATS)}, not {format!r}")
    if env:
        cfg.env(env)
    entries = Inventory().hosts(env=env)
    key, _ = ssh.keypair(cfg)
    # Ansible checks host keys against booted's pins (not the user's ~/.ssh/known_hosts, which lacks them).
    print(inventory.render(entries, format, ssh_user=ssh.user(cfg), ssh_key=key,
                           known_hosts=str(ssh.known_hosts_path())), end="" if format != "table" else "\n")


@task(help={"yes": "do not ask"})
def hosts_clear(c, yes=False):
    """Clear the inventory."""
    confirm("forget every host in the inventory?", yes)
    n = Inventory().clear()
    say(f"inventory cleared ({n} hosts forgotten)")


@task(help={"yes": "do not ask", "booted_log": "read this log instead of BOOTED_LOG"})
def hosts_reset(c, yes=False, booted_log=None):
    """Clear the inventory, re-read the whole booted log, keep reachable hosts."""
    cfg = load_config()
    confirm("rebuild the inventory from the booted log?", yes)
    Inventory().clear()
    _logged(cfg, booted_log, full=True)
    _filter(cfg)


@task
def restart_nginx(c):
    """Render, check and (re)start booted's nginx; rotate the booted log."""
    cfg = load_config()
    action, rotated = nginxctl.restart(cfg, reach=discovery.endpoint_addresses(cfg),
                                       installers=discovery.installer_networks(cfg))
    say(f"nginx {action}: {nginxctl.status(cfg).url} (config {nginxctl.conf_path()})")
    say(f"booted log: {nginxctl.booted_log_path()}" + (f" (previous moved to {rotated})" if rotated else ""))
    if rotated is not None:
        # nginx has closed the old log: finish it from the cursor, so no call home is lost
        result = discovery.read_log(cfg, rotated)
        discovery.record(cfg, result)
        say(f"read the last {result.lines} lines of the previous log: {len(result.calls)} calls home")


@task(help={"force": "stop it even while an image install needs it"})
def nginx_stop(c, force=False):
    """Stop booted's nginx (hosts cannot call home until the next env-start-* or restart-nginx)."""
    load_config()
    say(environment.stop_nginx(force=force))


@task(help={"host": "IP address whose pinned SSH host keys to forget"})
def hosts_forget(c, host=None):
    """Forget every pinned SSH host key of an address (after its host was rebuilt)."""
    if not host:
        raise UsageError("--host ADDRESS is required")
    address = names.check_address(host, "--host")
    n = ssh.forget(address)
    say(f"forgot {n} pinned host key{'s' if n != 1 else ''} of {address}" if n
        else f"no pinned host key of {address} (nothing to forget)")
