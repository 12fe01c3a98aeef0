"""Helpers for tests on libvirt's ``test:///default`` driver, whose state lives as long as the process."""
from __future__ import annotations


def clear(prov) -> None:
    """Leave none of ``prov``'s domains, volumes or storage pool behind in the test driver."""
    for _hv, dom, _ in prov._domains():
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    pool = prov.pool(prov.hypervisor())
    for vol in pool.listAllVolumes(0):
        vol.delete(0)
    pool.destroy()
    pool.undefine()
