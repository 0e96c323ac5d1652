"""Sparse copies of images: holes stay holes."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

# ----------------------------------------------------------------------------- sparse copies


def copy_sparse(src: Path, dst: Path, *, chunk: int = 1 << 20) -> None:
    """Copy a (possibly sparse) image file keeping its holes; zero chunks become holes too."""
    size = os.path.getsize(src)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.truncate(size)
        for start, end in _data_ranges(fin.fileno(), size):
            fin.seek(start)
            pos = start
            while pos < end:
                buf = fin.read(min(chunk, end - pos))
                if not buf:
                    break
                if buf.count(0) != len(buf):
                    fout.seek(pos)
                    fout.write(buf)
                pos += len(buf)


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    seek_data = getattr(os, "SEEK_DATA", None)
    seek_hole = getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, seek_data)
        except OSError as e:
            if e.errno != errno.ENXIO:  # the file system cannot tell: read the rest
                yield pos, size
            return  # ENXIO: only a hole is left
        end = os.lseek(fd, start, seek_hole)
        yield start, min(end, size)
        pos = end
