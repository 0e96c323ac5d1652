"""Join a partition image from its chunks, and split it back, reusing unchanged chunks.

Decompression and compression run on a thread pool (ISA-L and hashlib release the
GIL), streaming in small pieces, so memory stays bounded whatever the image size.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from isal import isal_zlib

from builder.errors import PackageError
from builder.package.flashplan import CHUNK_NAME, SECTOR, FileSet, PartitionFlash
from builder.package.scripts import NewChunk
from builder.pool import check_cancelled, worker_pool

# isal declares its error loosely for type checkers: this is the exception class it raises
ZlibError = cast("type[Exception]", isal_zlib.error)

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
    chunk_digests: tuple[str, ...]  # sha256 of each vendor chunk's uncompressed bytes
    fingerprint: str | None = None  # of the edits applied to it (builder.previous), when known
    # Called with (offset, length, sha256) of each chunk once it is packed; None: a work file,
    # deleted then. (An image edited in place in the image cache is restored by it.)
    release: Callable[[Sequence[tuple[int, int, str]]], None] | None = None


def _decompress_chunk(
    files: FileSet, name: str, expected: int | None, out_fd: int, offset: int, progress: Progress | None
) -> str:
    """Stream-decompress one chunk into `out_fd` at `offset`; return the sha256 of its bytes."""
    h = hashlib.sha256()
    written = 0
    d = isal_zlib.decompressobj(GZIP_WBITS) if expected is not None else None

    def emit(data: bytes) -> None:
        nonlocal written
        if data:
            pwrite_sparse(out_fd, data, offset + written)
            h.update(data)
            written += len(data)
            if progress:
                progress(len(data))

    try:
        with files.open(name) as f:
            while True:
                check_cancelled()  # Ctrl-C: stop within a piece, not at the end of a 100 MB chunk
                raw = f.read(PIECE)
                if not raw:
                    break
                if d is None:
                    emit(raw)
                    continue
                # Bounded output: a piece of gzip'd zeros inflates a thousandfold.
                emit(d.decompress(raw, PIECE))
                while d.unconsumed_tail:
                    emit(d.decompress(d.unconsumed_tail, PIECE))
                if d.unused_data:
                    raise PackageError(
                        f"{name} holds data after the end of its gzip stream",
                        where=name,
                        hint="U-Boot's unzip reads one gzip member; recompress the chunk",
                    )
            if d is not None:
                tail = d.flush()
                if tail:
                    pwrite_sparse(out_fd, tail, offset + written)
                    h.update(tail)
                    written += len(tail)
                if not d.eof:
                    raise PackageError(
                        f"{name} is truncated: its gzip stream ends early after {written} bytes",
                        where=name,
                        hint="copy or download the package again",
                    )
    except ZlibError as e:
        raise PackageError(f"{name} is not valid gzip data: {e}", where=name) from None
    if expected is not None and written != expected:
        raise PackageError(
            f"{name} holds {written} bytes uncompressed but its script says {expected}",
            where=name,
            hint="the chunk and its unzip size disagree; the package is inconsistent",
        )
    return h.hexdigest()


def pwrite_sparse(fd: int, data: bytes, offset: int) -> None:
    """Write `data` at `offset`, leaving all-zero pieces as holes."""
    view = memoryview(data)
    for start in range(0, len(view), 1 << 20):
        piece = view[start : start + (1 << 20)]
        # bytes.startswith is one memcmp; comparing memoryviews goes element by element
        if not _ZEROS.startswith(piece):
            pwrite_all(fd, piece, offset + start)


def pwrite_over(fd: int, data: bytes, offset: int) -> None:
    """Write `data` at `offset` over what is there: all-zero pieces become holes (punched where
    the filesystem can, written as zeros where it cannot), so the result reads as `data`."""
    view = memoryview(data)
    for start in range(0, len(view), 1 << 20):
        piece = view[start : start + (1 << 20)]
        if not _ZEROS.startswith(piece) or not punch_hole(fd, offset + start, len(piece)):
            pwrite_all(fd, piece, offset + start)


_libc: Any = None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE | KEEP_SIZE); False where the system or filesystem cannot."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return bool(_libc.fallocate(fd, 0x02 | 0x01, offset, length) == 0)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """os.pwrite until every byte is written: on a nearly full disk pwrite writes part of the
    buffer and returns a short count (the next call raises ENOSPC), which must not go unseen."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


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
        with worker_pool(workers or default_workers()) as pool:
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


FileStat = tuple[int, int, int]  # size, mtime_ns, inode: "this very file, unchanged"


def file_stat(path: Path) -> FileStat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def vendor_stat(files: FileSet, name: str) -> FileStat | None:
    """The identity of a vendor file, when the package is a real folder (else None: not trackable)."""
    set_dir = getattr(files, "set_dir", None)
    return file_stat(Path(set_dir) / name) if set_dir is not None else None


@dataclass(frozen=True)
class EarlierFile:
    """A file an earlier build wrote into its card folder, and what it knew about it."""

    path: Path
    out_stat: FileStat | None  # its (size, mtime_ns, inode) when that build finished
    md5: str | None = None  # of the file, from that build's md5.txt
    sha256: str | None = None  # of the file, from that build's SHA256SUMS
    gz_bytes: int | None = None

    def unchanged(self) -> bool:
        return self.out_stat is not None and file_stat(self.path) == self.out_stat


