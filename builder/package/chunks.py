"""Join a partition image from its chunks, and split it back, reusing unchanged chunks.

Decompression and compression run on a thread pool (ISA-L and hashlib release the
GIL), streaming in small pieces, so memory stays bounded whatever the image size.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from isal import isal_zlib

from builder.errors import PackageError
from builder.package.flashplan import CHUNK_NAME, SECTOR, FileSet, PartitionFlash
from builder.package.scripts import NewChunk

PIECE = 4 << 20
GZIP_WBITS = 31  # gzip container: header with mtime 0, no name
DEFAULT_LEVEL = 3  # ISA-L's best; see the benchmark in bench/
_ZEROS = bytes(PIECE)

Progress = Callable[[int], None]  # called with a byte count as work advances


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@dataclass(frozen=True)
class JoinedImage:
    path: Path
    size: int
    chunk_digests: tuple[str, ...]  # sha256 of each chunk's uncompressed bytes


def _decompress_chunk(
    files: FileSet, name: str, expected: int | None, out_fd: int, offset: int, progress: Progress | None
) -> str:
    """Stream-decompress one chunk into `out_fd` at `offset`; return the sha256 of its bytes."""
    h = hashlib.sha256()
    written = 0
    d = isal_zlib.decompressobj(GZIP_WBITS) if expected is not None else None
    try:
        with files.open(name) as f:
            while True:
                raw = f.read(PIECE)
                if not raw:
                    break
                data = d.decompress(raw) if d is not None else raw
                if d is not None and d.unused_data:
                    raise PackageError(
                        f"{name} holds data after the end of its gzip stream",
                        where=name,
                        hint="U-Boot's unzip reads one gzip member; recompress the chunk",
                    )
                if data:
                    _write_sparse(out_fd, data, offset + written)
                    h.update(data)
                    written += len(data)
                    if progress:
                        progress(len(data))
            if d is not None:
                tail = d.flush()
                if tail:
                    _write_sparse(out_fd, tail, offset + written)
                    h.update(tail)
                    written += len(tail)
                if not d.eof:
                    raise PackageError(
                        f"{name} is truncated: its gzip stream ends early after {written} bytes",
                        where=name,
                        hint="copy or download the package again",
                    )
    except isal_zlib.error as e:
        raise PackageError(f"{name} is not valid gzip data: {e}", where=name) from None
    if expected is not None and written != expected:
        raise PackageError(
            f"{name} holds {written} bytes uncompressed but its script says {expected}",
            where=name,
            hint="the chunk and its unzip size disagree; the package is inconsistent",
        )
    return h.hexdigest()


def _write_sparse(fd: int, data: bytes, offset: int) -> None:
    """Write `data` at `offset`, leaving all-zero pieces as holes."""
    view = memoryview(data)
    for start in range(0, len(view), 1 << 20):
        piece = view[start : start + (1 << 20)]
        if piece != _ZEROS[: len(piece)]:
            os.pwrite(fd, piece, offset + start)


def join_partition(
    files: FileSet,
    part: PartitionFlash,
    dest: Path,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> JoinedImage:
    """Rebuild the partition image from its chunks as a sparse file at `dest`."""
    if not part.chunks:
        raise PackageError(f"partition {part.label} has no image in the package")
    size = part.image_bytes
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        with ThreadPoolExecutor(workers or default_workers()) as pool:
            futures = [
                pool.submit(
                    _decompress_chunk,
                    files,
                    c.file,
                    c.unzip_bytes,
                    fd,
                    (c.offset_sectors - part.offset_sectors) * SECTOR,
                    progress,
                )
                for c in part.chunks
            ]
            digests = tuple(f.result() for f in futures)
    finally:
        os.close(fd)
    return JoinedImage(dest, size, digests)


def chunk_ranges(size: int, chunk_sectors: int) -> list[tuple[int, int]]:
    """(byte offset, byte length) of each chunk of an image of `size` bytes."""
    step = chunk_sectors * SECTOR
    return [(off, min(step, size - off)) for off in range(0, size, step)] or [(0, 0)]


def chunk_name_pattern(part: PartitionFlash) -> str:
    """The vendor's chunk-name stem for this partition (from its names when they follow the pattern)."""
    for c in part.chunks:
        m = CHUNK_NAME.match(c.file)
        if m:
            return m["label"]
    return part.stem


