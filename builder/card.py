"""Write a bundle onto a mounted TF card and read every file back, on Linux, macOS and Windows.

Only the Python standard library is used here (ctypes for what `os` does not expose), so
`airbox-build write` runs on a Windows or macOS laptop with nothing else installed: no mtools, no
e2fsprogs, no admin rights.

What `write_card` does, in this order (nothing on the card changes before step 5):
 1. reads the bundle (an output folder with card/ and SHA256SUMS, or a card folder) and checks it:
    boot.scr and boot_emmc.scr present, no boot.scr.emmc/boot.scr.sd, no file of 4 GiB or more;
 2. finds what filesystem holds TARGET (Linux: /proc/self/mountinfo, else statfs f_type; macOS:
    statfs f_fstypename + `diskutil info`; Windows: GetVolumeInformationW) and refuses anything
    but FAT, with the way to format the card spelled out for the OS;
 3. lists the card, ignoring desktop metadata (`._*`, `.Spotlight-V100`, `.fseventsd`,
    `.Trashes`, `System Volume Information`, ...): files an older bundle left (stale chunks,
    `boot.scr.emmc`, `boot.scr.sd`, scripts) are to be removed; any other file means TARGET may
    not be the card at all, and nothing is touched;
 4. checks the bundle fits (in clusters, counting what the removals free);
 5. asks before removing stale files (or `--yes`), removes `boot.scr` first, then the stale
    files; files already on the card with the same sha256 (read back from the card) stay;
 6. copies the rest with a progress bar, `boot.scr` LAST: an interrupted write leaves a card
    without `boot.scr`, which U-Boot ignores, never a half-written bundle that it would flash;
 7. flushes every file to the card (fsync, F_FULLFSYNC on macOS, FlushFileBuffers on Windows);
 8. reads every file back and compares its sha256 with the bundle's, bypassing the page cache
    where the OS allows (O_DIRECT or posix_fadvise(DONTNEED) on Linux, F_NOCACHE on macOS,
    FILE_FLAG_NO_BUFFERING on Windows), so the bytes come from the card, not from memory; on a
    mismatch boot.scr is removed again, so a card that did not keep the bundle is never flashed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import AirboxError
from builder.events import Reporter

FAT32_MAX_FILE = (4 << 30) - 1
TRIGGERS = ("boot.scr", "boot.scr.emmc", "boot.scr.sd")  # what makes U-Boot flash from the card
FIRST_SCRIPT = "boot.scr"
MARKERS = ("boot.scr", "boot_emmc.scr")
SUMS = "SHA256SUMS"
MD5_NAME = "md5.txt"
_BLOCK = 4 << 20
_DEFAULT_CLUSTER = 32 << 10  # when the OS does not say: the largest FAT32 cluster, pessimistic

# Desktop metadata: never part of a bundle, never removed, never copied.
_JUNK_DIRS = frozenset(
    {
        "System Volume Information",
        "$RECYCLE.BIN",
        ".Trashes",
        ".Spotlight-V100",
        ".fseventsd",
        ".TemporaryItems",
        "__MACOSX",
    }
)
_JUNK_FILES = frozenset(
    {".DS_Store", "Thumbs.db", "desktop.ini", ".metadata_never_index", ".VolumeIcon.icns"}
)

# Files an AirBox bundle has or had at the top of the card (case-insensitive: FAT may show 8.3 names).
_BUNDLE_FILE = re.compile(
    r"""^(?:
        .+\.\d+-of-\d+\.gz            # chunks
      | [\w.-]+\.(?:scr|cmd)          # U-Boot scripts and their text
      | boot\.scr\.(?:emmc|sd)        # scripts that override boot.scr
      | gpt\.gz | md5\.txt | BOOT | fip\.bin | spi_flash[\w.-]*\.bin
      | partition[\w.-]*\.xml | local_update\.sh
    )$""",
    re.IGNORECASE | re.VERBOSE,
)


class CardError(AirboxError):
    """The card (or the target folder) cannot take the bundle, or did not keep it."""


# --------------------------------------------------------------------------------------------
# The bundle


@dataclass(frozen=True)
class Bundle:
    """The files to put on a card: '/'-paths relative to `card`, with sizes and known digests."""

    card: Path
    sizes: Mapping[str, int]
    sha256: Mapping[str, str]  # from the output folder's SHA256SUMS; empty for a bare card folder
    md5: Mapping[str, str]  # from md5.txt
    sums_file: Path | None

    def order(self) -> list[str]:
        """The copy order: everything sorted, boot.scr last."""
        return sorted(self.sizes, key=lambda n: (n == FIRST_SCRIPT, n))

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def open_bundle(path: Path) -> Bundle:
    """An output folder (`card/` + `SHA256SUMS`) or a card folder (holding boot.scr)."""
    path = Path(path)
    if not path.is_dir():
        raise CardError(
            "not a folder", where=str(path), hint="give the output folder OUTPUT/<name> or its card/ folder"
        )
    sums_file: Path | None = None
    if (path / "card").is_dir():
        card = path / "card"
        if (path / SUMS).is_file():
            sums_file = path / SUMS
    else:
        card = path
    sizes = dict(sorted(list_files(card).items()))
    missing = [m for m in MARKERS if m not in sizes]
    if missing:
        raise CardError(
            f"no bundle here: {' and '.join(missing)} missing",
            where=str(card),
            hint="give the output folder of `airbox-build build` (OUTPUT/<name>) or its card/ folder",
        )
    sha = _read_sums(sums_file, sizes) if sums_file else {}
    md5 = _read_md5(card / MD5_NAME) if MD5_NAME in sizes else {}
    bundle = Bundle(card, sizes, sha, md5, sums_file)
    check_bundle(bundle)
    return bundle


def _read_sums(path: Path, sizes: Mapping[str, int]) -> dict[str, str]:
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        if len(line) > 66 and line[64:66] in ("  ", " *") and line[66:].startswith("card/"):
            sums[line[71:]] = line[:64].lower()
    unlisted = sorted(set(sizes) - set(sums))
    gone = sorted(set(sums) - set(sizes))
    if unlisted or gone:
        detail = []
        if unlisted:
            detail.append(f"not listed: {_preview(unlisted)}")
        if gone:
            detail.append(f"listed but missing: {_preview(gone)}")
        raise CardError(
            f"card/ does not match {SUMS} ({'; '.join(detail)})",
            where=str(path.parent),
            hint="card/ was changed after the build: rebuild it (or, to write it as it is, give the "
            "card/ folder itself)",
        )
    return sums


def _read_md5(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^([0-9a-fA-F]{32}) [ *](.+)$", line)
        if m:
            out[m[2]] = m[1].lower()
    return out


def check_bundle(bundle: Bundle) -> None:
    """What would make the card useless or unwritable, found before the card is touched."""
    for bad in ("boot.scr.emmc", "boot.scr.sd"):
        if bad in bundle.sizes:
            raise CardError(
                "must not be on the card: U-Boot would run it instead of boot.scr",
                where=str(bundle.card / bad),
                hint="rebuild the bundle; airbox-build never puts it there",
            )
    big = [n for n, s in bundle.sizes.items() if s > FAT32_MAX_FILE]
    if big:
        raise CardError(
            f"{_preview(big)}: FAT32 cannot hold a file of 4 GiB or more",
            where=str(bundle.card),
            hint="the chunks must be smaller; rebuild the bundle",
        )


# --------------------------------------------------------------------------------------------
# Listing a card or a folder


def is_junk(rel: str) -> bool:
    """Desktop metadata (macOS, Windows, Android), by '/'-path."""
    parts = rel.split("/")
    return any(p in _JUNK_DIRS for p in parts[:-1]) or parts[-1] in _JUNK_FILES or parts[-1].startswith("._")


def list_files(top: Path) -> dict[str, int]:
    """'/'-path -> size of every regular file below `top`, desktop metadata skipped."""
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        rel_dir = Path(dirpath).relative_to(top).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if d not in _JUNK_DIRS)
        for fn in filenames:
            rel = prefix + fn
            if is_junk(rel):
                continue
            st = os.stat(os.path.join(dirpath, fn))
            if stat.S_ISREG(st.st_mode):
                out[rel] = st.st_size
    return out


def is_bundle_file(rel: str) -> bool:
    """A name an AirBox bundle uses (or used) at the top of the card."""
    return "/" not in rel and bool(_BUNDLE_FILE.match(rel))


# --------------------------------------------------------------------------------------------
# What filesystem holds a path


@dataclass(frozen=True)
class Volume:
    """The filesystem holding a path. `kind` is what users call it: FAT32, FAT16, FAT (width
    unknown), exFAT, NTFS, ext4, APFS, ...; `fstype` is the OS's own name for it."""

    path: Path
    kind: str
    fstype: str
    mount_point: Path | None = None
    device: str | None = None
    total_bytes: int | None = None
    free_bytes: int | None = None
    cluster_bytes: int | None = None

    @property
    def is_fat(self) -> bool:
        return self.kind.startswith("FAT")

    @property
    def is_root(self) -> bool:
        return self.mount_point is not None and _same_path(self.mount_point, self.path)