class ChunkPool:
    """What an earlier build of the same recipe wrote, to take instead of doing it again.

    - Chunks it compressed, by the length and sha256 of their uncompressed bytes: a chunk
      that is not the vendor's but that an earlier build already compressed (the same app
      payload again, a netplan-only change) is linked (or copied) from there.
    - Its copies of vendor files, by the vendor file's identity (size, mtime, inode, in a
      package folder): while both the vendor file and the earlier copy are unchanged, the
      copy is hard-linked instead of written again.

    A file linked to an earlier one that is unchanged since keeps that build's digests:
    `known_md5` and `known_sha256` collect them (card name -> digest).
    """

    def __init__(self) -> None:
        self._chunks: dict[tuple[int, str], EarlierFile] = {}
        self._copies: dict[tuple[str, FileStat], EarlierFile] = {}
        self.known_md5: dict[str, str] = {}
        self.known_sha256: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._chunks) + len(self._copies)

    def add(self, length: int, sha256: str, earlier: EarlierFile) -> None:
        """A chunk whose uncompressed bytes are `length` long with this sha256."""
        self._chunks.setdefault((length, sha256), earlier)

    def add_copy(self, vendor: str, vstat: FileStat, earlier: EarlierFile) -> None:
        """A byte-for-byte copy of the vendor file `vendor` as it was then (`vstat`)."""
        self._copies.setdefault((vendor, vstat), earlier)

    def find(self, length: int, sha256: str) -> Path | None:
        """The .gz holding these bytes, if it is still there with the size it was written with."""
        e = self._chunks.get((length, sha256))
        if e is None:
            return None
        st = file_stat(e.path)
        return e.path if st is not None and st[0] == e.gz_bytes else None

    def place_earlier(self, length: int, sha256: str, dest: Path) -> bool:
        """Link (or copy) the earlier .gz of these bytes at dest; False if there is none."""
        gz = self.find(length, sha256)
        if gz is None:
            return False
        e = self._chunks[(length, sha256)]
        unchanged = e.unchanged()
        link_or_copy(gz, dest)
        if unchanged and file_stat(dest) == e.out_stat:
            self._note(dest.name, e)  # a link to the very file those digests were taken of
        return True

    def place_vendor(self, files: FileSet, vendor: str, dest: Path) -> bool:
        """Link the earlier copy of `vendor` at dest if both are unchanged; False if there is none."""
        vstat = vendor_stat(files, vendor)
        e = self._copies.get((vendor, vstat)) if vstat is not None else None
        if e is None or not e.unchanged():
            return False
        try:
            os.link(e.path, dest)
        except OSError:
            return False
        self._note(dest.name, e)
        return True

    def _note(self, name: str, e: EarlierFile) -> None:
        if e.md5 is not None:
            self.known_md5[name] = e.md5
        if e.sha256 is not None:
            self.known_sha256[name] = e.sha256


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link src at dest (same file system), else copy it (in the kernel where it can)."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


@dataclass(frozen=True)
class PackedChunk:
    chunk: NewChunk
    reused_from: str | None  # the vendor chunk whose .gz was kept, or None if recompressed
    sha256: str  # of the uncompressed bytes
    gz_bytes: int
    pooled: bool = False  # not compressed here: taken from an earlier build's output (ChunkPool)


def copy_vendor(files: FileSet, name: str, dest: Path, pool: ChunkPool | None = None) -> None:
    """A vendor file, byte for byte; never a hard link to the input package (that would alias it),
    but a link to an earlier build's unchanged copy of it when `pool` has one."""
    if pool is not None and pool.place_vendor(files, name, dest):
        return
    copy_to = getattr(files, "copy_to", None)
    if copy_to is not None:
        copy_to(name, dest, link=False)  # a folder: the kernel copies (sendfile/reflink)
        return
    with files.open(name) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, PIECE)


def hash_region(fd: int, offset: int, length: int) -> str:
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
        check_cancelled()
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
    pool: ChunkPool | None = None,
) -> list[PackedChunk]:
    """Split `image` into chunks in `out_dir`, keeping the vendor's .gz for unchanged ones.

    `original` holds the sha256 of each vendor chunk's uncompressed bytes (from the
    join); a new chunk with the same length and digest reuses that vendor file byte
    for byte, whatever its new name. Other chunks come from `pool` when an earlier build
    compressed the same bytes, and are compressed otherwise.
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
        digest = hash_region(fd, off, length)
        nc = NewChunk(
            file=name,
            unzip_bytes=length,
            offset_sectors=base + off // SECTOR,
            count_sectors=-(-length // SECTOR),
        )
        dest = out_dir / name
        vendor = reusable.get((length, digest))
        pooled = False
        if vendor is not None:
            copy_vendor(files, vendor, dest, pool)
        elif pool is not None and pool.place_earlier(length, digest, dest):
            pooled = True
        else:
            with open(dest, "wb") as dst:
                compress_region(fd, off, length, dst, level)
        if progress:
            progress(length)
        return PackedChunk(nc, vendor, digest, dest.stat().st_size, pooled=pooled)

    fd = os.open(image, os.O_RDONLY)
    try:
        with worker_pool(workers or default_workers()) as executor:
            return list(executor.map(one, range(total)))
    finally:
        os.close(fd)


_SAFE = re.compile(r"^[A-Za-z0-9._+-]+$")


def is_fat_safe(name: str) -> bool:
    """A name every FAT32 (VFAT) implementation accepts."""
    return bool(_SAFE.match(name)) and len(name) <= 255 and not name.endswith(".")
