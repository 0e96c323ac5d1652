"""Joined vendor partition images, kept in the cache so the next build does not decompress them again.

Layout under the cache root::

    images/<key>.img             the partition as the vendor's chunks join it (sparse, never edited)
    images/<key>.json            its record: label, size, sha256 of each chunk's bytes, last use
    images/<key>.lock            held shared by each build reading the image, exclusively to delete it
    images/<key>.img.partial-<pid>   a join in progress (renamed to .img when complete)

`key` names the vendor's chunks without reading them (builder.package.source member_identity:
the input's path, size, mtime and inode): a changed package is a new key. A build reads the
cached image (stat, cat, ls) and edits a sparse copy of it, or, for a small edit, the cached
image itself with undo files, put back and checked after packing (ImageCache.writable/restore).
Each partition label keeps its KEEP_PER_LABEL most recently used images; `cache prune` drops the rest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from builder.cache import file_lock, fsync_path, read_json, try_file_lock, write_json_atomic
from builder.errors import AirboxError, BuildError
from builder.fs.ext4 import Ext4Image
from builder.package.chunks import (
    JoinedImage,
    Progress,
    default_workers,
    hash_region,
    join_partition,
    pwrite_sparse,
)
from builder.package.flashplan import SECTOR, FileSet, PartitionFlash
from builder.pool import check_cancelled, worker_pool

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no shared locks, builds there are unsupported anyway
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("airbox-build.images")

IMAGE_CACHE_VERSION = 1
KEEP_PER_LABEL = 2
COPY_PIECE = 64 << 20


@dataclass(frozen=True)
class BaseImage:
    """A vendor partition joined: read it, never edit it (see ImageCache.writable)."""

    label: str
    key: str
    path: Path
    size: int
    chunk_digests: tuple[str, ...]  # sha256 of each vendor chunk's uncompressed bytes
    cached: bool  # in the image cache (else a work file the build may edit)
    chunk_ranges: tuple[tuple[int, int], ...] = ()  # (offset, length) of each vendor chunk


@dataclass(frozen=True)
class ImageEntry:
    path: Path
    label: str
    size: int  # the image's length
    disk_bytes: int  # what it takes on disk (sparse)
    last_used: float


class IdentifiedFiles(FileSet, Protocol):
    """A file set that can name the identity of a member without reading it (PackageSource)."""

    def member_identity(self, name: str) -> list[object]: ...

    def describe(self) -> str: ...


def partition_key(files: IdentifiedFiles, part: PartitionFlash) -> str:
    """The identity of a partition's vendor chunks, from their names, places and file identities."""
    ident = {
        "version": IMAGE_CACHE_VERSION,
        "label": part.label,
        "bytes": part.image_bytes,
        "chunks": [
            [
                c.file,
                c.unzip_bytes,
                (c.offset_sectors - part.offset_sectors) * SECTOR,
                files.member_identity(c.file),
            ]
            for c in part.chunks
        ],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


class ImageCache:
    """The image cache under `root` (cache dir / "images"); None: join into the work folder each time."""

    def __init__(self, root: Path | None, *, workers: int | None = None) -> None:
        self.root = root
        self.workers = workers
        self._held: dict[str, int] = {}  # key -> fd of its .lock, held shared (exclusive while edited)
        self._editing: dict[str, dict[str, Any]] = {}  # key -> its record, while edited in place

    def open(
        self,
        files: IdentifiedFiles,
        part: PartitionFlash,
        work: Path,
        joining: Callable[[], contextlib.AbstractContextManager[Progress]] | None = None,
    ) -> BaseImage:
        """The joined vendor image of `part`: from the cache, else joined (into the cache when on).
        `joining` gives the progress callback for a join (not called when the cache has it)."""
        key = partition_key(files, part)
        if self.root is None:
            with _progress(joining) as advance:
                joined = join_partition(
                    files, part, work / f"{part.stem}.img", workers=self.workers, progress=advance
                )
            return BaseImage(
                part.label, key, joined.path, joined.size, joined.chunk_digests, False, _ranges(part)
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self._hold(key)  # before looking: a prune cannot delete it from under us
        with file_lock(self.root / f"{key}.join.lock"):  # two builds: one joins, the other waits
            found = self._load(key, part)
            if found is None:
                with _progress(joining) as advance:
                    found = self._join(key, files, part, advance)
                self._evict(part.label, keep=key)
        self._touch(key)
        return found

    def writable(self, base: BaseImage, dest: Path, *, in_place: bool = False) -> JoinedImage:
        """A work image to edit: the work file itself (no cache), the cached image itself when
        `in_place` is asked and no other build reads it (edit it with undo files, then give it
        back with restore()), else a sparse copy of it at `dest`."""
        if not base.cached:
            return JoinedImage(base.path, base.size, base.chunk_digests)
        if in_place and self._take_for_edit(base.key):
            return JoinedImage(base.path, base.size, base.chunk_digests)
        copy_sparse(base.path, dest, workers=self.workers)
        return JoinedImage(dest, base.size, base.chunk_digests)

    def _take_for_edit(self, key: str) -> bool:
        """Hold the image alone and mark it as being edited (its record removed: a build killed
        now leaves an image no later build trusts, and the next one joins it again)."""
        fd = self._held.get(key)
        if fd is None or fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fcntl.flock(fd, fcntl.LOCK_SH)  # a failed conversion may have dropped the shared lock
            return False
        _, meta_path, _ = self._paths(key)
        meta = read_json(meta_path)
        if meta is None:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return False
        meta_path.unlink()
        with contextlib.suppress(OSError):
            fsync_path(meta_path.parent)
        self._editing[key] = meta
        return True

    def restore(self, base: BaseImage, image: Ext4Image, packed: Sequence[tuple[int, int, str]]) -> None:
        """Undo the in-place edit of a cached image and check it is the vendor's again.

        `packed`: (offset, length, sha256) of the chunks the edited image was cut into. A vendor
        chunk packed unchanged was not written to; the others are hashed again after e2undo.
        On any doubt the image is dropped: the next build joins it anew."""
        meta = self._editing.pop(base.key)
        seen = {(off, n): digest for off, n, digest in packed}
        try:
            image.undo(base.size)
            fd = os.open(base.path, os.O_RDONLY)
            try:
                for (off, n), digest in zip(base.chunk_ranges, base.chunk_digests, strict=True):
                    if seen.get((off, n)) != digest and hash_region(fd, off, n) != digest:
                        raise BuildError(f"bytes {off}+{n} differ from the vendor's chunk after e2undo")
            finally:
                os.close(fd)
        except (AirboxError, OSError) as e:
            log.warning(
                "partition %s: the cached image could not be restored (%s); it is dropped", base.label, e
            )
            base.path.unlink(missing_ok=True)
            return
        write_json_atomic(self._paths(base.key)[1], meta)
        if fcntl is not None and base.key in self._held:
            fcntl.flock(self._held[base.key], fcntl.LOCK_SH)

    def close(self) -> None:
        """Let go of the images this build read (prune may delete them again). An image still
        being edited (the build failed before restore()) is dropped."""
        for key in list(self._editing):
            self._paths(key)[0].unlink(missing_ok=True)
        self._editing.clear()
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()

    # ---- entries

    def _paths(self, key: str) -> tuple[Path, Path, Path]:
        assert self.root is not None
        return self.root / f"{key}.img", self.root / f"{key}.json", self.root / f"{key}.lock"

    def _hold(self, key: str) -> None:
        if key in self._held or fcntl is None:
            return
        fd = os.open(self._paths(key)[2], os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._held[key] = fd

    def _load(self, key: str, part: PartitionFlash) -> BaseImage | None:
        img, meta_path, _ = self._paths(key)
        meta = read_json(meta_path)
        try:
            ok = (
                meta is not None
                and meta.get("version") == IMAGE_CACHE_VERSION
                and meta.get("label") == part.label
                and meta.get("size") == part.image_bytes == img.stat().st_size
                and len(meta.get("chunk_digests", ())) == len(part.chunks)
            )
        except OSError:
            ok = False
        if not ok or meta is None:
            img.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            return None
        log.info("partition %s: using the joined image %s", part.label, img)
        digests = tuple(meta["chunk_digests"])
        return BaseImage(part.label, key, img, int(meta["size"]), digests, True, _ranges(part))

    def _join(
        self, key: str, files: IdentifiedFiles, part: PartitionFlash, progress: Progress | None
    ) -> BaseImage:
        img, meta_path, _ = self._paths(key)
        assert self.root is not None
        for stale in self.root.glob(f"{key}.img.partial-*"):  # a killed join (we hold the join lock)
            stale.unlink(missing_ok=True)
        tmp = self.root / f"{key}.img.partial-{os.getpid()}"
        try:
            joined = join_partition(files, part, tmp, workers=self.workers, progress=progress)
            os.chmod(tmp, 0o444)  # a reminder: builds edit a copy
            os.replace(tmp, img)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        now = time.time()
        write_json_atomic(
            meta_path,
            {
                "version": IMAGE_CACHE_VERSION,
                "label": part.label,
                "size": joined.size,
                "chunk_digests": list(joined.chunk_digests),
                "chunks": [c.file for c in part.chunks],
                "chunk_ranges": [list(r) for r in _ranges(part)],  # offset, length of each chunk
                "package": files.describe(),
                "created": now,
                "last_used": now,
            },
        )
        return BaseImage(part.label, key, img, joined.size, joined.chunk_digests, True, _ranges(part))

    def _touch(self, key: str) -> None:
        _, meta_path, _ = self._paths(key)
        meta = read_json(meta_path)
        if meta is not None:
            meta["last_used"] = time.time()
            with contextlib.suppress(OSError):
                write_json_atomic(meta_path, meta)

    def _evict(self, label: str, *, keep: str) -> None:
        """Keep the KEEP_PER_LABEL most recently used images of this label (the new one among them)."""
        assert self.root is not None
        same = [(m, k) for k, m in _metas(self.root) if m.get("label") == label and k != keep]
        same.sort(key=lambda mk: float(mk[0].get("last_used", 0)), reverse=True)
        for _, k in same[KEEP_PER_LABEL - 1 :]:
            _remove_if_idle(self.root, k)


@contextlib.contextmanager
def _progress(
    joining: Callable[[], contextlib.AbstractContextManager[Progress]] | None,
) -> Iterator[Progress | None]:
    if joining is None:
        yield None
        return
    with joining() as advance:
        yield advance


def _ranges(part: PartitionFlash) -> tuple[tuple[int, int], ...]:
    return tuple(
        ((c.offset_sectors - part.offset_sectors) * SECTOR, c.unzip_bytes or c.count_sectors * SECTOR)
        for c in part.chunks
    )


def _metas(root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for meta_file in sorted(root.glob("*.json")):
        meta = read_json(meta_file)
        if meta is not None:
            yield meta_file.stem, meta


def _remove_if_idle(root: Path, key: str) -> int:
    """Delete an image nobody reads right now; returns the bytes it took on disk."""
    lock = root / f"{key}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0  # a build is reading it
        img = root / f"{key}.img"
        try:
            freed = img.stat().st_blocks * 512
        except OSError:
            freed = 0
        (root / f"{key}.json").unlink(missing_ok=True)  # first: a half-removed entry never looks whole
        img.unlink(missing_ok=True)
        return freed
    finally:
        os.close(fd)


def image_entries(cache_dir: Path) -> list[ImageEntry]:
    root = cache_dir / "images"
    out = []
    for key, meta in _metas(root):
        img = root / f"{key}.img"
        try:
            st = img.stat()
        except OSError:
            continue
        out.append(
            ImageEntry(
                img, str(meta.get("label")), st.st_size, st.st_blocks * 512, float(meta.get("last_used", 0))
            )
        )
    return out


def prune_images(cache_dir: Path, cutoff: float | None) -> tuple[int, int]:
    """Remove images unused since `cutoff` (all when None) and killed joins; (files, bytes) freed."""
    root = cache_dir / "images"
    files = freed = 0
    for key, meta in list(_metas(root)):
        if cutoff is not None and float(meta.get("last_used", 0)) >= cutoff:
            continue
        n = _remove_if_idle(root, key)
        if n or not (root / f"{key}.img").exists():
            files += 1
            freed += n
    for partial in sorted(root.glob("*.img.partial-*")):
        key = partial.name.split(".", 1)[0]
        with contextlib.suppress(OSError), try_file_lock(root / f"{key}.join.lock") as free:
            if free:
                freed += partial.stat().st_blocks * 512
                partial.unlink()
                files += 1
    return files, freed


# ---------------------------------------------------------------------------- sparse copy


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the parts of a file that hold data; the whole file where holes are not known."""
    if not hasattr(os, "SEEK_DATA"):
        return [(0, size)]
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    except OSError:
        return [(0, size)]
    return out


def copy_sparse(src: Path, dest: Path, *, workers: int | None = None) -> None:
    """Copy `src` to `dest` keeping its holes; in the kernel (copy_file_range) where it can, on both cores."""
    fi = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(fi).st_size
        fo = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fo, size)
            pieces = [
                (off, min(COPY_PIECE, end - off))
                for start, end in data_ranges(fi, size)
                for off in range(start, end, COPY_PIECE)
            ]
            with worker_pool(workers or default_workers()) as pool:
                for _ in pool.map(lambda p: _copy_piece(fi, fo, *p), pieces):
                    pass
        finally:
            os.close(fo)
    finally:
        os.close(fi)


def _copy_piece(fi: int, fo: int, offset: int, length: int) -> None:
    check_cancelled()
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(fi, fo, length - done, offset + done, offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # not on this file system: copy by hand
    while done < length:
        buf = os.pread(fi, min(4 << 20, length - done), offset + done)
        if not buf:
            raise OSError(f"short read at byte {offset + done}")
        pwrite_sparse(fo, buf, offset + done)
        done += len(buf)
