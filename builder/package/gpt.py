"""The partition layout of a package: `partition32G.xml` and the 17408-byte GPT blob (`gpt.gz`).

The vendor packer (`bm_make_package.sh` + `mk_gpt`) reads the XML twice: the shell greps it for
labels, sizes and formats; `mk_gpt` (libxml2) builds the GPT from it. This module is the GPT's
strict codec; partxml is the XML's, layout the arithmetic of resizing.

mk_gpt facts this module follows (scripts/mk-gpt/mk_gpt.{c,h}):
- blob = LBA 0 protective MBR + LBA 1 header (sizeof(struct gpt_header_t) == 512: the 92 header
  bytes, then 420 zero bytes) + LBA 2..33: 128 entries of 128 bytes. No backup GPT.
- protective MBR: all zero except record 0 = {boot 0, CHS start 0/0/1, type 0xEE, CHS end 0xFE/0xFF/0xFF,
  start LBA 1, size min(sectors - 1, 0xFFFFFFFF)} and the 0x55AA signature.
- header: revision 1.0, size 92, my LBA 1, alternate LBA sectors - 1, usable 34 .. sectors - 34.
- partitions packed from LBA 8192; end = start + ceil(size / 512) - 1; type "basic data";
  readonly="true" sets attribute bit 60; the name is the label's bytes widened to UTF-16 as written
  in the XML (mk_gpt does NOT upper-case; the vendor XMLs simply use upper-case labels).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from builder.errors import BuildError, PackageError
from builder.package.partxml import (
    _BACKUP_SECTORS,
    _GUID_NAMESPACE,
    BASIC_DATA_GUID,
    GPT_BLOB_SIZE,
    GPT_ENTRY_COUNT,
    GPT_ENTRY_SIZE,
    GPT_HEADER_SIZE,
    GPT_NAME_BYTES,
    GPT_NAME_CHARS,
    GPT_REVISION,
    GPT_SECTORS,
    GPT_SIGNATURE,
    MBR_PROTECTIVE_TYPE,
    READONLY_ATTRIBUTE,
    SECTOR,
    PartitionTable,
    XmlPartition,
    validate_table,
)

# --------------------------------------------------------------------------------------------
# The GPT


@dataclass(frozen=True)
class GptEntry:
    slot: int  # 0-based position in the entry array; the partition number is slot + 1
    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str
    # The 72 name bytes as read (anything after the NUL survives a re-encode); ignored if stale.
    name_raw: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def readonly(self) -> bool:
        return bool(self.attributes & READONLY_ATTRIBUTE)

    @property
    def size_sectors(self) -> int:
        return self.last_lba - self.first_lba + 1


@dataclass(frozen=True)
class Gpt:
    """A primary GPT as in gpt.gz. Keeps every field so that encode(decode(blob)) == blob."""

    mbr: bytes = field(repr=False)  # LBA 0 as is (512 bytes)
    disk_guid: uuid.UUID
    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    entries: tuple[GptEntry, ...]  # used slots (type GUID not zero), in slot order
    revision: int = GPT_REVISION
    header_size: int = GPT_HEADER_SIZE
    reserved1: int = 0
    entries_lba: int = 2
    entry_count: int = GPT_ENTRY_COUNT
    entry_size: int = GPT_ENTRY_SIZE
    header_tail: bytes = b""  # LBA 1 bytes 92..511 as read; b"" when all zero (mk_gpt)
    unused_slots: tuple[tuple[int, bytes], ...] = ()  # empty slots that are not all zero, as read

    @property
    def disk_sectors(self) -> int:
        """The disk size the header was made for (the backup header sits on its last sector)."""
        return self.alternate_lba + 1

    def entry(self, name: str) -> GptEntry | None:
        for e in self.entries:
            if e.name == name:
                return e
        return None


_MBR_RECORD = struct.Struct("<BBBBBBBBII")
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY = struct.Struct("<16s16sQQQ72s")
assert _HEADER.size == GPT_HEADER_SIZE and _ENTRY.size == GPT_ENTRY_SIZE


def protective_mbr(disk_sectors: int) -> bytes:
    """LBA 0 exactly as mk_gpt writes it."""
    size = min(disk_sectors - 1, 0xFFFFFFFF)
    record = _MBR_RECORD.pack(0x00, 0x00, 0x01, 0x00, MBR_PROTECTIVE_TYPE, 0xFE, 0xFF, 0xFF, 1, size)
    return bytes(446) + record + bytes(48) + b"\x55\xaa"


def decode_gpt(blob: bytes, where: str) -> Gpt:
    """Decode and check the 17408-byte primary GPT blob (PackageError on anything wrong)."""
    if len(blob) != GPT_BLOB_SIZE:
        raise PackageError(
            f"the GPT blob is {len(blob)} bytes, expected {GPT_BLOB_SIZE} (MBR + header + 128 entries)",
            where=where,
            hint="gpt.gz must uncompress to exactly 34 sectors",
        )
    mbr = bytes(blob[:SECTOR])
    _check_protective_mbr(mbr, where)
    header = _decode_header(blob[SECTOR : 2 * SECTOR], where)
    entries_blob = blob[2 * SECTOR :]
    crc = zlib.crc32(entries_blob)
    if crc != header["entries_crc32"]:
        raise PackageError(
            f"entry array CRC32 is 0x{header['entries_crc32']:08x} in the header, "
            f"computed 0x{crc:08x}: the partition entries are corrupt",
            where=where,
            hint="the package is damaged; download it again",
        )
    entries, unused = _decode_entries(entries_blob, where)
    return Gpt(
        mbr=mbr,
        disk_guid=header["disk_guid"],
        my_lba=header["my_lba"],
        alternate_lba=header["alternate_lba"],
        first_usable_lba=header["first_usable_lba"],
        last_usable_lba=header["last_usable_lba"],
        entries=entries,
        revision=header["revision"],
        header_size=header["header_size"],
        reserved1=header["reserved1"],
        entries_lba=header["entries_lba"],
        entry_count=header["entry_count"],
        entry_size=header["entry_size"],
        header_tail=header["tail"],
        unused_slots=unused,
    )


def _check_protective_mbr(mbr: bytes, where: str) -> None:
    if mbr[510:512] != b"\x55\xaa":
        raise PackageError(
            f"LBA 0 has no MBR signature (bytes 510..511 are {mbr[510:512].hex()}, expected 55aa)",
            where=where,
            hint="this is not a GPT blob, or it is damaged",
        )
    if mbr[446 + 4] != MBR_PROTECTIVE_TYPE:
        raise PackageError(
            f"the first MBR partition has type 0x{mbr[446 + 4]:02x}, expected 0xee (protective MBR)",
            where=where,
            hint="this is an MBR disk label, not a GPT",
        )


def _decode_header(sector: bytes, where: str) -> dict[str, Any]:
    fields = _HEADER.unpack_from(sector)
    (signature, revision, header_size, header_crc, reserved1, my_lba, alternate_lba) = fields[:7]
    (first_usable, last_usable, disk_guid, entries_lba, entry_count, entry_size, entries_crc) = fields[7:]
    hint = "the package is damaged; download it again"
    if signature != GPT_SIGNATURE:
        raise PackageError(
            f"LBA 1 signature is {signature!r}, expected {GPT_SIGNATURE!r}", where=where, hint=hint
        )
    if revision != GPT_REVISION:
        raise PackageError(
            f"GPT revision is 0x{revision:08x}, expected 0x{GPT_REVISION:08x}", where=where, hint=hint
        )
    if not GPT_HEADER_SIZE <= header_size <= SECTOR:
        raise PackageError(
            f"GPT header size is {header_size}, expected {GPT_HEADER_SIZE}..{SECTOR}", where=where, hint=hint
        )
    zeroed = sector[:16] + b"\0\0\0\0" + sector[20:header_size]
    crc = zlib.crc32(zeroed)
    if crc != header_crc:
        raise PackageError(
            f"GPT header CRC32 is 0x{header_crc:08x}, computed 0x{crc:08x}: the header is corrupt",
            where=where,
            hint=hint,
        )
    expected = {
        "my LBA": (my_lba, 1),
        "partition entry LBA": (entries_lba, 2),
        "number of partition entries": (entry_count, GPT_ENTRY_COUNT),
        "size of a partition entry": (entry_size, GPT_ENTRY_SIZE),
    }
    for what, (got, want) in expected.items():
        if got != want:
            raise PackageError(
                f"GPT header: {what} is {got}, expected {want} (the layout mk_gpt writes)",
                where=where,
                hint="the U-Boot script writes exactly 34 sectors, so only mk_gpt's layout can be flashed: "
                "regenerate gpt.gz with the vendor's mk_gpt, or download the package again",
            )
    if not (GPT_SECTORS <= first_usable <= last_usable + 1 and last_usable < alternate_lba):
        raise PackageError(
            f"GPT header: usable LBAs {first_usable}..{last_usable} do not fit before the alternate "
            f"header at LBA {alternate_lba}",
            where=where,
            hint=hint,
        )
    tail = bytes(sector[GPT_HEADER_SIZE:])
    return {
        "revision": revision,
        "header_size": header_size,
        "reserved1": reserved1,
        "my_lba": my_lba,
        "alternate_lba": alternate_lba,
        "first_usable_lba": first_usable,
        "last_usable_lba": last_usable,
        "disk_guid": uuid.UUID(bytes_le=disk_guid),
        "entries_lba": entries_lba,
        "entry_count": entry_count,
        "entry_size": entry_size,
        "entries_crc32": entries_crc,
        "tail": b"" if not any(tail) else tail,
    }


def _decode_entries(blob: bytes, where: str) -> tuple[tuple[GptEntry, ...], tuple[tuple[int, bytes], ...]]:
    entries = []
    unused = []
    for slot in range(GPT_ENTRY_COUNT):
        raw = blob[slot * GPT_ENTRY_SIZE : (slot + 1) * GPT_ENTRY_SIZE]
        type_guid, unique_guid, first, last, attributes, name_raw = _ENTRY.unpack(raw)
        if not any(type_guid):
            if any(raw):
                unused.append((slot, bytes(raw)))
            continue
        entries.append(
            GptEntry(
                slot=slot,
                type_guid=uuid.UUID(bytes_le=type_guid),
                unique_guid=uuid.UUID(bytes_le=unique_guid),
                first_lba=first,
                last_lba=last,
                attributes=attributes,
                name=_decode_name(name_raw, slot, where),
                name_raw=name_raw,
            )
        )
    return tuple(entries), tuple(unused)


def _decode_name(raw: bytes, slot: int, where: str) -> str:
    end = len(raw)
    for i in range(0, len(raw), 2):
        if raw[i : i + 2] == b"\0\0":
            end = i
            break
    try:
        return raw[:end].decode("utf-16-le")
    except UnicodeDecodeError:
        raise PackageError(
            f"GPT entry {slot + 1}: the partition name is not valid UTF-16LE ({raw[:end].hex()})",
            where=where,
            hint="the package is damaged; download it again",
        ) from None


def encode_gpt(gpt: Gpt) -> bytes:
    """The 17408-byte blob exactly as mk_gpt lays it out (CRCs recomputed)."""
    if len(gpt.mbr) != SECTOR:
        raise BuildError(f"cannot encode GPT: the MBR is {len(gpt.mbr)} bytes, expected {SECTOR}")
    if (gpt.entry_count, gpt.entry_size, gpt.entries_lba) != (GPT_ENTRY_COUNT, GPT_ENTRY_SIZE, 2):
        raise BuildError("cannot encode GPT: only 128 entries of 128 bytes at LBA 2 fit the 34-sector blob")
    if not GPT_HEADER_SIZE <= gpt.header_size <= SECTOR:
        raise BuildError(f"cannot encode GPT: header size {gpt.header_size} is not in 92..512")
    entries = _encode_entries(gpt)
    tail = gpt.header_tail or bytes(SECTOR - GPT_HEADER_SIZE)
    if len(tail) != SECTOR - GPT_HEADER_SIZE:
        raise BuildError(
            f"cannot encode GPT: header tail is {len(tail)} bytes, expected {SECTOR - GPT_HEADER_SIZE}"
        )
    fields = _HEADER.pack(
        GPT_SIGNATURE,
        gpt.revision,
        gpt.header_size,
        0,
        gpt.reserved1,
        gpt.my_lba,
        gpt.alternate_lba,
        gpt.first_usable_lba,
        gpt.last_usable_lba,
        gpt.disk_guid.bytes_le,
        gpt.entries_lba,
        gpt.entry_count,
        gpt.entry_size,
        zlib.crc32(entries),
    )
    sector = fields + tail
    crc = zlib.crc32(sector[: gpt.header_size])
    sector = sector[:16] + struct.pack("<I", crc) + sector[20:]
    return gpt.mbr + sector + entries


def _encode_entries(gpt: Gpt) -> bytes:
    array = bytearray(GPT_ENTRY_COUNT * GPT_ENTRY_SIZE)
    used: set[int] = set()
    for slot, raw in gpt.unused_slots:
        array[slot * GPT_ENTRY_SIZE : (slot + 1) * GPT_ENTRY_SIZE] = raw
    for e in gpt.entries:
        if not 0 <= e.slot < GPT_ENTRY_COUNT or e.slot in used:
            raise BuildError(f"cannot encode GPT: entry {e.name!r} has a bad or duplicate slot {e.slot}")
        if e.type_guid.int == 0:
            raise BuildError(f"cannot encode GPT: entry {e.name!r} has a zero type GUID (that means unused)")
        used.add(e.slot)
        array[e.slot * GPT_ENTRY_SIZE : (e.slot + 1) * GPT_ENTRY_SIZE] = _ENTRY.pack(
            e.type_guid.bytes_le,
            e.unique_guid.bytes_le,
            e.first_lba,
            e.last_lba,
            e.attributes,
            _encode_name(e),
        )
    return bytes(array)


def _encode_name(entry: GptEntry) -> bytes:
    raw = entry.name_raw
    if raw is not None and len(raw) == GPT_NAME_BYTES:
        try:
            if _decode_name(raw, entry.slot, "") == entry.name:
                return raw
        except PackageError:
            pass
    encoded = entry.name.encode("utf-16-le")
    if len(encoded) > GPT_NAME_BYTES or "\0" in entry.name:
        raise BuildError(
            f"cannot encode GPT: partition name {entry.name!r} is longer than {GPT_NAME_CHARS} UTF-16 "
            "units or contains NUL"
        )
    return encoded.ljust(GPT_NAME_BYTES, b"\0")


def gpt_from_table(table: PartitionTable, template: Gpt | None = None) -> Gpt:
    """The GPT mk_gpt would make from this table, with deterministic GUIDs.

    With a template (the package's own GPT) its disk GUID is kept, and every partition whose label
    equals a template entry's name keeps that entry's unique GUID. Anything without one gets a
    uuid5 of the label and disk size, so the same table always gives the same bytes.
    """
    validate_table(table, error=BuildError)
    sectors = table.disk_sectors
    if template is not None:
        disk_guid = template.disk_guid
    else:
        disk_guid = uuid.uuid5(_GUID_NAMESPACE, f"disk/{table.disk_kb}")
    entries = []
    for part in table.partitions:
        old = template.entry(part.label) if template is not None else None
        if old is not None:
            guid = old.unique_guid
        else:
            guid = uuid.uuid5(_GUID_NAMESPACE, f"partition/{part.label}/{table.disk_kb}/{disk_guid}")
        entries.append(
            GptEntry(
                slot=part.index,
                type_guid=BASIC_DATA_GUID,
                unique_guid=guid,
                first_lba=part.offset_sectors,
                last_lba=part.end_sector,
                attributes=READONLY_ATTRIBUTE if part.readonly else 0,
                name=_mk_gpt_name(part.label),
            )
        )
    return Gpt(
        mbr=protective_mbr(sectors),
        disk_guid=disk_guid,
        my_lba=1,
        alternate_lba=sectors - 1,
        first_usable_lba=GPT_SECTORS,
        last_usable_lba=sectors - 1 - _BACKUP_SECTORS,
        entries=tuple(entries),
    )


def _mk_gpt_name(label: str) -> str:
    # mk_gpt widens each byte of the label to a UTF-16 unit, as written (no case change).
    return label[:GPT_NAME_CHARS]


def check_gpt_against_table(gpt: Gpt, table: PartitionTable) -> list[str]:
    """Every way the GPT differs from what mk_gpt would make of the table, one line each."""
    problems = []
    sectors = table.disk_sectors
    if gpt.alternate_lba != sectors - 1:
        problems.append(
            f"disk size: the GPT is for {gpt.disk_sectors} sectors, the XML says {sectors} "
            f"({table.disk_kb} KiB)"
        )
    if gpt.last_usable_lba != sectors - 1 - _BACKUP_SECTORS:
        problems.append(
            f"disk size: last usable LBA is {gpt.last_usable_lba}, "
            f"the XML gives {sectors - 1 - _BACKUP_SECTORS}"
        )
    mbr_size = struct.unpack_from("<I", gpt.mbr, 446 + 12)[0]
    if mbr_size != min(sectors - 1, 0xFFFFFFFF):
        problems.append(
            f"protective MBR covers {mbr_size} sectors, the XML disk needs {min(sectors - 1, 0xFFFFFFFF)}"
        )
    if len(gpt.entries) != len(table.partitions):
        problems.append(f"count: the GPT has {len(gpt.entries)} partitions, the XML {len(table.partitions)}")
    by_slot = {e.slot: e for e in gpt.entries}
    for part in table.partitions:
        problems += _entry_problems(by_slot.get(part.index), part)
    extra = sorted(slot for slot in by_slot if slot >= len(table.partitions))
    for slot in extra:
        e = by_slot[slot]
        problems.append(f"GPT partition {slot + 1} ({e.name}) is not in the XML")
    for e in gpt.entries:
        if not gpt.first_usable_lba <= e.first_lba <= e.last_lba <= gpt.last_usable_lba:
            problems.append(
                f"GPT partition {e.slot + 1} ({e.name}): sectors {e.first_lba}..{e.last_lba} are outside "
                f"the usable {gpt.first_usable_lba}..{gpt.last_usable_lba}"
            )
    return problems


def _entry_problems(entry: GptEntry | None, part: XmlPartition) -> list[str]:
    what = f"partition {part.index + 1} ({part.label})"
    if entry is None:
        return [f"{what}: missing from the GPT"]
    problems = []
    if entry.name != _mk_gpt_name(part.label):
        case = " (differs only in case)" if entry.name.lower() == part.label.lower() else ""
        problems.append(f"{what}: GPT name is {entry.name!r}, the XML label is {part.label!r}{case}")
    if entry.first_lba != part.offset_sectors:
        problems.append(
            f"{what}: starts at sector {entry.first_lba} in the GPT, {part.offset_sectors} in the XML"
        )
    if entry.last_lba != part.end_sector:
        problems.append(f"{what}: ends at sector {entry.last_lba} in the GPT, {part.end_sector} in the XML")
    if entry.readonly != part.readonly:
        problems.append(
            f"{what}: read-only flag (attribute bit 60) is {'set' if entry.readonly else 'clear'} in the "
            f'GPT but readonly="{"true" if part.readonly else "false"}" in the XML'
        )
    if entry.type_guid != BASIC_DATA_GUID:
        problems.append(f"{what}: type GUID is {entry.type_guid}, mk_gpt writes {BASIC_DATA_GUID}")
    return problems
