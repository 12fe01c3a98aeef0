"""What libvirt's test driver cannot do, faked at that boundary for the libvirt provider's fast tests:
the base image build (small files stand in for the qcow2, kernel and initrd) and volume uploads
(``record(hv, vol, src)`` is called instead)."""
from __future__ import annotations

from pathlib import Path

from fabfile.providers.libvirt import image
from fabfile.providers.libvirt.provider import LibvirtProvider

DIGEST = "0123456789abcdef"


def fake_base_image(tmp_path: Path, monkeypatch, record) -> image.BaseImage:
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    base = image.base_files(base_dir, DIGEST)
    for i, f in enumerate(base.names.values()):
        f.write_bytes(b"x" * (1000 + i))
    monkeypatch.setattr(LibvirtProvider, "base_image", lambda self: base)
    monkeypatch.setattr(LibvirtProvider, "base_names", lambda self: base)
    monkeypatch.setattr(LibvirtProvider, "_upload", staticmethod(record))
    return base