def probe_volume(path: Path) -> Volume:
    """Which filesystem holds `path`, where it is mounted, its space and cluster size."""
    path = Path(os.path.realpath(path))
    if sys.platform.startswith("linux"):
        return _probe_linux(path)
    if sys.platform == "darwin":
        return _probe_macos(path)
    if sys.platform == "win32":
        return _probe_windows(path)
    return _probe_statvfs(path, "unknown", "unknown")


def _same_path(a: Path, b: Path) -> bool:
    return os.path.normcase(os.path.realpath(a)).rstrip("\\/") == os.path.normcase(
        os.path.realpath(b)
    ).rstrip("\\/")


def _probe_statvfs(
    path: Path, kind: str, fstype: str, mount_point: Path | None = None, device: str | None = None
) -> Volume:
    total = free = cluster = None
    try:
        st = os.statvfs(path)
        unit = st.f_frsize or st.f_bsize
        # Some FUSE filesystems (fusefat) report no blocks at all: space unknown, not zero.
        if st.f_blocks:
            total, free = st.f_blocks * unit, st.f_bavail * unit
        cluster = st.f_bsize or None
    except (OSError, AttributeError):
        pass
    return Volume(path, kind, fstype, mount_point, device, total, free, cluster)


# Linux ------------------------------------------------------------------------------------------

