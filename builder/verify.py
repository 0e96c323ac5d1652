"""Static verification of a bundle, and a simulated flash of it into an eMMC image.

The simulation plays the eMMC scripts as U-Boot would: every chunk is unzipped to
its RAM address and `mmc write` copies whole sectors from there, so the bytes after
a partial last chunk are whatever an earlier chunk left in RAM (zeros at power-on).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from isal import isal_zlib

from builder.errors import AirboxError, PackageError
from builder.manifest import MD5_NAME, parse_md5
from builder.ota import ota_plan
from builder.package.chunks import (
    GZIP_WBITS,
    PIECE,
    ZlibError,
    default_workers,
    is_fat_safe,
    pwrite_all,
    pwrite_over,
    pwrite_sparse,
)
from builder.package.flashplan import (
    CHUNK_NAME,
    FORBIDDEN_TOP,
    SECTOR,
    FileSet,
    FlashPlan,
    read_flash_plan,
)
from builder.package.scripts import ChunkBlock
from builder.pool import worker_pool

FAT32_MAX = (4 << 30) - 1
MAX_COMPRESSED = 256 << 20  # ramdisk_addr_r .. unzip_addr on the BM1684X


@dataclass(frozen=True)
class Problem:
    file: str
    message: str


@dataclass
class VerifyReport:
    failures: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    plan: FlashPlan | None = None
    chunks_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, file: str, message: str) -> None:
        self.failures.append(Problem(file, message))

    def warn(self, file: str, message: str) -> None:
        self.warnings.append(Problem(file, message))


@dataclass(frozen=True)
class _Write:
    """One `mmc write` in flash order."""

    chunk: ChunkBlock
    script: str
    ram: str  # the RAM address the sectors are copied from


def flash_order(plan: FlashPlan) -> list[_Write]:
    writes = []
    for name in plan.emmc_order:
        script = plan.scripts[name]
        for c in script.chunks:
            lines = script.lines
            ram = _write_source(lines[c.write_line - 1])
            writes.append(_Write(c, name, ram))
    return writes


def _write_source(line: str) -> str:
    m = re.search(r"mmc\s+write\s+(\S+)", line)
    return m.group(1) if m else ""


class _RamModel:
    """What sits in RAM after each partial chunk's end, so a simulated write is exact."""

    def __init__(self, writes: list[_Write], played: set[int] | None = None) -> None:
        self.writes = writes
        self.played = set(range(len(writes))) if played is None else played  # an update skips some
        # for each partial write j: (ram address, start, end) of the bytes it copies from stale RAM
        self.tails: dict[int, tuple[str, int, int]] = {}
        for j, w in enumerate(writes):
            if j not in self.played:
                continue
            n = w.chunk.unzip_bytes
            if n is not None and n % SECTOR:
                self.tails[j] = (w.ram, n, w.chunk.count_sectors * SECTOR)
        self.captured: dict[int, dict[int, bytes]] = {}  # write i -> {tail j: bytes of i at j's range}

    def wants(self, i: int) -> list[tuple[int, int, int]]:
        if i not in self.played:
            return []
        ram = self.writes[i].ram
        return [(j, s, e) for j, (r, s, e) in self.tails.items() if r == ram and j != i]

    def capture(self, i: int, offset: int, data: bytes, wants: list[tuple[int, int, int]]) -> None:
        end = offset + len(data)
        for j, s, e in wants:
            lo, hi = max(s, offset), min(e, end)
            if lo < hi:
                buf = bytearray(self.captured.setdefault(i, {}).get(j, bytes(e - s)))
                buf[lo - s : hi - s] = data[lo - offset : hi - offset]
                self.captured[i][j] = bytes(buf)

    def tail(self, j: int) -> bytes:
        ram, s, e = self.tails[j]
        out = bytearray(e - s)  # RAM is zero at power-on under QEMU
        for i in range(j):
            w = self.writes[i]
            if w.ram != ram or j not in self.captured.get(i, {}):
                continue
            size = w.chunk.unzip_bytes if w.chunk.unzip_bytes is not None else 0
            upto = max(0, min(e, size) - s)
            out[:upto] = self.captured[i][j][:upto]
        return bytes(out)


