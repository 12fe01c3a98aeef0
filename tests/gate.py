"""The deploy gate as the tests drive it: pack a version, then test the packed release."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from fabfile.services import repo as servicerepo


def pack_and_test(service, version: str, workdir) -> SimpleNamespace:
    """(ok, output, tarball, commit) of the gate on ``version``, packed under ``workdir``."""
    tarball = servicerepo.pack(service, version, Path(workdir) / "release.tar.gz")
    ok, output = servicerepo.test_packed(service, tarball)
    return SimpleNamespace(ok=ok, output=output, tarball=tarball, commit=servicerepo.resolve(service, version))
