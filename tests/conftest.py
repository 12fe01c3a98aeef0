"""Shared fixtures. The real-host lab (tests/lab.py) is built once per session and always torn down."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from lab import Lab, can_run_local_hosts, make_lab


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Lab:
    """Real local hosts: a state dir, bridge, subnet and nginx port of the session's own."""
    reason = can_run_local_hosts()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the local-host lab cannot run here: {reason}")
        pytest.skip(f"local hosts: {reason}")
    the_lab = make_lab(tmp_path_factory.mktemp("lab"))
    try:
        yield the_lab
    finally:
        # Hosts a test stopped (or powered off) must have left nothing: processes of a host whose
        # nspawn is gone are such a leak. Then the teardown stops the rest; nothing may survive it.
        orphans = the_lab.orphaned_processes()
        survivors = the_lab.teardown()
        report = [f"still running after its host was stopped: {p}" for p in orphans]
        report += [f"still running after the lab's teardown: {p}" for p in survivors]
        if report:
            pytest.fail("processes of lab hosts were left behind (killed now):\n  " + "\n  ".join(report))


# The unit tests on libvirt's test:///default driver configure these bridges; the provider creates
# a bridge on this machine when booted's nginx is made ready (a real one, with root), so the session
# removes the ones it made.
TEST_DRIVER_BRIDGES = ("btstlv0", "btstlv1")


@pytest.fixture(scope="session", autouse=True)
def test_driver_bridges_removed():
    before = {name for name in TEST_DRIVER_BRIDGES if Path("/sys/class/net", name).exists()}
    yield
    for name in TEST_DRIVER_BRIDGES:
        if name not in before and Path("/sys/class/net", name).exists():
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
