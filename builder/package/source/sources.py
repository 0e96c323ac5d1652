"""The package sources: a file set read from a folder, a zip or a FAT volume, streaming."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO

from builder.errors import PackageError
from builder.fs.fat import FatEntry, FatImage
from builder.package.source.base import (
    _COPY_BLOCK,
    _DECOMPRESS_ERRORS,
    _damaged,
    _GuardedReader,
    _preview,
    _walk_files,
    is_os_junk,
)
from builder.package.source.scratch import _copy_stream, _reflink, _write_atomically

log = logging.getLogger("airbox-build")


class PackageSource:
    """The vendor file set, whatever it came in. Names are '/'-paths relative to the file set."""

    form: str
    origin: Path
    location: str  # where in the input the file set was found, for messages and reports

    def __init__(self, form: str, origin: Path, location: str, sizes: dict[str, int], cache: Path) -> None:
        self.form = form
        self.origin = origin
        self.location = location
        self.ignored: tuple[str, ...] = tuple(sorted(n for n in sizes if is_os_junk(n)))
        self._sizes = dict(sorted((n, s) for n, s in sizes.items() if not is_os_junk(n)))
        self._cache = cache
        if self.ignored:
            log.warning("ignoring desktop metadata in %s: %s", self.describe(), ", ".join(self.ignored[:8]))
        self.subfolders: tuple[str, ...] = tuple(
            sorted({str(p) for n in self._sizes for p in PurePosixPath(n).parents if str(p) != "."})
        )
        if self.subfolders:
            log.info("the file set in %s has subfolders: %s", self.describe(), ", ".join(self.subfolders))

    def names(self) -> list[str]:
        """Every file of the set, sorted. The vendor set is flat; files in subfolders (listed in
        `subfolders`) appear as 'sub/name'."""
        return list(self._sizes)

    def __contains__(self, name: object) -> bool:
        return name in self._sizes

    def size(self, name: str) -> int:
        return self._sizes[self._check(name)]

    def open(self, name: str) -> BinaryIO:
        """A streaming reader of one file (a context manager); never the whole file in memory."""
        raise NotImplementedError

    def local_path(self, name: str) -> Path:
        """A real file holding the member: the file itself for a folder or an extracted tarball,
        else a copy extracted on first use into the work dir and reused after. Do not modify it."""
        self._check(name)
        dest = self._cache / "members" / name
        if dest.is_file() and dest.stat().st_size == self._sizes[name]:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.copy_to(name, dest)
        return dest

    def copy_to(self, name: str, dest: Path, *, link: bool = True) -> None:
        """Write the member to `dest` (replaced if it exists), streaming. `link` matters only for a
        folder or an extracted tarball (see DirSource.copy_to)."""
        self._check(name)
        with self.open(name) as src:
            _write_atomically(dest, lambda _, f: _copy_stream(src, f), self._sizes[name], self._where(name))

    def describe(self) -> str:
        return f"{self.form} {self.origin}" + (f", {self.location}" if self.location else "")

    def member_identity(self, name: str) -> list[object]:
        """What names these very bytes of a member, without reading them: the input file's
        path, size, mtime and inode (an archive or card image is read, never changed, by us),
        and the member's place in it. Like make or rsync, a file rewritten with its old size and
        mtime goes unnoticed; `verify` reads every byte."""
        st = os.stat(self.origin)
        return [
            self.form,
            str(self.origin.resolve()),
            st.st_size,
            st.st_mtime_ns,
            st.st_ino,
            st.st_dev,
            self.location,
            name,
            self._sizes[self._check(name)],
        ]

    def close(self) -> None:
        """Release open handles; scratch files in the work dir are kept for reuse."""

    def __enter__(self) -> PackageSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check(self, name: str) -> str:
        if name not in self._sizes:
            raise PackageError(
                f"the vendor file set has no file {name!r}",
                where=self.describe(),
                hint=f"it holds {len(self._sizes)} files: {_preview(self._sizes)}",
            )
        return name

    def _where(self, name: str) -> str:
        return f"{self.describe()}: {name}"


class DirSource(PackageSource):
    """A file set that is a real folder: the vendor's folder, or our extraction of a tarball."""

    def __init__(self, form: str, origin: Path, location: str, set_dir: Path, cache: Path) -> None:
        self.set_dir = set_dir
        super().__init__(form, origin, location, _dir_sizes(set_dir, str(origin)), cache)

    def open(self, name: str) -> BinaryIO:
        return open(self.set_dir / self._check(name), "rb")

    def local_path(self, name: str) -> Path:
        return self.set_dir / self._check(name)

    def member_identity(self, name: str) -> list[object]:
        if self.form != "dir":  # our own extraction of a tarball: fresh each build, the tarball is not
            return super().member_identity(name)
        path = self.set_dir / self._check(name)
        st = os.stat(path)
        return ["dir", str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]

    def copy_to(self, name: str, dest: Path, *, link: bool = True) -> None:
        """Reflink when the filesystem can, else hardlink (`link=True`), else copy.

        A hardlinked `dest` shares its inode with the input: replace it, never edit it in place.
        """
        src = self.set_dir / self._check(name)
        dest = Path(dest)
        if dest.resolve() == src.resolve():
            return
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        if _reflink(src, dest):
            return
        if link:
            try:
                os.link(src, dest)
                return
            except OSError:
                pass
        shutil.copyfile(src, dest)