_LINUX_KINDS = {
    "vfat": "FAT",
    "msdos": "FAT",
    "fat": "FAT",
    "umsdos": "FAT",
    "fuse.fusefat": "FAT",
    "exfat": "exFAT",
    "fuse.exfat": "exFAT",
    "ntfs": "NTFS",
    "ntfs3": "NTFS",
    "fuse.ntfs-3g": "NTFS",
    "ext2": "ext2",
    "ext3": "ext3",
    "ext4": "ext4",
    "btrfs": "btrfs",
    "xfs": "XFS",
    "f2fs": "F2FS",
    "tmpfs": "tmpfs",
    "overlay": "overlay",
    "hfsplus": "HFS+",
    "apfs": "APFS",
    "9p": "9p (a Windows drive seen from WSL?)",
    "drvfs": "drvfs (a Windows drive seen from WSL)",
    "nfs": "NFS",
    "nfs4": "NFS",
    "cifs": "SMB",
    "smb3": "SMB",
    "zfs": "ZFS",
}
# statfs(2) f_type, for when /proc/self/mountinfo cannot be read.
_LINUX_MAGIC = {
    0x4D44: "FAT",
    0x2011BAB0: "exFAT",
    0x5346544E: "NTFS",
    0x7366746E: "NTFS",
    0xEF53: "ext4",
    0x9123683E: "btrfs",
    0x58465342: "XFS",
    0x01021994: "tmpfs",
    0x794C7630: "overlay",
    0x65735546: "FUSE",
}


@dataclass(frozen=True)
class _Mount:
    point: str
    fstype: str
    source: str


def read_mountinfo(text: str) -> list[_Mount]:
    """Parse /proc/self/mountinfo (mount points have spaces etc. escaped as octal)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(_Mount(_unescape(fields[4]), tail[0], _unescape(tail[1])))
    return mounts


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s)


def _mount_of(path: Path, mounts: Sequence[_Mount]) -> _Mount | None:
    """The mount that holds `path`: the longest mount point above it (the last one if stacked)."""
    best: _Mount | None = None
    best_len = -1
    target = str(path)
    for m in mounts:
        point = m.point.rstrip("/") or "/"
        inside = point == "/" or target == point or target.startswith(point + "/")
        if inside and len(point) >= best_len:  # >=: of stacked mounts, the last one is visible
            best, best_len = m, len(point)
    return best


def _probe_linux(path: Path) -> Volume:
    try:
        with open("/proc/self/mountinfo") as f:
            mount = _mount_of(path, read_mountinfo(f.read()))
    except OSError:
        mount = None
    if mount is None:
        kind = _statfs_kind_linux(path)
        return _probe_statvfs(path, kind, kind.lower())
    kind = _LINUX_KINDS.get(mount.fstype, mount.fstype)
    device = mount.source if mount.source.startswith("/dev/") else None
    if mount.fstype == "fuseblk":
        kind = "exFAT or NTFS (fuseblk)"
    if device and (kind == "FAT" or mount.fstype == "fuseblk"):
        kind = _kind_from_device(device) or kind
    return _probe_statvfs(path, kind, mount.fstype, mount_point=Path(mount.point), device=device)


def _statfs_kind_linux(path: Path) -> str:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on 64-bit Linux
        if libc.statfs(os.fsencode(path), buf) != 0:
            return "unknown"
        f_type = ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    except (OSError, AttributeError):
        return "unknown"
    return _LINUX_MAGIC.get(f_type, f"unknown (statfs type 0x{f_type:x})")


def _kind_from_device(device: str) -> str | None:
    """FAT12/16/32, exFAT or NTFS from the device's first sector, when the user may read it."""
    from builder.fs.fat import probe_filesystem

    try:
        with open(device, "rb") as f:
            head = f.read(2048)
    except OSError:
        return None
    found = probe_filesystem(head)
    return found if found.startswith(("FAT", "exFAT", "NTFS")) else None


# macOS ------------------------------------------------------------------------------------------

