"""The partition layout of a package: `partition32G.xml` and the 17408-byte GPT blob (`gpt.gz`).

The vendor packer (`bm_make_package.sh` + `mk_gpt`) reads the XML twice: the shell greps it for
labels, sizes and formats; `mk_gpt` (libxml2) builds the GPT from it. This module is a strict codec
for both, plus the layout arithmetic the builder needs when it resizes partitions.

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

import dataclasses
import difflib
import re
import struct
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from xml.parsers import expat

from builder.errors import AirboxError, BuildError, PackageError

KIB = 1024
SECTOR = 512
FIRST_PARTITION_SECTOR = 8192

GPT_ENTRY_COUNT = 128
GPT_ENTRY_SIZE = 128
GPT_HEADER_SIZE = 92
GPT_REVISION = 0x00010000
GPT_SIGNATURE = b"EFI PART"
GPT_ENTRY_SECTORS = GPT_ENTRY_COUNT * GPT_ENTRY_SIZE // SECTOR  # 32
GPT_SECTORS = 2 + GPT_ENTRY_SECTORS  # 34: what boot_emmc-gpt writes at LBA 0
GPT_BLOB_SIZE = GPT_SECTORS * SECTOR  # 17408 = 0x4400
GPT_NAME_BYTES = GPT_ENTRY_SIZE - 56  # 72 bytes = 36 UTF-16 code units
GPT_NAME_CHARS = GPT_NAME_BYTES // 2
READONLY_ATTRIBUTE_BIT = 60
READONLY_ATTRIBUTE = 1 << READONLY_ATTRIBUTE_BIT
BASIC_DATA_GUID = uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")
MBR_PROTECTIVE_TYPE = 0xEE

FORMAT_RAW = 0
FORMAT_FAT = 1
FORMAT_EXT4 = 2
FORMAT_NAMES = {FORMAT_RAW: "raw", FORMAT_FAT: "fat", FORMAT_EXT4: "ext4"}

# Sectors after the last usable LBA: 32 sectors of backup entries + the backup header.
_BACKUP_SECTORS = GPT_ENTRY_SECTORS + 1
_MAX_DISK_KB = (1 << 62) // KIB  # keeps every LBA well inside uint64
# A label becomes a GPT name (<= 36 UTF-16 units, widened byte by byte by mk_gpt), a file name
# (`<label>.<k>-of-<M>.gz`, lower-cased) and a shell word in the vendor scripts.
_LABEL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,35}", re.ASCII)
_DIGITS_RE = re.compile(r"[0-9]+", re.ASCII)
_GUID_NAMESPACE = uuid.UUID("5b1d7a5e-6a0e-4b7e-9a43-0a1b0c2d3e4f")  # airbox-build's own uuid5 namespace


# --------------------------------------------------------------------------------------------
# The XML


@dataclass(frozen=True)
class XmlPartition:
    """One `<partition>` element. `line` and `size_span` point into the text it was parsed from."""

    index: int  # 0-based; the GPT partition number is index + 1
    label: str  # as written in the XML
    size_kb: int
    readonly: bool
    fmt: int  # FORMAT_RAW, FORMAT_FAT or FORMAT_EXT4
    offset_sectors: int  # first LBA: packed from FIRST_PARTITION_SECTOR in XML order
    line: int = field(default=0, compare=False)
    size_span: tuple[int, int] | None = field(default=None, compare=False, repr=False)
    extra_attributes: tuple[tuple[str, str], ...] = ()  # attributes mk_gpt ignores, kept as found

    @property
    def size_sectors(self) -> int:
        return self.size_kb * KIB // SECTOR

    @property
    def size_bytes(self) -> int:
        return self.size_kb * KIB

    @property
    def end_sector(self) -> int:
        """Last LBA of the partition (inclusive), as mk_gpt computes it."""
        return self.offset_sectors + self.size_sectors - 1

    @property
    def file_label(self) -> str:
        """The label as the packer uses it in file names (`rootfs.1-of-32.gz`)."""
        return self.label.lower()


@dataclass(frozen=True)
class PartitionTable:
    disk_kb: int
    partitions: tuple[XmlPartition, ...]
    where: str = field(default="", compare=False)
    disk_line: int = field(default=0, compare=False)
    disk_extra_attributes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        offset = FIRST_PARTITION_SECTOR
        for i, part in enumerate(self.partitions):
            if part.index != i or part.offset_sectors != offset:
                raise ValueError(f"partition {part.label!r} is not packed in order (use make_table)")
            offset += part.size_sectors

    @property
    def disk_sectors(self) -> int:
        return self.disk_kb * KIB // SECTOR

    @property
    def disk_bytes(self) -> int:
        return self.disk_kb * KIB

    @property
    def last_usable_sector(self) -> int:
        return self.disk_sectors - 1 - _BACKUP_SECTORS

    @property
    def end_sector(self) -> int:
        """First LBA after the last partition."""
        if not self.partitions:
            return FIRST_PARTITION_SECTOR
        return self.partitions[-1].end_sector + 1

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(p.label for p in self.partitions)

    def find(self, label: str) -> XmlPartition | None:
        """The partition with this label, compared case-insensitively (file names are lower-case)."""
        wanted = label.lower()
        for part in self.partitions:
            if part.label.lower() == wanted:
                return part
        return None

    def get(self, label: str, *, error: type[AirboxError] = BuildError) -> XmlPartition:
        part = self.find(label)
        if part is None:
            raise _unknown_label_error(label, self, error)
        return part


def make_table(
    disk_kb: int,
    specs: Iterable[tuple[str, int, bool, int]],
    *,
    where: str = "",
) -> PartitionTable:
    """A table from (label, size_kb, readonly, fmt) tuples, with offsets packed as the packer does.

    Only computes; validation of labels/sizes is `validate_table`.
    """
    parts = []
    offset = FIRST_PARTITION_SECTOR
    for index, (label, size_kb, readonly, fmt) in enumerate(specs):
        parts.append(XmlPartition(index, label, size_kb, readonly, fmt, offset))
        offset += size_kb * KIB // SECTOR
    return PartitionTable(disk_kb, tuple(parts), where=where)


def _with_sizes(table: PartitionTable, sizes_kb: Mapping[int, int]) -> PartitionTable:
    """The same table with some partitions (by index) resized and everything after re-packed."""
    parts = []
    offset = FIRST_PARTITION_SECTOR
    for part in table.partitions:
        size_kb = sizes_kb.get(part.index, part.size_kb)
        parts.append(dataclasses.replace(part, size_kb=size_kb, offset_sectors=offset))
        offset += size_kb * KIB // SECTOR
    return dataclasses.replace(table, partitions=tuple(parts))


def validate_table(table: PartitionTable, *, error: type[AirboxError] = PackageError) -> None:
    """Labels well-formed and unique, sizes positive, formats known, everything inside the disk."""
    where = table.where or "partition table"
    if not 0 < table.disk_kb <= _MAX_DISK_KB:
        raise error(
            f"physical_partition size_in_kb={table.disk_kb} is out of range",
            where=_at(where, table.disk_line),
            hint="the disk size must be a positive number of KiB",
        )
    if not table.partitions:
        raise error("no <partition> in physical_partition", where=_at(where, table.disk_line))
    if len(table.partitions) > GPT_ENTRY_COUNT:
        raise error(
            f"{len(table.partitions)} partitions, a GPT holds at most {GPT_ENTRY_COUNT}",
            where=_at(where, table.disk_line),
        )
    seen: dict[str, XmlPartition] = {}
    for part in table.partitions:
        pwhere = _at(where, part.line)
        if not _LABEL_RE.fullmatch(part.label):
            raise error(
                f"partition {part.index + 1}: label={part.label!r} is not usable",
                where=pwhere,
                hint="a label is 1 to 36 ASCII letters, digits, '_', '.', '-' (it becomes the GPT name "
                "and the chunk file names), starting with a letter, digit or '_'",
            )
        first = seen.get(part.label.lower())
        if first is not None:
            raise error(
                f"label={part.label!r} duplicates label={first.label!r} of line {first.line} "
                "(labels are compared case-insensitively: the chunk files use the lower-case label)",
                where=pwhere,
                hint="give every partition its own label",
            )
        seen[part.label.lower()] = part
        if part.size_kb <= 0:
            raise error(
                f"partition {part.label}: size_in_kb={part.size_kb} must be positive",
                where=pwhere,
            )
        if part.fmt not in FORMAT_NAMES:
            raise error(
                f"partition {part.label}: format={part.fmt} is unknown",
                where=pwhere,
                hint="format is 0 (raw), 1 (FAT) or 2 (ext4)",
            )
    _check_fits(table, error)


def _check_fits(table: PartitionTable, error: type[AirboxError]) -> None:
    last_usable = table.last_usable_sector
    for part in table.partitions:
        if part.end_sector <= last_usable:
            continue
        needed = (table.end_sector + _BACKUP_SECTORS) * SECTOR
        available = table.disk_bytes
        raise error(
            f"partition {part.index + 1} ({part.label}, size_in_kb={part.size_kb}) ends at sector "
            f"{part.end_sector}, past the last usable sector {last_usable} of the "
            f"{table.disk_kb} KiB disk: the layout needs {needed} bytes "
            f"({_ceil_div(needed, KIB)} KiB incl. the {FIRST_PARTITION_SECTOR // 2} KiB before the first "
            f"partition and the {_BACKUP_SECTORS * SECTOR} bytes of backup GPT), the disk has {available} "
            f"bytes (short by {needed - available} bytes)",
            where=_at(table.where or "partition table", part.line),
            hint="shrink a partition or raise physical_partition size_in_kb",
        )


class _XmlReader:
    """Collects elements from expat with their byte positions (expat gives lines, not spans)."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data = data
        self.where = where
        self.parser = expat.ParserCreate(encoding="UTF-8")
        self.parser.StartElementHandler = self._start
        self.parser.EndElementHandler = self._end
        self.parser.CharacterDataHandler = self._text
        self.depth = 0
        self.root: _Element | None = None
        self.children: list[_Element] = []

    def read(self) -> None:
        try:
            self.parser.Parse(self.data, True)
        except expat.ExpatError as exc:
            raise PackageError(
                f"malformed XML: {expat.ErrorString(exc.code)} (column {exc.offset + 1})",
                where=_at(self.where, exc.lineno),
                hint="the file must be well-formed XML like the vendor's partition32G.xml",
            ) from None

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        start = self.parser.CurrentByteIndex
        line = self.parser.CurrentLineNumber
        element = _Element(name, line, _attribute_spans(self.data, start), attrs)
        self.depth += 1
        if self.depth == 1:
            if name != "physical_partition":
                raise PackageError(
                    f"the root element is <{name}>, expected <physical_partition>",
                    where=_at(self.where, line),
                )
            self.root = element
        elif self.depth == 2 and name == "partition":
            self.children.append(element)
        else:
            inside = "physical_partition" if self.depth == 2 else "partition"
            raise PackageError(
                f"unexpected element <{name}> inside <{inside}>",
                where=_at(self.where, line),
                hint="physical_partition holds only <partition .../> elements",
            )

    def _end(self, name: str) -> None:
        self.depth -= 1

    def _text(self, text: str) -> None:
        if text.strip():
            raise PackageError(
                f"unexpected text {text.strip()[:40]!r}",
                where=_at(self.where, self.parser.CurrentLineNumber),
                hint="physical_partition holds only <partition .../> elements",
            )


