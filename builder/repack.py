"""Repack a vendor file set: copy what did not change, rebuild what did.

A partition with no edit is never decompressed: its chunks and script are copied.
An edited partition is joined, edited, split; chunks whose bytes did not change keep
the vendor's .gz, and its script is regenerated only if its chunk list changed.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from isal import isal_zlib

from builder.errors import BuildError, PackageError
from builder.manifest import MD5_NAME, file_digest, parse_md5, render_md5
from builder.package.chunks import (
    GZIP_WBITS,
    ChunkPool,
    JoinedImage,
    ZlibError,
    chunk_name_pattern,
    chunk_ranges,
    copy_vendor,
    default_workers,
    file_stat,
    pack_partition,
    vendor_stat,
)
from builder.package.flashplan import SECTOR, FileSet, FlashPlan, PartitionFlash
from builder.package.gpt import encode_gpt, gpt_from_table
from builder.package.layout import LayoutChange
from builder.package.partxml import rewrite_partition_xml
from builder.package.scripts import NewChunk, regenerate
from builder.package.uimage import encode_script
from builder.pool import worker_pool
from builder.previous import EarlierPartition, PreviousBuild

log = logging.getLogger("airbox-build")

# An edit receives the joined partition image (a sparse file it may grow or shrink).


@dataclass
class PartitionResult:
    label: str
    changed: bool
    chunks_before: int
    chunks_after: int
    reused: int = 0
    recompressed: int = 0
    bytes_recompressed: int = 0
    image_bytes_before: int = 0
    image_bytes_after: int = 0
    script_regenerated: bool = False
    pooled: int = 0  # chunks taken from an earlier build's output instead of compressed again
    bytes_pooled: int = 0
    # for a changed partition, each chunk: file, bytes, sha256 (uncompressed), gz_bytes, source
    chunks: list[dict[str, object]] = field(default_factory=list)
    fingerprint: str | None = None  # of the edits that made it (builder.previous.edit_fingerprint)
    same_edits_as_earlier: bool = False  # its chunks were taken from the last build, nothing applied


@dataclass
class RepackResult:
    partitions: list[PartitionResult] = field(default_factory=list)
    files_written: list[str] = field(default_factory=list)
    scripts_regenerated: list[str] = field(default_factory=list)
    # sha256 of card files linked from an earlier bundle, unchanged since it listed them
    known_sha256: dict[str, str] = field(default_factory=dict)


def copy_member(files: FileSet, name: str, dest: Path) -> None:
    copy_to = getattr(files, "copy_to", None)
    if copy_to is not None:
        copy_to(name, dest, link=False)  # a hardlink would alias the vendor package
        return
    with files.open(name) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 4 << 20)


def _chunk_list(part: PartitionFlash) -> list[NewChunk]:
    return [
        NewChunk(c.file, c.unzip_bytes or c.count_sectors * SECTOR, c.offset_sectors, c.count_sectors)
        for c in part.chunks
    ]


def _write_script(plan: FlashPlan, name: str, text: str, card: Path, epoch: int | None) -> None:
    header = plan.headers[name]
    cmd_name = name[: -len(".scr")] + ".cmd"
    data = text.encode("utf-8")
    # Keep the vendor's header name and (unless SOURCE_DATE_EPOCH says otherwise) its timestamp.
    (card / name).write_bytes(encode_script(data, header.name, header.timestamp if epoch is None else epoch))
    if cmd_name in plan.files:
        (card / cmd_name).write_bytes(data)


def repack(
    files: FileSet,
    plan: FlashPlan,
    card: Path,
    images: Mapping[str, JoinedImage | EarlierPartition],
    *,
    level: int,
    workers: int | None = None,
    epoch: int | None = None,
    layout: LayoutChange | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    previous: PreviousBuild | None = None,
    linked_base: Mapping[str, tuple[Path, str, str]] | None = None,
) -> RepackResult:
    """Write the customised file set into `card` (an empty folder).

    With a layout change, the XML and gpt.gz are rewritten and every partition whose first
    sector moved gets its script regenerated (its chunks are kept byte for byte).
    `previous` is what the last bundle of the same recipe offers (builder.previous): chunks it
    already compressed are linked from it instead of compressed again. An EarlierPartition in
    `images` (the same edits as that build) takes its chunks as they are.
    """
    result = RepackResult()
    pool = previous.pool if previous is not None else None
    replaced: set[str] = set()  # vendor names we do not copy verbatim
    table = layout.table if layout is not None else plan.table
    placement = {p.label.upper(): (p.offset_sectors, p.size_sectors * SECTOR) for p in table.partitions}
    for part in plan.partitions:
        offset, limit = placement[part.label.upper()]
        joined = next((j for label, j in images.items() if label.upper() == part.label.upper()), None)
        if isinstance(joined, EarlierPartition):
            pr, new_list = _relink_partition(files, part, joined, card, offset, workers, pool)
            replaced.update(c.file for c in part.chunks)
        elif joined is not None:
            pr, new_list = _rebuild_partition(
                files, plan, part, joined, card, offset, limit, level, workers, progress, pool
            )
            replaced.update(c.file for c in part.chunks)
        else:
            shift = offset - part.offset_sectors
            new_list = [replace(c, offset_sectors=c.offset_sectors + shift) for c in _chunk_list(part)]
            pr = PartitionResult(
                part.label,
                False,
                len(part.chunks),
                len(part.chunks),
                reused=len(part.chunks),
                image_bytes_before=part.image_bytes,
                image_bytes_after=part.image_bytes,
                chunks=[
                    {
                        "file": c.file,
                        "bytes": c.unzip_bytes,
                        "sha256": None,
                        "source": "vendor",
                        "vendor_file": c.file,
                    }
                    for c in part.chunks
                ],
            )
        if part.script is not None and new_list != _chunk_list(part):
            _write_script(plan, part.script, regenerate(plan.scripts[part.script], new_list), card, epoch)
            replaced.update((part.script, part.script[: -len(".scr")] + ".cmd"))
            result.scripts_regenerated.append(part.script)
            pr.script_regenerated = True
        result.partitions.append(pr)
    if layout is not None and layout.resized:
        replaced.update(_write_layout(files, plan, layout, card))
    written = {p.name for p in card.iterdir()}
    copied = []
    for name in sorted(plan.files):
        if name in replaced or name in written or name == MD5_NAME:
            continue
        dest = card / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        copy_vendor(files, name, dest, pool)
        copied.append(name)
    known = dict(pool.known_md5) if pool is not None else {}
    base_sha256 = _linked_base_digests(card, linked_base or {}, known)
    md5s = _write_md5(files, plan, card, changed=bool(replaced or written), workers=workers, known=known)
    _check_copies(files, card, [n for n in copied if n not in known], md5s)
    _note_outputs(files, card, result, md5s)
    if pool is not None:
        result.known_sha256 = dict(pool.known_sha256)
    result.known_sha256.update(base_sha256)
    result.files_written = sorted(p.relative_to(card).as_posix() for p in card.rglob("*") if p.is_file())
    return result


def _linked_base_digests(
    card: Path, linked_base: Mapping[str, tuple[Path, str, str]], known_md5: dict[str, str]
) -> dict[str, str]:
    """Digests of card files that are hard links to a bundle of ours the build started from (a
    fleet's shared build: its md5.txt and SHA256SUMS describe those very inodes)."""
    sha256s = {}
    for name, (path, md5, sha256) in linked_base.items():
        try:
            if os.path.samefile(card / name, path):
                known_md5[name] = md5
                sha256s[name] = sha256
        except OSError:
            continue
    return sha256s


def _write_layout(files: FileSet, plan: FlashPlan, layout: LayoutChange, card: Path) -> set[str]:
    """The new partition32G.xml (only size_in_kb values changed) and gpt.gz (vendor GUIDs kept)."""
    with files.open(plan.xml_name) as f:
        text = f.read().decode("utf-8")
    (card / plan.xml_name).write_text(rewrite_partition_xml(text, layout.sizes_kb, plan.xml_name))
    gpt_chunk = plan.scripts[plan.gpt_script].chunks[0]
    blob = encode_gpt(gpt_from_table(layout.table, template=plan.gpt))
    if gpt_chunk.unzip_bytes is not None and len(blob) != gpt_chunk.unzip_bytes:
        raise BuildError(
            f"the new GPT is {len(blob)} bytes, but {plan.gpt_script} unzips {gpt_chunk.unzip_bytes}"
        )
    c = isal_zlib.compressobj(3, isal_zlib.DEFLATED, GZIP_WBITS)
    (card / gpt_chunk.file).write_bytes(c.compress(blob) + c.flush())
    return {plan.xml_name, gpt_chunk.file}


def _rebuild_partition(
    files: FileSet,
    plan: FlashPlan,
    part: PartitionFlash,
    joined: JoinedImage,
    card: Path,
    offset: int,
    limit: int,
    level: int,
    workers: int | None,
    progress: Callable[[str, int, int], None] | None,
    pool: ChunkPool | None = None,
) -> tuple[PartitionResult, list[NewChunk]]:
    image = joined.path

    def tick(stage: str, total: int) -> Callable[[int], None] | None:
        if progress is None:
            return None
        return lambda n: progress(f"{stage} {part.label}", n, total)

    new_size = image.stat().st_size
    if new_size > limit:
        raise BuildError(
            f"partition {part.label}: the edited image is {new_size} bytes, "
            f"more than the partition's {limit} bytes",
            hint=f"grow it with `layout: {{{part.label}: <size>}}` or put less into it",
        )
    packed = pack_partition(
        image,
        part,
        plan.chunk_sectors,
        joined.chunk_digests,
        files,
        card,
        level=level,
        workers=workers,
        progress=tick("pack", new_size),
        offset_sectors=offset,
        pool=pool,
    )
    reused = sum(1 for p in packed if p.reused_from is not None)
    pooled = [p for p in packed if p.pooled]
    fresh = [p for p in packed if p.reused_from is None and not p.pooled]
    if joined.release is not None:
        ranges = chunk_ranges(new_size, plan.chunk_sectors)
        joined.release([(off, n, p.sha256) for (off, n), p in zip(ranges, packed, strict=True)])
    else:
        _remove_in_background(image)
    result = PartitionResult(
        label=part.label,
        changed=True,
        chunks_before=len(part.chunks),
        chunks_after=len(packed),
        reused=reused,
        recompressed=len(fresh),
        bytes_recompressed=sum(p.chunk.unzip_bytes for p in fresh),
        image_bytes_before=part.image_bytes,
        image_bytes_after=new_size,
        pooled=len(pooled),
        bytes_pooled=sum(p.chunk.unzip_bytes for p in pooled),
        fingerprint=joined.fingerprint,
        chunks=[
            {
                "file": p.chunk.file,
                "bytes": p.chunk.unzip_bytes,
                "sha256": p.sha256,
                "gz_bytes": p.gz_bytes,
                "source": "vendor" if p.reused_from else "earlier build" if p.pooled else "compressed",
                "vendor_file": p.reused_from,
            }
            for p in packed
        ],
    )
    return result, [p.chunk for p in packed]


def _relink_partition(
    files: FileSet,
    part: PartitionFlash,
    earlier: EarlierPartition,
    card: Path,
    offset: int,
    workers: int | None,
    pool: ChunkPool | None,
) -> tuple[PartitionResult, list[NewChunk]]:
    """The chunks of a partition the last build edited in exactly the same way, taken from it."""
    stem = chunk_name_pattern(part)
    total = len(earlier.chunks)
    lengths = [int(c["bytes"]) for c in earlier.chunks]
    starts = [sum(lengths[:k]) for k in range(total)]

    def one(k: int) -> dict[str, object]:
        c = earlier.chunks[k]
        length, digest = lengths[k], str(c["sha256"])
        dest = card / f"{stem}.{k + 1}-of-{total}.gz"
        vendor = c.get("vendor_file") if c.get("source") == "vendor" else None
        if vendor:
            copy_vendor(files, str(vendor), dest, pool)
        elif pool is None or not pool.place_earlier(length, digest, dest):
            raise BuildError(
                f"partition {part.label}: {c['file']} of the last build went missing during this build",
                hint="run the build again (it then applies the edits itself)",
            )
        return {
            "file": dest.name,
            "bytes": length,
            "sha256": digest,
            "gz_bytes": dest.stat().st_size,
            "source": "vendor" if vendor else "earlier build",
            "vendor_file": vendor,
        }

    with worker_pool(workers or default_workers()) as executor:
        entries = list(executor.map(one, range(total)))
    new_list = [
        NewChunk(str(e["file"]), lengths[k], offset + starts[k] // SECTOR, -(-lengths[k] // SECTOR))
        for k, e in enumerate(entries)
    ]
    pooled = [k for k, e in enumerate(entries) if e["source"] == "earlier build"]
    result = PartitionResult(
        label=part.label,
        changed=True,
        chunks_before=len(part.chunks),
        chunks_after=total,
        reused=total - len(pooled),
        image_bytes_before=part.image_bytes,
        image_bytes_after=earlier.image_bytes,
        pooled=len(pooled),
        bytes_pooled=sum(lengths[k] for k in pooled),
        chunks=entries,
        fingerprint=earlier.fingerprint,
        same_edits_as_earlier=True,
    )
    return result, new_list


def _remove_in_background(path: Path) -> None:
    """Freeing a multi-GB image keeps the file system busy for a second: let it, meanwhile go on."""
    threading.Thread(target=path.unlink, kwargs={"missing_ok": True}, name=f"rm {path.name}").start()


def _note_outputs(files: FileSet, card: Path, result: RepackResult, md5s: Mapping[str, str]) -> None:
    """Complete each chunk's report entry with what a later build needs to reuse it (load_pool)."""
    for pr in result.partitions:
        for entry in pr.chunks:
            name = str(entry["file"])
            out_stat = file_stat(card / name)
            entry["gz_bytes"] = out_stat[0] if out_stat else None
            entry["out_stat"] = list(out_stat) if out_stat else None
            entry["md5"] = md5s.get(name)
            vendor = entry.get("vendor_file")
            vstat = vendor_stat(files, str(vendor)) if vendor else None
            entry["vendor_stat"] = list(vstat) if vstat else None


def _check_copies(files: FileSet, card: Path, names: Sequence[str], md5s: Mapping[str, str]) -> None:
    """Vendor files copied as they are (partitions the recipe does not touch) must have the md5
    the vendor's md5.txt gives: their digests are computed for the new md5.txt anyway, so a
    chunk damaged in the middle (its gzip frame and size intact) is caught here for free. On a
    mismatch the chunk is decompressed: a bad CRC is an error, an intact one a stale md5.txt."""
    if MD5_NAME not in files.names() or not md5s:
        return
    with files.open(MD5_NAME) as f:
        listed = dict(parse_md5(f.read().decode("utf-8", errors="replace")))
    for name in names:
        want, got = listed.get(name), md5s.get(name)
        if want is None or got is None or want == got:
            continue
        if name.endswith(".gz"):
            _gzip_intact(card / name, name)
        log.warning(
            "md5.txt of the package gives %s for %s, but the file (intact) has %s: "
            "md5.txt was stale; the card's md5.txt has the right one",
            want,
            name,
            got,
        )


def _gzip_intact(path: Path, name: str) -> None:
    d = isal_zlib.decompressobj(GZIP_WBITS)
    try:
        with open(path, "rb") as f:
            while block := f.read(4 << 20):
                d.decompress(block)
                while d.unconsumed_tail:
                    d.decompress(d.unconsumed_tail, 4 << 20)
        if not d.eof:
            raise ZlibError("the gzip stream ends early")
    except ZlibError as e:
        raise PackageError(
            f"{name} is damaged: its md5 is not the one md5.txt gives, and it does not decompress ({e})",
            where=name,
            hint="copy or download the vendor package again (`airbox-build verify` on it names every "
            "damaged chunk)",
        ) from None


def _write_md5(
    files: FileSet,
    plan: FlashPlan,
    card: Path,
    changed: bool,
    workers: int | None = None,
    known: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """md5.txt for the card; returns the md5 of every file. `known`: digests of files linked
    from an earlier build, unchanged since it hashed them."""
    vendor_text: str | None = None
    if MD5_NAME in plan.files:
        with files.open(MD5_NAME) as f:
            vendor_text = f.read().decode("utf-8", errors="replace")
        if not changed:
            copy_member(files, MD5_NAME, card / MD5_NAME)
            return {}
    paths = [p for p in sorted(card.iterdir()) if p.is_file() and p.name != MD5_NAME]
    known = known or {}
    todo = [p for p in paths if p.name not in known]
    # hashlib releases the GIL on large buffers: the files are hashed side by side
    with worker_pool(workers or default_workers()) as pool:
        md5s = dict(zip((p.name for p in todo), pool.map(lambda p: file_digest(p, "md5"), todo), strict=True))
    digests = {p.name: known[p.name] if p.name in known else md5s[p.name] for p in paths}
    (card / MD5_NAME).write_text(render_md5(digests, vendor_text))
    return digests
