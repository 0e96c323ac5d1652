"""Which form a file is, from its bytes (not its name), and decompressing streams."""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path
from typing import BinaryIO, cast

from builder.errors import PackageError
from builder.fs.fat import parse_boot_sector, probe_filesystem
from builder.package.source.base import (
    _7Z_MAGIC,
    _COMPRESSIONS,
    _FORMS_HINT,
    _HEAD_BYTES,
    _ZIP_MAGICS,
    _ZSTD_MAGIC,
    _damaged,
    _is_data_error,
)
from builder.package.source.partitions import _mbr_entries

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

            return cast(BinaryIO, igzip.open(path, "rb"))
        except ImportError:
            return gzip.open(path, "rb")  # type: ignore[return-value]
    if comp == "xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    if comp == "bz2":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    raise AssertionError(comp)
