"""Open the vendor package in any form and give uniform, streaming access to its file set.

Forms (detected from the bytes, not the file name):
  dir      a folder holding the file set, or holding (at most two levels down) one folder that does
  tar      .tar / .tgz / .tar.gz / .tar.xz / .tar.bz2, any top folder (`sdcard/`, none, ...)
  zip      .zip, any top folder
  img      a whole-card image: MBR or GPT label (or a bare FAT volume), the file set on a FAT
           partition, read in place with mtools: no mount, no loop device, nothing unpacked
  img.zip  an .img inside a zip: a stored (uncompressed) member is read in place inside the zip,
           a deflated one is decompressed once to a sparse file in the work dir
  img.xz, img.gz  a compressed .img, decompressed once to a sparse file in the work dir

The file set is the one folder that holds both `boot.scr` and `boot_emmc.scr` (case-sensitive).
None, or several, is a PackageError naming what was found.

Cost model: a folder and a zip are random access. A tarball is not: opening it extracts the
whole archive in one streaming pass into the work dir, and members are served from there.
Everything written to the work dir lives under `source-<key>/`, where the key hashes the input's
path, size and mtime; a completed extraction or decompression is found and reused by a later
open of the same input (it is renamed into place only once complete).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import logging
import lzma
import os
import shutil
import struct
import sys
import tarfile
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO

from builder.errors import PackageError, ToolError
from builder.fs.fat import READ_TOOLS as FAT_READ_TOOLS
from builder.fs.fat import FatEntry, FatImage, parse_boot_sector, probe_filesystem
from builder.package import release
from builder.run import require_tools

log = logging.getLogger("airbox-build")

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
        EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile, tarfile.TarError, zipfile.BadZipFile,
    ]
    with contextlib.suppress(ImportError):
        from isal.igzip_lib import IsalError

        errors.append(IsalError)
    return tuple(errors)


_DECOMPRESS_ERRORS = _decompress_errors()


def _is_data_error(exc: BaseException) -> bool:
    """True for a damaged/truncated archive; False for a real I/O error (disk full) to re-raise."""
    if isinstance(exc, _DECOMPRESS_ERRORS):
        return True
    # bz2 and gzip report bad data as a bare OSError; an OS-level failure carries an errno.
    return isinstance(exc, OSError) and exc.errno is None


# --------------------------------------------------------------------------------------------
# The public API


def open_package(path: Path, workdir: Path, member: str | None = None) -> PackageSource:
    """Open the vendor package at `path` in whatever form it comes; `workdir` holds scratch files.

    An archive that holds no file set of its own is an SDK release: the package inside it is
    found by content (builder.package.release); `member` (the recipe's `base.member`) names one
    when there are several, or the folder of the file set inside a folder or archive.
    """
    path = Path(path)
    if not path.exists():
        raise PackageError("the vendor package does not exist", where=str(path), hint=_SET_HINT)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        if member is not None:
            inner = path / member.strip("/")
            if not inner.exists():
                raise PackageError(
                    f"base.member {member!r} is not in the folder",
                    where=str(path),
                    hint="give a path inside it",
                )
            return open_package(inner, workdir)
        return _open_dir(path, workdir)
    kind = _sniff(path)
    if kind.startswith("img"):
        require_tools(*FAT_READ_TOOLS)  # before a long decompression, not after
    if kind == "tar" or kind.startswith("tar."):
        return _open_tar_release(path, None if kind == "tar" else kind[4:], workdir, member)
    if kind == "zip":
        return _open_zip(path, workdir, member)
    if kind == "img":
        return _open_image(path, 0, path.stat().st_size, "img", path, _cache_dir(workdir, path))
    comp = kind[4:]  # img.gz, img.xz, img.bz2
    cache = _cache_dir(workdir, path)
    disk = _decompressed_image(cache, lambda: _open_decompressed(path, comp), str(path))
    return _open_image(disk, 0, disk.stat().st_size, kind, path, cache)


def detect_form(path: Path) -> str:
    """The form of `path` from its bytes: "dir", "tar", "zip", "img", "img.xz", "img.gz", ...

    A zip is reported as "zip" here; opening it decides between "zip" and "img.zip".
    """
    path = Path(path)
    if path.is_dir():
        return "dir"
    kind = _sniff(path)
    return "tar" if kind.startswith("tar.") else kind


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
        return [self.form, str(self.origin.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev,
                self.location, name, self._sizes[self._check(name)]]

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

    def __init__(self, origin: Path, zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo],
                 location: str, cache: Path) -> None:
        self._zip = zf
        self._members = members
        super().__init__("zip", origin, location, {n: i.file_size for n, i in members.items()}, cache)

    def open(self, name: str) -> BinaryIO:
        info = self._members[self._check(name)]
        if info.flag_bits & 0x1:
            raise PackageError("the zip member is encrypted", where=self._where(name),
                               hint="extract it with the password and open the folder instead")
        try:
            inner = self._zip.open(info)
        except _DECOMPRESS_ERRORS as exc:
            raise _damaged("zip archive", self._where(name), exc) from exc
        return io.BufferedReader(_GuardedReader(inner, "zip archive", self._where(name)), _COPY_BLOCK)

    def close(self) -> None:
        self._zip.close()


class FatSource(PackageSource):
    """A file set on a FAT partition of a card image, read with mtools in place."""

    def __init__(self, form: str, origin: Path, location: str, fat: FatImage, set_dir: str,
                 entries: list[FatEntry], cache: Path) -> None:
        self.fat = fat
        self.set_dir = set_dir
        prefix = f"{set_dir}/" if set_dir else ""
        sizes = {e.path[len(prefix):]: e.size for e in entries if not e.is_dir and e.path.startswith(prefix)}
        super().__init__(form, origin, location, sizes, cache)

    def open(self, name: str) -> BinaryIO:
        return self.fat.open_stream(self._fat_path(name))

    def copy_to(self, name: str, dest: Path, *, link: bool = True) -> None:
        fat_path = self._fat_path(name)
        _write_atomically(dest, lambda tmp, _: self.fat.read_to(fat_path, tmp),
                          self._sizes[name], self._where(name))

    def _fat_path(self, name: str) -> str:
        self._check(name)
        return f"{self.set_dir}/{name}" if self.set_dir else name


def is_os_junk(name: str) -> bool:
    """macOS/Windows metadata (AppleDouble `._x`, `.DS_Store`, `__MACOSX/`, ...), ignored everywhere."""
    parts = name.split("/")
    return (
        any(p in _OS_JUNK_DIRS for p in parts[:-1])
        or parts[-1] in _OS_JUNK_FILES
        or parts[-1].startswith("._")
    )


# --------------------------------------------------------------------------------------------
# Form detection


def _sniff(path: Path) -> str:
    """Classify a file from its first bytes (and a peek into a compressed stream)."""
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if not head:
        raise PackageError("the vendor package is an empty file", where=str(path), hint=_FORMS_HINT)
    if head.startswith(_ZIP_MAGICS):
        return "zip"
    for comp, magic in _COMPRESSIONS.items():
        if head.startswith(magic):
            return _sniff_compressed(path, comp)
    if _looks_like_tar(head):
        return "tar"
    if _looks_like_disk(head):
        return "img"
    raise PackageError(
        f"not a vendor package form this tool reads ({_describe_unknown(head)})",
        where=str(path),
        hint=_FORMS_HINT,
    )


def _sniff_compressed(path: Path, comp: str) -> str:
    try:
        with _open_decompressed(path, comp) as f:
            head = f.read(_HEAD_BYTES)
    except Exception as exc:
        if _is_data_error(exc):
            raise _damaged(f"{comp} stream", str(path), exc) from exc
        raise
    if _looks_like_tar(head):
        return f"tar.{comp}"
    if _looks_like_disk(head):
        return f"img.{comp}"
    raise PackageError(
        f"a {comp}-compressed file holding neither a tar archive nor a card image "
        f"({_describe_unknown(head)})",
        where=str(path),
        hint=_FORMS_HINT,
    )


def _describe_unknown(head: bytes) -> str:
    if head.startswith(_ZSTD_MAGIC):
        return "zstd-compressed: decompress it first with `zstd -d`"
    if head.startswith(_7Z_MAGIC):
        return "a 7-Zip archive: extract it first"
    fs = probe_filesystem(head[:2048])
    if fs != "unknown" and not fs.startswith("empty"):
        return f"a bare {fs} filesystem image"
    return f"unrecognised content, first bytes {head[:8].hex(' ')}"


def _looks_like_tar(head: bytes) -> bool:
    if len(head) < 512:
        return False
    if head[257:262] == b"ustar":
        return True
    # A v7 tar has no magic: check the header checksum (octal, over the header with its field blank).
    try:
        stored = int(head[148:156].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(head[:148]) + 8 * 32 + sum(head[156:512]) and head[0] != 0


def _looks_like_card(head: bytes) -> bool:
    """A whole-card image with a partition table (a member of a release; a bare FAT volume there
    is a partition image of something else)."""
    if any(head[ss : ss + 8] == b"EFI PART" for ss in (512, 4096)):
        return True
    mbr = head[:512]
    return head[510:512] == b"\x55\xaa" and parse_boot_sector(mbr) is None and bool(_mbr_entries(mbr))


def _looks_like_disk(head: bytes) -> bool:
    if any(head[ss : ss + 8] == b"EFI PART" for ss in (512, 4096)):
        return True
    if parse_boot_sector(head[:512]) is not None:
        return True
    return head[510:512] == b"\x55\xaa" and bool(_mbr_entries(head[:512]))


def _open_decompressed(path: Path, comp: str | None) -> BinaryIO:
    if comp is None:
        return open(path, "rb")
    if comp == "gz":
        try:
            from isal import igzip  # several times faster than zlib

            return igzip.open(path, "rb")  # type: ignore[return-value]
        except ImportError:
            return gzip.open(path, "rb")  # type: ignore[return-value]
    if comp == "xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    if comp == "bz2":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    raise AssertionError(comp)


# --------------------------------------------------------------------------------------------
# Finding the file set among paths


def find_file_set(paths: Iterable[str], where: str) -> str:
    """The folder ('' for the top) holding both marker files, among '/'-separated file paths."""
    by_name: dict[str, set[str]] = {m: set() for m in MARKERS}
    near: set[str] = set()
    all_paths: list[str] = []
    for p in paths:
        if is_os_junk(p):
            continue
        all_paths.append(p)
        pp = PurePosixPath(p)
        parent = "" if str(pp.parent) == "." else str(pp.parent)
        if pp.name in by_name:
            by_name[pp.name].add(parent)
        elif pp.name.lower() in MARKERS:
            near.add(p)
    candidates = sorted(set.intersection(*by_name.values()))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise PackageError(
            f"{len(candidates)} folders each hold a file set (boot.scr + boot_emmc.scr): "
            + ", ".join(_show_dir(c) for c in candidates),
            where=where,
            hint="keep exactly one vendor file set in the package",
        )
    found = [
        f"{m} in {', '.join(_show_dir(d) for d in sorted(ds)) or 'no folder'}" for m, ds in by_name.items()
    ]
    if near:
        found.append(f"differently-cased {', '.join(sorted(near)[:4])} (names are case-sensitive)")
    top = sorted({p.split("/")[0] + ("/" if "/" in p else "") for p in all_paths})
    raise PackageError(
        "no folder holds both boot.scr and boot_emmc.scr (the vendor file set); found "
        + "; ".join(found)
        + f"; top level: {', '.join(top[:12]) + (' ...' if len(top) > 12 else '') if top else 'nothing'}",
        where=where,
        hint=_SET_HINT,
    )


def _show_dir(d: str) -> str:
    return f"{d}/" if d else "the top folder"


# --------------------------------------------------------------------------------------------
# Folder


def _open_dir(path: Path, workdir: Path) -> PackageSource:
    set_rel = find_file_set(_walk_files(path, max_depth=_DIR_SEARCH_DEPTH), str(path))
    location = f"folder {set_rel}/" if set_rel else ""
    return DirSource("dir", path, location, path / set_rel, _cache_dir(workdir, path))


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


def _dir_sizes(set_dir: Path, where: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for rel in _walk_files(set_dir):
        p = set_dir / rel
        try:
            st = p.stat()
        except OSError as exc:
            raise PackageError(f"cannot read {rel}: {exc.strerror}", where=where,
                               hint="a broken symbolic link? fix or remove it") from exc
        if not p.is_file():
            raise PackageError(f"{rel} is not a regular file", where=where,
                               hint="the vendor file set holds plain files only")
        sizes[rel] = st.st_size
    return sizes


# --------------------------------------------------------------------------------------------
# Tarball: one streaming pass extracts everything into the work dir


def _open_tar_release(path: Path, comp: str | None, workdir: Path, member: str | None) -> PackageSource:
    """A tarball: the package itself (extracted whole, as before), or a release holding it."""
    cache = _cache_dir(workdir, path)
    if member is None and (cache / "tree").is_dir():
        return _open_tar(path, comp, workdir)  # extracted by an earlier build
    index = release.load_index(cache)
    if index is None:
        log.info("reading the listing of %s (one streaming pass)", path)
        try:
            with _open_decompressed(path, comp) as raw:
                nested, names = release.scan_tar(
                    raw, _looks_like_tar, _looks_like_card, cache, lambda n: _safe_member_name(n, str(path))
                )
        except Exception as exc:
            if _is_data_error(exc):
                raise _damaged("tarball", str(path), exc) from exc
            raise
        direct = release.names_hold_file_set([n for n in names if not is_os_junk(n)])
        if not direct and not nested:
            find_file_set(names, str(path))  # raises, naming what the tarball holds
        release.save_index(cache, nested, direct)
        index = (nested, direct)
    nested, direct = index
    folder = member.strip("/") if member is not None else None
    if direct and (folder is None or not any(c.name.strip("/") == folder for c in nested)):
        source = _open_tar(path, comp, workdir)
        if folder is None:
            return source
        top = cache / "tree" / folder
        if not top.is_dir():
            raise PackageError(f"base.member {member!r} is not in the tarball", where=str(path),
                               hint=f"its file set is in {source.location or 'the top folder'}")
        set_rel = find_file_set(_walk_files(top), f"{path}: {folder}")
        where = "/".join(p for p in (folder, set_rel) if p)
        return DirSource("tar", path, f"folder {where}/", top / set_rel, cache)
    chosen = release.choose(nested, folder, str(path))
    log.info("the vendor package is %s inside %s", chosen.name, path)
    return open_package(release.member_path(cache, chosen.name), workdir)


def _open_tar(path: Path, comp: str | None, workdir: Path) -> PackageSource:
    cache = _cache_dir(workdir, path)
    tree = cache / "tree"
    if tree.is_dir():
        log.info("reusing the extraction of %s in %s", path, tree)
        set_rel = find_file_set(_walk_files(tree), str(path))
    else:
        log.info("extracting %s into %s (a tarball is read in one pass)", path, tree)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="tree.partial-", dir=cache))
        try:
            set_rel = _extract_tar(path, comp, tmp)
            tmp.rename(tree)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    location = f"folder {set_rel}/" if set_rel else ""
    return DirSource("tar", path, location, tree / set_rel, cache)


def _extract_tar(path: Path, comp: str | None, dest: Path) -> str:
    files: dict[str, None] = {}  # in archive order
    skipped: dict[str, str] = {}
    try:
        with _open_decompressed(path, comp) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                name = _safe_member_name(member.name, str(path))
                if name is None:
                    continue
                target = dest / name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isreg():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None
                    with open(target, "wb") as out:
                        _copy_stream(src, out)
                    if target.stat().st_size != member.size:
                        raise PackageError(f"{name}: short read from the tarball", where=str(path))
                    files[name] = None
                elif member.islnk() and (linked := _safe_member_name(member.linkname, str(path))) in files:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(dest / str(linked), target)
                    files[name] = None
                else:
                    skipped[name] = _tar_kind(member)
    except PackageError:
        raise
    except Exception as exc:
        if _is_data_error(exc):
            raise _damaged("tarball", str(path), exc) from exc
        raise
    set_rel = find_file_set(files, str(path))
    inside = sorted(n for n in skipped if set_rel == "" or n.startswith(f"{set_rel}/"))
    if inside:
        raise PackageError(
            "the file set holds entries that are not plain files: "
            + ", ".join(f"{n} ({skipped[n]})" for n in inside[:5]),
            where=str(path),
            hint="repack the tarball with plain files only (GNU tar: --dereference)",
        )
    return set_rel


def _safe_member_name(name: str, where: str) -> str | None:
    """A tar/zip member path made relative; None for the archive's top entry ('.' or './')."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        return None
    if name.startswith("/") or ".." in parts:
        raise PackageError(f"unsafe member path {name!r} in the archive", where=where,
                           hint="this is not a vendor package; refusing to extract it")
    return "/".join(parts)


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symbolic link to {member.linkname}"
    if member.islnk():
        return f"hard link to {member.linkname}"
    return "device, fifo or other special file"


# --------------------------------------------------------------------------------------------
# Zip: a file set, or a card image inside


def _open_zip(path: Path, workdir: Path, member: str | None = None) -> PackageSource:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise _damaged("zip archive", str(path), exc) from exc
    try:
        return _zip_source(path, zf, workdir, member)
    except BaseException:
        zf.close()
        raise


def _zip_source(path: Path, zf: zipfile.ZipFile, workdir: Path, member: str | None = None) -> PackageSource:
    members: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = _safe_member_name(info.filename, str(path))
        if name is None or info.is_dir():
            continue
        if name in members:
            raise PackageError(f"the zip holds {name!r} twice", where=str(path),
                               hint="repack it with each file once")
        members[name] = info
    folder = member.strip("/") if member is not None else None
    if folder is not None and any(n.startswith(f"{folder}/") for n in members):
        members = {n[len(folder) + 1 :]: i for n, i in members.items() if n.startswith(f"{folder}/")}
        folder = None  # the member is a folder of the zip: its file set, as for a zip of its own
    if folder is None and any(PurePosixPath(n).name in MARKERS for n in members):
        set_rel = find_file_set(members, str(path))
        prefix = f"{set_rel}/" if set_rel else ""
        in_set = {n[len(prefix):]: i for n, i in members.items() if n.startswith(prefix)}
        location = f"folder {set_rel}/" if set_rel else ""
        if member is not None:
            location = f"folder {'/'.join(p for p in (member.strip('/'), set_rel) if p)}/"
        return ZipSource(path, zf, in_set, location, _cache_dir(workdir, path))
    nested = release.scan_zip(path, _looks_like_tar, _looks_like_card)
    if any(c.kind != "img" for c in nested) or folder is not None:
        chosen = release.choose(nested, folder, str(path))
        if chosen.kind != "img":
            zf.close()
            cache = _cache_dir(workdir, path)
            inner = release.copy_zip_member(path, chosen.name, release.member_path(cache, chosen.name))
            log.info("the vendor package is %s inside %s", chosen.name, path)
            return open_package(inner, workdir)
        members = {chosen.name: zf.getinfo(chosen.name)}
    images = [i for n, i in members.items() if _zip_member_is_disk(zf, i, path)]
    if len(images) > 1:
        raise PackageError(
            f"the zip holds no file set but {len(images)} card images: "
            + ", ".join(i.filename for i in images),
            where=str(path),
            hint="keep one card image per zip",
        )
    if not images:
        find_file_set(members, str(path))  # raises, naming what the zip holds
    info = images[0]
    zf.close()
    require_tools(*FAT_READ_TOOLS)
    cache = _cache_dir(workdir, path)
    where = f"{path}: {info.filename}"
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
        return _open_image(path, _zip_data_offset(path, info), info.file_size, "img.zip", path, cache)

    @contextlib.contextmanager
    def open_member() -> Iterator[BinaryIO]:
        with zipfile.ZipFile(path) as z, z.open(info) as member:
            yield member  # type: ignore[misc]

    disk = _decompressed_image(cache, open_member, where)
    return _open_image(disk, 0, disk.stat().st_size, "img.zip", path, cache)


def _zip_member_is_disk(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bool:
    if info.file_size < _MIN_IMAGE_MEMBER or info.flag_bits & 0x1:
        return False
    try:
        with zf.open(info) as f:
            return _looks_like_disk(f.read(_HEAD_BYTES))
    except _DECOMPRESS_ERRORS as exc:
        raise _damaged("zip archive", f"{path}: {info.filename}", exc) from exc


def _zip_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, name and extra field."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise PackageError(f"damaged local header of {info.filename}", where=str(path))
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    return info.header_offset + 30 + name_len + extra_len


# --------------------------------------------------------------------------------------------
# Card images: partition tables


@dataclass(frozen=True)
class Partition:
    """A partition of a card image; `number` as Linux numbers it (MBR logical ones from 5)."""

    number: int
    start: int  # bytes from the start of the image
    size: int  # bytes
    scheme: str  # "mbr", "gpt" or "none" (a bare FAT volume, no partition table)
    kind: str  # MBR type byte or GPT type GUID (+ name), for messages


def read_partitions(image: Path, base: int = 0, length: int | None = None) -> list[Partition]:
    """Parse the MBR or GPT of the image that starts at byte `base` of `image` (struct, no tools)."""
    if length is None:
        length = image.stat().st_size - base
    with open(image, "rb") as f:

        def read_at(offset: int, n: int) -> bytes:
            f.seek(base + offset)
            return f.read(max(0, min(n, length - offset)))

        head = read_at(0, _HEAD_BYTES)
        for ss in (512, 4096):
            if head[ss : ss + 8] == b"EFI PART":
                return _gpt_partitions(read_at, ss, str(image))
        if _is_bare_fat(head, length):
            return [Partition(0, 0, length, "none", "bare FAT volume")]
        if head[510:512] != b"\x55\xaa":
            raise PackageError("no partition table (no MBR signature 0x55AA, no GPT header)",
                               where=str(image), hint=_FORMS_HINT)
        return _mbr_partitions(read_at, head[:512], str(image))


def _is_bare_fat(head: bytes, length: int) -> bool:
    """A FAT boot sector at sector 0 and no plausible partition entries (its boot code sits there)."""
    if parse_boot_sector(head[:512]) is None:
        return False
    entries = _mbr_entries(head[:512])
    return not entries or any(lba == 0 or (lba + n) * 512 > length for _, lba, n in entries)


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first LBA, sector count) of the used primary entries; [] when the table is not sane."""
    entries = []
    for i in range(4):
        status, ptype, lba, count = struct.unpack_from("<B3xB3xII", sector, 446 + 16 * i)
        if status not in (0x00, 0x80):
            return []
        if ptype and count:
            entries.append((ptype, lba, count))
    return entries


def _mbr_partitions(read_at: Callable[[int, int], bytes], sector0: bytes, where: str) -> list[Partition]:
    entries = _mbr_entries(sector0)
    if not entries:
        raise PackageError("the MBR partition table is empty or damaged", where=where, hint=_FORMS_HINT)
    if any(t == 0xEE for t, _, _ in entries):
        raise PackageError("protective MBR of a GPT disk, but no valid GPT header at LBA 1",
                           where=where, hint="the image is damaged; download it again")
    parts: list[Partition] = []
    for i, (ptype, lba, count) in enumerate(entries, start=1):
        if ptype in (0x05, 0x0F, 0x85):
            parts.extend(_logical_partitions(read_at, lba, where))
        else:
            parts.append(Partition(i, lba * 512, count * 512, "mbr", f"type 0x{ptype:02x}"))
    return parts


def _logical_partitions(read_at: Callable[[int, int], bytes], ext_lba: int, where: str) -> list[Partition]:
    parts: list[Partition] = []
    ebr_lba = ext_lba
    for number in range(5, 5 + 128):  # a chain longer than this is a loop
        ebr = read_at(ebr_lba * 512, 512)
        if len(ebr) < 512 or ebr[510:512] != b"\x55\xaa":
            raise PackageError(f"damaged extended boot record at sector {ebr_lba}", where=where)
        ptype, lba, count = struct.unpack_from("<4xB3xII", ebr, 446)
        if ptype and count:
            parts.append(Partition(number, (ebr_lba + lba) * 512, count * 512, "mbr", f"type 0x{ptype:02x}"))
        ntype, nlba, _ = struct.unpack_from("<4xB3xII", ebr, 462)
        if not ntype:
            return parts
        ebr_lba = ext_lba + nlba
    raise PackageError("the chain of logical partitions does not end", where=where)


def _gpt_partitions(read_at: Callable[[int, int], bytes], ss: int, where: str) -> list[Partition]:
    header = read_at(ss, 92)
    hsize, hcrc = struct.unpack_from("<II", header, 12)
    if not 92 <= hsize <= ss:
        raise PackageError(f"GPT header size {hsize} is invalid", where=where)
    header = read_at(ss, hsize)
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:]) != hcrc:
        raise PackageError("the GPT header checksum does not match (damaged image)", where=where,
                           hint="download the image again")
    entries_lba, n_entries, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if entry_size < 128 or n_entries > 4096:
        raise PackageError(f"GPT with {n_entries} entries of {entry_size} bytes is invalid", where=where)
    table = read_at(entries_lba * ss, n_entries * entry_size)
    if len(table) < n_entries * entry_size:
        raise PackageError("the image ends inside the GPT partition entries (truncated)", where=where)
    if zlib.crc32(table) != entries_crc:
        raise PackageError("the GPT partition entries checksum does not match (damaged image)",
                           where=where, hint="download the image again")
    parts = []
    for i in range(n_entries):
        e = table[i * entry_size : (i + 1) * entry_size]
        if not any(e[:16]):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        name = e[56:128].decode("utf-16-le", "replace").split("\0")[0]
        kind = f"type {uuid.UUID(bytes_le=e[:16])}" + (f" {name!r}" if name else "")
        parts.append(Partition(i + 1, first * ss, (last - first + 1) * ss, "gpt", kind))
    return parts


# --------------------------------------------------------------------------------------------
# Card images: find the file set on the FAT partitions


def _open_image(image: Path, base: int, length: int, form: str, origin: Path, cache: Path) -> PackageSource:
    where = str(origin)
    parts = read_partitions(image, base, length)
    seen: list[str] = []
    found: list[tuple[Partition, FatImage, str, list[FatEntry]]] = []
    no_set: list[str] = []
    for part in parts:
        desc = _describe_partition(part)
        if part.start >= length:
            seen.append(f"{desc}: beyond the end of the image (truncated)")
            continue
        with open(image, "rb") as f:
            f.seek(base + part.start)
            head = f.read(2048)
        fs = probe_filesystem(head)
        seen.append(f"{desc}: {fs}")
        if not fs.startswith("FAT"):
            continue
        boot = parse_boot_sector(head)
        assert boot is not None
        if part.start + boot.size_bytes > length:
            raise PackageError(
                f"{desc}: the {fs} volume needs {boot.size_bytes} bytes but the image ends "
                f"{length - part.start} bytes into it (truncated download?)",
                where=where,
                hint="download the image again and check its published MD5",
            )
        fat = FatImage(image, base + part.start)
        entries = _walk_fat(fat, f"{where} ({desc})")
        files = [e.path for e in entries if not e.is_dir]
        try:
            set_rel = find_file_set(files, f"{where} ({desc})")
        except PackageError as exc:
            if "no folder holds" not in exc.message:
                raise
            no_set.append(f"{desc} holds {_preview_paths(files)}")
            continue
        found.append((part, fat, set_rel, entries))
    fat_seen = [s for s in seen if ": FAT" in s]
    if not fat_seen:
        raise PackageError(
            "no FAT partition in the card image; found " + "; ".join(seen or ["no partitions"]),
            where=where,
            hint="the vendor TF-card image carries its file set on a FAT16/FAT32 partition",
        )
    if not found:
        raise PackageError(
            "no FAT partition holds boot.scr and boot_emmc.scr (the vendor file set): "
            + "; ".join(no_set),
            where=where,
            hint=_SET_HINT,
        )
    if len(found) > 1:
        raise PackageError(
            "several FAT partitions hold a file set: "
            + ", ".join(f"{_describe_partition(p)} folder /{d}" for p, _, d, _ in found),
            where=where,
            hint="keep exactly one vendor file set on the card image",
        )
    part, fat, set_rel, entries = found[0]
    location = f"{_describe_partition(part)} ({fat.fs_type()}), folder /{set_rel}"
    return FatSource(form, origin, location, fat, set_rel, entries, cache)


def _walk_fat(fat: FatImage, where: str) -> list[FatEntry]:
    try:
        return fat.walk()
    except ToolError as exc:
        raise PackageError(f"mtools cannot read the FAT volume: {exc.message}", where=where,
                           hint="the image may be damaged or truncated; download it again") from exc


def _describe_partition(part: Partition) -> str:
    if part.scheme == "none":
        return "the whole image (a bare FAT volume)"
    return f"partition {part.number} ({part.scheme.upper()} {part.kind}, at byte {part.start})"


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


def _copy_stream(src: BinaryIO, out: BinaryIO) -> None:
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
            raise PackageError(f"read {got} bytes but the listing says {expected}", where=where,
                               hint="the package may be damaged or truncated")
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


class _GuardedReader(io.RawIOBase):
    """Turns the decompression errors of a member stream into PackageError naming the member."""

    def __init__(self, inner: BinaryIO, what: str, where: str) -> None:
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
