"""Small ISO images for tests, built with pycdlib: an install-DVD look-alike without the DVD.

``make_test_iso(path)`` writes an ISO holding ``images/pxeboot/vmlinuz`` and
``images/pxeboot/initrd.img`` under Rock Ridge names (as real RHEL 9 family ISOs have), over
upper-case ISO 9660 names with ';1' versions. Pass ``files`` to choose other paths or contents.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import pycdlib

# Distinct, non-repeating bytes, so a test comparing extracted files catches swaps and truncation.
DEFAULT_FILES = {
    "images/pxeboot/vmlinuz": b"booted test kernel\n" + bytes(range(256)) * 40,
    "images/pxeboot/initrd.img": b"booted test initrd\n" + bytes(reversed(range(256))) * 90,
}


def _iso9660_name(name: str, is_dir: bool) -> str:
    """An ISO 9660 level 3 identifier: upper case d-characters; files get an extension dot and ';1'."""
    stem, dot, ext = name.partition(".") if not is_dir else (name, "", "")
    clean = lambda s: re.sub(r"[^A-Z0-9_]", "_", s.upper())  # noqa: E731
    if is_dir:
        return clean(stem)[:31]
    return f"{clean(stem)}.{clean(ext)};1"


def make_test_iso(path: Path | str, files: dict[str, bytes] | None = None, *, rock_ridge: bool = True,
                  joliet: bool = False, volume: str = "BOOTED_TEST") -> Path:
    """Write an ISO at ``path`` holding ``files`` (ISO path -> bytes); returns ``path``.

    ``rock_ridge=False, joliet=False`` gives plain ISO 9660 names only (e.g. ``/IMAGES/PXEBOOT/VMLINUZ.;1``).
    """
    path = Path(path)
    files = DEFAULT_FILES if files is None else files
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=volume, rock_ridge="1.09" if rock_ridge else None,
            joliet=3 if joliet else None)
    made = set()
    for name, data in files.items():
        parts = name.strip("/").split("/")
        for depth in range(1, len(parts)):
            dirs = parts[:depth]
            key = "/".join(dirs)
            if key in made:
                continue
            kwargs = {"iso_path": "/" + "/".join(_iso9660_name(d, True) for d in dirs)}
            if rock_ridge:
                kwargs["rr_name"] = dirs[-1]
            if joliet:
                kwargs["joliet_path"] = "/" + key
            iso.add_directory(**kwargs)
            made.add(key)
        kwargs = {"iso_path": "/" + "/".join([*(_iso9660_name(d, True) for d in parts[:-1]),
                                              _iso9660_name(parts[-1], False)])}
        if rock_ridge:
            kwargs["rr_name"] = parts[-1]
        if joliet:
            kwargs["joliet_path"] = "/" + "/".join(parts)
        iso.add_fp(io.BytesIO(data), len(data), **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    iso.write(str(path))
    iso.close()
    return path