class ZipSource(PackageSource):
    """A file set inside a zip: random access by member."""

    def __init__(
        self,
        origin: Path,
        zf: zipfile.ZipFile,
        members: dict[str, zipfile.ZipInfo],
        location: str,
        cache: Path,
    ) -> None:
        self._zip = zf
        self._members = members
        super().__init__("zip", origin, location, {n: i.file_size for n, i in members.items()}, cache)

    def open(self, name: str) -> BinaryIO:
        info = self._members[self._check(name)]
        if info.flag_bits & 0x1:
            raise PackageError(
                "the zip member is encrypted",
                where=self._where(name),
                hint="extract it with the password and open the folder instead",
            )
        try:
            inner = self._zip.open(info)
        except _DECOMPRESS_ERRORS as exc:
            raise _damaged("zip archive", self._where(name), exc) from exc
        return io.BufferedReader(_GuardedReader(inner, "zip archive", self._where(name)), _COPY_BLOCK)

    def close(self) -> None:
        self._zip.close()


class FatSource(PackageSource):
    """A file set on a FAT partition of a card image, read with mtools in place."""

    def __init__(
        self,
        form: str,
        origin: Path,
        location: str,
        fat: FatImage,
        set_dir: str,
        entries: list[FatEntry],
        cache: Path,
    ) -> None:
        self.fat = fat
        self.set_dir = set_dir
        prefix = f"{set_dir}/" if set_dir else ""
        sizes = {e.path[len(prefix) :]: e.size for e in entries if not e.is_dir and e.path.startswith(prefix)}
        super().__init__(form, origin, location, sizes, cache)

    def open(self, name: str) -> BinaryIO:
        return self.fat.open_stream(self._fat_path(name))

    def copy_to(self, name: str, dest: Path, *, link: bool = True) -> None:
        fat_path = self._fat_path(name)
        _write_atomically(
            dest, lambda tmp, _: self.fat.read_to(fat_path, tmp), self._sizes[name], self._where(name)
        )

    def _fat_path(self, name: str) -> str:
        self._check(name)
        return f"{self.set_dir}/{name}" if self.set_dir else name


def _dir_sizes(set_dir: Path, where: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for rel in _walk_files(set_dir):
        p = set_dir / rel
        try:
            st = p.stat()
        except OSError as exc:
            raise PackageError(
                f"cannot read {rel}: {exc.strerror}",
                where=where,
                hint="a broken symbolic link? fix or remove it",
            ) from exc
        if not p.is_file():
            raise PackageError(
                f"{rel} is not a regular file", where=where, hint="the vendor file set holds plain files only"
            )
        sizes[rel] = st.st_size
    return sizes
