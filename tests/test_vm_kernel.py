"""The VM kernel booted uncompresses for TCG (kernel.py): what it accepts, and why it refuses.

bzImages here are made to the boot protocol's layout (Documentation/arch/x86/boot.rst): real-mode
sectors with the setup header, then the protected-mode code the payload offset counts from. The ELF
images are minimal 64-bit ones with one PT_NOTE segment. A real kernel is booted by the VM tier.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct

import pytest

from fabfile.providers.libvirt import image, kernel


def note(name: bytes, kind: int, desc: bytes) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name) + 1, len(desc), kind) + pad(name + b"\0") + pad(desc)


def elf(notes: bytes) -> bytes:
    """A 64-bit little-endian ELF with its notes in one PT_NOTE segment, then some 'code'."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", kernel.PT_NOTE, 4, 64 + 56, 0, 0, len(notes), len(notes), 4)
    return bytes(header) + phdr + notes + b"\x90" * 4096


PVH = note(b"Xen", 6, b"linux\0") + note(b"Xen", kernel.XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000850))
NO_PVH = note(b"Xen", 6, b"linux\0") + note(b"GNU", 3, b"\x01" * 20)


def bzimage(payload: bytes, version: int = 0x20F, setup_sects: int = 3, trailer: bytes = b"\x11\x22\x33\x44") -> bytes:
    """A bzImage with ``payload`` (compressed kernel + the kernel build's 4-byte size) after 100
    bytes of decompressor code."""
    real_mode = bytearray((setup_sects + 1) * 512)
    real_mode[0x1F1] = setup_sects
    real_mode[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", real_mode, 0x206, version)
    struct.pack_into("<II", real_mode, 0x248, 100, len(payload) + len(trailer))
    return bytes(real_mode) + b"\xcc" * 100 + payload + trailer + b"\0" * 64


KERNEL = elf(PVH)


@pytest.mark.parametrize("compress", [lambda b: lzma.compress(b, format=lzma.FORMAT_XZ), gzip.compress, bz2.compress,
                                      lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE)],
                         ids=["xz", "gzip", "bzip2", "lzma"])
def test_the_elf_kernel_comes_out_of_a_bzimage_whatever_stdlib_compressor_made_it(compress):
    assert kernel.uncompressed(bzimage(compress(KERNEL))) == KERNEL


def test_setup_sects_zero_means_four():
    image_ = bytearray(bzimage(lzma.compress(KERNEL), setup_sects=4))
    image_[0x1F1] = 0
    assert kernel.uncompressed(bytes(image_)) == KERNEL


@pytest.mark.parametrize("data, why", [
    (b"\x7fELF" + b"\0" * 1000, "not a bzImage"),
    (bzimage(lzma.compress(KERNEL), version=0x207), "boot protocol 2.07 names no payload"),
    (bzimage(b"\x28\xb5\x2f\xfd" + b"\0" * 40), "compressed with zstd, which Python cannot uncompress"),
    (bzimage(b"\x89LZO" + b"\0" * 40), "compressed with lzo"),
    (bzimage(b"MZ" + b"\0" * 40), "unknown format (first bytes 4d5a0000)"),
    (bzimage(lzma.compress(KERNEL)[:40], trailer=b""), "ends before its stream does"),
    (bzimage(b"\xfd7zXZ\x00" + b"\x01" * 60), "does not uncompress"),
    (bzimage(lzma.compress(b"not an ELF" * 100)), "no PVH entry note"),
    (bzimage(lzma.compress(elf(NO_PVH))), "no PVH entry note"),
], ids=["not-bzimage", "old-protocol", "zstd", "lzo", "unknown", "truncated", "corrupt", "not-elf", "no-pvh"])
def test_a_kernel_that_cannot_be_booted_uncompressed_is_refused_with_the_reason(data, why):
    with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
        kernel.uncompressed(data)


def test_a_payload_past_the_end_of_the_file_is_refused():
    image_ = bytearray(bzimage(lzma.compress(KERNEL)))
    struct.pack_into("<I", image_, 0x24C, len(image_))
    with pytest.raises(ValueError, match="outside the file"):
        kernel.uncompressed(bytes(image_))


def test_a_decompression_bomb_stops_at_the_size_limit(monkeypatch):
    monkeypatch.setattr(kernel, "MAX_KERNEL_BYTES", 10_000)
    with pytest.raises(ValueError, match="more than 0 MB"):
        kernel.uncompressed(bzimage(lzma.compress(b"\0" * 50_000)))


@pytest.mark.parametrize("domain_type, booted", [("qemu", "vmlinux"), ("kvm", "vmlinuz"), ("test", "vmlinuz")])
def test_vms_boot_the_uncompressed_kernel_only_under_tcg(tmp_path, domain_type, booted):
    """Under KVM the decompressor costs a fraction of a second and places the kernel at a random
    address (KASLR): VMs there boot the kernel as shipped."""
    files = image.base_files(tmp_path, "0123456789abcdef").files_for(domain_type)
    assert {role: path.name for role, path in files.items()} == {
        "disk": "booted-base-0123456789abcdef.qcow2", "kernel": f"booted-base-0123456789abcdef.{booted}",
        "initrd": "booted-base-0123456789abcdef.initrd"}


def test_a_kernel_that_cannot_be_uncompressed_is_booted_as_shipped(capsys):
    shipped = bzimage(b"\x28\xb5\x2f\xfd" + b"\0" * 40)
    assert image._tcg_kernel(shipped) == shipped
    assert "boot the compressed kernel (the kernel is compressed with zstd" in capsys.readouterr().err