_MAC_KINDS = {"msdos": "FAT", "exfat": "exFAT", "ntfs": "NTFS", "apfs": "APFS", "hfs": "HFS+", "smbfs": "SMB"}


def parse_macos_statfs(raw: bytes) -> dict[str, object]:
    """Fields of macOS's 64-bit `struct statfs` (sys/mount.h, __DARWIN_STRUCT_STATFS64)."""

    def text(start: int, size: int) -> str:
        return raw[start : start + size].split(b"\0", 1)[0].decode("utf-8", "replace")

    bsize = int.from_bytes(raw[0:4], "little")
    blocks, _bfree, bavail = (int.from_bytes(raw[o : o + 8], "little") for o in (8, 16, 24))
    return {
        "bsize": bsize,
        "blocks": blocks,
        "bavail": bavail,
        "fstypename": text(72, 16),
        "mntonname": text(88, 1024),
        "mntfromname": text(1112, 1024),
    }


def _probe_macos(path: Path) -> Volume:
    import ctypes

    info: dict[str, object] | None = None
    try:
        libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib", use_errno=True)
        # x86_64 keeps the 32-bit-inode statfs under the plain name; arm64 has only the 64-bit one.
        fn = getattr(libc, "statfs$INODE64", None) or libc.statfs
        buf = ctypes.create_string_buffer(4096)
        if fn(os.fsencode(path), buf) == 0:
            info = parse_macos_statfs(buf.raw)
    except (OSError, AttributeError):
        info = None
    if info is None:
        return _probe_statvfs(path, "unknown", "unknown")
    fstype = str(info["fstypename"])
    kind = _MAC_KINDS.get(fstype, fstype)
    mount_point = Path(str(info["mntonname"]))
    device = str(info["mntfromname"]) or None
    if kind == "FAT":
        kind = _diskutil_fat_width(mount_point) or kind
    bsize, blocks, bavail = int(info["bsize"]), int(info["blocks"]), int(info["bavail"])  # type: ignore[call-overload]
    return Volume(
        path,
        kind,
        fstype,
        mount_point=mount_point,
        device=device,
        total_bytes=blocks * bsize if blocks else None,
        free_bytes=bavail * bsize if blocks else None,
        cluster_bytes=bsize or None,
    )


def _diskutil_fat_width(mount_point: Path) -> str | None:
    """ "FAT32"/"FAT16"/"FAT12" from `diskutil info -plist` ("MS-DOS FAT32"), or None."""
    import plistlib

    from builder.run import run

    try:
        proc = run(["diskutil", "info", "-plist", str(mount_point)], check=False)
        data = plistlib.loads(proc.stdout) if proc.returncode == 0 else {}
    except (AirboxError, ValueError, OSError):
        return None
    m = re.search(r"FAT(12|16|32)", str(data.get("FilesystemName", "")))
    return f"FAT{m[1]}" if m else None


# Windows ----------------------------------------------------------------------------------------


def _probe_windows(path: Path) -> Volume:
    import ctypes
    from ctypes import wintypes

    k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    root_buf = ctypes.create_unicode_buffer(1024)
    if not k32.GetVolumePathNameW(str(path), root_buf, len(root_buf)):
        return _probe_statvfs(path, "unknown", "unknown")
    root = root_buf.value
    fs_buf = ctypes.create_unicode_buffer(64)
    serial, maxlen, flags = wintypes.DWORD(), wintypes.DWORD(), wintypes.DWORD()
    ok = k32.GetVolumeInformationW(
        root, None, 0, ctypes.byref(serial), ctypes.byref(maxlen), ctypes.byref(flags), fs_buf, len(fs_buf)
    )
    fstype = fs_buf.value if ok else "unknown"
    kind = {"FAT32": "FAT32", "FAT": "FAT16", "FAT12": "FAT12"}.get(fstype, fstype)
    spc, bps, free_c, total_c = (wintypes.DWORD() for _ in range(4))
    cluster = None
    counts = (ctypes.byref(spc), ctypes.byref(bps), ctypes.byref(free_c), ctypes.byref(total_c))
    if k32.GetDiskFreeSpaceW(root, *counts):
        cluster = spc.value * bps.value or None
    free = ctypes.c_ulonglong()
    total = ctypes.c_ulonglong()
    have_space = k32.GetDiskFreeSpaceExW(root, ctypes.byref(free), ctypes.byref(total), None)
    return Volume(
        path,
        kind,
        fstype,
        mount_point=Path(root),
        device=root.rstrip("\\"),
        total_bytes=total.value if have_space else None,
        free_bytes=free.value if have_space else None,
        cluster_bytes=cluster,
    )


# --------------------------------------------------------------------------------------------
# What to tell the user


