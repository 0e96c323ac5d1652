"""What an ext4 image holds, as the rest of the builder sees it: file types, inodes, directory
entries, the file system's facts, and space estimates."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_VERSION = (1, 45)
TOOLS = ("debugfs", "dumpe2fs", "e2fsck", "resize2fs")

_MARK = b"@@airbox:"
_MAX_LINE = 8000  # debugfs reads script lines into a BUFSIZ (8192) buffer
_NAME_MAX = 255
_SYMLINK_MAX = 4095
_FAST_SYMLINK_MAX = 59  # shorter targets live in the inode, longer ones take a block
_MAX_READ = 64 << 20

_S_IFMT = 0o170000
_TYPE_BITS = {
    "file": 0o100000,
    "dir": 0o040000,
    "symlink": 0o120000,
    "char": 0o020000,
    "block": 0o060000,
    "fifo": 0o010000,
    "socket": 0o140000,
}


class FileType(str, enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"

    @property
    def bits(self) -> int:
        return _TYPE_BITS[self.value]

    @classmethod
    def from_mode(cls, mode: int) -> FileType:
        fmt = mode & _S_IFMT
        for name, bits in _TYPE_BITS.items():
            if bits == fmt:
                return cls(name)
        raise ValueError(f"unknown inode type in mode 0{mode:o}")


_STAT_TYPES = {
    "regular": FileType.FILE,
    "directory": FileType.DIR,
    "symlink": FileType.SYMLINK,
    "character special": FileType.CHAR,
    "block special": FileType.BLOCK,
    "FIFO": FileType.FIFO,
    "socket": FileType.SOCKET,
}


@dataclass(frozen=True)
class Ext4Info:
    """The superblock numbers the builder plans with (from `dumpe2fs -h`)."""

    block_size: int
    block_count: int
    free_blocks: int
    reserved_blocks: int
    inode_count: int
    free_inodes: int
    inode_size: int
    inodes_per_group: int
    blocks_per_group: int
    features: frozenset[str]
    uuid: str
    label: str
    state: str

    @property
    def size_bytes(self) -> int:
        return self.block_count * self.block_size

    @property
    def free_bytes(self) -> int:
        return self.free_blocks * self.block_size


@dataclass(frozen=True)
class Inode:
    """What `stat` says about one inode. `mode` is the permission bits (07777, suid etc. included)."""

    path: str
    ino: int
    type: FileType
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    links: int
    target: str | None = None  # symlinks
    rdev: tuple[int, int] | None = None  # char/block devices: (major, minor)
    xattr_block: int = 0  # 0 when all xattrs (if any) live in the inode
    xattr_names: tuple[str, ...] = ()
    blocks_512: int = 0  # i_blocks: space used, in 512-byte units

    @property
    def is_dir(self) -> bool:
        return self.type is FileType.DIR

    @property
    def is_whiteout(self) -> bool:
        """An overlayfs whiteout: a char device 0:0."""
        return self.type is FileType.CHAR and self.rdev == (0, 0)


@dataclass(frozen=True)
class DirEntry:
    """One entry of a directory listing (`ls -p`)."""

    name: str
    ino: int
    type: FileType
    mode: int  # permission bits
    uid: int
    gid: int
    size: int


@dataclass(frozen=True)
class SpaceEstimate:
    """A conservative count of what a batch allocates (removals not credited)."""

    blocks: int
    inodes: int
    block_size: int

    @property
    def bytes(self) -> int:
        return self.blocks * self.block_size


@dataclass(frozen=True)
class EditSummary:
    """What one applied batch did, for logs and the build report."""

    commands: int
    created: int
    removed: int
    debugfs_runs: int


def _file_blocks(size: int, block_size: int) -> int:
    data = math.ceil(size / block_size)
    # An extent covers at most 32768 blocks, the inode holds 4; assume fragments of 1 MiB-ish
    # runs so that a file landing in fragmented free space still fits.
    extents = math.ceil(data / 256) if data else 0
    meta = 0 if extents <= 4 else math.ceil(extents / 340) + 1
    return data + meta


def _estimate(
    block_size: int,
    *,
    files: Sequence[int],
    dirs: int,
    slow_symlinks: int,
    entries: dict[bytes, list[int]],
    xattr_inodes: int,
    fast_symlinks: int = 0,
    nodes: int = 0,
) -> SpaceEstimate:
    blocks = sum(_file_blocks(s, block_size) for s in files)
    blocks += dirs + slow_symlinks + xattr_inodes
    usable = block_size - 12  # metadata_csum puts a 12-byte tail in each directory block
    for name_lens in entries.values():
        if name_lens:
            used = sum(8 + (n + 3) // 4 * 4 for n in name_lens)
            blocks += math.ceil(used / usable) + 1  # +1: a partly full last block, an htree index
    inodes = len(files) + dirs + slow_symlinks + fast_symlinks + nodes
    return SpaceEstimate(blocks=blocks, inodes=inodes, block_size=block_size)