@dataclass
class _Element:
    name: str
    line: int
    spans: dict[str, tuple[int, int]]  # attribute -> byte span of its raw value (inside the quotes)
    attrs: dict[str, str]


_TAG_NAME_RE = re.compile(rb"<[^\s/>]+")
_ATTRIBUTE_RE = re.compile(rb"\s+([^\s=/>]+)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')")


def _attribute_spans(data: bytes, start: int) -> dict[str, tuple[int, int]]:
    """Spans of the attribute values of the start tag at `start` (already checked by expat)."""
    spans: dict[str, tuple[int, int]] = {}
    match = _TAG_NAME_RE.match(data, start)
    pos = match.end() if match else start
    while (attr := _ATTRIBUTE_RE.match(data, pos)) is not None:
        group = 2 if attr.group(2) is not None else 3
        spans[attr.group(1).decode("utf-8")] = attr.span(group)
        pos = attr.end()
    return spans


def parse_partition_xml(text: str, where: str) -> PartitionTable:
    """Parse partition32G.xml strictly; every error names the file, line and attribute."""
    data = text.encode("utf-8")
    reader = _XmlReader(data, where)
    reader.read()
    root = reader.root
    assert root is not None  # expat refuses a document without a root element
    disk_kb = _int_attribute(root, "size_in_kb", data, where, what="physical_partition")
    parts = []
    offset = FIRST_PARTITION_SECTOR
    for index, element in enumerate(reader.children):
        part = _partition_from_element(index, element, offset, data, where)
        parts.append(part)
        offset += part.size_sectors
    table = PartitionTable(
        disk_kb,
        tuple(parts),
        where=where,
        disk_line=root.line,
        disk_extra_attributes=_extra_attributes(root, {"size_in_kb"}),
    )
    validate_table(table, error=PackageError)
    return table


