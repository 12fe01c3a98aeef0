"""The VM kernel uncompressed, for QEMU's PVH direct boot where no hardware virtualisation runs.

A Debian kernel (bzImage) is a small decompressor with the real kernel inside, xz-compressed.
Under TCG (QEMU emulating the CPU, as on machines without usable KVM) unpacking it took 2.9 s of
an idle VM's boot, 4-5 s with three VMs booting on two cores: the largest single step before the
kernel ran. QEMU's ``-kernel`` also takes the kernel's own ELF image, if that carries the PVH entry
note (the x86/HVM direct boot ABI of Xen's docs/misc/pvh: an ELF note named "Xen", type 18,
XEN_ELFNOTE_PHYS32_ENTRY; Linux has it with CONFIG_PVH, which Debian's kernel sets), and jumps to
that entry: no decompression at all (``Linux version`` 0.3 s after QEMU started instead of 3.3 s).

Where to find the ELF image in a bzImage (the kernel's Documentation/arch/x86/boot.rst): the setup
header's ``HdrS`` magic at 0x202 and protocol version at 0x206 (2.08 or later for the next
fields), ``setup_sects`` at 0x1f1 (0 means 4), and ``payload_offset``/``payload_length`` at
0x248/0x24c, counted from the protected-mode code, which starts after the (setup_sects + 1)
512-byte sectors of real-mode code. The payload is the compressed ELF; its first bytes say which
compressor made it.

The decompressor is also what places the kernel at a random address (KASLR): a kernel started at
its PVH entry runs at the address it was linked for. That is why booted boots this image only
where decompressing costs seconds (TCG); under KVM VMs boot the compressed kernel. Pure: bytes in,
bytes out.
"""
from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from typing import Any

# The decompressed kernel of a distribution is 40-70 MB; more than this is not a kernel.
MAX_KERNEL_BYTES = 512 * 2**20
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4

# payload magic -> (compressor's name, a decompressor object's maker, or None where Python has none)
_COMPRESSORS: list[tuple[bytes, str, Callable[[], Any] | None]] = [
    (b"\xfd7zXZ\x00", "xz", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
    (b"\x1f\x8b", "gzip", lambda: zlib.decompressobj(wbits=31)),
    (b"BZh", "bzip2", bz2.BZ2Decompressor),
    (b"\x5d\x00\x00", "lzma", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)),
    (b"\x28\xb5\x2f\xfd", "zstd", None),
    (b"\x02\x21\x4c\x18", "lz4", None),
    (b"\x89LZO", "lzo", None),
]


def payload(bzimage: bytes) -> bytes:
    """The compressed kernel inside a bzImage; ValueError says why there is none."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS setup header)")
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise ValueError(f"boot protocol {version >> 8}.{version & 0xff:02d} names no payload (2.08 or later does)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if not length or start + length > len(bzimage):
        raise ValueError("the setup header's payload lies outside the file")
    return bzimage[start:start + length]


def uncompressed(bzimage: bytes) -> bytes:
    """The kernel's ELF image from a bzImage, checked to carry the PVH entry; ValueError says why not."""
    data = payload(bzimage)
    found = next(((name, make) for magic, name, make in _COMPRESSORS if data.startswith(magic)), None)
    if found is None:
        raise ValueError(f"the kernel is compressed in an unknown format (first bytes {data[:4].hex()})")
    name, make = found
    if make is None:
        raise ValueError(f"the kernel is compressed with {name}, which Python cannot uncompress")
    try:
        # a decompressor object stops at the end of the stream: the kernel's build appends the
        # uncompressed size after it
        unpacker = make()
        elf = unpacker.decompress(data, MAX_KERNEL_BYTES + 1)
    except (lzma.LZMAError, zlib.error, OSError, EOFError) as err:
        raise ValueError(f"the {name} payload does not uncompress: {err}") from None
    if len(elf) > MAX_KERNEL_BYTES:
        raise ValueError(f"the payload uncompresses to more than {MAX_KERNEL_BYTES // 2**20} MB")
    if not unpacker.eof:
        raise ValueError(f"the {name} payload ends before its stream does (a truncated kernel)")
    if not has_pvh_entry(elf):
        raise ValueError("the uncompressed kernel has no PVH entry note (a kernel built without CONFIG_PVH)")
    return elf


def has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has the XEN_ELFNOTE_PHYS32_ENTRY note in a PT_NOTE segment."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 56 > len(elf):
            return False
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, at)
        if p_type == PT_NOTE and _notes_have(elf[p_offset:p_offset + p_filesz], b"Xen", XEN_ELFNOTE_PHYS32_ENTRY):
            return True
    return False


def _notes_have(notes: bytes, name: bytes, kind: int) -> bool:
    """Whether an ELF note area holds a note of ``name`` and type ``kind`` (fields 4-byte aligned)."""
    at = 0
    while at + 12 <= len(notes):
        namesz, descsz, note_type = struct.unpack_from("<III", notes, at)
        at += 12
        note_name = notes[at:at + namesz].rstrip(b"\0")
        at += (namesz + 3) & ~3
        at += (descsz + 3) & ~3
        if note_name == name and note_type == kind:
            return True
    return False


def boots_uncompressed(domain_type: str) -> bool:
    """Whether VMs of this libvirt domain type boot the uncompressed kernel: under TCG only (see above)."""
    return domain_type == "qemu"
