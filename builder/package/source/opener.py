"""`open_package`: the vendor package in any form, archives (tar, zip, release archives) opened
here because they may hold another form inside."""

from __future__ import annotations

import contextlib
import logging
import shutil
import struct
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from builder.errors import PackageError
from builder.fs.fat import READ_TOOLS as FAT_READ_TOOLS
from builder.package import release
from builder.package.source.base import (
    _DECOMPRESS_ERRORS,
    _HEAD_BYTES,
    _MIN_IMAGE_MEMBER,
    _SET_HINT,
    MARKERS,
    _damaged,
    _is_data_error,
    _walk_files,
    is_os_junk,
)
from builder.package.source.cardimage import _open_image
from builder.package.source.fileset import _open_dir, find_file_set
from builder.package.source.scratch import _cache_dir, _copy_stream, _decompressed_image, _link_or_copy
from builder.package.source.sniff import (
    _looks_like_card,
    _looks_like_disk,
    _looks_like_tar,
    _open_decompressed,
    _sniff,
)
from builder.package.source.sources import DirSource, PackageSource, ZipSource
from builder.run import require_tools

log = logging.getLogger("airbox-build")


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
            raise PackageError(
                f"base.member {member!r} is not in the tarball",
                where=str(path),
                hint=f"its file set is in {source.location or 'the top folder'}",
            )
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
        raise PackageError(
            f"unsafe member path {name!r} in the archive",
            where=where,
            hint="this is not a vendor package; refusing to extract it",
        )
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
            raise PackageError(
                f"the zip holds {name!r} twice", where=str(path), hint="repack it with each file once"
            )
        members[name] = info
    folder = member.strip("/") if member is not None else None
    if folder is not None and any(n.startswith(f"{folder}/") for n in members):
        members = {n[len(folder) + 1 :]: i for n, i in members.items() if n.startswith(f"{folder}/")}
        folder = None  # the member is a folder of the zip: its file set, as for a zip of its own
    if folder is None and any(PurePosixPath(n).name in MARKERS for n in members):
        set_rel = find_file_set(members, str(path))
        prefix = f"{set_rel}/" if set_rel else ""
        in_set = {n[len(prefix) :]: i for n, i in members.items() if n.startswith(prefix)}
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
    return int(info.header_offset + 30 + name_len + extra_len)