def _stream_chunk(files: FileSet, c: ChunkBlock, sink: Callable[[int, bytes], None]) -> int:
    """Decompress one chunk, feeding (offset, data) to `sink`; return its uncompressed size."""
    d = isal_zlib.decompressobj(GZIP_WBITS) if c.unzip_bytes is not None else None
    pos = 0
    with files.open(c.file) as f:
        while raw := f.read(PIECE):
            data = d.decompress(raw) if d is not None else raw
            if d is not None and d.unused_data:
                raise PackageError("trailing data after the gzip stream", where=c.file)
            if data:
                sink(pos, data)
                pos += len(data)
        if d is not None:
            tail = d.flush()
            if tail:
                sink(pos, tail)
                pos += len(tail)
            if not d.eof:
                raise PackageError(f"truncated gzip stream (ends after {pos} bytes)", where=c.file)
    return pos


def verify_fileset(
    files: FileSet,
    *,
    simulate: Path | None = None,
    ota: int | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check a bundle; with `simulate`, play it into that eMMC image as U-Boot would. With `ota`
    (the GPT number of the partition holding the bundle) play an update in the field instead:
    the image must hold the box as it is, and only what the scripts then write is written
    (builder.ota)."""
    report = VerifyReport()
    names = files.names()
    for bad in FORBIDDEN_TOP:
        if bad in names:
            report.fail(bad, "must not be on the card: U-Boot runs it before boot.scr (delete it)")
    for n in names:
        size = files.size(n)
        if size > FAT32_MAX:
            report.fail(n, f"{size} bytes: FAT32 cannot hold a file of 4 GiB or more")
        if not is_fat_safe(n.rsplit("/", 1)[-1]):
            report.fail(n, "name is not valid on a FAT32 card")
    try:
        plan = read_flash_plan(files)
    except AirboxError as e:
        report.fail(e.where or "package", e.message)
        return report
    report.plan = plan
    _check_required_loads(plan, report)
    _check_md5(files, names, report)
    _check_stale_chunks(plan, names, report)
    writes = flash_order(plan)
    for w in writes:
        if files.size(w.chunk.file) >= MAX_COMPRESSED:
            report.fail(
                w.chunk.file,
                f"{files.size(w.chunk.file)} bytes compressed: over 256 MiB it overruns unzip_addr "
                "when U-Boot loads it",
            )
    played = None
    if ota is not None:
        try:
            update = ota_plan(plan, ota)
        except AirboxError as e:
            report.fail(e.where or "package", e.message)
            return report
        labels = set(update.written)
        scripts = {p.script for p in plan.partitions if p.label in labels}
        if update.gpt_written:
            scripts.add(plan.gpt_script)
        played = {i for i, w in enumerate(writes) if w.script in scripts}
    _check_and_simulate(files, plan, writes, report, simulate, workers, progress, played)
    return report


def _check_required_loads(plan: FlashPlan, report: VerifyReport) -> None:
    for name, script in plan.scripts.items():
        for load in script.loads:
            if load.required and load.file not in plan.files:
                report.fail(name, f"line {load.line} loads {load.file}, which is missing")


def _check_md5(files: FileSet, names: list[str], report: VerifyReport) -> None:
    if MD5_NAME not in names:
        report.warn(MD5_NAME, "missing: the on-device OTA helper reads it")
        return
    with files.open(MD5_NAME) as f:
        text = f.read().decode("utf-8", errors="replace")
    try:
        entries = parse_md5(text)
    except PackageError as e:
        report.fail(MD5_NAME, e.message)
        return
    listed = {n for n, _ in entries}
    for n, digest in entries:
        if n == MD5_NAME:
            continue
        if n not in names:
            report.fail(MD5_NAME, f"lists {n}, which is not in the bundle (stale md5.txt)")
            continue
        h = hashlib.md5()
        with files.open(n) as f:
            while block := f.read(PIECE):
                h.update(block)
        if h.hexdigest() != digest:
            report.fail(n, f"md5 {h.hexdigest()} does not match md5.txt ({digest})")
    for n in names:
        if n not in listed and n != MD5_NAME and "/" not in n:
            report.fail(MD5_NAME, f"does not list {n} (stale md5.txt)")


def _check_stale_chunks(plan: FlashPlan, names: list[str], report: VerifyReport) -> None:
    used = {c.file for s in plan.scripts.values() for c in s.chunks}
    for n in names:
        if CHUNK_NAME.match(n) and n not in used:
            report.warn(n, "not written by any script (a stale chunk from another bundle?)")


def _check_and_simulate(
    files: FileSet,
    plan: FlashPlan,
    writes: list[_Write],
    report: VerifyReport,
    simulate: Path | None,
    workers: int | None,
    progress: Callable[[int], None] | None,
    played: set[int] | None = None,
) -> None:
    fd: int | None = None
    ram = _RamModel(writes, played)
    put = pwrite_sparse
    if simulate is not None and played is not None:  # an update: over the box as it is
        fd = os.open(simulate, os.O_RDWR)
        put = pwrite_over
    elif simulate is not None:
        fd = os.open(simulate, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, plan.table.disk_kb * 1024)

    def one(i: int) -> int | None:
        """Check (and play) one write; its uncompressed size, or None when it cannot be read."""
        w = writes[i]
        base = w.chunk.offset_sectors * SECTOR
        wants = ram.wants(i)

        play = fd is not None and i in ram.played

        def sink(off: int, data: bytes) -> None:
            if play:
                assert fd is not None
                put(fd, data, base + off)
            if wants:
                ram.capture(i, off, data, wants)
            if progress:
                progress(len(data))

        try:
            n = _stream_chunk(files, w.chunk, sink)
        except (PackageError, ZlibError, OSError) as e:
            msg = e.message if isinstance(e, PackageError) else str(e)
            report.fail(w.chunk.file, f"cannot decompress: {msg}")
            return None
        if w.chunk.unzip_bytes is not None and n != w.chunk.unzip_bytes:
            report.fail(
                w.chunk.file,
                f"holds {n} bytes uncompressed but {w.script} line {w.chunk.unzip_line} "
                f"unzips 0x{w.chunk.unzip_bytes:08x} ({w.chunk.unzip_bytes}) bytes",
            )
        return n

    try:
        with worker_pool(workers or default_workers()) as pool:
            sizes = [n for n in pool.map(one, range(len(writes))) if n is not None]
        # counted here, in one thread: `+=` from the workers would race
        report.chunks_checked += len(sizes)
        report.bytes_checked += sum(sizes)
        if fd is not None:
            for j in ram.tails:
                w = writes[j]
                _, s, _e = ram.tails[j]
                pwrite_all(fd, ram.tail(j), w.chunk.offset_sectors * SECTOR + s)
    finally:
        if fd is not None:
            os.close(fd)


_ZEROS = bytes(1 << 20)


def extract_partitions(emmc: Path, plan: FlashPlan, dest: Path) -> dict[str, Path]:
    """Cut each partition's area out of a (simulated) eMMC image into `dest/<label>.img`."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for p in plan.partitions:
        out[p.label] = cut_area(
            emmc, p.offset_sectors * SECTOR, p.size_sectors * SECTOR, dest / f"{p.label}.img"
        )
    return out


def cut_area(emmc: Path, offset: int, length: int, path: Path) -> Path:
    """`length` bytes of `emmc` from `offset` as a file of their own, all-zero runs left as holes."""
    with open(emmc, "rb") as src, open(path, "wb") as dst:
        dst.truncate(length)
        pos = 0
        while pos < length:
            src.seek(offset + pos)
            buf = src.read(min(1 << 20, length - pos))
            if not buf:
                break
            if buf != _ZEROS[: len(buf)]:
                dst.seek(pos)
                dst.write(buf)
            pos += len(buf)
    return path