def format_hint(vol: Volume, platform: str = sys.platform) -> str:
    """How to make the card FAT32 on this OS (or avoid it with the card image).

    The device is named only when TARGET is the top of its own volume (a mounted card); for a
    folder on some other disk, or the system's root, the commands show placeholders.
    """
    if not vol.is_root or vol.mount_point in (Path("/"), Path("C:\\")):
        vol = Volume(vol.path, vol.kind, vol.fstype)
    image = (
        "or skip formatting: build with --image and write OUTPUT/<name>/<name>.img with Raspberry Pi "
        "Imager or balenaEtcher, which lay out the card themselves"
    )
    if platform == "win32":
        drive = vol.device or "the card's drive"
        how = (
            f"back up anything on it, then in File Explorer right-click {drive} > Format... > "
            "File system: FAT32 > Start (for cards over 32 GB Windows offers only exFAT: use Raspberry Pi "
            "Imager > Choose OS > Erase, which formats any card as FAT32)"
        )
    elif platform == "darwin":
        disk = _mac_whole_disk(vol.device) or "diskN"
        how = (
            f"back up anything on it, check the card is /dev/{disk} with `diskutil list`, then "
            f"`diskutil eraseDisk FAT32 AIRBOX MBRFormat /dev/{disk}` (erases the whole card; or Disk "
            "Utility > View > Show All Devices > the card > Erase, Format: MS-DOS (FAT), Scheme: Master "
            "Boot Record)"
        )
    else:
        dev = vol.device or "/dev/sdX1"
        disk = re.sub(r"(?<=\d)p\d+$|(?<=[a-z])\d+$", "", dev) if vol.device else "/dev/sdX"
        how = (
            f"back up anything on it, find the card's device with `lsblk -f` (never the disk your "
            f"system runs from), unmount it (`udisksctl unmount "
            f"-b {dev}`), then `sudo mkfs.vfat -F 32 -n AIRBOX {dev}`; a card without a partition "
            f"table needs one first: `sudo parted {disk} mklabel msdos mkpart primary fat32 1MiB 100%`"
        )
    return f"format the card as FAT32: {how}; {image}"


def _mac_whole_disk(device: str | None) -> str | None:
    m = re.match(r"^(?:/dev/)?(disk\d+)", device or "")
    return m[1] if m else None


def eject_hint(vol: Volume, platform: str = sys.platform) -> str:
    if platform == "win32":
        return f"eject the card: in File Explorer right-click {vol.device or 'the card'} > Eject"
    if platform == "darwin":
        disk = _mac_whole_disk(vol.device)
        return f"eject the card: `diskutil eject {disk}`" if disk else "eject the card in Finder"
    if vol.device:
        return f"eject the card: `udisksctl unmount -b {vol.device}` (or Eject in the file manager)"
    return "unmount the card (Eject in the file manager, or `umount` its mount point)"


def next_steps(vol: Volume) -> list[str]:
    return [
        eject_hint(vol),
        "with the AirBox powered off, insert the card into its TF slot",
        "hold the power button while you connect power, and keep holding it a few seconds: U-Boot "
        "finds boot.scr on the card and writes the eMMC from it",
        "wait: the serial console (115200 baud) ends with `all done` and `Please remove the "
        "installation medium, then reboot`; `ERROR: load package failed` or `ERROR: eMMC write "
        "failed` means the card is bad (check it with `airbox-build verify CARD --against OUTPUT`)",
        "remove the card, then power-cycle the box: a card left in flashes the eMMC again at every boot",
    ]


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


@dataclass
class _Copied:
    sha256: str
    md5: str


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


# --------------------------------------------------------------------------------------------
# Planning a write


@dataclass(frozen=True)
class CardState:
    """The card compared with the bundle, before anything is changed."""

    existing: Mapping[str, int]  # every file on the card (desktop metadata excluded)
    stale: tuple[str, ...]  # older-bundle files the new bundle does not have: to remove
    unknown: tuple[str, ...]  # files that are no bundle's: TARGET may be the wrong disk
    replaced: tuple[str, ...]  # files the bundle overwrites (same name)


def compare_card(bundle: Bundle, existing: Mapping[str, int]) -> CardState:
    new = set(bundle.sizes)
    stale, unknown, replaced = [], [], []
    new_folded = {n.casefold() for n in new}
    for name in sorted(existing):
        if name in new:
            replaced.append(name)
        elif name.casefold() in new_folded or is_bundle_file(name):
            stale.append(name)
        else:
            unknown.append(name)
    return CardState(dict(existing), tuple(stale), tuple(unknown), tuple(replaced))


@dataclass(frozen=True)
class SpaceCheck:
    needed: int
    available: int | None  # None: the filesystem does not report its free space
    cluster: int

    @property
    def fits(self) -> bool:
        return self.available is None or self.needed <= self.available


