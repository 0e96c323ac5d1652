"""Legacy U-Boot image (uImage) codec for script images (`mkimage -T script -C none`)."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from builder.errors import PackageError

MAGIC = 0x27051956
HEADER = struct.Struct(">IIIIIIIBBBB32s")
HEADER_SIZE = HEADER.size  # 64
OS_LINUX = 5
ARCH_ARM64 = 0x16
TYPE_SCRIPT = 6
COMP_NONE = 0
NAME_MAX = 32


@dataclass(frozen=True)
class ScriptImage:
    """A decoded script image: its text and the header fields worth keeping."""

    text: bytes
    name: str
    timestamp: int
    load: int = 0
    entry: int = 0
    os: int = OS_LINUX
    arch: int = ARCH_ARM64


def decode_script(blob: bytes, where: str) -> ScriptImage:
    """Decode a `.scr`, checking magic, both CRCs, type and the image-length list."""
    if len(blob) < HEADER_SIZE:
        raise PackageError(
            f"too short for a U-Boot script image ({len(blob)} bytes, header needs {HEADER_SIZE})",
            where=where,
            hint="the file is truncated; copy it again from the vendor package",
        )
    magic, hcrc, ts, size, load, entry, dcrc, os_, arch, typ, comp, name = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise PackageError(
            f"bad uImage magic 0x{magic:08x} (expected 0x{MAGIC:08x})",
            where=where,
            hint="this is not a mkimage script image",
        )
    header = bytearray(blob[:HEADER_SIZE])
    header[4:8] = b"\0\0\0\0"
    actual_hcrc = zlib.crc32(header)
    if actual_hcrc != hcrc:
        raise PackageError(
            f"header CRC mismatch: stored 0x{hcrc:08x}, computed 0x{actual_hcrc:08x}",
            where=where,
            hint="the header is corrupt; regenerate the script with mkimage",
        )
    data = blob[HEADER_SIZE:]
    if len(data) != size:
        raise PackageError(
            f"data size mismatch: header says {size} bytes, file has {len(data)}",
            where=where,
            hint="the file is truncated or has trailing bytes",
        )
    actual_dcrc = zlib.crc32(data)
    if actual_dcrc != dcrc:
        raise PackageError(
            f"data CRC mismatch: stored 0x{dcrc:08x}, computed 0x{actual_dcrc:08x}",
            where=where,
            hint="the script text is corrupt; regenerate it with mkimage",
        )
    if typ != TYPE_SCRIPT or comp != COMP_NONE:
        raise PackageError(
            f"not an uncompressed script image (type {typ}, compression {comp})",
            where=where,
            hint="U-Boot `source` needs `mkimage -T script -C none`",
        )
    text = _script_payload(data, where)
    return ScriptImage(
        text=text,
        name=name.rstrip(b"\0").decode("latin-1"),
        timestamp=ts,
        load=load,
        entry=entry,
        os=os_,
        arch=arch,
    )


def _script_payload(data: bytes, where: str) -> bytes:
    """Script images are multi-file images: a zero-terminated list of BE lengths, then data."""
    lengths = []
    pos = 0
    while True:
        if pos + 4 > len(data):
            raise PackageError("unterminated image-length list in script image", where=where)
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if n == 0:
            break
        lengths.append(n)
    if not lengths:
        if data == bytes(8):  # mkimage of an empty script: length 0, then the terminator
            return b""
        raise PackageError("script image holds no script", where=where)
    first = lengths[0]
    if pos + first > len(data):
        raise PackageError(
            f"script length {first} exceeds the image data ({len(data) - pos} bytes)", where=where
        )
    return data[pos : pos + first]


def encode_script(text: bytes, name: str, timestamp: int) -> bytes:
    """Encode like `mkimage -A arm64 -O linux -T script -C none -a 0 -e 0 -n NAME`."""
    raw_name = name.encode("latin-1")[:NAME_MAX]
    data = struct.pack(">II", len(text), 0) + text
    dcrc = zlib.crc32(data)
    fields = [MAGIC, 0, timestamp, len(data), 0, 0, dcrc, OS_LINUX, ARCH_ARM64, TYPE_SCRIPT, COMP_NONE]
    header = HEADER.pack(*fields, raw_name)
    hcrc = zlib.crc32(header)
    fields[1] = hcrc
    return HEADER.pack(*fields, raw_name) + data
