"""Read the flash plan of a vendor package from its own scripts, XML and GPT.

Nothing here is assumed: partitions, offsets, chunk lists and the chunk size are
read from `boot.scr` -> `boot_emmc.scr` -> `boot_emmc-*.scr`, then cross-checked
against `partition32G.xml` and `gpt.gz`.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from builder.errors import PackageError
from builder.package.gpt import Gpt, check_gpt_against_table, decode_gpt
from builder.package.partxml import PartitionTable, parse_partition_xml
from builder.package.scripts import ChunkBlock, ParsedScript, parse_script
from builder.package.uimage import ScriptImage, decode_script

SECTOR = 512
FORMAT_NAMES = {0: "raw", 1: "fat", 2: "ext4"}
TOP_SCRIPT = "boot.scr"
EMMC_SCRIPT = "boot_emmc.scr"
GPT_SECTORS = 34
FORBIDDEN_TOP = ("boot.scr.emmc", "boot.scr.sd")
CHUNK_NAME = re.compile(r"^(?P<label>.+)\.(?P<k>\d+)-of-(?P<m>\d+)\.gz$")
MAX_SCRIPT_BYTES = 16 << 20


class FileSet(Protocol):
    """The file set of a package, whatever form it came in."""

    def names(self) -> list[str]: ...

    def size(self, name: str) -> int: ...

    def open(self, name: str) -> BinaryIO: ...


@dataclass(frozen=True)
class PartitionFlash:
    """One partition: where it lives on the eMMC and the chunks that write it."""

    index: int  # 0-based, XML order; the GPT number is index + 1
    label: str  # as written in the XML
    fmt: int
    readonly: bool
    offset_sectors: int
    size_sectors: int
    script: str | None  # e.g. boot_emmc-rootfs.scr; None when the package has no image for it
    chunks: tuple[ChunkBlock, ...]

    @property
    def fmt_name(self) -> str:
        return FORMAT_NAMES.get(self.fmt, str(self.fmt))

    @property
    def image_bytes(self) -> int:
        if not self.chunks:
            return 0
        last = self.chunks[-1]
        size = last.unzip_bytes if last.unzip_bytes is not None else last.count_sectors * SECTOR
        return (last.offset_sectors - self.offset_sectors) * SECTOR + size

    @property
    def stem(self) -> str:
        """Lower-case label, the stem of chunk and script names."""
        return self.label.lower()


@dataclass(frozen=True)
class FlashPlan:
    chunk_sectors: int
    chunk_sectors_inferred: bool  # False when no partition had two chunks to measure it from
    table: PartitionTable
    xml_name: str
    gpt: Gpt
    gpt_script: str
    partitions: tuple[PartitionFlash, ...]
    scripts: Mapping[str, ParsedScript]
    headers: Mapping[str, ScriptImage]
    emmc_order: tuple[str, ...]  # scripts sourced by boot_emmc.scr, in order
    files: Mapping[str, int]  # every file of the set and its size

    def partition(self, label: str) -> PartitionFlash:
        for p in self.partitions:
            if p.label.upper() == label.upper():
                return p
        known = ", ".join(p.label for p in self.partitions)
        raise PackageError(f"no partition labelled {label!r} (the package has {known})")


def read_script(files: FileSet, name: str) -> tuple[ScriptImage, ParsedScript]:
    size = files.size(name)
    if size > MAX_SCRIPT_BYTES:
        raise PackageError(f"script is {size} bytes, too large to be a U-Boot script", where=name)
    with files.open(name) as f:
        blob = f.read()
    image = decode_script(blob, name)
    return image, parse_script(image.text, name)


def read_flash_plan(files: FileSet) -> FlashPlan:
    sizes = {n: files.size(n) for n in files.names()}
    for must in (TOP_SCRIPT, EMMC_SCRIPT):
        if must not in sizes:
            raise PackageError(
                f"the package has no {must}",
                hint="a vendor TF-card package has boot.scr and boot_emmc.scr at its top",
            )
    headers: dict[str, ScriptImage] = {}
    scripts: dict[str, ParsedScript] = {}
    _walk_scripts(files, sizes, TOP_SCRIPT, None, headers, scripts)
    if EMMC_SCRIPT not in scripts:
        raise PackageError(
            f"{TOP_SCRIPT} never sources {EMMC_SCRIPT}",
            where=TOP_SCRIPT,
            hint="the package's top script must run the eMMC update",
        )
    xml_name = _find_xml(sizes)
    with files.open(xml_name) as f:
        xml_text = f.read().decode("utf-8", errors="strict")
    table = parse_partition_xml(xml_text, xml_name)
    emmc = scripts[EMMC_SCRIPT]
    order = tuple(ref.file for ref in emmc.sources)
    gpt_script = _find_gpt_script(emmc, scripts)
    gpt = _read_gpt(files, sizes, scripts[gpt_script], table, xml_name)
    by_index: dict[int, tuple[str, tuple[ChunkBlock, ...]]] = {}
    starts = {p.offset_sectors: p for p in table.partitions}
    for ref in emmc.sources:
        if ref.file == gpt_script:
            continue
        sub = scripts[ref.file]
        first = sub.chunks[0]
        part = starts.get(first.offset_sectors)
        if part is None:
            raise PackageError(
                f"first chunk {first.file} is written at sector 0x{first.offset_sectors:08x}, "
                f"which is not the start of any partition in {xml_name}",
                where=sub.where(first.write_line),
                hint=f"the scripts and {xml_name} disagree; the package is inconsistent",
            )
        if part.index in by_index:
            raise PackageError(
                f"partition {part.label} is written by both {by_index[part.index][0]} and {ref.file}",
                where=sub.where(first.write_line),
            )
        by_index[part.index] = (ref.file, sub.chunks)
    partitions = []
    for p in table.partitions:
        script, chunks = by_index.get(p.index, (None, ()))
        flash = PartitionFlash(
            index=p.index,
            label=p.label,
            fmt=p.fmt,
            readonly=p.readonly,
            offset_sectors=p.offset_sectors,
            size_sectors=p.size_sectors,
            script=script,
            chunks=chunks,
        )
        if script is not None:
            _check_chunks(flash, scripts[script], sizes)
        partitions.append(flash)
    chunk_sectors, inferred = _infer_chunk_sectors(partitions, scripts)
    return FlashPlan(
        chunk_sectors=chunk_sectors,
        chunk_sectors_inferred=inferred,
        table=table,
        xml_name=xml_name,
        gpt=gpt,
        gpt_script=gpt_script,
        partitions=tuple(partitions),
        scripts=scripts,
        headers=headers,
        emmc_order=order,
        files=sizes,
    )


def _walk_scripts(
    files: FileSet,
    sizes: Mapping[str, int],
    name: str,
    referrer: tuple[str, int] | None,
    headers: dict[str, ScriptImage],
    scripts: dict[str, ParsedScript],
) -> None:
    if name in scripts:
        return
    if name not in sizes:
        where = f"{referrer[0]}:{referrer[1]}" if referrer else None
        raise PackageError(
            f"sources {name}, which is not in the package",
            where=where,
            hint="the package is incomplete; copy it again or re-download it",
        )
    headers[name], scripts[name] = read_script(files, name)
    for ref in scripts[name].sources:
        if ref.file in scripts or (not ref.required and ref.file not in sizes):
            continue
        _walk_scripts(files, sizes, ref.file, (name, ref.line), headers, scripts)


def _find_gpt_script(emmc: ParsedScript, scripts: Mapping[str, ParsedScript]) -> str:
    """The script sourced by boot_emmc.scr that writes sector 0; every sourced script must write."""
    found: str | None = None
    for ref in emmc.sources:
        sub = scripts[ref.file]
        if not sub.chunks:
            raise PackageError(
                "sourced by boot_emmc.scr but writes nothing to the eMMC",
                where=ref.file,
                hint=f"see {EMMC_SCRIPT} line {ref.line}",
            )
        if sub.chunks[0].offset_sectors == 0:
            if found is not None:
                raise PackageError(
                    f"both {found} and {ref.file} write sector 0", where=sub.where(sub.chunks[0].write_line)
                )
            found = ref.file
    if found is None:
        raise PackageError(
            f"no script sourced by {EMMC_SCRIPT} writes the GPT at sector 0",
            where=EMMC_SCRIPT,
            hint="the vendor package writes gpt.gz first",
        )
    return found


def _find_xml(sizes: Mapping[str, int]) -> str:
    if "partition32G.xml" in sizes:
        return "partition32G.xml"
    xmls = sorted(n for n in sizes if n.lower().endswith(".xml") and "/" not in n)
    if len(xmls) == 1:
        return xmls[0]
    if not xmls:
        raise PackageError(
            "the package has no partition XML (partition32G.xml)",
            hint="the vendor package carries the partition table as partition32G.xml",
        )
    raise PackageError(
        f"several partition XMLs and none is partition32G.xml: {', '.join(xmls)}",
        hint="keep only the one the package was made with",
    )


def _read_gpt(
    files: FileSet, sizes: Mapping[str, int], script: ParsedScript, table: PartitionTable, xml_name: str
) -> Gpt:
    if len(script.chunks) != 1:
        raise PackageError(
            f"the GPT script writes {len(script.chunks)} chunks; expected one", where=script.name
        )
    chunk = script.chunks[0]
    where = script.where(chunk.load_line)
    if chunk.file not in sizes:
        raise PackageError(f"loads {chunk.file}, which is not in the package", where=where)
    with files.open(chunk.file) as f:
        raw = f.read(1 << 20)
    try:
        blob = gzip.decompress(raw) if chunk.unzip_bytes is not None else raw
    except (OSError, EOFError, zlib.error) as e:
        raise PackageError(f"cannot decompress: {e}", where=chunk.file) from None
    if chunk.unzip_bytes is not None and len(blob) != chunk.unzip_bytes:
        raise PackageError(
            f"unzip size says {chunk.unzip_bytes} bytes but {chunk.file} holds {len(blob)}",
            where=script.where(chunk.unzip_line or chunk.load_line),
        )
    if chunk.count_sectors * SECTOR < len(blob):
        raise PackageError(
            f"mmc write count 0x{chunk.count_sectors:x} is short of the GPT's {len(blob)} bytes",
            where=script.where(chunk.write_line),
        )
    gpt = decode_gpt(blob, chunk.file)
    problems = check_gpt_against_table(gpt, table)
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise PackageError(
            f"{chunk.file} disagrees with {xml_name}: " + "; ".join(problems[:3]) + more,
            where=chunk.file,
            hint=f"the package's GPT and partition XML must describe the same layout: regenerate "
            f"{chunk.file} from {xml_name} (the vendor's mk_gpt), or download the package again",
        )
    return gpt


def _check_chunks(part: PartitionFlash, script: ParsedScript, sizes: Mapping[str, int]) -> None:
    expected_offset = part.offset_sectors
    end = part.offset_sectors + part.size_sectors
    m_total = len(part.chunks)
    for k, c in enumerate(part.chunks, start=1):
        where = script.where(c.write_line)
        if c.file not in sizes:
            raise PackageError(
                f"loads {c.file}, which is not in the package",
                where=script.where(c.load_line),
                hint="the package is incomplete; copy it again or re-download it",
            )
        if c.offset_sectors != expected_offset:
            what = (
                "gap before" if c.offset_sectors > expected_offset else "overlap with the previous chunk at"
            )
            raise PackageError(
                f"{what} chunk {c.file}: written at 0x{c.offset_sectors:08x}, "
                f"previous chunk ends at 0x{expected_offset:08x}",
                where=where,
                hint=f"partition {part.label} must be written without gaps or overlaps",
            )
        if c.offset_sectors + c.count_sectors > end:
            raise PackageError(
                f"chunk {c.file} ends at sector 0x{c.offset_sectors + c.count_sectors:08x}, past the end "
                f"of partition {part.label} (0x{end:08x})",
                where=where,
                hint=f"the script would overwrite the partition after {part.label}: the package is "
                "inconsistent; download it again, or regenerate it with the vendor's packer",
            )
        if c.unzip_bytes is not None:
            need = -(-c.unzip_bytes // SECTOR)
            if need != c.count_sectors:
                raise PackageError(
                    f"mmc write count 0x{c.count_sectors:08x} does not match the unzip size "
                    f"0x{c.unzip_bytes:08x} ({need} sectors) of {c.file}",
                    where=where,
                )
            if k < m_total and c.unzip_bytes % SECTOR:
                raise PackageError(
                    f"chunk {c.file} is not whole sectors but is not the last chunk", where=where
                )
        m = CHUNK_NAME.match(c.file)
        if m and (int(m["k"]) != k or int(m["m"]) != m_total):
            raise PackageError(
                f"chunk {c.file} is block {k} of {m_total} in the script but its name says "
                f"{m['k']} of {m['m']}",
                where=script.where(c.load_line),
            )
        expected_offset = c.offset_sectors + c.count_sectors


def _infer_chunk_sectors(
    partitions: list[PartitionFlash], scripts: Mapping[str, ParsedScript]
) -> tuple[int, bool]:
    """Every chunk but a partition's last has the same size: that is the chunk size."""
    seen: dict[int, tuple[str, int]] = {}
    for p in partitions:
        for c in p.chunks[:-1]:
            seen.setdefault(c.count_sectors, (p.script or "", c.write_line))
    if len(seen) > 1:
        desc = ", ".join(f"0x{n:x} ({s}:{ln})" for n, (s, ln) in sorted(seen.items()))
        raise PackageError(
            f"chunks of different sizes: {desc}",
            hint="every chunk but the last of a partition must have the package's chunk size",
        )
    if seen:
        size = next(iter(seen))
        for p in partitions:
            if p.chunks and p.chunks[-1].count_sectors > size:
                assert p.script is not None
                raise PackageError(
                    f"last chunk {p.chunks[-1].file} is larger than the chunk size 0x{size:x}",
                    where=scripts[p.script].where(p.chunks[-1].write_line),
                )
        return size, True
    largest = max((c.count_sectors for p in partitions for c in p.chunks), default=0)
    return max(largest, 200704), False