def check_space(bundle: Bundle, state: CardState, vol: Volume) -> SpaceCheck:
    """Bytes the bundle takes in whole clusters vs free space plus what removal/overwrite frees."""
    from builder.emit import fat_directory_bytes

    cluster = vol.cluster_bytes or _DEFAULT_CLUSTER

    def on_disk(n: int) -> int:
        return -(-n // cluster) * cluster

    needed = sum(on_disk(s) for s in bundle.sizes.values()) + on_disk(fat_directory_bytes(list(bundle.sizes)))
    if vol.free_bytes is None:
        return SpaceCheck(needed, None, cluster)
    freed = sum(on_disk(state.existing[n]) for n in (*state.stale, *state.replaced))
    return SpaceCheck(needed, vol.free_bytes + freed, cluster)


# --------------------------------------------------------------------------------------------
# The write


@dataclass(frozen=True)
class WriteOptions:
    yes: bool = False  # remove files of an older bundle without asking
    allow_non_fat: bool = False  # accept a target that is not a FAT card (a staging folder)


@dataclass
class WriteResult:
    target: Path
    volume: Volume
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    bytes_written: int = 0
    bytes_verified: int = 0
    read_back: set[str] = field(default_factory=set)  # how the cache was bypassed
    digests: dict[str, str] = field(default_factory=dict)


Confirm = Callable[[Sequence[str]], bool]


def write_card(
    source: Path,
    target: Path,
    opts: WriteOptions,
    reporter: Reporter,
    confirm: Confirm | None = None,
) -> WriteResult:
    """Put the bundle at `source` on the mounted card `target`, then prove it is there."""
    target = normalize_target(target)
    with reporter.step("check", source=str(source), target=str(target)):
        bundle = open_bundle(source)
        vol = check_target(target, bundle, opts, reporter)
        state = compare_card(bundle, list_files(target))
        _refuse_unknown(state, target)
        space = check_space(bundle, state, vol)
        _refuse_no_room(space, vol)
        if space.available is None:
            reporter.warn(
                f"{target} does not report its free space: the bundle needs "
                f"{_size(space.needed)}; a card too small fails while copying"
            )
    result = WriteResult(target, vol)
    if state.stale and not opts.yes:
        _confirm_removal(state.stale, target, confirm)
    try:
        _write(bundle, target, state, result, reporter)
    except KeyboardInterrupt:
        reporter.warn("interrupted: the card has no boot.scr now, so the AirBox ignores it; run write again")
        raise
    return result


def normalize_target(target: Path | str) -> Path:
    """`E:` means the drive's current folder to Windows; the card's top folder is `E:\\`."""
    text = str(target)
    if re.fullmatch(r"[A-Za-z]:", text):
        text += "\\"
    return Path(text)


def check_target(target: Path, bundle: Bundle, opts: WriteOptions, reporter: Reporter) -> Volume:
    """Refuse a target that is not the root of a FAT volume (unless allowed), or is the bundle."""
    if not target.is_dir():
        raise CardError(
            "not a folder (is the card mounted?)",
            where=str(target),
            hint="give the card's mount point: E:\\, /Volumes/NO NAME, /media/<user>/<label>",
        )
    src, dst = Path(os.path.realpath(bundle.card)), Path(os.path.realpath(target))
    if src == dst or src in dst.parents or dst in src.parents:
        raise CardError(
            f"the target and the bundle ({bundle.card}) overlap",
            where=str(target),
            hint="give the card's mount point as TARGET",
        )
    vol = probe_volume(target)
    reporter.event(
        "volume",
        filesystem=vol.kind,
        fstype=vol.fstype,
        mount_point=str(vol.mount_point or ""),
        device=vol.device,
        free_bytes=vol.free_bytes,
        cluster_bytes=vol.cluster_bytes,
    )
    if opts.allow_non_fat:
        if not vol.is_fat:
            reporter.warn(
                f"{target} is {vol.kind}, not FAT: fine for a staging folder, but the AirBox "
                "reads only a FAT card"
            )
        return vol
    if not vol.is_fat:
        kind = vol.kind if vol.fstype.lower() == vol.kind.lower() else f"{vol.kind} ({vol.fstype})"
        if vol.is_root:
            what = f"the card is {kind}, but the AirBox's U-Boot reads only FAT32"
        else:
            where_mounted = f" mounted at {vol.mount_point}" if vol.mount_point else ""
            what = (
                f"this is a folder on the {kind} volume{where_mounted}, not the top of a FAT32 card: "
                "the AirBox's U-Boot reads only FAT32"
            )
        raise CardError(
            what,
            where=str(target),
            hint="give the card's mount point as TARGET; if the card itself is not FAT32, "
            + format_hint(vol)
            + ". To fill a plain folder on purpose (to copy to a card later), pass --allow-non-fat",
        )
    if vol.kind in ("FAT12", "FAT16"):
        reporter.warn(f"{target} is {vol.kind}; U-Boot reads it, but the vendor's procedure asks for FAT32")
    if vol.mount_point is not None and not vol.is_root:
        raise CardError(
            f"not the top folder of the card (that is {vol.mount_point})",
            where=str(target),
            hint=f"U-Boot looks for boot.scr only at the top of the card: give {vol.mount_point}",
        )
    return vol


def _refuse_unknown(state: CardState, target: Path) -> None:
    if state.unknown:
        raise CardError(
            f"the card holds {len(state.unknown)} file(s) that belong to no AirBox bundle: "
            f"{_preview(list(state.unknown))}; nothing was changed",
            where=str(target),
            hint="check that TARGET is the card you mean. If it is, move those files off it (or "
            "format it FAT32) and run write again",
        )


def _refuse_no_room(space: SpaceCheck, vol: Volume) -> None:
    if space.fits:
        return
    assert space.available is not None
    total = f" of {_size(vol.total_bytes)}" if vol.total_bytes else ""
    too_small = vol.total_bytes is not None and vol.total_bytes < space.needed
    raise CardError(
        f"the bundle needs {_size(space.needed)} on the card ({space.cluster}-byte clusters) but only "
        f"{_size(space.available)}{total} can be free after removing the old bundle; nothing was changed",
        where=str(vol.path),
        hint="use a bigger card" if too_small else "free space on the card (or format it), then write again",
    )


def _confirm_removal(stale: Sequence[str], target: Path, confirm: Confirm | None) -> None:
    if confirm is None:
        raise CardError(
            f"{len(stale)} file(s) of an older bundle must be removed from the card first: "
            f"{_preview(list(stale))}; nothing was changed",
            where=str(target),
            hint="run again with --yes to remove them (there is no terminal to ask)",
        )
    if not confirm(stale):
        raise CardError(
            "nothing was changed: the files of the older bundle were kept",
            where=str(target),
            hint="run again and answer yes, or pass --yes",
        )


def _write(bundle: Bundle, target: Path, state: CardState, result: WriteResult, reporter: Reporter) -> None:
    with reporter.step("remove", files=len(state.stale)):
        # The triggers go first: from here until boot.scr is back, U-Boot ignores the card.
        first = [n for n in (*state.stale, *state.replaced) if n.casefold() in TRIGGERS]
        for name in [*first, *(n for n in state.stale if n not in first)]:
            _remove(target / name)
            if name in state.stale:
                result.removed.append(name)
        _sync_dir(target)
    kept = {n for n in state.replaced if n.casefold() not in TRIGGERS}
    candidates = [n for n in bundle.order() if n in kept and state.existing[n] == bundle.sizes[n]]
    expected = _expected_digests(bundle, candidates)
    with (
        reporter.step("compare", files=len(candidates)),
        reporter.progress("compare", sum(bundle.sizes[n] for n in candidates) or 1) as advance,
    ):
        for name in candidates:
            try:
                digest, how = hash_uncached(target / name, advance)
            except OSError:
                continue  # unreadable: it is rewritten, and the read-back judges the card
            result.read_back.add(how)
            if digest == expected[name]:
                result.unchanged.append(name)
    to_write = [n for n in bundle.order() if n not in result.unchanged]
    total = sum(bundle.sizes[n] for n in to_write)
    with (
        reporter.step("write", files=len(to_write), bytes=total),
        reporter.progress("write", total or 1) as advance,
    ):
        for name in to_write:
            copied = _copy_one(bundle, target, name, result, advance)
            _check_source(bundle, name, copied)
            expected[name] = copied.sha256
            result.written.append(name)
            result.bytes_written += bundle.sizes[name]
        _sync_dir(target)
        if hasattr(os, "sync"):
            os.sync()
    with (
        reporter.step("read back", files=len(bundle.sizes)),
        reporter.progress("read back", bundle.total_bytes or 1) as advance,
    ):
        bad = _read_back(bundle, target, expected, result, advance)
    if bad:
        # A card that would flash damaged chunks must not start: without boot.scr U-Boot ignores it.
        with contextlib.suppress(OSError):
            (target / FIRST_SCRIPT).unlink()
        raise CardError(
            f"{len(bad)} file(s) on the card differ from the bundle after writing: {_preview(bad)}; "
            "boot.scr was removed, so the AirBox ignores this card",
            where=str(target),
            hint=MISMATCH_CAUSES,
        )
    result.digests = {n: expected[n] for n in bundle.order()}


MISMATCH_CAUSES = (
    "the card did not keep what was written. Likely causes: a failing card; a faulty card reader or "
    "USB port (try another); a counterfeit card that reports more capacity than it has (writes past "
    "its real size overwrite earlier data: test it with f3 on Linux/macOS or H2testw on Windows). "
    "Do not use this card in the AirBox"
)


def _expected_digests(bundle: Bundle, names: Sequence[str]) -> dict[str, str]:
    """The bundle's sha256 of `names`: from SHA256SUMS, else hashed from the bundle (and md5-checked)."""
    out = {}
    for n in names:
        if n in bundle.sha256:
            out[n] = bundle.sha256[n]
            continue
        sha, md5 = hashlib.sha256(), hashlib.md5()
        with open(bundle.card / n, "rb") as f:
            while block := f.read(_BLOCK):
                sha.update(block)
                md5.update(block)
        _check_source(bundle, n, _Copied(sha.hexdigest(), md5.hexdigest()))
        out[n] = sha.hexdigest()
    return out


def _copy_one(
    bundle: Bundle, target: Path, name: str, result: WriteResult, advance: Callable[[int], None]
) -> _Copied:
    try:
        return copy_file(bundle.card / name, target / name, advance)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG):
            raise CardError(
                f"the card is full (or refused the file size) while writing {name}",
                where=str(target),
                hint="use a bigger card; the card has no boot.scr now, so the AirBox ignores it",
            ) from e
        written = result.bytes_written
        full = (
            f"full (it does not report its free space; {_size(written)} of {_size(bundle.total_bytes)} "
            "were written), "
            if result.volume.free_bytes is None
            else ""
        )
        raise CardError(
            f"cannot write {name}: {e.strerror or e}",
            where=str(target),
            hint=f"is the card {full}write-protected (the lock switch on an SD adapter) or removed? "
            "The card has no boot.scr now, so the AirBox ignores it; run write again",
        ) from e