_PARTITION_ATTRIBUTES = ("label", "size_in_kb", "readonly", "format")


def _partition_from_element(
    index: int, element: _Element, offset: int, data: bytes, where: str
) -> XmlPartition:
    what = f"partition {index + 1}"
    for name in _PARTITION_ATTRIBUTES:
        if name not in element.attrs:
            raise PackageError(
                f"{what}: attribute {name} is missing",
                where=_at(where, element.line),
                hint='each partition needs label="...", size_in_kb="...", readonly="true|false", '
                'format="0|1|2"',
            )
    label = element.attrs["label"]
    what = f"partition {index + 1} ({label})"
    size_kb = _int_attribute(element, "size_in_kb", data, where, what=what)
    readonly_text = element.attrs["readonly"]
    if readonly_text not in ("true", "false"):
        raise PackageError(
            f"{what}: readonly={readonly_text!r} is neither 'true' nor 'false'",
            where=_at(where, _attribute_line(element, "readonly", data)),
            hint='mk_gpt silently treats anything else as false; write readonly="false" if that is meant',
        )
    fmt = _int_attribute(element, "format", data, where, what=what)
    if fmt not in FORMAT_NAMES:
        raise PackageError(
            f"{what}: format={fmt} is unknown",
            where=_at(where, _attribute_line(element, "format", data)),
            hint="format is 0 (raw), 1 (FAT) or 2 (ext4)",
        )
    return XmlPartition(
        index=index,
        label=label,
        size_kb=size_kb,
        readonly=readonly_text == "true",
        fmt=fmt,
        offset_sectors=offset,
        line=element.line,
        size_span=element.spans.get("size_in_kb"),
        extra_attributes=_extra_attributes(element, set(_PARTITION_ATTRIBUTES)),
    )


