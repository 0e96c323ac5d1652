"""What every form of the vendor package gives: a `PackageSource` (its file set, read streaming),
the forms' constants, desktop junk, and the errors for damaged inputs."""

from __future__ import annotations

import contextlib
import gzip
import io
import lzma
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, cast

from builder.errors import PackageError
from builder.package import release

MARKERS = release.MARKERS  # the file set: the one folder holding both
SUPPORTED_FORMS = (
    "a folder holding the file set (or holding one folder that does)",
    "a tarball: .tar, .tgz/.tar.gz, .tar.xz, .tar.bz2 (any top folder)",
    "a .zip (any top folder)",
    "a whole-card image .img (MBR or GPT label, file set on a FAT12/16/32 partition)",
    "a card image zipped or compressed: .img.zip, .img.xz, .img.gz",
)
_FORMS_HINT = "supported forms: " + "; ".join(SUPPORTED_FORMS)
_SET_HINT = (
    "point at the vendor TF-card package: the folder, archive or card image whose file set holds "
    "boot.scr, boot_emmc.scr, the boot_emmc-*.scr scripts and the *.gz chunks"
)

_COPY_BLOCK = 1 << 20
_SPARSE_BLOCK = 64 << 10
_HEAD_BYTES = 8192 + 512  # enough for a GPT header behind a 4096-byte sector 0
_DIR_SEARCH_DEPTH = 2  # a folder form: the file set may sit this many levels below the folder
_MIN_IMAGE_MEMBER = 1 << 20  # zip members smaller than this are not card images

_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_BZ2_MAGIC = b"BZh"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_7Z_MAGIC = b"7z\xbc\xaf\x27\x1c"
_COMPRESSIONS = {"gz": _GZIP_MAGIC, "xz": _XZ_MAGIC, "bz2": _BZ2_MAGIC}

# Metadata that desktop systems leave on cards and in archives; never part of the vendor set.
_OS_JUNK_DIRS = frozenset(
    {"__MACOSX", "System Volume Information", "$RECYCLE.BIN", ".Trashes", ".Spotlight-V100", ".fseventsd"}
)
_OS_JUNK_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})

_FICLONE = 0x40049409  # Linux ioctl: share the extents of one file with another (reflink)


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        EOFError,
        lzma.LZMAError,
        zlib.error,
        gzip.BadGzipFile,
        tarfile.TarError,
        zipfile.BadZipFile,
    ]
    with contextlib.suppress(ImportError):
        from isal.igzip_lib import IsalError

        errors.append(cast("type[BaseException]", IsalError))
    return tuple(errors)


_DECOMPRESS_ERRORS = _decompress_errors()


def _is_data_error(exc: BaseException) -> bool:
    """True for a damaged/truncated archive; False for a real I/O error (disk full) to re-raise."""
    if isinstance(exc, _DECOMPRESS_ERRORS):
        return True
    # bz2 and gzip report bad data as a bare OSError; an OS-level failure carries an errno.
    return isinstance(exc, OSError) and exc.errno is None


def is_os_junk(name: str) -> bool:
    """macOS/Windows metadata (AppleDouble `._x`, `.DS_Store`, `__MACOSX/`, ...), ignored everywhere."""
    parts = name.split("/")
    return (
        any(p in _OS_JUNK_DIRS for p in parts[:-1])
        or parts[-1] in _OS_JUNK_FILES
        or parts[-1].startswith("._")
    )


class _GuardedReader(io.RawIOBase):
    """Turns the decompression errors of a member stream into PackageError naming the member."""

    def __init__(self, inner: IO[bytes], what: str, where: str) -> None:
        self._inner = inner
        self._what = what
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            return self._inner.readinto(buffer)  # type: ignore[attr-defined, no-any-return]
        except Exception as exc:
            if _is_data_error(exc):
                raise _damaged(self._what, self._where, exc) from exc
            raise

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


def _damaged(what: str, where: str, exc: BaseException) -> PackageError:
    return PackageError(
        f"the {what} is truncated or damaged ({type(exc).__name__}: {exc})",
        where=where,
        hint="download it again and compare its checksum with the published one",
    )


def _preview(sizes: dict[str, int]) -> str:
    names = list(sizes)
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")


def _preview_paths(paths: list[str]) -> str:
    if not paths:
        return "no files"
    return ", ".join(sorted(paths)[:8]) + (f" ... ({len(paths)} files)" if len(paths) > 8 else "")


def _walk_files(top: Path, max_depth: int | None = None) -> Iterator[str]:
    """'/'-paths of the files below `top`, not following symlinked folders."""
    for dirpath, dirnames, filenames in os.walk(top):
        rel = Path(dirpath).relative_to(top)
        depth = 0 if rel == Path(".") else len(rel.parts)
        if max_depth is not None and depth >= max_depth:
            dirnames.clear()
        dirnames.sort()
        for fn in sorted(filenames):
            yield (rel / fn).as_posix() if depth else fn
