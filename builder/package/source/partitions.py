"""Card images: their partition tables (MBR with logical partitions, GPT, or a bare FAT volume)."""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.errors import PackageError
from builder.fs.fat import parse_boot_sector
from builder.package.source.base import _FORMS_HINT, _HEAD_BYTES

# --------------------------------------------------------------------------------------------
# Card images: partition tables


@dataclass(frozen=True)
class Partition:
    """A partition of a card image; `number` as Linux numbers it (MBR logical ones from 5)."""

    number: int
    start: int  # bytes from the start of the image
    size: int  # bytes
    scheme: str  # "mbr", "gpt" or "none" (a bare FAT volume, no partition table)
    kind: str  # MBR type byte or GPT type GUID (+ name), for messages


def read_partitions(image: Path, base: int = 0, length: int | None = None) -> list[Partition]:
    """Parse the MBR or GPT of the image that starts at byte `base` of `image` (struct, no tools)."""
    if length is None:
        length = image.stat().st_size - base
    with open(image, "rb") as f:

        def read_at(offset: int, n: int) -> bytes:
            f.seek(base + offset)
            return f.read(max(0, min(n, length - offset)))

        head = read_at(0, _HEAD_BYTES)
        for ss in (512, 4096):
            if head[ss : ss + 8] == b"EFI PART":
                return _gpt_partitions(read_at, ss, str(image))
        if _is_bare_fat(head, length):
            return [Partition(0, 0, length, "none", "bare FAT volume")]
        if head[510:512] != b"\x55\xaa":
            raise PackageError(
                "no partition table (no MBR signature 0x55AA, no GPT header)",
                where=str(image),
                hint=_FORMS_HINT,
            )
        return _mbr_partitions(read_at, head[:512], str(image))


def _is_bare_fat(head: bytes, length: int) -> bool:
    """A FAT boot sector at sector 0 and no plausible partition entries (its boot code sits there)."""
    if parse_boot_sector(head[:512]) is None:
        return False
    entries = _mbr_entries(head[:512])
    return not entries or any(lba == 0 or (lba + n) * 512 > length for _, lba, n in entries)


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first LBA, sector count) of the used primary entries; [] when the table is not sane."""
    entries = []
    for i in range(4):
        status, ptype, lba, count = struct.unpack_from("<B3xB3xII", sector, 446 + 16 * i)
        if status not in (0x00, 0x80):
            return []
        if ptype and count:
            entries.append((ptype, lba, count))
    return entries


def _mbr_partitions(read_at: Callable[[int, int], bytes], sector0: bytes, where: str) -> list[Partition]:
    entries = _mbr_entries(sector0)
    if not entries:
        raise PackageError("the MBR partition table is empty or damaged", where=where, hint=_FORMS_HINT)
    if any(t == 0xEE for t, _, _ in entries):
        raise PackageError(
            "protective MBR of a GPT disk, but no valid GPT header at LBA 1",
            where=where,
            hint="the image is damaged; download it again",
        )
    parts: list[Partition] = []
    for i, (ptype, lba, count) in enumerate(entries, start=1):
        if ptype in (0x05, 0x0F, 0x85):
            parts.extend(_logical_partitions(read_at, lba, where))
        else:
            parts.append(Partition(i, lba * 512, count * 512, "mbr", f"type 0x{ptype:02x}"))
    return parts


def _logical_partitions(read_at: Callable[[int, int], bytes], ext_lba: int, where: str) -> list[Partition]:
    parts: list[Partition] = []
    ebr_lba = ext_lba
    for number in range(5, 5 + 128):  # a chain longer than this is a loop
        ebr = read_at(ebr_lba * 512, 512)
        if len(ebr) < 512 or ebr[510:512] != b"\x55\xaa":
            raise PackageError(f"damaged extended boot record at sector {ebr_lba}", where=where)
        ptype, lba, count = struct.unpack_from("<4xB3xII", ebr, 446)
        if ptype and count:
            parts.append(Partition(number, (ebr_lba + lba) * 512, count * 512, "mbr", f"type 0x{ptype:02x}"))
        ntype, nlba, _ = struct.unpack_from("<4xB3xII", ebr, 462)
        if not ntype:
            return parts
        ebr_lba = ext_lba + nlba
    raise PackageError("the chain of logical partitions does not end", where=where)


def _gpt_partitions(read_at: Callable[[int, int], bytes], ss: int, where: str) -> list[Partition]:
    header = read_at(ss, 92)
    hsize, hcrc = struct.unpack_from("<II", header, 12)
    if not 92 <= hsize <= ss:
        raise PackageError(f"GPT header size {hsize} is invalid", where=where)
    header = read_at(ss, hsize)
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:]) != hcrc:
        raise PackageError(
            "the GPT header checksum does not match (damaged image)",
            where=where,
            hint="download the image again",
        )
    entries_lba, n_entries, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if entry_size < 128 or n_entries > 4096:
        raise PackageError(f"GPT with {n_entries} entries of {entry_size} bytes is invalid", where=where)
    table = read_at(entries_lba * ss, n_entries * entry_size)
    if len(table) < n_entries * entry_size:
        raise PackageError("the image ends inside the GPT partition entries (truncated)", where=where)
    if zlib.crc32(table) != entries_crc:
        raise PackageError(
            "the GPT partition entries checksum does not match (damaged image)",
            where=where,
            hint="download the image again",
        )
    parts = []
    for i in range(n_entries):
        e = table[i * entry_size : (i + 1) * entry_size]
        if not any(e[:16]):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        name = e[56:128].decode("utf-16-le", "replace").split("\0")[0]
        kind = f"type {uuid.UUID(bytes_le=e[:16])}" + (f" {name!r}" if name else "")
        parts.append(Partition(i + 1, first * ss, (last - first + 1) * ss, "gpt", kind))
    return parts