def _check_source(bundle: Bundle, name: str, copied: _Copied) -> None:
    """The bytes read from the bundle are the ones the build recorded (SHA256SUMS, md5.txt)."""
    want = bundle.sha256.get(name)
    if want is not None and want != copied.sha256:
        raise CardError(
            f"{name} does not match {SUMS} (sha256 {copied.sha256}, recorded {want})",
            where=str(bundle.card),
            hint="the output folder is damaged or was edited: rebuild it. The card has no boot.scr "
            "now, so the AirBox ignores it",
        )
    want_md5 = bundle.md5.get(name)
    if want_md5 is not None and name != MD5_NAME and want_md5 != copied.md5:
        raise CardError(
            f"{name} does not match md5.txt (md5 {copied.md5}, listed {want_md5})",
            where=str(bundle.card),
            hint="the bundle is damaged or was edited: rebuild it",
        )


def _read_back(
    bundle: Bundle,
    target: Path,
    expected: Mapping[str, str],
    result: WriteResult,
    advance: Callable[[int], None],
) -> list[str]:
    bad = []
    for name in bundle.order():
        path = target / name
        try:
            size = path.stat().st_size
        except OSError:
            bad.append(f"{name} (missing)")
            continue
        if size != bundle.sizes[name]:
            bad.append(f"{name} ({size} bytes, not {bundle.sizes[name]})")
            continue
        try:
            digest, how = hash_uncached(path, advance)
        except OSError as e:
            bad.append(f"{name} (read error: {e.strerror or e})")
            continue
        result.read_back.add(how)
        result.bytes_verified += size
        if digest != expected[name]:
            bad.append(name)
    return bad


