"""Scratch files: the work cache folder, sparse decompression, streaming and atomic copies, reflinks."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

from builder.errors import PackageError
from builder.package.source.base import _COPY_BLOCK, _FICLONE, _SPARSE_BLOCK, _damaged, _is_data_error

log = logging.getLogger("airbox-build")


# --------------------------------------------------------------------------------------------
# Scratch files: cache dir, sparse decompression, streaming copies


def _cache_dir(workdir: Path, origin: Path) -> Path:
    st = origin.stat()
    key = hashlib.sha256(f"{origin.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return workdir / f"source-{key}"


def _decompressed_image(
    cache: Path, opener: Callable[[], contextlib.AbstractContextManager[BinaryIO]], where: str
) -> Path:
    """Decompress the card image once into `cache/disk.img`, as a sparse file; reuse it after."""
    disk = cache / "disk.img"
    if disk.is_file():
        log.info("reusing the decompressed card image %s", disk)
        return disk
    cache.mkdir(parents=True, exist_ok=True)
    log.info("decompressing %s into %s (sparse)", where, disk)
    fd, tmp_name = tempfile.mkstemp(prefix="disk.img.partial-", dir=cache)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, opener() as src:
            write_sparse(src, out, where)
        tmp.rename(disk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return disk


def write_sparse(src: BinaryIO, out: BinaryIO, where: str) -> int:
    """Copy a stream to a file, leaving holes for all-zero 64 KiB blocks; returns the byte count."""
    zeros = bytes(_SPARSE_BLOCK)
    total = 0
    while True:
        block = _read_checked(src, _SPARSE_BLOCK, where)
        if not block:
            break
        if block == zeros[: len(block)]:
            out.seek(len(block), os.SEEK_CUR)
        else:
            out.write(block)
        total += len(block)
    out.truncate(total)  # the file must end at the image end even when it ends in a hole
    return total


def _read_checked(src: BinaryIO, n: int, where: str) -> bytes:
    try:
        return src.read(n)
    except Exception as exc:
        if _is_data_error(exc):
            raise _damaged("compressed data", where, exc) from exc
        raise


def _copy_stream(src: IO[bytes], out: IO[bytes]) -> None:
    shutil.copyfileobj(src, out, _COPY_BLOCK)


def _write_atomically(
    dest: Path, write: Callable[[Path, BinaryIO], object], expected: int, where: str
) -> None:
    """Write `dest` through a temporary file beside it; check the size before renaming into place."""
    dest = Path(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.partial-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(tmp, f)
        got = tmp.stat().st_size
        if got != expected:
            raise PackageError(
                f"read {got} bytes but the listing says {expected}",
                where=where,
                hint="the package may be damaged or truncated",
            )
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reflink(src: Path, dest: Path) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    try:
        with open(src, "rb") as s, open(dest, "xb") as d:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
        return True
    except OSError:
        dest.unlink(missing_ok=True)
        return False


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
