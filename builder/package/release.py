"""SDK release archives: the vendor package nested inside a bigger archive.

Sophgo ships each SDK release as an archive (zip, tgz, tar.xz) that holds, one or more folders
deep and beside unrelated files, the TF-card package as `sdcard.tgz` (or the `sdcard/` folder).
The package is found by content, never by name: a member whose bytes are a tarball (plain, gz,
xz or bz2) or a zip counts when its own listing has a folder with boot.scr and boot_emmc.scr; a
member that is a card image counts as is (it is checked when opened). A zip release is read in
place and only the chosen member is copied out; a tarball release is read in one streaming pass
that copies out only the members that are packages. The rest of the release is never written to
disk. With more than one package, `base.member: path/inside` selects one; the error lists them.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from builder.errors import PackageError

MARKERS = ("boot.scr", "boot_emmc.scr")
HEAD = 8192 + 512
MIN_MEMBER = 4096  # smaller members are not packages
Sniff = Callable[[bytes], bool]


@dataclass(frozen=True)
class Candidate:
    name: str  # the member's path inside the release
    kind: str  # tar, tar.gz, tar.xz, tar.bz2, zip, img


def names_hold_file_set(names: list[str]) -> bool:
    folders: dict[str, set[str]] = {}
    for n in names:
        p = PurePosixPath(n)
        if p.name in MARKERS:
            folders.setdefault(str(p.parent), set()).add(p.name)
    return any(len(v) == len(MARKERS) for v in folders.values())


def kind_of(head: bytes, looks_like_tar: Sniff, looks_like_disk: Sniff) -> str | None:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    for comp, magic in (("gz", b"\x1f\x8b"), ("xz", b"\xfd7zXZ\x00"), ("bz2", b"BZh")):
        if head.startswith(magic):
            return f"tar.{comp}"  # a compressed tarball, if its listing reads
    if looks_like_tar(head):
        return "tar"
    if looks_like_disk(head):
        return "img"
    return None


def head_is_tar(head: bytes, kind: str, looks_like_tar: Sniff) -> bool:
    """Does a (compressed) member start like a tarball? Decompresses only its first bytes, so a
    gzip chunk of a partition image is passed over without reading it to its end."""
    if kind == "tar":
        return True
    try:
        if kind == "tar.gz":
            out = zlib.decompressobj(31).decompress(head, 1024)
        elif kind == "tar.xz":
            out = lzma.LZMADecompressor().decompress(head, 1024)
        elif kind == "tar.bz2":
            out = bz2.BZ2Decompressor().decompress(head)[:1024]
        else:
            return False
    except (zlib.error, lzma.LZMAError, OSError, EOFError):
        return False
    return len(out) >= 512 and looks_like_tar(out[:1024].ljust(1024, b"\0"))


def _decompressing(raw: BinaryIO, kind: str) -> BinaryIO:
    if kind == "tar.gz":
        try:
            from isal import igzip

            return igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
        except ImportError:
            import gzip

            return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "tar.xz":
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    if kind == "tar.bz2":
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    return raw


def tar_holds_file_set(stream: BinaryIO, kind: str) -> bool:
    """Read a (nested) tarball's listing to its end; True when it holds a file set."""
    try:
        with tarfile.open(fileobj=_decompressing(stream, kind), mode="r|") as tar:
            return names_hold_file_set([m.name for m in tar if m.isreg()])
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError):
        return False


