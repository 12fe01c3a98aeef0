"""Helpers for tests on libvirt's ``test:///default`` driver, whose state lives as long as the process."""
from __future__ import annotations


def drop_domains(conn) -> None:
    """Destroy booted's domains (transient: gone then) and undefine any persistent one a test made."""
    for dom in conn.listAllDomains(0):
        if not dom.name().startswith("booted-"):
            continue  # the driver's own
        persistent = dom.isPersistent()
        if dom.isActive():
            dom.destroy()
        if persistent:
            dom.undefine()


def drop_pools(conn) -> None:
    for pool in conn.listAllStoragePools(0):
        if not pool.name().startswith("booted-"):
            continue  # the driver's own
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
        pool.destroy()
        pool.undefine()


def clear(prov) -> None:
    """Leave none of ``prov``'s domains, volumes or storage pools behind in the test driver."""
    for hv in prov.hypervisors.values():
        drop_domains(hv.conn)
        drop_pools(hv.conn)
