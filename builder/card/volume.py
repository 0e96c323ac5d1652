"""What filesystem holds a path (Linux mountinfo and statfs, macOS statfs and diskutil, Windows
GetVolumeInformationW), and what to tell the user about it: how to format it, how to eject it."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import AirboxError

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