class _Tee:
    """Reads `head` then `src`, writing everything it hands out to `sink`."""

    def __init__(self, head: bytes, src: BinaryIO, sink: BinaryIO | None) -> None:
        self._head, self._src, self._sink = head, src, sink

    def read(self, n: int = -1) -> bytes:
        if self._head:
            cut = len(self._head) if n < 0 else min(n, len(self._head))
            data, self._head = self._head[:cut], self._head[cut:]
        else:
            data = self._src.read(n)
        if self._sink is not None:
            self._sink.write(data)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def scan_zip(path: Path, looks_like_tar: Sniff, looks_like_disk: Sniff) -> list[Candidate]:
    out = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir() or info.file_size < MIN_MEMBER or info.flag_bits & 0x1:
                continue
            with zf.open(info) as f:
                head = f.read(HEAD)
            kind = kind_of(head, looks_like_tar, looks_like_disk)
            if kind is None or (kind.startswith("tar") and not head_is_tar(head, kind, looks_like_tar)):
                continue
            with zf.open(info) as f:
                if kind.startswith("tar") and not tar_holds_file_set(f, kind):  # type: ignore[arg-type]
                    continue
                if kind == "zip":
                    with zipfile.ZipFile(f) as inner:
                        if not names_hold_file_set(inner.namelist()):
                            continue
            out.append(Candidate(info.filename, kind))
    return out


def scan_tar(
    raw: BinaryIO,
    looks_like_tar: Sniff,
    looks_like_disk: Sniff,
    cache: Path,
    check_name: Callable[[str], object] = lambda name: name,
) -> tuple[list[Candidate], list[str]]:
    """One streaming pass over a tarball release: (the packages inside it, each copied to
    `member_path(cache, name)`; every regular member's name, to find a file set at top level)."""
    out, names = [], []
    with tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            check_name(member.name)  # an unsafe path (absolute, ..) is refused, listed or not
            if not member.isreg():
                continue
            names.append(member.name)
            if member.size < MIN_MEMBER:
                continue
            f = tar.extractfile(member)
            assert f is not None
            head = f.read(HEAD)
            kind = kind_of(head, looks_like_tar, looks_like_disk)
            if kind is None or (kind.startswith("tar") and not head_is_tar(head, kind, looks_like_tar)):
                continue
            dest = member_path(cache, member.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + ".partial")
            with open(part, "wb") as sink:
                tee = _Tee(head, f, sink)  # type: ignore[arg-type]
                holds = tar_holds_file_set(tee, kind) if kind.startswith("tar") else True  # type: ignore[arg-type]
                tee.drain()
            if not holds or (kind == "zip" and not _zip_holds(part)):
                part.unlink()
                continue
            part.rename(dest)
            out.append(Candidate(member.name, kind))
    return out, names


def _zip_holds(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return names_hold_file_set(zf.namelist())
    except zipfile.BadZipFile:
        return False


def choose(candidates: list[Candidate], member: str | None, where: str) -> Candidate:
    listing = ", ".join(f"{c.name} ({c.kind})" for c in candidates)
    if member is not None:
        wanted = member.strip("/")
        for c in candidates:
            if c.name.strip("/") == wanted:
                return c
        raise PackageError(
            f"base.member {member!r} is not a vendor package in this archive",
            where=where,
            hint=f"packages found: {listing}" if candidates else "the archive holds no vendor package",
        )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise PackageError(
            "no vendor package in this archive: no folder holds boot.scr and boot_emmc.scr, and no "
            "archive or card image inside it does",
            where=where,
            hint="point base at the SDK release archive that holds sdcard.tgz, or at the package itself",
        )
    raise PackageError(
        f"the archive holds {len(candidates)} vendor packages: {listing}",
        where=where,
        hint="choose one in the recipe: base: {..., member: <path inside>}",
    )


def member_path(cache: Path, name: str) -> Path:
    """Where a nested member is kept: a folder per member path, with the member's file name."""
    key = hashlib.sha256(name.encode()).hexdigest()[:16]
    return cache / "nested" / key / PurePosixPath(name).name


def copy_zip_member(path: Path, name: str, dest: Path) -> Path:
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(path) as zf, zf.open(name) as src, open(part, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    part.rename(dest)
    return dest


def save_index(cache: Path, candidates: list[Candidate], direct: bool) -> None:
    index = cache / "nested" / "index.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"direct": direct, "candidates": [asdict(c) for c in candidates]}))


def load_index(cache: Path) -> tuple[list[Candidate], bool] | None:
    try:
        doc = json.loads((cache / "nested" / "index.json").read_text())
        return [Candidate(**c) for c in doc["candidates"]], bool(doc["direct"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