@dataclass(frozen=True)
class PackedChunk:
    chunk: NewChunk
    reused_from: str | None  # the vendor chunk whose .gz was kept, or None if recompressed
    sha256: str  # of the uncompressed bytes
    gz_bytes: int


def _hash_region(fd: int, offset: int, length: int) -> str:
    h = hashlib.sha256()
    pos = 0
    while pos < length:
        buf = os.pread(fd, min(PIECE, length - pos), offset + pos)
        if not buf:
            raise PackageError(f"image ends early at byte {offset + pos}")
        h.update(buf)
        pos += len(buf)
    return h.hexdigest()


def compress_region(fd: int, offset: int, length: int, dest: BinaryIO, level: int) -> None:
    """Deterministic gzip (mtime 0, no name) of one image region, streamed."""
    c = isal_zlib.compressobj(level, isal_zlib.DEFLATED, GZIP_WBITS)
    pos = 0
    while pos < length:
        buf = os.pread(fd, min(PIECE, length - pos), offset + pos)
        if not buf:
            raise PackageError(f"image ends early at byte {offset + pos}")
        dest.write(c.compress(buf))
        pos += len(buf)
    dest.write(c.flush())


def pack_partition(
    image: Path,
    part: PartitionFlash,
    chunk_sectors: int,
    original: Sequence[str] | None,
    files: FileSet,
    out_dir: Path,
    *,
    level: int = DEFAULT_LEVEL,
    workers: int | None = None,
    progress: Progress | None = None,
    offset_sectors: int | None = None,
) -> list[PackedChunk]:
    """Split `image` into chunks in `out_dir`, keeping the vendor's .gz for unchanged ones.

    `original` holds the sha256 of each vendor chunk's uncompressed bytes (from the
    join); a new chunk with the same length and digest reuses that vendor file byte
    for byte, whatever its new name.
    """
    size = image.stat().st_size
    ranges = chunk_ranges(size, chunk_sectors)
    base = part.offset_sectors if offset_sectors is None else offset_sectors
    stem = chunk_name_pattern(part)
    reusable: dict[tuple[int, str], str] = {}
    if original is not None:
        for c, digest in zip(part.chunks, original, strict=True):
            if c.unzip_bytes is not None:
                reusable.setdefault((c.unzip_bytes, digest), c.file)
    total = len(ranges)

    def one(k: int) -> PackedChunk:
        off, length = ranges[k]
        name = f"{stem}.{k + 1}-of-{total}.gz"
        digest = _hash_region(fd, off, length)
        nc = NewChunk(
            file=name,
            unzip_bytes=length,
            offset_sectors=base + off // SECTOR,
            count_sectors=-(-length // SECTOR),
        )
        dest = out_dir / name
        vendor = reusable.get((length, digest))
        if vendor is not None:
            with files.open(vendor) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, PIECE)
        else:
            with open(dest, "wb") as dst:
                compress_region(fd, off, length, dst, level)
        if progress:
            progress(length)
        return PackedChunk(nc, vendor, digest, dest.stat().st_size)

    fd = os.open(image, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(workers or default_workers()) as pool:
            return list(pool.map(one, range(total)))
    finally:
        os.close(fd)


_SAFE = re.compile(r"^[A-Za-z0-9._+-]+$")


def is_fat_safe(name: str) -> bool:
    """A name every FAT32 (VFAT) implementation accepts."""
    return bool(_SAFE.match(name)) and len(name) <= 255 and not name.endswith(".")
