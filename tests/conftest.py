"""Shared fixtures. The real-host lab (tests/lab.py) is built once per session and always torn down."""
from __future__ import annotations

import os

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
        the_lab.teardown()