# --------------------------------------------------------------------------------------------
# Comparing any card (folder, mounted card, card image) with a bundle


@dataclass(frozen=True)
class Difference:
    file: str
    message: str


def compare_with_bundle(
    names: Sequence[str],
    size_of: Callable[[str], int],
    digest_of: Callable[[str], str],
    bundle: Bundle,
) -> list[Difference]:
    """Every way the card's files differ from the bundle: missing, extra, other size, other bytes."""
    out = []
    card = set(names)
    expected = _expected_digests(bundle, bundle.order())
    for n in bundle.order():
        if n not in card:
            out.append(Difference(n, "missing on the card"))
    for n in sorted(card - set(bundle.sizes)):
        if is_bundle_file(n):
            out.append(
                Difference(
                    n,
                    "on the card but not in the bundle: a file of an older bundle "
                    "(airbox-build write removes it)",
                )
            )
        else:
            out.append(Difference(n, "on the card but not part of the bundle (remove it)"))
    for n in bundle.order():
        if n not in card:
            continue
        size = size_of(n)
        if size != bundle.sizes[n]:
            out.append(Difference(n, f"{size} bytes on the card, {bundle.sizes[n]} in the bundle"))
            continue
        try:
            digest = digest_of(n)
        except OSError as e:
            out.append(Difference(n, f"cannot read it from the card: {e.strerror or e}"))
            continue
        if digest != expected[n]:
            out.append(Difference(n, "different bytes on the card (sha256 mismatch): " + MISMATCH_CAUSES))
    return out


def iter_preview(items: Sequence[str], n: int = 6) -> Iterator[str]:
    yield from items[:n]
    if len(items) > n:
        yield f"... ({len(items)} in all)"


def _preview(items: Sequence[str]) -> str:
    return ", ".join(iter_preview(list(items)))


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    if n < 1024:
        return f"{n} bytes"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"
