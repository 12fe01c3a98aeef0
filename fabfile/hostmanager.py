"""Hosts: the inventory learned from the booted log, SSH reachability, and booted's nginx."""
from __future__ import annotations

from .errors import NotAvailable
from .taskutil import task


@task(help={"booted_log": "read this log instead of BOOTED_LOG"})
def hosts_logged(c, booted_log=None):
    """Record every host that called home (from the booted log) in the inventory."""
    raise NotAvailable("hosts-logged (discovery)")


@task
def hosts_filter(c):
    """Keep only the inventory hosts that answer on SSH."""
    raise NotAvailable("hosts-filter (discovery)")


@task(help={"format": "table (default), json, yaml or ansible"})
def hosts_list(c, format="table"):
    """List the hosts in the inventory."""
    raise NotAvailable("hosts-list (discovery)")


@task(help={"yes": "do not ask"})
def hosts_clear(c, yes=False):
    """Clear the inventory."""
    raise NotAvailable("hosts-clear (discovery)")


@task(help={"yes": "do not ask", "booted_log": "read this log instead of BOOTED_LOG"})
def hosts_reset(c, yes=False, booted_log=None):
    """Hard reset: clear the inventory, then read the booted log, then keep reachable hosts."""
    raise NotAvailable("hosts-reset (discovery)")


@task
def restart_nginx(c):
    """Render booted's nginx config, check it, rotate the booted log, start or reload nginx."""
    raise NotAvailable("restart-nginx (discovery)")
