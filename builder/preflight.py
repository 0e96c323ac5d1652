"""Checks that stop a build before any long work, or before it could hand over a bundle that lies.

Before the base is fetched (`preflight_build`):

- every system tool the build runs is on PATH (or in /sbin & co), else the error names the
  Debian package and the Homebrew formula;
- e2fsprogs is 1.45 or newer (what debugfs scripting and the box's e2fsck need);
- the output folder is on a case-sensitive POSIX filesystem: a case-insensitive one (FAT,
  exFAT, NTFS, default APFS) would merge files whose names differ only in case (an app's
  `README` and `readme`, staged on the host before they go into the image), and one without
  symlinks or modes (FAT, exFAT, NTFS mounts) cannot stage what goes into the ext4 images.
  The bundle is built on a real filesystem and copied to the FAT card by `airbox-build write`.

Once the package is open (`check_package_files`): no file of 4 GiB or more or with a name FAT32
cannot hold, no boot.scr.emmc/boot.scr.sd (the build would copy them verbatim). After the repack
(`check_card_chunks`): every chunk on the card is a gzip stream whose trailer (ISIZE) gives the
size its script unzips, which catches a truncated or overwritten vendor chunk that the build
copies without decompressing. (A chunk damaged in the middle with a correct trailer is caught by
the package's checksum when the base is pinned, and by `airbox-build verify`.)
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from builder.errors import BuildError, PackageError, ToolError
from builder.fs.ext4 import require_e2fsprogs
from builder.package.chunks import is_fat_safe
from builder.package.flashplan import FORBIDDEN_TOP
from builder.run import BUILD_TOOLS, find_tool, require_tools

FAT32_MAX = (4 << 30) - 1
GZIP_MAGIC = b"\x1f\x8b"

OUTPUT_FS_HINT = (
    "build into a folder on a case-sensitive POSIX filesystem with -o (Linux: ext4, xfs, btrfs; "
    "macOS: a case-sensitive APFS volume; WSL: a folder under ~, not /mnt/c), then copy the bundle "
    "to the card with `airbox-build write OUTPUT/<name> CARD`"
)


def preflight_build(out_root: Path) -> None:
    """Everything a build needs from this machine, checked before any download or long work."""
    require_tools(*BUILD_TOOLS)
    check_e2fsprogs()
    check_output_filesystem(out_root)


def check_e2fsprogs() -> tuple[int, int, int]:
    """e2fsprogs >= 1.45, or a ToolError naming the debugfs that was found."""
    try:
        return require_e2fsprogs()
    except ToolError as e:
        if e.where is None:
            e.where = find_tool("debugfs")
        raise


def check_output_filesystem(out_root: Path) -> None:
    """Refuse an output folder on a case-insensitive or non-POSIX filesystem (see the docstring)."""
    out_root.mkdir(parents=True, exist_ok=True)
    probe = Path(tempfile.mkdtemp(prefix=".airbox-preflight-", dir=out_root))
    try:
        problem = case_insensitive_problem(probe) or posix_problem(probe)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if problem:
        raise BuildError(
            f"the output folder is on a filesystem that {problem}", where=str(out_root), hint=OUTPUT_FS_HINT
        )


def case_insensitive_problem(folder: Path) -> str | None:
    """Why `folder` cannot tell `Aa` from `aA` (None when it can)."""
    (folder / "Aa").write_bytes(b"upper")
    if (folder / "aA").exists():
        return "does not tell upper from lower case (files such as README and readme would collide)"
    return None


def posix_problem(folder: Path) -> str | None:
    """Why `folder` cannot hold symlinks or keep file modes (None when it can)."""
    return symlink_problem(folder) or mode_problem(folder)


def symlink_problem(folder: Path) -> str | None:
    link = folder / "link"
    try:
        os.symlink("target", link)
        ok = os.readlink(link) == "target"
    except (OSError, NotImplementedError):
        ok = False
    if not ok:
        return "cannot hold symbolic links (a FAT, exFAT or NTFS mount?)"
    return None


def mode_problem(folder: Path) -> str | None:
    probe = folder / "mode"
    probe.write_bytes(b"")
    for mode in (0o640, 0o755):
        try:
            os.chmod(probe, mode)
            kept = stat.S_IMODE(os.stat(probe).st_mode) == mode
        except OSError:
            kept = False
        if not kept:
            return f"does not keep file modes (chmod {mode:o} did not stick: a FAT, exFAT or NTFS mount?)"
    return None


def check_package_files(sizes: Mapping[str, int]) -> None:
    """Refuse a package whose files cannot go on the card as they are: U-Boot would run
    boot.scr.emmc or boot.scr.sd before boot.scr, and FAT32 cannot hold a name such as `a:b`
    or a file of 4 GiB or more (the build copies every file it does not change verbatim)."""
    for name in FORBIDDEN_TOP:
        if name in sizes:
            raise PackageError(
                "U-Boot runs this file before boot.scr, so the card would not flash the bundle",
                where=name,
                hint=f"delete {name} from the package folder (it is not part of a vendor package)",
            )
    for name in sorted(sizes):
        if not is_fat_safe(name.rsplit("/", 1)[-1]):
            raise PackageError(
                "the name is not valid on a FAT32 card",
                where=name,
                hint="rename or remove it: names on the card use only A-Z, a-z, 0-9, '.', '_', '+' and '-'",
            )
    too_big = sorted((name, size) for name, size in sizes.items() if size > FAT32_MAX)
    if too_big:
        name, size = too_big[0]
        others = f" (and {len(too_big) - 1} more)" if len(too_big) > 1 else ""
        raise PackageError(
            f"{size:,} bytes: a FAT32 card cannot hold a file of 4 GiB or more{others}",
            where=name,
            hint="a vendor package's files are far smaller: remove this file from the package folder, "
            "or download the package again",
        )


def check_card_chunks(card: Path, chunks: Iterable[tuple[str, int]]) -> None:
    """Each (chunk file, uncompressed bytes) on the card starts like gzip and ends with that size."""
    for name, size in chunks:
        problem = _gzip_frame_problem(card / name, size)
        if problem:
            raise PackageError(
                f"{problem}: the chunk is truncated or damaged, and the card would fail to flash",
                where=name,
                hint="the vendor package is damaged: download it again (check its checksum), "
                "or run `airbox-build verify` on it to list every problem",
            )


def _gzip_frame_problem(path: Path, size: int) -> str | None:
    with open(path, "rb") as f:
        head = f.read(2)
        length = f.seek(0, os.SEEK_END)
        if head != GZIP_MAGIC or length < 18:
            return "not a gzip file"
        f.seek(length - 4)
        (isize,) = struct.unpack("<I", f.read(4))
    if isize != size % (1 << 32):
        return f"its gzip trailer says {isize} bytes, but its script unzips {size}"
    return None