def _int_attribute(element: _Element, name: str, data: bytes, where: str, *, what: str) -> int:
    if name not in element.attrs:
        raise PackageError(f"{what}: attribute {name} is missing", where=_at(where, element.line))
    value = element.attrs[name]
    if not _DIGITS_RE.fullmatch(value):
        raise PackageError(
            f"{what}: {name}={value!r} is not a non-negative whole number",
            where=_at(where, _attribute_line(element, name, data)),
            hint=f"{name} is written in decimal digits only",
        )
    number = int(value)
    if name == "size_in_kb" and number == 0:
        raise PackageError(f"{what}: size_in_kb is 0", where=_at(where, _attribute_line(element, name, data)))
    return number


def _attribute_line(element: _Element, name: str, data: bytes) -> int:
    span = element.spans.get(name)
    if span is None:
        return element.line
    # Lines counted the way expat counts them (CR, LF and CRLF each end one line).
    before = data[: span[0]].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return before.count(b"\n") + 1


def _extra_attributes(element: _Element, known: set[str]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in element.attrs.items() if k not in known)


def rewrite_partition_xml(text: str, new_sizes: Mapping[str, int], where: str = "partition32G.xml") -> str:
    """Change only the size_in_kb values of the named partitions; every other byte stays.

    Labels are matched case-insensitively; an unknown label, a non-positive size or a layout that
    no longer fits the disk is a BuildError.
    """
    table = parse_partition_xml(text, where)
    sizes_kb: dict[int, int] = {}
    for label, size_kb in new_sizes.items():
        part = table.get(label, error=BuildError)
        if isinstance(size_kb, bool) or not isinstance(size_kb, int) or size_kb <= 0:
            raise BuildError(f"partition {part.label}: new size {size_kb!r} KiB is not a positive integer")
        sizes_kb[part.index] = size_kb
    _check_fits(_with_sizes(table, sizes_kb), BuildError)
    data = text.encode("utf-8")
    out = bytearray()
    pos = 0
    for part in table.partitions:
        if part.index not in sizes_kb:
            continue
        assert part.size_span is not None
        start, end = part.size_span
        out += data[pos:start] + str(sizes_kb[part.index]).encode("ascii")
        pos = end
    out += data[pos:]
    return out.decode("utf-8")


