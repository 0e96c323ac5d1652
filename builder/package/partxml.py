"""`partition32G.xml`: the vendor's partition table, parsed strictly (every error with its line),
validated, rewritten with new sizes byte for byte otherwise, and formatted; the geometry constants."""

from __future__ import annotations

import dataclasses
import difflib
import re
import uuid
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


def _unknown_label_error(label: str, table: PartitionTable, error: type[AirboxError]) -> Exception:
    lower = {p.label.lower(): p.label for p in table.partitions}
    close = difflib.get_close_matches(label.lower(), list(lower), n=1, cutoff=0.6)
    hint = f"did you mean {lower[close[0]]!r}? " if close else ""
    hint += "the partitions are " + ", ".join(table.labels)
    return error(f"no partition labelled {label!r}", where=table.where or None, hint=hint)


# --------------------------------------------------------------------------------------------


def _at(where: str, line: int) -> str:
    return f"{where}:{line}" if line else where


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
