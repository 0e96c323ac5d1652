"""Reading and writing a card without the page cache: uncached sha256 (O_DIRECT, F_NOCACHE,
FILE_FLAG_NO_BUFFERING), copies flushed to the card, removals and directory syncs."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from builder.card.bundle import _BLOCK, CardError, _Copied

# --------------------------------------------------------------------------------------------
# Reading and writing without the page cache


def _o_binary() -> int:
    return getattr(os, "O_BINARY", 0)


def hash_uncached(path: Path, advance: Callable[[int], None] | None = None) -> tuple[str, str]:
    """(sha256, how the cache was bypassed) of a file, read from the device where the OS allows."""
    if sys.platform == "win32":
        got = _hash_windows_unbuffered(path, advance)
        if got is not None:
            return got, "FILE_FLAG_NO_BUFFERING"
        return _hash_plain(path, advance), "buffered"
    if sys.platform.startswith("linux"):
        _drop_cache(path)
        got = _hash_o_direct(path, advance)
        if got is not None:
            return got, "O_DIRECT"
        _drop_cache(path)
        return _hash_plain(path, advance), "posix_fadvise"
    if sys.platform == "darwin":
        return _hash_plain(path, advance, nocache=True), "F_NOCACHE"
    return _hash_plain(path, advance), "buffered"


def _drop_cache(path: Path) -> None:
    """Ask Linux to forget the file's cached pages (they are clean after fsync)."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hash_plain(path: Path, advance: Callable[[int], None] | None, nocache: bool = False) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | _o_binary())
    try:
        if nocache:
            _set_nocache(fd)
        while block := os.read(fd, _BLOCK):
            h.update(block)
            if advance:
                advance(len(block))
    finally:
        os.close(fd)
    return h.hexdigest()


def _hash_o_direct(path: Path, advance: Callable[[int], None] | None) -> str | None:
    """Read with O_DIRECT into a page-aligned buffer; None when the filesystem refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise
    h = hashlib.sha256()
    done = 0
    buf = mmap.mmap(-1, _BLOCK)  # page-aligned, as O_DIRECT needs
    try:
        with memoryview(buf) as view:
            while True:
                try:
                    n = os.readv(fd, [buf])
                except OSError as e:
                    if e.errno == errno.EINVAL and done == 0:
                        return None
                    raise
                if n == 0:
                    break
                h.update(view[:n])
                done += n
                if advance:
                    advance(n)
    finally:
        buf.close()
        os.close(fd)
    return h.hexdigest()


def _set_nocache(fd: int) -> None:
    """macOS: no caching of this file's data (reads come from the card, writes leave no pages)."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
    except (ImportError, OSError):
        pass


def _full_sync(fd: int) -> None:
    """Flush a file to the card itself: F_FULLFSYNC on macOS (fsync stops at the drive's cache)."""
    if sys.platform == "darwin":
        try:
            import fcntl

            fcntl.fcntl(fd, getattr(fcntl, "F_FULLFSYNC", 51))
            return
        except (ImportError, OSError):
            pass
    os.fsync(fd)  # FlushFileBuffers on Windows


def _hash_windows_unbuffered(path: Path, advance: Callable[[int], None] | None) -> str | None:
    """ReadFile with FILE_FLAG_NO_BUFFERING into a page-aligned buffer; None if it cannot open."""
    import ctypes
    from ctypes import wintypes

    k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    k32.CreateFileW.restype = wintypes.HANDLE
    k32.CreateFileW.argtypes = [
        wintypes.LPCWSTR,
        wintypes.DWORD,
        wintypes.DWORD,
        ctypes.c_void_p,
        wintypes.DWORD,
        wintypes.DWORD,
        wintypes.HANDLE,
    ]
    k32.ReadFile.argtypes = [
        wintypes.HANDLE,
        ctypes.c_void_p,
        wintypes.DWORD,
        ctypes.POINTER(wintypes.DWORD),
        ctypes.c_void_p,
    ]
    k32.CloseHandle.argtypes = [wintypes.HANDLE]
    generic_read, share_rw, open_existing = 0x80000000, 0x1 | 0x2, 3
    no_buffering, sequential = 0x20000000, 0x08000000
    flags = no_buffering | sequential
    handle = k32.CreateFileW(str(path), generic_read, share_rw, None, open_existing, flags, None)
    if handle is None or handle == ctypes.c_void_p(-1).value:
        return None
    h = hashlib.sha256()
    buf = mmap.mmap(-1, _BLOCK)  # page-aligned: a multiple of any sector size
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        address = ctypes.addressof(anchor)
        got = wintypes.DWORD()
        while True:
            if not k32.ReadFile(handle, address, _BLOCK, ctypes.byref(got), None):
                raise OSError(ctypes.get_last_error(), f"cannot read {path}")  # type: ignore[attr-defined]
            if got.value == 0:
                break
            h.update(buf[: got.value])
            if advance:
                advance(got.value)
    finally:
        del anchor
        buf.close()
        k32.CloseHandle(handle)
    return h.hexdigest()


def copy_file(src: Path, dest: Path, advance: Callable[[int], None] | None = None) -> _Copied:
    """Copy `src` to `dest` (replaced), hashing the bytes written, and flush it to the device."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sha, md5 = hashlib.sha256(), hashlib.md5()
    # Replace = remove, then create: some FAT drivers (fusefat) do not shrink a file on O_TRUNC.
    if dest.exists():
        _remove(dest)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _o_binary(), 0o644)
    try:
        if sys.platform == "darwin":
            _set_nocache(fd)
        with open(src, "rb") as s:
            while block := s.read(_BLOCK):
                sha.update(block)
                md5.update(block)
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view) :]
                if advance:
                    advance(len(block))
        _full_sync(fd)
        fadvise = getattr(os, "posix_fadvise", None)
        if fadvise is not None:
            with contextlib.suppress(OSError):
                fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return _Copied(sha.hexdigest(), md5.hexdigest())


def _remove(path: Path) -> None:
    try:
        try:
            path.unlink(missing_ok=True)
        except PermissionError:
            # FAT's read-only attribute (set by some tools) blocks deletion on Windows
            os.chmod(path, stat.S_IWRITE | stat.S_IREAD)
            path.unlink(missing_ok=True)
    except OSError as e:
        raise CardError(
            f"cannot remove {path.name}: {e.strerror or e}",
            where=str(path.parent),
            hint="is the card write-protected (the lock switch on an SD adapter) or read-only?",
        ) from e


def _sync_dir(path: Path) -> None:
    if sys.platform == "win32":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