def format_partition_xml(table: PartitionTable) -> str:
    """The table written in the vendor's style (one partition per line: the packer greps lines)."""
    validate_table(table, error=BuildError)
    width = max(len(p.label) for p in table.partitions) + 3
    extra_disk = "".join(f" {k}={_quote(v)}" for k, v in table.disk_extra_attributes)
    lines = [f'<physical_partition size_in_kb="{table.disk_kb}"{extra_disk}>']
    for p in table.partitions:
        label = f'"{p.label}"'.ljust(width)
        extra = "".join(f" {k}={_quote(v)}" for k, v in p.extra_attributes)
        lines.append(
            f'\t<partition label={label}size_in_kb="{p.size_kb}" '
            f'readonly="{"true" if p.readonly else "false"}" format="{p.fmt}"{extra} />'
        )
    lines.append("</physical_partition>")
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    escaped = (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace('"', "&quot;")
        .replace("\t", "&#9;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
    )
    return f'"{escaped}"'


# --------------------------------------------------------------------------------------------
# Layout changes


@dataclass(frozen=True)
class LayoutChange:
    table: PartitionTable
    resized: tuple[str, ...]  # labels whose size changed
    moved: tuple[str, ...]  # labels whose first sector changed

    @property
    def sizes_kb(self) -> dict[str, int]:
        """label -> size_in_kb for every partition: feed to rewrite_partition_xml."""
        return {p.label: p.size_kb for p in self.table.partitions}


def apply_layout(
    table: PartitionTable,
    new_sizes: Mapping[str, int],
    min_bytes: Mapping[str, int] | None = None,
) -> LayoutChange:
    """Resize partitions (sizes in BYTES, rounded UP to whole KiB) and re-pack the ones after them.

    Labels are matched case-insensitively. Errors (BuildError) carry the numbers: an unknown label
    (with a did-you-mean), a size that is not positive, a partition smaller than its `min_bytes`
    (e.g. the size of the image that must go into it), a layout past the end of the disk.
    """
    sizes_kb: dict[int, int] = {}
    for label, size_bytes in new_sizes.items():
        part = table.get(label, error=BuildError)
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
            raise BuildError(
                f"partition {part.label}: requested size {size_bytes!r} bytes is not a positive integer",
                hint="give the partition size in bytes",
            )
        sizes_kb[part.index] = _ceil_div(size_bytes, KIB)
    new_table = _with_sizes(table, sizes_kb)
    for label, minimum in (min_bytes or {}).items():
        part = new_table.get(label, error=BuildError)
        if part.size_bytes < minimum:
            requested = "requested" if part.index in sizes_kb else "current"
            raise BuildError(
                f"partition {part.label}: {requested} size {part.size_bytes} bytes ({part.size_kb} KiB) is "
                f"smaller than the {minimum} bytes it must hold (short by {minimum - part.size_bytes} bytes)",
                hint=f"make {part.label} at least {_ceil_div(minimum, KIB)} KiB",
            )
    _check_fits(new_table, BuildError)
    pairs = list(zip(table.partitions, new_table.partitions, strict=True))
    resized = tuple(new.label for old, new in pairs if old.size_kb != new.size_kb)
    moved = tuple(new.label for old, new in pairs if old.offset_sectors != new.offset_sectors)
    return LayoutChange(new_table, resized, moved)


def _unknown_label_error(label: str, table: PartitionTable, error: type[AirboxError]) -> Exception:
    lower = {p.label.lower(): p.label for p in table.partitions}
    close = difflib.get_close_matches(label.lower(), list(lower), n=1, cutoff=0.6)
    hint = f"did you mean {lower[close[0]]!r}? " if close else ""
    hint += "the partitions are " + ", ".join(table.labels)
    return error(f"no partition labelled {label!r}", where=table.where or None, hint=hint)


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


def _decode_header(sector: bytes, where: str) -> dict:
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


# --------------------------------------------------------------------------------------------


def _at(where: str, line: int) -> str:
    return f"{where}:{line}" if line else where


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
