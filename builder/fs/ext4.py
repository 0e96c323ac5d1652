"""ext4 images read and edited with e2fsprogs (debugfs, resize2fs, e2fsck, dumpe2fs): no mount, no root.

How e2fsprogs is driven, and why (facts checked against the e2fsprogs 1.45-1.47 sources):

- Edits are batched: an `EditBatch` records operations, plans them against a model of the
  directories involved (read with ONE read-only debugfs run), and applies them in ONE
  `debugfs -w -f -` run, however many files. Removing existing trees costs one extra read-only
  run per tree level (to list them and stat every inode to be removed).
- debugfs exits 0 when commands fail. The commands of each operation are followed by a marker
  line that is an unknown command (`@@airbox:<k>`); debugfs reports it on stderr right after
  the errors of the commands before it, so each error is tied to its operation, and so to the
  image path the caller named. On stdout, the echoed command lines delimit each output.
- Script lines are split by libss: whitespace separates words, `"..."` quotes, `""` inside
  quotes is one `"`. A line is read with fgets and cut at the first CR or LF, so names and
  symlink targets holding CR or LF cannot be expressed; they are refused, naming the path.
- Every command is addressed by inode number (`<12>`) or by a bare name relative to a `cd`:
  debugfs 1.45's `write`/`mknod` link their name argument into the current directory literally
  (a '/' in it would create a bogus entry), and `mkdir /a/b` through a symlinked `/a` corrupts
  the file system (a half-made directory) instead of failing. The planner resolves every parent
  (symlinks included) before any write, so no command can hit those paths.
- `rm`/`rmdir` free an inode's blocks but not its external xattr block (a leak e2fsck reports),
  and libext2fs never frees such a block when xattrs are removed either. Before the batch, one
  xattr of each inode about to be freed is removed (libext2fs copies a shared block, dropping
  its reference count properly); after the inode goes, its block is freed through a throw-away
  inode that maps it. See _Planner.release_xattr_blocks.
- Determinism: libext2fs takes "now" from E2FSPROGS_FAKE_TIME (1.47.2+: SOURCE_DATE_EPOCH)
  for new inodes (atime/mtime/ctime/crtime), dtime and the superblock write time; e2fsck takes
  it from E2FSCK_TIME. All are set to the batch epoch (tests check every new inode's four
  times); the ctime of existing inodes an edit changes, and the mtime/ctime of directories
  whose entries change, are set with `set_inode_field`. Inode and block allocation and the
  directory hash (seeded in the superblock) are deterministic, and libext2fs sets no random
  inode generation, so the same image plus the same batch gives the same bytes, whatever the
  clock, TZ or umask. An epoch of 0 is refused: libext2fs reads 0 as "use the clock".
- e2fsck runs with our own E2FSCK_CONFIG (`broken_system_clock`): a vendor image written after
  the build epoch would otherwise be "fixed" for times "in the future", and a user's
  /etc/e2fsck.conf cannot change what the build does. Tools run with LC_ALL=C so their output
  can be parsed, and with debugfs's pager disabled.
- No feature is ever added: debugfs, resize2fs and e2fsck -p keep the feature set (tests check
  it), so an image made for the device's e2fsck 1.45.4 stays checkable there.

Minimum e2fsprogs: 1.45 (Ubuntu 20.04, the vendor's build host; the device runs 1.45.4); the
tests pass on 1.45.5 and 1.47.0. Used: `ea_set -f`/`ea_get -f`/`ea_rm` and `symlink` (debugfs
1.43+), `-f -` scripts, E2FSPROGS_FAKE_TIME in ext2fs_open, `set_inode_field ... @<seconds>`,
`resize2fs -M` and E2FSCK_TIME. (1.45 turns a hash-indexed directory it adds to into a linear
one; 1.46+ inserts into the index. Both are valid and e2fsck-clean.)
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import errno
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shutil
import stat as statmod
import struct
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType

from builder.errors import BuildError, ToolError
from builder.run import require_tools, run

log = logging.getLogger("airbox-build")

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


# ----------------------------------------------------------------------------- tools, environment


@cache
def e2fsprogs_version() -> tuple[int, int, int]:
    """The e2fsprogs version of the debugfs on PATH, e.g. (1, 47, 0)."""
    require_tools(*TOOLS)
    proc = run(["debugfs", "-V"], check=False, env=_env(None))
    text = (proc.stderr or b"").decode(errors="replace") + (proc.stdout or b"").decode(errors="replace")
    m = re.search(r"debugfs (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise ToolError(
            f"cannot tell the e2fsprogs version from `debugfs -V`: {text.strip()[:200]!r}",
            hint="install e2fsprogs 1.45 or newer",
        )
    return int(m[1]), int(m[2]), int(m[3] or 0)


def require_e2fsprogs() -> tuple[int, int, int]:
    """Fail before any work when e2fsprogs is missing or older than MIN_VERSION."""
    version = e2fsprogs_version()
    if version[:2] < MIN_VERSION:
        have = ".".join(map(str, version))
        raise ToolError(
            f"e2fsprogs {have} is too old: airbox-build needs {'.'.join(map(str, MIN_VERSION))} or newer",
            hint="install e2fsprogs >= 1.45 (Ubuntu 20.04+, Debian 11+; macOS: brew install e2fsprogs)",
        )
    return version


_E2FSCK_CONF = "[options]\n\tbroken_system_clock = 1\n"


def _e2fsck_config() -> str:
    """The e2fsck config file, in the current temp folder (a build's own, see builder.outdir)."""
    name = _e2fsck_config_in(tempfile.gettempdir())
    if not os.path.exists(name):  # its folder was cleaned: make another
        _e2fsck_config_in.cache_clear()
        name = _e2fsck_config_in(tempfile.gettempdir())
    return name


@cache
def _e2fsck_config_in(folder: str) -> str:
    fd, name = tempfile.mkstemp(prefix="airbox-e2fsck-", suffix=".conf", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(_E2FSCK_CONF)
    atexit.register(lambda: Path(name).unlink(missing_ok=True))
    return name


def _env(epoch: int | None, *, e2fsck: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("LANGUAGE", "E2FSPROGS_FAKE_TIME", "SOURCE_DATE_EPOCH", "E2FSCK_TIME", "DEBUGFS_PAGER"):
        env.pop(var, None)
    env.update(LC_ALL="C", LANG="C", TZ="UTC", PAGER="__none__", DEBUGFS_PAGER="__none__")
    if e2fsck:
        env["E2FSCK_CONFIG"] = _e2fsck_config()
    if epoch is not None:
        env["E2FSPROGS_FAKE_TIME"] = env["SOURCE_DATE_EPOCH"] = env["E2FSCK_TIME"] = str(epoch)
    return env


def _check_epoch(epoch: int | None, what: str) -> int:
    if epoch is None:
        raise BuildError(
            f"{what} needs a timestamp epoch for deterministic output, and none was given",
            hint="pass epoch= (SOURCE_DATE_EPOCH or the recipe's timestamp) to Ext4Image or edit()",
        )
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch < 1 << 32:
        raise BuildError(
            f"timestamp epoch {epoch!r} is not usable for ext4",
            hint="use whole seconds from 1 to 4294967295 (e2fsprogs reads 0 as 'use the clock')",
        )
    return epoch


# ----------------------------------------------------------------------------- the superblock

_SB_OFFSET, _SB_SIZE = 1024, 1024
_SB_MAGIC = 0x38
_SB_RO_COMPAT = 0x64
_SB_KBYTES_WRITTEN = 0x178
_SB_CHECKSUM = 0x3FC
_RO_COMPAT_METADATA_CSUM = 0x400


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def _crc32c(data: bytes) -> int:
    """ext4's metadata checksum: CRC32C (Castagnoli) from ~0, without the final inversion."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


# ----------------------------------------------------------------------------- names and quoting


def _split(path: str | os.PathLike[str], *, what: str = "path") -> tuple[bytes, ...]:
    """An image path as its components (bytes). Absolute, no '..', no CR/LF/NUL."""
    text = os.fspath(path)
    if not text.startswith("/"):
        raise BuildError(f"image path {text!r} is not absolute", hint="image paths start with '/'")
    # one encode and one C-level split: this runs for every file an app or overlay writes
    parts = tuple(p for p in os.fsencode(text).split(b"/") if p and p != b".")
    if b".." in parts:
        raise BuildError(f"image path {text!r} contains '..'", hint="give the path without '..'")
    if "\r" in text or "\n" in text or "\0" in text or any(len(p) > _NAME_MAX for p in parts):
        for raw in parts:
            _check_name(raw, text, what)
    return parts


def _check_scriptable(raw: bytes, path: str, what: str) -> None:
    if any(c in raw for c in b"\r\n\0"):
        raise BuildError(
            f"{what} {path!r} has a line break or NUL in a name, which debugfs scripts cannot express",
            hint="rename the file",
        )


def _check_name(raw: bytes, path: str, what: str) -> None:
    _check_scriptable(raw, path, what)
    if len(raw) > _NAME_MAX:
        raise BuildError(f"{what} {path!r}: name longer than {_NAME_MAX} bytes", hint="shorten the name")


def _join(parts: Sequence[bytes]) -> str:
    return "/" + "/".join(os.fsdecode(p) for p in parts)


def _raw_path(parts: Sequence[bytes]) -> bytes:
    return b"/" + b"/".join(parts)


def _q(word: bytes | str) -> bytes:
    """One debugfs (libss) word: double-quoted, an inner quote doubled."""
    raw = os.fsencode(word) if isinstance(word, str) else word
    return b'"' + raw.replace(b'"', b'""') + b'"'


def _ino_ref(ino: int) -> bytes:
    return b"<%d>" % ino


# ----------------------------------------------------------------------------- output parsing


def _parse_ls_p(lines: Iterable[bytes]) -> list[DirEntry]:
    """Parse `ls -p` lines: /ino/mode/uid/gid/name/size/ (size empty for directories)."""
    out = []
    for line in lines:
        if not line:
            continue
        fields = line.split(b"/")
        if len(fields) != 8 or fields[0] or fields[7]:
            raise BuildError(
                f"cannot parse debugfs directory listing line {line[:200]!r}",
                hint="a file name in the image may contain a line break",
            )
        name = fields[5]
        if name in (b".", b"..") or fields[1] == b"0":
            continue  # 0: an empty slot (lost+found has many), not an entry
        mode = int(fields[2], 8)
        out.append(
            DirEntry(
                name=os.fsdecode(name),
                ino=int(fields[1]),
                type=FileType.from_mode(mode),
                mode=mode & 0o7777,
                uid=int(fields[3]),
                gid=int(fields[4]),
                size=int(fields[6] or 0),
            )
        )
    return out


def _ls_dot(lines: Iterable[bytes]) -> DirEntry | None:
    """The '.' entry of an `ls -p` listing: the directory itself."""
    for line in lines:
        fields = line.split(b"/")
        if len(fields) == 8 and fields[5] == b".":
            mode = int(fields[2], 8)
            return DirEntry(".", int(fields[1]), FileType.from_mode(mode), mode & 0o7777,
                            int(fields[3]), int(fields[4]), 0)  # fmt: skip
    return None


_RE_HEAD = re.compile(rb"Inode:\s*(\d+)\s+Type:\s*(.+?)\s+Mode:\s*(\d+)")
_RE_OWNER = re.compile(rb"User:\s*(-?\d+)\s+Group:\s*(-?\d+)")
_RE_SIZE = re.compile(rb"Group:.*?Size:\s*(\d+)")
_RE_LINKS = re.compile(rb"Links:\s*(\d+)\s+Blockcount:\s*(\d+)")
_RE_ACL = re.compile(rb"File ACL:\s*(\d+)")
_RE_MTIME = re.compile(rb"^\s*mtime:\s*0x([0-9a-fA-F]+)", re.M)
_RE_DEV = re.compile(rb"Device major/minor number:\s*(\d+):(\d+)")
_RE_FASTLINK = re.compile(rb'^\s*Fast link dest:\s*"(.*)"\s*$', re.M)


def _parse_stat(path: str, text: bytes) -> Inode:
    head = _RE_HEAD.search(text)
    owner = _RE_OWNER.search(text)
    links = _RE_LINKS.search(text)
    size = _RE_SIZE.search(text)
    if not (head and owner and links and size):
        raise BuildError(f"cannot parse debugfs stat output for {path}: {text[:300]!r}")
    type_name = head[2].decode(errors="replace")
    if type_name not in _STAT_TYPES:
        raise BuildError(f"{path}: inode {int(head[1])} has a bad type ({type_name!r})")
    ftype = _STAT_TYPES[type_name]
    acl = _RE_ACL.search(text)
    mtime = _RE_MTIME.search(text)
    target = None
    if ftype is FileType.SYMLINK:
        fast = _RE_FASTLINK.search(text)
        if fast:
            target = os.fsdecode(fast[1])
    rdev = None
    if ftype in (FileType.CHAR, FileType.BLOCK):
        dev = _RE_DEV.search(text)
        if dev:
            rdev = (int(dev[1]), int(dev[2]))
    return Inode(
        path=path,
        ino=int(head[1]),
        type=ftype,
        mode=int(head[3], 8) & 0o7777,
        uid=int(owner[1]),
        gid=int(owner[2]),
        size=int(size[1]),
        mtime=int(mtime[1], 16) if mtime else 0,
        links=int(links[1]),
        target=target,
        rdev=rdev,
        xattr_block=int(acl[1]) if acl else 0,
        xattr_names=_stat_xattr_names(text),
        blocks_512=int(links[2]),
    )


def _stat_xattr_names(text: bytes) -> tuple[str, ...]:
    names: list[str] = []
    lines = text.split(b"\n")
    for i, line in enumerate(lines):
        if line.strip() == b"Extended attributes:":
            for attr in lines[i + 1 :]:
                if not attr.startswith(b"  "):
                    break
                m = re.match(rb"\s+(.+?) \(\d+\)", attr)
                if m:
                    names.append(os.fsdecode(m[1]))
            break
    return tuple(names)


def _parse_dumpe2fs(text: str) -> Ext4Info:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())

    def num(key: str, default: int | None = None) -> int:
        if key not in fields:
            if default is not None:
                return default
            raise BuildError(f"dumpe2fs output has no {key!r}", hint="is this an ext2/3/4 image?")
        return int(fields[key].split()[0])

    label = fields.get("Filesystem volume name", "")
    return Ext4Info(
        block_size=num("Block size"),
        block_count=num("Block count"),
        free_blocks=num("Free blocks"),
        reserved_blocks=num("Reserved block count", 0),
        inode_count=num("Inode count"),
        free_inodes=num("Free inodes"),
        inode_size=num("Inode size", 128),
        inodes_per_group=num("Inodes per group"),
        blocks_per_group=num("Blocks per group"),
        features=frozenset(fields.get("Filesystem features", "").split()),
        uuid=fields.get("Filesystem UUID", ""),
        label="" if label == "<none>" else label,
        state=fields.get("Filesystem state", ""),
    )


# ----------------------------------------------------------------------------- debugfs runner


@dataclass
class _Result:
    command: bytes
    out: list[bytes]
    err: list[bytes]

    def error_text(self) -> str:
        return "; ".join(e.decode(errors="replace").strip() for e in self.err if e.strip())


_BENIGN_OUT = re.compile(rb"^(Allocated inode: \d+|)$")


def _run_debugfs(
    image: Path,
    commands: Sequence[bytes],
    *,
    write: bool,
    epoch: int | None,
    groups: Sequence[object] | None = None,
    undo: Sequence[str] = (),
) -> list[_Result]:
    """Run commands in one debugfs process; return each command's stdout and stderr lines.

    A marker follows each command, or with `groups` only the last command of each run of
    equal group keys (one operation's commands), whose result then carries the group's errors.
    A first `params` command reports whether the file system opened (and read-write when
    asked); its stderr holds the open errors. Lines after the last marker are close errors.
    """
    for cmd in commands:
        if b"\n" in cmd or b"\r" in cmd or len(cmd) > _MAX_LINE:
            raise BuildError(f"internal: debugfs command cannot be scripted: {cmd[:120]!r}")
    lines = [b"params", *commands]
    keys: list[object] = [object(), *(groups if groups is not None else range(len(commands)))]
    parts = []
    for k, cmd in enumerate(lines):
        parts.append(cmd + b"\n")
        if k + 1 == len(lines) or keys[k] != keys[k + 1]:
            parts.append(b"%s%d\n" % (_MARK, k))
    args: list[str | Path] = ["debugfs", *undo]
    if write:
        args.append("-w")
    args += ["-f", "-", image]
    proc = run(args, input=b"".join(parts), env=_env(epoch), check=False)
    if proc.returncode < 0:
        raise ToolError(f"debugfs was killed (signal {-proc.returncode}) while working on {image}")
    stdout = proc.stdout or b""
    if b"Checksum errors in superblock" in stdout.split(b"debugfs: params", 1)[0]:
        raise BuildError(
            f"{image} has a bad superblock checksum",
            hint="the image is damaged; check the vendor package (e2fsck -fn)",
        )
    outs = _split_stdout(stdout.split(b"\n"), lines, image)
    errs, trailing = _split_stderr((proc.stderr or b"").split(b"\n"), len(lines))
    opened = b"\n".join(outs[0])
    if errs[0] or b"--none--" in opened or (write and b"read-write" not in opened):
        text = "; ".join(e.decode(errors="replace").strip() for e in errs[0]) or "not opened read-write"
        raise BuildError(
            f"debugfs could not open {image}: {text}",
            hint="check that the file is an ext2/3/4 image, writable, and not damaged (e2fsck -fn)",
        )
    if trailing:
        text = "; ".join(e.decode(errors="replace").strip() for e in trailing)
        raise BuildError(
            f"debugfs failed to write back {image}: {text}",
            hint="the image is now inconsistent and must be discarded",
        )
    return [_Result(cmd, o, e) for cmd, o, e in zip(commands, outs[1:], errs[1:], strict=True)]


_MARK_OUT = re.compile(rb"^debugfs: " + re.escape(_MARK) + rb"\d+$")
_MARK_ERR = re.compile(rb"^debugfs: Command not found " + re.escape(_MARK) + rb"(\d+)\s*$")


def _split_stdout(lines: list[bytes], commands: Sequence[bytes], image: Path) -> list[list[bytes]]:
    """Cut stdout at the echoed command lines (`debugfs: <line>`) and the markers."""
    blocks: list[list[bytes]] = []
    k, current = -1, None
    for line in lines:
        if k + 1 < len(commands) and line == b"debugfs: " + commands[k + 1]:
            k += 1
            current = []
            blocks.append(current)
        elif current is not None and _MARK_OUT.match(line):
            current = None
        elif current is not None:
            current.append(line)
    if len(blocks) != len(commands):
        raise ToolError(
            f"debugfs stopped after {len(blocks)} of {len(commands)} commands on {image}",
            hint="the image may be damaged: run `e2fsck -fn` on it",
        )
    return blocks


def _split_stderr(lines: list[bytes], count: int) -> tuple[list[list[bytes]], list[bytes]]:
    """Cut stderr at the markers: what comes before marker k belongs to command k."""
    blocks: list[list[bytes]] = [[] for _ in range(count)]
    pending: list[bytes] = []
    first = True
    for line in lines:
        m = _MARK_ERR.match(line)
        if m:
            blocks[int(m[1])] = pending
            pending, first = [], False
        elif not line.strip() or (first and re.match(rb"^debugfs \d", line)):
            continue  # blank, or the version banner
        else:
            pending.append(line)
    return blocks, pending


# ----------------------------------------------------------------------------- the image


_UNKNOWN = object()


class Ext4Image:
    """An ext4 file system in an image file, read and edited in place.

    `epoch` is the timestamp every edit, grow and shrink stamps into the image; reading needs none.
    """

    def __init__(self, path: Path | str, *, epoch: int | None = None, undo_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.epoch = epoch
        # With undo_dir, debugfs keeps the blocks it overwrites in undo files there (`-z`), in
        # order: `undo()` puts them back (e2undo, newest first). No grow, shrink or e2fsck -p then.
        self.undo_dir = undo_dir
        self.undo_files: list[Path] = []
        self._tools_writes: int | None = None  # s_kbytes_written as the last tool left it
        # stat results, valid while the image file is unchanged (see _stat_memo)
        self._memo: dict[str, Inode | None] = {}
        self._memo_key: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"Ext4Image({str(self.path)!r})"

    def undo_args(self) -> list[str]:
        """`-z FILE` for the next writing tool when undo files are kept, else nothing."""
        if self.undo_dir is None:
            return []
        f = self.undo_dir / f"{len(self.undo_files):03d}.e2undo"
        f.unlink(missing_ok=True)
        self.undo_files.append(f)
        return ["-z", str(f)]

    def lifetime_writes(self) -> int:
        """The superblock's s_kbytes_written (KiB written over the file system's life)."""
        with open(self.path, "rb") as f:
            f.seek(_SB_OFFSET)
            sb = f.read(_SB_SIZE)
        if len(sb) < _SB_SIZE or struct.unpack_from("<H", sb, _SB_MAGIC)[0] != 0xEF53:
            raise BuildError(f"{self.path} has no ext2/3/4 superblock")
        return int(struct.unpack_from("<Q", sb, _SB_KBYTES_WRITTEN)[0])

    def set_lifetime_writes(self, kib: int) -> None:
        """Set s_kbytes_written (and the superblock checksum). e2fsprogs adds each session's
        writes to it, and how much depends on the I/O path (an undo file counts): an edited
        image gets the vendor's value, so it is the same however it was edited."""
        with open(self.path, "r+b") as f:
            f.seek(_SB_OFFSET)
            sb = bytearray(f.read(_SB_SIZE))
            if len(sb) < _SB_SIZE or struct.unpack_from("<H", sb, _SB_MAGIC)[0] != 0xEF53:
                raise BuildError(f"{self.path} has no ext2/3/4 superblock")
            if self.undo_dir is not None and self._tools_writes is None:  # e2undo wants it back
                self._tools_writes = int(struct.unpack_from("<Q", sb, _SB_KBYTES_WRITTEN)[0])
            struct.pack_into("<Q", sb, _SB_KBYTES_WRITTEN, kib)
            if struct.unpack_from("<I", sb, _SB_RO_COMPAT)[0] & _RO_COMPAT_METADATA_CSUM:
                struct.pack_into("<I", sb, _SB_CHECKSUM, _crc32c(bytes(sb[:_SB_CHECKSUM])))
            f.seek(_SB_OFFSET)
            f.write(sb)
        self.forget()

    def _no_undo(self, tool: str) -> None:
        # resize2fs -z leaves an invalid resize inode (e2fsprogs 1.47); e2fsck -p's undo is
        # untested here: an image edited in place (undo_dir) must need neither.
        if self.undo_dir is not None:
            raise BuildError(f"internal: {tool} on {self.path}, an image edited in place with undo files")

    def undo(self, size: int) -> None:
        """Put back every block the tools overwrote (newest undo file first) and the file's size."""
        require_tools("e2undo")
        if self._tools_writes is not None:  # e2undo checks the superblock is as the tool left it
            undo_dir, self.undo_dir = self.undo_dir, None
            self.set_lifetime_writes(self._tools_writes)
            self.undo_dir, self._tools_writes = undo_dir, None
        for f in reversed(self.undo_files):
            if not f.exists():
                continue  # the tool stopped before writing anything
            proc = run(["e2undo", f, self.path], env=_env(None), check=False)
            if proc.returncode != 0:
                err = ((proc.stderr or b"") + (proc.stdout or b"")).decode(errors="replace").strip()
                raise BuildError(f"e2undo could not restore {self.path} from {f.name}: {err[-400:]}")
            f.unlink()
        self.undo_files.clear()
        os.truncate(self.path, size)
        self.forget()

    # -- reading ------------------------------------------------------------------------

    def _ready(self) -> None:
        require_e2fsprogs()
        if not self.path.is_file():
            raise BuildError(f"ext4 image {self.path} does not exist", hint="check the build's work folder")

    def info(self) -> Ext4Info:
        """Block/inode counts, features, UUID and label from the superblock."""
        self._ready()
        proc = run(["dumpe2fs", "-h", self.path], env=_env(None), check=False)
        if proc.returncode != 0:
            err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
            raise BuildError(
                f"{self.path} is not a readable ext2/3/4 image: {err[-1] if err else 'dumpe2fs failed'}",
                hint="check the partition's format in the package layout, or whether the image is damaged",
            )
        return _parse_dumpe2fs(proc.stdout.decode(errors="replace"))

    def free_bytes(self) -> int:
        """Free space in bytes (blocks reserved for root included: debugfs may use them)."""
        return self.info().free_bytes

    def _read_script(self, commands: Sequence[bytes]) -> list[_Result]:
        self._ready()
        return _run_debugfs(self.path, commands, write=False, epoch=None)

    def stat_many(self, paths: Iterable[str]) -> dict[str, Inode | None]:
        """`stat` several paths in one debugfs run; None for those that do not exist.

        The last component is not followed (lstat): a symlink is reported as a symlink.
        """
        keys = list(dict.fromkeys(paths))
        found = self._stat_raw([_join(_split(p)) for p in keys])
        return dict(zip(keys, found, strict=True))

    def _stat_memo(self) -> dict[str, Inode | None]:
        """Known stat results; dropped whenever the image file changed since they were read.

        Callers stat path after path (an overlay: one mkdir per folder); each debugfs run
        opens the whole file system, so known answers, and what follows from them (nothing
        exists below a missing path or a regular file), save one process per path.
        """
        try:
            st = os.stat(self.path)
            key: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            key = None
        if key is None or key != self._memo_key:
            self._memo = {}
            self._memo_key = key
        return self._memo

    def forget(self) -> None:
        """Drop remembered stat results (the image was or is about to be written)."""
        self._memo = {}
        self._memo_key = None

    def _known(self, memo: dict[str, Inode | None], path: str) -> tuple[bool, Inode | None]:
        """(True, answer) when memo answers path: directly, or because a parent is missing or a file."""
        if path in memo:
            return True, memo[path]
        parent = path
        while parent not in ("", "/"):
            parent = parent.rsplit("/", 1)[0]
            st = memo.get(parent or "/", _UNKNOWN)
            if st is _UNKNOWN:
                continue
            if st is None or (isinstance(st, Inode) and st.type not in (FileType.DIR, FileType.SYMLINK)):
                return True, None  # debugfs's namei: "File not found" / "not a directory"
            break  # an existing directory or a symlink: only debugfs can tell
        return False, None

    def _stat_raw(self, paths: Sequence[str]) -> list[Inode | None]:
        """stat paths as debugfs resolves them ('..' and symlinks in parents included)."""
        for p in paths:
            _check_scriptable(os.fsencode(p), p, "path")
        memo = self._stat_memo()
        ask = [p for p in dict.fromkeys(paths) if not self._known(memo, p)[0]]
        if ask:
            results = self._read_script([b"stat " + _q(p) for p in ask])
            for path, res in zip(ask, results, strict=True):
                if res.err:
                    if _is_not_found(res):
                        memo[path] = None
                        continue
                    raise BuildError(f"cannot stat {path} in {self.path}: {res.error_text()}")
                memo[path] = _parse_stat(path, b"\n".join(res.out))
        return [self._known(memo, p)[1] for p in paths]

    def stat(self, path: str) -> Inode | None:
        """The inode at path (lstat semantics), or None."""
        return self.stat_many([path])[path]

    def exists(self, path: str) -> bool:
        """True when something (a symlink included, even dangling) is at path."""
        return self.stat(path) is not None

    def readlink(self, path: str) -> str:
        st = self.stat(path)
        if st is None or st.type is not FileType.SYMLINK:
            raise BuildError(f"{path} is not a symlink in {self.path}")
        return self._link_target(st)

    def _link_target(self, st: Inode) -> str:
        if st.target is not None:
            return st.target  # a fast symlink: stat shows it
        return os.fsdecode(self._cat(st))  # a slow one keeps it in a data block

    def resolve(self, path: str) -> Inode | None:
        """Like stat, but follows symlinks (in the image's own namespace) to the final inode."""
        current = _join(_split(path))
        for _ in range(40):
            st = self._stat_raw([current])[0]
            if st is None or st.type is not FileType.SYMLINK:
                return st
            target = self._link_target(st)
            parent = posixpath.dirname(current)
            # debugfs resolves '..' itself; keep the joined path unnormalised.
            current = target if target.startswith("/") else f"{parent.rstrip('/')}/{target}"
        raise BuildError(f"{path}: too many levels of symbolic links in {self.path}")

    def _regular(self, path: str) -> Inode:
        st = self.resolve(path)
        if st is None:
            raise BuildError(f"{path} does not exist in {self.path}")
        if st.type is not FileType.FILE:
            raise BuildError(f"{path} is a {st.type.value}, not a regular file, in {self.path}")
        return st

    def _cat(self, st: Inode) -> bytes:
        self._ready()
        proc = run(["debugfs", "-R", f"cat <{st.ino}>", self.path], env=_env(None))
        _raise_on_stderr(proc.stderr, f"reading {st.path} from {self.path}")
        return proc.stdout

    def read_file(self, path: str, *, max_bytes: int = _MAX_READ) -> bytes:
        """The bytes of a (small) regular file; symlinks are followed."""
        st = self._regular(path)
        if st.size > max_bytes:
            raise BuildError(
                f"{path} in {self.path} is {st.size} bytes, too big to read into memory",
                hint="use read_to() to stream it to a file",
            )
        data = self._cat(st)
        if len(data) != st.size:
            raise BuildError(f"read {len(data)} of {st.size} bytes of {path} from {self.path}")
        return data

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read_file(path).decode(encoding)

    def read_to(self, path: str, dest: Path) -> Inode:
        """Stream a regular file out of the image into dest (debugfs dump); symlinks are followed."""
        st = self._regular(path)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        target = _q(os.fsencode(dest.absolute())).decode(errors="surrogateescape")
        proc = run(["debugfs", "-R", f"dump <{st.ino}> {target}", self.path], env=_env(None))
        _raise_on_stderr(proc.stderr, f"dumping {path} from {self.path}")
        if not dest.is_file() or dest.stat().st_size != st.size:
            raise BuildError(f"dumping {path} from {self.path} to {dest} gave a wrong size")
        return st

    def scandir(self, path: str) -> list[DirEntry]:
        """The entries of a directory (symlinks in the path followed), sorted by name."""
        return self.scandir_many([path])[path]

    def scandir_many(self, paths: Iterable[str]) -> dict[str, list[DirEntry]]:
        keys = list(dict.fromkeys(paths))
        norm = [_join(_split(p)) for p in keys]
        results = self._read_script([b"ls -p " + _q(_dot(p)) for p in norm])
        out = {}
        for key, path, res in zip(keys, norm, results, strict=True):
            if res.err:
                raise BuildError(f"cannot list {path} in {self.path}: {res.error_text()}")
            out[key] = sorted(_parse_ls_p(res.out), key=lambda e: os.fsencode(e.name))
        return out

    def listdir(self, path: str) -> list[str]:
        return [e.name for e in self.scandir(path)]

    def walk(self, top: str = "/") -> Iterator[tuple[str, list[DirEntry], list[DirEntry]]]:
        """(dirpath, subdirs, others) for top and every directory below, parents first.

        One debugfs run per tree level. Symlinks to directories are listed, not followed.
        """
        level = [_join(_split(top))]
        while level:
            listing = self.scandir_many(level)
            nxt = []
            for dirpath in level:
                entries = listing[dirpath]
                dirs = [e for e in entries if e.type is FileType.DIR]
                yield dirpath, dirs, [e for e in entries if e.type is not FileType.DIR]
                nxt += [posixpath.join(dirpath, e.name) for e in dirs]
            level = nxt

    def get_xattrs(self, path: str) -> dict[str, bytes]:
        """All extended attributes of the inode at path (not following a final symlink)."""
        st = self.stat(path)
        if st is None:
            raise BuildError(f"{path} does not exist in {self.path}")
        return self._get_xattr_values(st, st.xattr_names)

    def get_xattr(self, path: str, name: str) -> bytes | None:
        st = self.stat(path)
        if st is None:
            raise BuildError(f"{path} does not exist in {self.path}")
        if name not in st.xattr_names:
            return None
        return self._get_xattr_values(st, (name,))[name]

    def _get_xattr_values(self, st: Inode, names: Sequence[str]) -> dict[str, bytes]:
        if not names:
            return {}
        with tempfile.TemporaryDirectory(prefix="airbox-xattr-") as tmp:
            files = [Path(tmp) / str(i) for i in range(len(names))]
            cmds = [
                b"ea_get -f %s %s %s" % (_q(os.fsencode(f)), _ino_ref(st.ino), _q(n))
                for f, n in zip(files, names, strict=True)
            ]
            for name, res in zip(names, self._read_script(cmds), strict=True):
                if res.err:
                    raise BuildError(
                        f"cannot read xattr {name} of {st.path} in {self.path}: {res.error_text()}"
                    )
            return {n: f.read_bytes() for n, f in zip(names, files, strict=True)}

    # -- checking, growing, shrinking -----------------------------------------------------

    def check(self) -> None:
        """`e2fsck -fn`: the file system must be clean, else BuildError with e2fsck's report."""
        self._ready()
        proc = run(["e2fsck", "-fn", self.path], env=_env(None, e2fsck=True), check=False)
        if proc.returncode != 0:
            report = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            tail = "\n".join(report.splitlines()[-25:])
            raise BuildError(
                f"e2fsck found problems in {self.path} (exit {proc.returncode}):\n{tail}",
                hint="the image was damaged by an earlier step or is not a clean ext4 image",
            )

    def preen(self) -> int:
        """`e2fsck -f -p` (as the vendor does before shrinking); returns e2fsck's exit code (0 or 1)."""
        self._ready()
        epoch = _check_epoch(self.epoch, f"e2fsck on {self.path}")
        self.forget()
        self._no_undo("e2fsck -p")
        proc = run(["e2fsck", "-f", "-p", self.path], env=_env(epoch, e2fsck=True), check=False)
        if proc.returncode not in (0, 1):
            report = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            raise BuildError(
                f"e2fsck -f -p could not repair {self.path} (exit {proc.returncode}):\n"
                + "\n".join(report.splitlines()[-25:]),
                hint="the image is damaged beyond automatic repair; check the vendor package",
            )
        if proc.returncode == 1:
            log.warning("e2fsck -f -p corrected errors in %s", self.path)
        return proc.returncode

    def _resize(self, blocks: int | None) -> None:
        epoch = _check_epoch(self.epoch, f"resizing {self.path}")
        # A size without a unit is in file system blocks.
        args: list[str | Path] = ["-M", self.path] if blocks is None else [self.path, str(blocks)]
        self._no_undo("resize2fs")
        self.forget()
        for attempt in range(2):
            proc = run(["resize2fs", *args], env=_env(epoch), check=False)
            if proc.returncode == 0:
                return
            err = (proc.stderr or b"").decode(errors="replace")
            if attempt == 0 and "e2fsck -f" in err:
                self.preen()  # resize2fs insists on a freshly checked file system
                continue
            raise BuildError(
                f"resize2fs failed on {self.path} (exit {proc.returncode}): {err.strip()[-600:]}",
                hint="run `e2fsck -fn` on the image to see whether it is damaged",
            )

    def min_blocks(self) -> int:
        """`resize2fs -P`: the smallest block count resize2fs -M would shrink the file system to."""
        self._ready()
        proc = run(["resize2fs", "-P", self.path], env=_env(None), check=False)
        m = re.search(rb"minimum size of the filesystem:\s*(\d+)", proc.stdout or b"")
        if proc.returncode != 0 or not m:
            err = ((proc.stderr or b"") + (proc.stdout or b"")).decode(errors="replace").strip()
            raise BuildError(f"resize2fs -P failed on {self.path}: {err[-600:]}")
        return int(m[1])

    def grow_to(self, size_bytes: int, *, limit: int | None = None) -> Ext4Info:
        """Grow the file system (and the file, sparsely) to size_bytes; never shrinks, never past limit."""
        self._ready()
        if limit is not None and size_bytes > limit:
            raise BuildError(
                f"{self.path.name} would need {size_bytes} bytes, more than the partition's {limit}",
                hint="put less into this partition or make the partition bigger in the recipe",
            )
        info = self.info()
        blocks = size_bytes // info.block_size
        if blocks <= info.block_count:
            return info
        if self.path.stat().st_size < blocks * info.block_size:
            os.truncate(self.path, blocks * info.block_size)  # a hole: stays sparse
        self._resize(blocks)
        new = self.info()
        _same_features(info, new, self.path, "resize2fs")
        return new

    def grow_by(self, extra_bytes: int, *, limit: int | None = None) -> Ext4Info:
        info = self.info()
        return self.grow_to(info.size_bytes + max(0, extra_bytes), limit=limit)

    def shrink_to_min(self, *, passes: int = 3, floor_bytes: int | None = None) -> Ext4Info:
        """`e2fsck -f -p` then `resize2fs -M`, repeated while it still shrinks; the file is cut to fit.

        One `resize2fs -M` pass leaves slack after a grow; a second usually takes most of it.
        With `floor_bytes` (the size the vendor shrank the image to), it never goes below that:
        shrinking past the vendor's own minimum frees nothing worth having (free blocks are
        zeros: they compress to nothing) but moves blocks all over the image, so chunks that
        could have been kept byte for byte change. At or under the floor it does nothing.
        """
        self._ready()
        before = self.info()
        floor = 0 if floor_bytes is None else -(-floor_bytes // before.block_size)
        if floor and before.block_count <= floor:
            return before
        self.preen()
        info = before
        for _ in range(max(1, passes)):
            if floor:
                target = max(self.min_blocks(), floor)
                if target >= info.block_count:
                    break
                self._resize(target)
            else:
                self._resize(None)
            new = self.info()
            shrunk = new.block_count < info.block_count
            info = new
            if not shrunk:
                break
        size = info.block_count * info.block_size
        if self.path.stat().st_size > size:
            os.truncate(self.path, size)
        _same_features(before, info, self.path, "resize2fs -M")
        return info

    # -- space planning -----------------------------------------------------------------

    def bytes_needed_for(
        self, file_sizes: Iterable[int], *, dirs: int = 0, symlinks: int = 0, name_len: int = 48
    ) -> int:
        """A conservative estimate of the space a set of new files, dirs and symlinks takes."""
        info = self.info()
        sizes = list(file_sizes)
        est = _estimate(
            info.block_size,
            files=sizes,
            dirs=dirs,
            slow_symlinks=symlinks,
            entries={b"": [name_len] * (len(sizes) + dirs + symlinks)},
            xattr_inodes=0,
        )
        return est.bytes

    def ensure_room(self, need: SpaceEstimate, *, limit: int, headroom: int = 0) -> Ext4Info:
        """Grow (never past limit bytes) until need plus headroom bytes fit; BuildError if it cannot.

        Growth is just what is missing, plus the bitmaps and inode tables of the block groups it
        adds (a few per cent); missing inodes are bought as whole groups.
        """
        for _ in range(6):
            info = self.info()
            short_blocks = need.blocks + math.ceil(headroom / info.block_size) - info.free_blocks
            short_inodes = need.inodes - info.free_inodes
            if short_blocks <= 0 and short_inodes <= 0:
                return info
            if info.block_count >= limit // info.block_size:
                raise BuildError(
                    f"{self.path.name}: {need.bytes + headroom} bytes and {need.inodes} inodes do not fit "
                    f"even at the partition's full size ({limit} bytes; free {info.free_bytes} bytes, "
                    f"{info.free_inodes} inodes)",
                    hint="put less into this partition or make the partition bigger in the recipe",
                )
            table = math.ceil(info.inodes_per_group * info.inode_size / info.block_size) + 2
            usable = max(1, info.blocks_per_group - table - 1)
            extra = math.ceil(max(short_blocks, 0) * info.blocks_per_group / usable) + table + 16
            if short_inodes > 0:
                groups = math.ceil(short_inodes / info.inodes_per_group)
                extra = max(extra, groups * info.blocks_per_group)
            self.grow_to(min(info.size_bytes + extra * info.block_size, limit), limit=limit)
        raise BuildError(f"{self.path.name}: growing did not make room for {need.bytes + headroom} bytes")

    # -- editing --------------------------------------------------------------------------

    def edit(self, *, epoch: int | None = None) -> EditBatch:
        """A batch of edits, applied in one debugfs run by apply() or at the end of a with block."""
        return EditBatch(self, epoch=self.epoch if epoch is None else epoch)


def _dot(path: str) -> bytes:
    """A directory path that debugfs resolves through a final symlink too ('/lib' -> '/lib/.')."""
    return os.fsencode(path.rstrip("/") + "/.")


def _is_not_found(res: _Result) -> bool:
    """namei's ENOENT, or ENOTDIR for a path through a file: either way nothing is there."""
    return any(b"File not found" in e or b"inode is not a directory" in e for e in res.err)


def _raise_on_stderr(stderr: bytes | None, what: str) -> None:
    lines = [
        ln
        for ln in (stderr or b"").decode(errors="replace").splitlines()
        if ln.strip() and not re.match(r"^debugfs \d", ln)
    ]
    if lines:
        raise BuildError(f"debugfs failed {what}: {'; '.join(lines)[:600]}")


def _same_features(before: Ext4Info, after: Ext4Info, image: Path, tool: str) -> None:
    if before.features != after.features:
        added = sorted(after.features - before.features)
        removed = sorted(before.features - after.features)
        raise BuildError(
            f"{tool} changed the feature set of {image} (added {added}, removed {removed})",
            hint="the device's e2fsck 1.45 must be able to check it; report this as a bug",
        )


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


# ----------------------------------------------------------------------------- batches: operations


@dataclass(frozen=True)
class _Op:
    parts: tuple[bytes, ...]

    @property
    def path(self) -> str:
        return _join(self.parts)


@dataclass(frozen=True)
class _Mkdir(_Op):
    mode: int
    uid: int
    gid: int
    set_existing: bool  # mkdir: make an existing dir match; makedirs: leave it


@dataclass(frozen=True)
class _Write(_Op):
    src: Path
    size: int
    mode: int | None  # None: keep the replaced file's (else 0644 root:root)
    uid: int | None
    gid: int | None


@dataclass(frozen=True)
class _Symlink(_Op):
    target: bytes
    uid: int
    gid: int


@dataclass(frozen=True)
class _Mknod(_Op):
    kind: FileType
    major: int
    minor: int
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class _Remove(_Op):
    recursive: bool
    missing_ok: bool


@dataclass(frozen=True)
class _SetAttr(_Op):
    mode: int | None
    uid: int | None
    gid: int | None


@dataclass(frozen=True)
class _SetXattr(_Op):
    name: bytes
    value_file: Path
    size: int


@dataclass(frozen=True)
class _RmXattr(_Op):
    name: bytes


_XATTR_PREFIXES = (b"user.", b"trusted.", b"security.", b"system.")


def _check_owner(uid: int, gid: int) -> None:
    for v, what in ((uid, "uid"), (gid, "gid")):
        if not isinstance(v, int) or not 0 <= v < 1 << 32:
            raise BuildError(f"{what} {v!r} is not a valid owner id", hint="use 0..4294967295")


def _check_mode(mode: int, path: str) -> int:
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise BuildError(
            f"mode {mode!r} for {path} is not a permission mode", hint="use 0..0o7777, e.g. 0o644"
        )
    return mode


class EditBatch:
    """Edits to one image, recorded in order and applied in one debugfs run.

    Paths are absolute image paths. Missing parents of anything created are made 0755 root:root.
    Symlinks in parent paths are followed inside the image. Writing over an existing file,
    symlink or device replaces it (a symlink is replaced, not followed); over a directory is an
    error. Nothing touches the image until apply(); a failed apply leaves the image unusable
    (debugfs cannot roll back), so edit a work copy.
    """

    def __init__(self, image: Ext4Image, *, epoch: int | None) -> None:
        self.image = image
        self.epoch = epoch
        self._ops: list[_Op] = []
        self._staging: Path | None = None
        self._cleanup: weakref.finalize | None = None
        self._staged = 0
        self._applied = False

    def __enter__(self) -> EditBatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None and not self._applied:
                self.apply()
        finally:
            self.close()

    def close(self) -> None:
        """Remove staged bytes (write_bytes, xattr values)."""
        if self._cleanup is not None:
            self._cleanup()  # weakref.finalize: runs once, here or when the batch is collected
        self._staging = None

    def __len__(self) -> int:
        return len(self._ops)

    def _stage(self, data: bytes) -> Path:
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="airbox-ext4-"))
            # a batch dropped without close() (never applied, or a caller's error) still cleans up
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._staging), True)
        self._staged += 1
        f = self._staging / str(self._staged)
        f.write_bytes(data)
        return f

    # -- recording ------------------------------------------------------------------------

    def mkdir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> EditBatch:
        """Make sure a directory is at path with exactly this mode and owner (created if missing)."""
        parts = _split(path)
        _check_owner(uid, gid)
        self._ops.append(_Mkdir(parts, _check_mode(mode, path), uid, gid, set_existing=True))
        return self

    def makedirs(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> EditBatch:
        """Like `mkdir -p`: create what is missing (the leaf with mode/owner); existing dirs stay as is."""
        parts = _split(path)
        _check_owner(uid, gid)
        self._ops.append(_Mkdir(parts, _check_mode(mode, path), uid, gid, set_existing=False))
        return self

    def write(
        self,
        path: str,
        src: Path | str,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> EditBatch:
        """Copy the host file src to path, replacing what is there.

        mode/uid/gid left None keep those of the regular file being replaced (its xattrs are not
        kept), or are 0644 root:root for a new file. (On e2fsprogs 1.45 a kept uid/gid above
        65535 would be cut to 16 bits: give it explicitly there.)
        """
        parts = _split(path)
        if not parts:
            raise BuildError("cannot write a file over the image's root directory")
        _check_owner(uid or 0, gid or 0)
        src = Path(src).absolute()
        try:
            st = os.stat(src)
        except OSError as e:
            raise BuildError(f"cannot read {src} (to be written to {path}): {e.strerror}") from None
        if not statmod.S_ISREG(st.st_mode):
            raise BuildError(f"{src} (to be written to {path}) is not a regular file")
        _check_scriptable(os.fsencode(src), str(src), "host path")
        checked = None if mode is None else _check_mode(mode, path)
        self._ops.append(_Write(parts, src, st.st_size, checked, uid, gid))
        return self

    def write_bytes(
        self, path: str, data: bytes, mode: int | None = None, uid: int | None = None, gid: int | None = None
    ) -> EditBatch:
        """Write data to path (as write()); meant for small generated files."""
        return self.write(path, self._stage(data), mode, uid, gid)

    def write_text(
        self,
        path: str,
        text: str,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        encoding: str = "utf-8",
    ) -> EditBatch:
        return self.write_bytes(path, text.encode(encoding), mode, uid, gid)

    def symlink(self, path: str, target: str, uid: int = 0, gid: int = 0) -> EditBatch:
        """A symlink at path pointing to target (replacing what is there)."""
        parts = _split(path)
        if not parts:
            raise BuildError("cannot make the image's root directory a symlink")
        _check_owner(uid, gid)
        raw = os.fsencode(target)
        if not raw or len(raw) > _SYMLINK_MAX or any(c in raw for c in b"\r\n\0"):
            raise BuildError(
                f"symlink {path} -> {target!r}: the target must be 1..{_SYMLINK_MAX} bytes, no line break",
                hint="fix the symlink target",
            )
        self._ops.append(_Symlink(parts, raw, uid, gid))
        return self

    def mknod(
        self,
        path: str,
        kind: FileType | str,
        major: int = 0,
        minor: int = 0,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
    ) -> EditBatch:
        """A char/block device or FIFO at path (replacing what is there)."""
        parts = _split(path)
        kind = FileType(kind)
        if kind not in (FileType.CHAR, FileType.BLOCK, FileType.FIFO):
            raise BuildError(f"mknod {path}: {kind.value} is not a device or FIFO")
        if not (0 <= major <= 4095 and 0 <= minor <= 65535):
            raise BuildError(
                f"mknod {path}: device {major}:{minor} is out of range (debugfs: major<4096, minor<65536)"
            )
        _check_owner(uid, gid)
        self._ops.append(_Mknod(parts, kind, major, minor, _check_mode(mode, path), uid, gid))
        return self

    def whiteout(self, path: str) -> EditBatch:
        """An overlayfs whiteout (char device 0:0, mode 0) at path."""
        return self.mknod(path, FileType.CHAR, 0, 0, mode=0)

    def remove(self, path: str, *, recursive: bool = False, missing_ok: bool = False) -> EditBatch:
        """Remove a file, symlink or device; a directory (and everything in it) needs recursive=True."""
        parts = _split(path)
        if not parts:
            raise BuildError("cannot remove the image's root directory")
        self._ops.append(_Remove(parts, recursive, missing_ok))
        return self

    def chmod(self, path: str, mode: int) -> EditBatch:
        self._ops.append(_SetAttr(_split(path), _check_mode(mode, path), None, None))
        return self

    def chown(self, path: str, uid: int, gid: int) -> EditBatch:
        _check_owner(uid, gid)
        self._ops.append(_SetAttr(_split(path), None, uid, gid))
        return self

    def set_xattr(self, path: str, name: str, value: bytes | str) -> EditBatch:
        raw_name = name.encode()
        if (
            not raw_name.startswith(_XATTR_PREFIXES)
            or any(c in raw_name for c in b'\r\n\0 "')
            or len(raw_name) > 255
        ):
            raise BuildError(
                f"xattr name {name!r} for {path} is not valid",
                hint="use a name like user.x, trusted.overlay.opaque or security.capability",
            )
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._ops.append(_SetXattr(_split(path), raw_name, self._stage(data), len(data)))
        return self

    def remove_xattr(self, path: str, name: str) -> EditBatch:
        self._ops.append(_RmXattr(_split(path), name.encode()))
        return self

    def copy_tree(
        self,
        host_dir: Path | str,
        dest: str,
        *,
        uid: int = 0,
        gid: int = 0,
        dir_mode: int | None = None,
        file_mode: int | None = None,
    ) -> EditBatch:
        """Copy a host tree into dest (merged): files and symlinks replace, existing dirs are kept.

        Modes come from the host (or dir_mode/file_mode); every new inode gets uid:gid. The walk
        is sorted. Hard links become separate copies; sockets, FIFOs and devices are refused.
        """
        host_dir = Path(host_dir)
        if not host_dir.is_dir():
            raise BuildError(f"{host_dir} (to be copied to {dest}) is not a directory")
        _check_owner(uid, gid)
        base = _split(dest)
        top_mode = dir_mode if dir_mode is not None else statmod.S_IMODE(host_dir.stat().st_mode)
        self._ops.append(_Mkdir(base, top_mode, uid, gid, set_existing=False))
        for root, dirnames, filenames in _sorted_walk(host_dir):
            rel = Path(root).relative_to(host_dir)
            dparts = base + tuple(os.fsencode(p) for p in rel.parts)
            for name in dirnames:
                st = os.lstat(Path(root) / name)
                parts = (*dparts, os.fsencode(name))
                _check_name(parts[-1], str(Path(root) / name), "host path")
                mode = dir_mode if dir_mode is not None else statmod.S_IMODE(st.st_mode)
                self._ops.append(_Mkdir(parts, mode, uid, gid, set_existing=False))
            for name in filenames:
                src = Path(root) / name
                image_path = _join((*dparts, os.fsencode(name)))
                st = os.lstat(src)
                if statmod.S_ISLNK(st.st_mode):
                    self.symlink(image_path, os.readlink(src), uid, gid)
                elif statmod.S_ISREG(st.st_mode):
                    mode = file_mode if file_mode is not None else statmod.S_IMODE(st.st_mode)
                    self.write(image_path, src, mode, uid, gid)
                else:
                    raise BuildError(
                        f"{src} is a socket, FIFO or device; copy_tree copies only files, dirs and symlinks",
                        hint="remove it from the tree to copy",
                    )
        return self

    # -- identity ---------------------------------------------------------------------------

    def sources(self) -> list[Path]:
        """The host files whose bytes the batch puts into the image (contents and xattr values)."""
        return [
            op.src if isinstance(op, _Write) else op.value_file
            for op in self._ops
            if isinstance(op, (_Write, _SetXattr))
        ]

    def fingerprint(self, digest: Callable[[Path], str]) -> str:
        """What the batch does, by content: the same operations in the same order with the same
        bytes (`digest` of each host file) give the same value, wherever those files are."""
        h = hashlib.sha256()
        for op in self._ops:
            record: list[object] = [type(op).__name__]
            for f in dataclasses.fields(op):
                v = getattr(op, f.name)
                if f.name == "parts":
                    v = b"/".join(v).hex()
                elif isinstance(v, Path):
                    v = digest(v)
                elif isinstance(v, bytes):
                    v = v.hex()
                elif isinstance(v, enum.Enum):
                    v = v.value
                record.append(v)
            h.update(json.dumps(record).encode())
            h.update(b"\n")
        return h.hexdigest()

    def retarget(self, image: Ext4Image) -> None:
        """Apply to `image` instead (a work copy of the image the batch was recorded against)."""
        if self._applied:
            raise BuildError("this edit batch was already applied")
        self.image = image

    # -- planning and applying -------------------------------------------------------------

    def estimate(self) -> SpaceEstimate:
        """What the batch allocates at most (replaced and removed files not credited)."""
        block_size = self.image.info().block_size
        files, dirs, slow, fast, nodes, xattr_inodes = [], 0, 0, 0, 0, set()
        entries: dict[bytes, list[int]] = {}
        made = {op.parts for op in self._ops if isinstance(op, (_Write, _Mkdir, _Symlink, _Mknod))}
        parents = {op.parts[:i] for op in self._ops for i in range(1, len(op.parts))} - made
        for parts in parents:  # a parent may have to be made: count it as new
            entries.setdefault(b"/".join(parts[:-1]), []).append(len(parts[-1]))
        dirs += len(parents)
        for op in self._ops:
            if isinstance(op, (_Write, _Mkdir, _Symlink, _Mknod)) and op.parts:
                entries.setdefault(b"/".join(op.parts[:-1]), []).append(len(op.parts[-1]))
            if isinstance(op, _Write):
                files.append(op.size)
            elif isinstance(op, _Mkdir):
                dirs += 1
            elif isinstance(op, _Symlink):
                if len(op.target) > _FAST_SYMLINK_MAX:
                    slow += 1
                else:
                    fast += 1
            elif isinstance(op, _Mknod):
                nodes += 1
            elif isinstance(op, _SetXattr):
                xattr_inodes.add(op.parts)
        return _estimate(
            block_size,
            files=files,
            dirs=dirs,
            slow_symlinks=slow,
            fast_symlinks=fast,
            nodes=nodes,
            entries=entries,
            xattr_inodes=len(xattr_inodes),
        )

    def apply(self) -> EditSummary:
        """Plan against the image and run the whole batch in one `debugfs -w`; raise on any error.

        Errors found while planning (bad paths, no room) leave the image untouched, and the batch
        can be applied again after the cause is fixed (e.g. after ensure_room()).
        """
        if self._applied:
            raise BuildError("this edit batch was already applied")
        epoch = _check_epoch(self.epoch, f"editing {self.image.path}")
        self.image._ready()
        info = self.image.info()
        if "needs_recovery" in info.features or info.state not in ("clean",):
            self.image.preen()
            info = self.image.info()
        if not self._ops:
            self._applied = True
            return EditSummary(0, 0, 0, 0)
        planner = _Planner(self.image, info, epoch)
        planner.plan(self._ops)
        planner.check_space(self.estimate())
        self._applied = True  # from here on the image changes
        self.image.forget()
        planner.release_xattr_blocks(lambda: self._stage(b""))
        commands = planner.expand()
        results = _run_debugfs(
            self.image.path,
            [c.line for c in commands],
            write=True,
            epoch=epoch,
            groups=[c.path for c in commands],
            undo=self.image.undo_args(),
        )
        failed = [k for k, r in enumerate(results) if r.err or any(not _BENIGN_OUT.match(o) for o in r.out)]
        if failed:
            raise _edit_error(self.image.path, commands, results, failed)
        self.image.forget()
        if info.features & {"quota", "project"}:
            self.image.preen()  # debugfs does not account quota usage; e2fsck does
        self.close()
        log.debug(
            "ext4 %s: %d commands, %d created, %d removed", self.image.path.name, len(commands),
            planner.created, planner.removed,
        )  # fmt: skip
        return EditSummary(len(commands), planner.created, planner.removed, planner.runs + 1)


def _edit_error(image: Path, commands: list[_Cmd], results: list[_Result], failed: list[int]) -> BuildError:
    """Name each failing operation's path, its debugfs commands and what debugfs said."""
    groups: dict[int, str] = {}
    for k in failed:
        start = k
        while start > 0 and commands[start - 1].path == commands[k].path:
            start -= 1
        said = [results[k].error_text()] + [
            o.decode(errors="replace") for i in range(start, k + 1) for o in results[i].out if o.strip()
        ]
        said = [t for t in said if t and not t.startswith("Allocated inode")]
        lines = "; ".join(c.line.decode(errors="replace")[:160] for c in commands[start : k + 1])
        groups.setdefault(
            start, f"  {commands[k].path}: {'; '.join(said)[:400]}\n      (debugfs: {lines[:400]})"
        )
    shown = list(groups.values())
    more = f"\n  ... and {len(shown) - 8} more" if len(shown) > 8 else ""
    first = commands[min(groups)].path
    return BuildError(
        f"debugfs failed editing {image.name} at {first}:\n" + "\n".join(shown[:8]) + more,
        hint="the image is now inconsistent and must be discarded; fix the cause (space, paths) and rebuild",
        where=f"{image}:{first}",
    )


def _sorted_walk(top: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk with a byte-wise sorted, deterministic order; symlinks to dirs are files here."""
    for root, dirnames, filenames in os.walk(top):
        real_dirs, others = [], list(filenames)
        for d in dirnames:
            (others if os.path.islink(os.path.join(root, d)) else real_dirs).append(d)
        real_dirs.sort(key=os.fsencode)
        dirnames[:] = real_dirs
        yield root, list(real_dirs), sorted(others, key=os.fsencode)


# ----------------------------------------------------------------------------- the planner


@dataclass(eq=False)
class _Node:
    """A directory in the model: existing (ino known) or created by this batch."""

    ino: int | None
    entries: dict[bytes, _Entry]
    parent: _Node | None = None
    name: bytes = b""
    removed: bool = False


@dataclass(eq=False)
class _Entry:
    type: FileType
    ino: int | None  # None: created by this batch
    mode: int  # permission bits
    uid: int
    gid: int
    node: _Node | None = None  # directories created by this batch
    dead: bool = False  # created and removed again by this batch


@dataclass(frozen=True)
class _Cmd:
    line: bytes
    path: str  # the image path the caller named, for errors
    xattr_of: _Entry | None = None  # xattr edits: dropped when their inode goes in this batch


@dataclass
class _RemoveExisting:
    """Placeholder: remove an existing inode (a tree for directories), expanded after queries."""

    parent: _Node
    name: bytes
    entry: _Entry
    path: str
    children: dict[bytes, _Entry] | None  # the model's view when known, else queried


@dataclass
class _Unlink:
    """One name to remove, in order (children before their directory)."""

    parent_ino: int | None
    parent_node: _Node | None  # for directories made by this batch
    name: bytes
    entry: _Entry
    path: str
    last: bool = False  # the inode's last link: it is freed


class _Planner:
    """Turns a batch's operations into debugfs commands, checked against the image first."""

    def __init__(self, image: Ext4Image, info: Ext4Info, epoch: int) -> None:
        self.image = image
        self.info = info
        self.epoch = epoch
        self.large_inodes = info.inode_size > 128
        self.nodes: dict[int, _Node] = {}
        self.listed: dict[bytes, _Node | None] = {}  # textual dir path -> node (None: not a dir)
        self.items: list[_Cmd | _RemoveExisting] = []
        self.cwd: _Node | None = None
        self.touched: dict[int, _Node] = {}
        self.created = 0
        self.removed = 0
        self.runs = 0
        self.freed_blocks = 0
        self.freed_inodes = 0
        self.stats: dict[int, Inode] = {}
        self.listings: dict[int, list[DirEntry]] = {}
        self.unlinks: dict[int, int] = {}  # existing inode -> names removed so far
        self.steps: dict[int, list[_Unlink]] = {}  # id(_RemoveExisting) -> its unlinks
        self.dead_inos: set[int] = set()  # existing inodes this batch frees
        self.xattr_blocks: dict[int, int] = {}  # freed inode -> its xattr block, after copy-on-write
        self.empty_file = Path()
        self.root_entry = _Entry(FileType.DIR, 2, 0o755, 0, 0)  # replaced by the real one when listed
        self.walk_cache: dict[tuple[bytes, ...], _Node] = {}

    # -- queries -------------------------------------------------------------------------

    def _query(self, commands: list[bytes]) -> list[_Result]:
        self.runs += 1
        return _run_debugfs(self.image.path, commands, write=False, epoch=None)

    def root(self) -> _Node:
        node = self.listed[b"/"]
        assert node is not None
        return node

    def _list_ancestors(self, ops: Sequence[_Op]) -> None:
        """List every directory the operations' paths go through (and mkdir targets), in one run."""
        paths: dict[bytes, None] = {b"/": None}
        for op in ops:
            for i in range(1, len(op.parts) + isinstance(op, _Mkdir)):
                paths[_raw_path(op.parts[:i])] = None
        order = list(paths)
        results = self._query([b"ls -p " + _q(p.rstrip(b"/") + b"/.") for p in order])
        for p, res in zip(order, results, strict=True):
            if res.err:
                self.listed[p] = None
                continue
            dot = _ls_dot(res.out)
            if dot is None:
                raise BuildError(f"cannot read directory {os.fsdecode(p)} of {self.image.path}")
            ino = dot.ino
            if p == b"/":
                self.root_entry = _Entry(FileType.DIR, ino, dot.mode, dot.uid, dot.gid)
            node = self.nodes.get(ino)
            if node is None:
                entries = {
                    os.fsencode(e.name): _Entry(e.type, e.ino, e.mode, e.uid, e.gid)
                    for e in _parse_ls_p(res.out)
                }
                node = self.nodes[ino] = _Node(ino, entries)
            self.listed[p] = node
        if self.listed[b"/"] is None:
            raise BuildError(f"cannot read the root directory of {self.image.path}")

    # -- walking the model ---------------------------------------------------------------------

    def _walk(self, parts: Sequence[bytes], *, create: bool, path: str) -> _Node | None:
        """The directory node at parts, creating missing ones (0755 root:root) when asked."""
        key = tuple(parts)
        cached = self.walk_cache.get(key)
        if cached is not None:
            return cached
        node = self._walk_uncached(parts, create=create, path=path)
        if node is not None:
            self.walk_cache[key] = node
        return node

    def _walk_uncached(self, parts: Sequence[bytes], *, create: bool, path: str) -> _Node | None:
        node = self.root()
        for i, name in enumerate(parts):
            here = _join(parts[: i + 1])
            entry = node.entries.get(name)
            if entry is None:
                if not create:
                    return None
                entry = self._create_dir(node, name, 0o755, 0, 0, path)
            if entry.type is FileType.DIR:
                node = self._dir_node(entry, here)
            elif entry.type is FileType.SYMLINK:
                if entry.ino is None:
                    raise BuildError(
                        f"{path}: its parent {here} is a symlink made in the same edit batch",
                        hint="apply the batch that makes the symlink first, or use the real path",
                    )
                target = self.listed.get(_raw_path(parts[: i + 1]))
                if target is None:
                    raise BuildError(
                        f"{path}: its parent {here} is a symlink that leads to no directory in the image",
                        where=str(self.image.path),
                    )
                if target.removed:
                    raise BuildError(f"{path}: {here} leads to a directory this batch removes")
                node = target
            else:
                raise BuildError(
                    f"{path}: its parent {here} is a {entry.type.value}, not a directory",
                    hint="remove it first in the same batch, or pick another path",
                    where=str(self.image.path),
                )
        return node

    def _dir_node(self, entry: _Entry, here: str) -> _Node:
        if entry.node is not None:
            return entry.node
        assert entry.ino is not None
        node = self.nodes.get(entry.ino)
        if node is None:
            raise BuildError(f"internal: directory {here} was not read before planning")
        entry.node = node
        return node

    def _lookup(self, op: _Op, *, required: bool) -> tuple[_Node, bytes, _Entry | None]:
        parent = self._walk(op.parts[:-1], create=False, path=op.path)
        entry = parent.entries.get(op.parts[-1]) if parent is not None and op.parts else None
        if entry is None and required:
            raise BuildError(
                f"{op.path} does not exist in {self.image.path.name}", where=str(self.image.path)
            )
        if parent is None:
            parent = self.root()
        return parent, op.parts[-1] if op.parts else b"", entry

    # -- emitting ------------------------------------------------------------------------

    def _emit(self, line: bytes, path: str, xattr_of: _Entry | None = None) -> None:
        self.items.append(_Cmd(line, path, xattr_of))

    def _cd(self, node: _Node, path: str) -> None:
        if node is self.cwd:
            return
        if node.ino is not None:
            self._emit(b"cd " + _ino_ref(node.ino), path)
        else:
            assert node.parent is not None
            self._cd(node.parent, path)
            self._emit(b"cd " + _q(b"./" + node.name), path)
        self.cwd = node

    def _ref(self, parent: _Node, name: bytes, entry: _Entry, path: str) -> bytes:
        """How a command names an inode: <ino> when it exists, else ./name after a cd to its parent."""
        if entry.ino is not None:
            return _ino_ref(entry.ino)
        self._cd(parent, path)
        return _q(b"./" + name)

    def _set_times(self, ref: bytes, path: str, fields: Sequence[bytes]) -> None:
        for f in fields:
            if self.large_inodes:
                self._emit(b"sif %s %s_extra 0" % (ref, f), path)
            self._emit(b"sif %s %s @%d" % (ref, f, self.epoch), path)

    def _new_inode_attrs(self, ref: bytes, entry: _Entry, made_mode: int, path: str) -> None:
        """Mode and owner of an inode just made; its times are already the epoch.

        libext2fs stamps new inodes (atime, mtime, ctime, crtime; nanoseconds 0) with
        E2FSPROGS_FAKE_TIME, so no set_inode_field is needed for them. made_mode is the
        permission the debugfs command gives (mkdir 0755, symlink 0777, write: the host file's).
        """
        if entry.mode != made_mode:
            self._emit(b"sif %s mode 0%o" % (ref, entry.type.bits | entry.mode), path)
        if entry.uid:
            self._emit(b"sif %s uid %d" % (ref, entry.uid), path)
        if entry.gid:
            self._emit(b"sif %s gid %d" % (ref, entry.gid), path)

    def _touch(self, node: _Node) -> None:
        if node.ino is not None:
            self.touched[node.ino] = node

    def _create(
        self, parent: _Node, name: bytes, line: bytes, entry: _Entry, path: str, made_mode: int
    ) -> _Entry:
        self._cd(parent, path)
        self._emit(line, path)
        parent.entries[name] = entry
        self._touch(parent)
        self.created += 1
        self._new_inode_attrs(_q(b"./" + name), entry, made_mode, path)
        return entry

    def _create_dir(self, parent: _Node, name: bytes, mode: int, uid: int, gid: int, path: str) -> _Entry:
        node = _Node(None, {}, parent=parent, name=name)
        entry = _Entry(FileType.DIR, None, mode, uid, gid, node=node)
        # ext2fs_mkdir makes 0777 & ~fs->umask (022, fixed in libext2fs): 0755
        return self._create(parent, name, b"mkdir " + _q(name), entry, path, 0o755)

    def _clear_for_new(self, parent: _Node, name: bytes, path: str) -> None:
        entry = parent.entries.get(name)
        if entry is None:
            return
        if entry.type is FileType.DIR:
            raise BuildError(
                f"{path} is a directory in {self.image.path.name}; refusing to replace it with a non-dir",
                hint="remove it first (remove(path, recursive=True)) if that is intended",
                where=str(self.image.path),
            )
        self._remove_entry(parent, name, entry, path)

    def _remove_entry(self, parent: _Node, name: bytes, entry: _Entry, path: str) -> None:
        del parent.entries[name]
        self.walk_cache.clear()
        self._touch(parent)
        if entry.ino is None:
            self._remove_new(parent, name, entry, path)
            return
        children = None
        if entry.type is FileType.DIR:
            node = self.nodes.get(entry.ino)
            if node is not None:
                children = dict(node.entries)
            self._mark_removed(entry)
        self.items.append(_RemoveExisting(parent, name, entry, path, children))
        self.cwd = None  # the expansion moves around

    def _mark_removed(self, entry: _Entry) -> None:
        node = entry.node or (self.nodes.get(entry.ino) if entry.ino is not None else None)
        if node is None or node.removed:
            return
        node.removed = True
        for child in node.entries.values():
            if child.type is FileType.DIR:
                self._mark_removed(child)

    def _remove_new(self, parent: _Node, name: bytes, entry: _Entry, path: str) -> None:
        """Remove an inode this batch created (its tree, for a directory)."""
        if entry.type is FileType.DIR:
            assert entry.node is not None
            entry.node.removed = True
            for cname in sorted(entry.node.entries):
                child = entry.node.entries[cname]
                self._remove_entry(entry.node, cname, child, path + "/" + os.fsdecode(cname))
        self._cd(parent, path)
        entry.dead = True  # its xattr edits are dropped: they could leave an xattr block behind
        self._emit((b"rmdir " if entry.type is FileType.DIR else b"rm ") + _q(name), path)
        self.created -= 1

    # -- operations ----------------------------------------------------------------------

    def plan(self, ops: Sequence[_Op]) -> None:
        self._list_ancestors(ops)
        for op in ops:
            handler = getattr(self, f"_op_{type(op).__name__.lstrip('_').lower()}")
            handler(op)
        for ino in sorted(self.touched):
            node = self.touched[ino]
            if not node.removed:
                self._set_times(_ino_ref(ino), "(directory times)", (b"mtime", b"ctime"))
        self._query_removals()
        self._order_removals()

    def _parent_for_new(self, op: _Op) -> tuple[_Node, bytes]:
        parent = self._walk(op.parts[:-1], create=True, path=op.path)
        assert parent is not None
        return parent, op.parts[-1]

    def _op_mkdir(self, op: _Mkdir) -> None:
        if not op.parts:
            if op.set_existing:
                self._set_existing_attrs(self.root(), b"", self.root_entry, op)
            return
        parent, name = self._parent_for_new(op)
        entry = parent.entries.get(name)
        if entry is None:
            self._create_dir(parent, name, op.mode, op.uid, op.gid, op.path)
            return
        is_dir_link = entry.type is FileType.SYMLINK and self.listed.get(_raw_path(op.parts)) is not None
        if is_dir_link and entry.ino is not None and not op.set_existing:
            return  # makedirs of an existing symlink to a directory: it exists
        if entry.type is not FileType.DIR:
            raise BuildError(
                f"cannot make directory {op.path}: a {entry.type.value} is there",
                hint="remove it first in the same batch, or pick another path",
                where=str(self.image.path),
            )
        if op.set_existing:
            self._set_existing_attrs(parent, name, entry, op)

    def _set_existing_attrs(self, parent: _Node, name: bytes, entry: _Entry, op: _Mkdir | _SetAttr) -> None:
        changes = []
        if op.mode is not None and op.mode != entry.mode:
            changes.append(b"mode 0%o" % (entry.type.bits | op.mode))
            entry.mode = op.mode
        # ls -p shows 16-bit ids on e2fsprogs 1.45: set large ones unconditionally.
        if op.uid is not None and (op.uid != entry.uid or op.uid > 0xFFFF):
            changes.append(b"uid %d" % op.uid)
            entry.uid = op.uid
        if op.gid is not None and (op.gid != entry.gid or op.gid > 0xFFFF):
            changes.append(b"gid %d" % op.gid)
            entry.gid = op.gid
        if not changes:
            return
        ref = self._ref(parent, name, entry, op.path)
        for change in changes:
            self._emit(b"sif %s %s" % (ref, change), op.path)
        if entry.ino is not None:
            self._set_times(ref, op.path, (b"ctime",))

    def _op_write(self, op: _Write) -> None:
        parent, name = self._parent_for_new(op)
        old = parent.entries.get(name)
        keep = (
            old if old is not None and old.type is FileType.FILE else _Entry(FileType.FILE, None, 0o644, 0, 0)
        )
        mode = keep.mode if op.mode is None else op.mode
        uid = keep.uid if op.uid is None else op.uid
        gid = keep.gid if op.gid is None else op.gid
        self._clear_for_new(parent, name, op.path)
        try:
            host_mode = statmod.S_IMODE(os.stat(op.src).st_mode)  # debugfs write copies it
        except OSError as e:
            raise BuildError(f"cannot read {op.src} (to be written to {op.path}): {e.strerror}") from None
        line = b"write %s %s" % (_q(os.fsencode(op.src)), _q(name))
        self._create(parent, name, line, _Entry(FileType.FILE, None, mode, uid, gid), op.path, host_mode)

    def _op_symlink(self, op: _Symlink) -> None:
        parent, name = self._parent_for_new(op)
        self._clear_for_new(parent, name, op.path)
        line = b"symlink %s %s" % (_q(name), _q(op.target))
        self._create(
            parent, name, line, _Entry(FileType.SYMLINK, None, 0o777, op.uid, op.gid), op.path, 0o777
        )

    def _op_mknod(self, op: _Mknod) -> None:
        parent, name = self._parent_for_new(op)
        self._clear_for_new(parent, name, op.path)
        if op.kind is FileType.FIFO:
            line = b"mknod %s p" % _q(name)
        else:
            line = b"mknod %s %s %d %d" % (
                _q(name),
                b"c" if op.kind is FileType.CHAR else b"b",
                op.major,
                op.minor,
            )
        self._create(parent, name, line, _Entry(op.kind, None, op.mode, op.uid, op.gid), op.path, 0)

    def _op_remove(self, op: _Remove) -> None:
        parent, name, entry = self._lookup(op, required=not op.missing_ok)
        if entry is None:
            return
        if entry.type is FileType.DIR and not op.recursive:
            raise BuildError(
                f"{op.path} is a directory; removing it needs recursive=True",
                where=str(self.image.path),
            )
        self._remove_entry(parent, name, entry, op.path)

    def _op_setattr(self, op: _SetAttr) -> None:
        parent, name, entry = self._resolve_existing(op)
        self._set_existing_attrs(parent, name, entry, op)

    def _op_setxattr(self, op: _SetXattr) -> None:
        parent, name, entry = self._resolve_existing(op)
        ref = self._ref(parent, name, entry, op.path)
        line = b"ea_set -f %s %s %s" % (_q(os.fsencode(op.value_file)), ref, _q(op.name))
        self._emit(line, op.path, xattr_of=entry)
        if entry.ino is not None:
            self._set_times(ref, op.path, (b"ctime",))

    def _op_rmxattr(self, op: _RmXattr) -> None:
        parent, name, entry = self._resolve_existing(op)
        ref = self._ref(parent, name, entry, op.path)
        self._emit(b"ea_rm %s %s" % (ref, _q(op.name)), op.path, xattr_of=entry)
        if entry.ino is not None:
            self._set_times(ref, op.path, (b"ctime",))

    def _resolve_existing(self, op: _Op) -> tuple[_Node, bytes, _Entry]:
        if not op.parts:
            return self.root(), b"", self.root_entry
        parent, name, entry = self._lookup(op, required=True)
        assert entry is not None
        return parent, name, entry

    # -- removing existing trees --------------------------------------------------------------

    def _query_removals(self) -> None:
        """Stat every existing inode to be removed and list the existing directories among them."""
        to_stat: set[int] = set()
        to_list: set[int] = set()

        def visit(entry: _Entry, children: dict[bytes, _Entry] | None) -> None:
            if entry.ino is None:
                if entry.node is not None:
                    for child in entry.node.entries.values():
                        visit(child, None)
                return
            to_stat.add(entry.ino)
            if entry.type is FileType.DIR:
                if children is None:
                    node = self.nodes.get(entry.ino)
                    children = None if node is None else node.entries
                if children is None:
                    to_list.add(entry.ino)
                else:
                    for child in children.values():
                        visit(child, None)

        for item in self.items:
            if isinstance(item, _RemoveExisting):
                visit(item.entry, item.children)
        while to_stat or to_list:
            stat_inos, list_inos = sorted(to_stat - set(self.stats)), sorted(to_list - set(self.listings))
            to_stat, to_list = set(), set()
            if not stat_inos and not list_inos:
                break
            cmds = [b"stat " + _ino_ref(i) for i in stat_inos] + [b"ls -p " + _ino_ref(i) for i in list_inos]
            results = self._query(cmds)
            for ino, res in zip(stat_inos, results[: len(stat_inos)], strict=True):
                if res.err:
                    raise BuildError(f"cannot stat inode {ino} of {self.image.path}: {res.error_text()}")
                self.stats[ino] = _parse_stat(f"<{ino}>", b"\n".join(res.out))
            for ino, res in zip(list_inos, results[len(stat_inos) :], strict=True):
                if res.err:
                    raise BuildError(
                        f"cannot list directory inode {ino} of {self.image.path}: {res.error_text()}"
                    )
                entries = _parse_ls_p(res.out)
                self.listings[ino] = entries
                for e in entries:
                    to_stat.add(e.ino)
                    if e.type is FileType.DIR:
                        to_list.add(e.ino)

    def _order_removals(self) -> None:
        """Flatten each removal into unlinks (children first) and find which inodes get freed."""
        for item in self.items:
            if isinstance(item, _RemoveExisting):
                steps: list[_Unlink] = []
                self._flatten(
                    steps, item.parent.ino, item.parent, item.name, item.entry, item.path, item.children
                )
                self.steps[id(item)] = steps
        for steps in self.steps.values():
            for step in steps:
                ino = step.entry.ino
                if ino is None:
                    step.entry.dead = True
                    continue
                st = self.stats[ino]
                self.unlinks[ino] = self.unlinks.get(ino, 0) + 1
                step.last = st.type is FileType.DIR or self.unlinks[ino] >= st.links
                if step.last:
                    self.dead_inos.add(ino)
                    self.removed += 1
                    self.freed_inodes += 1
                    self.freed_blocks += st.blocks_512 * 512 // self.info.block_size

    def _flatten(
        self,
        out: list[_Unlink],
        parent_ino: int | None,
        parent_node: _Node | None,
        name: bytes,
        entry: _Entry,
        path: str,
        children: dict[bytes, _Entry] | None,
    ) -> None:
        if entry.type is FileType.DIR:
            if entry.ino is None:
                assert entry.node is not None
                children, node = entry.node.entries, entry.node
            else:
                node = None
                if children is None:
                    known = self.nodes.get(entry.ino)
                    children = known.entries if known is not None else {
                        os.fsencode(e.name): _Entry(e.type, e.ino, e.mode, e.uid, e.gid)
                        for e in self.listings[entry.ino]
                    }  # fmt: skip
            for cname in sorted(children):
                self._flatten(
                    out, entry.ino, node, cname, children[cname], f"{path}/{os.fsdecode(cname)}", None
                )
        out.append(_Unlink(parent_ino, parent_node, name, entry, path))

    def release_xattr_blocks(self, empty_file: Callable[[], Path]) -> None:
        """Make the xattr block of every inode to be freed its own, and learn its number.

        rm/rmdir free an inode's blocks but not its xattr block, and libext2fs never frees one
        when xattrs are removed either. So, in a write run before the batch, one xattr of each
        such inode is removed: libext2fs then copies a block shared with other inodes (its
        reference count drops by one, properly) and leaves an unshared one in place. The batch
        later frees that block through a throw-away inode that maps it (see _free_block).
        """
        inos = sorted(i for i in self.dead_inos if self.stats[i].xattr_block)
        if not inos:
            return
        if "inline_data" in self.info.features:
            raise BuildError(
                f"{self.image.path.name}: removing files with an xattr block is not supported "
                "on file systems with inline_data",
                hint="keep those files, or rebuild the image without inline_data",
            )
        cmds = []
        for ino in inos:
            names = self.stats[ino].xattr_names
            if not names:
                raise BuildError(
                    f"{self.stats[ino].path}: xattr block {self.stats[ino].xattr_block} lists no xattr"
                )
            cmds.append(b"ea_rm %s %s" % (_ino_ref(ino), _q(names[0])))
        self.runs += 2
        undo = self.image.undo_args()
        results = _run_debugfs(self.image.path, cmds, write=True, epoch=self.epoch, undo=undo)
        failed = [r.error_text() for r in results if r.err]
        if failed:
            raise BuildError(f"cannot release xattr blocks in {self.image.path.name}: {failed[0]}")
        stats = _run_debugfs(self.image.path, [b"stat " + _ino_ref(i) for i in inos], write=False, epoch=None)
        for ino, res in zip(inos, stats, strict=True):
            st = _parse_stat(f"<{ino}>", b"\n".join(res.out))
            self.xattr_blocks[ino] = st.xattr_block
        self.empty_file = empty_file()

    def expand(self) -> list[_Cmd]:
        """The final command list: removals spelled out, dropped xattr edits left out."""
        out: list[_Cmd] = []
        for item in self.items:
            if isinstance(item, _Cmd):
                owner = item.xattr_of
                if owner is not None and (owner.dead or owner.ino in self.dead_inos):
                    continue  # the inode goes in this batch: leave its xattrs as they were
                out.append(item)
                continue
            here: object = None
            for step in self.steps[id(item)]:
                there = step.parent_ino if step.parent_ino is not None else step.parent_node
                if there != here:
                    self._cd_line(out, step.parent_node, step.parent_ino, step.path)
                    here = there
                verb = b"rmdir " if step.entry.type is FileType.DIR else b"rm "
                out.append(_Cmd(verb + _q(step.name), step.path))
                if step.last and step.entry.ino in self.xattr_blocks:
                    self._free_block(out, step.name, self.xattr_blocks[step.entry.ino], step.path)
        return out

    def _free_block(self, out: list[_Cmd], name: bytes, block: int, path: str) -> None:
        """Free one block with the right accounting: map it in a throw-away inode and rm that.

        The inode is a fresh empty file (under the name just removed) turned into a block-mapped
        one whose only block is this one; kill_file then frees it like any data block.
        """
        ref = _q(b"./" + name)
        out.append(_Cmd(b"write %s %s" % (_q(os.fsencode(self.empty_file)), _q(name)), path))
        out.append(_Cmd(b"sif %s flags 0" % ref, path))
        out.append(_Cmd(b"sif %s block[0] %d" % (ref, block), path))
        out.append(_Cmd(b"sif %s block[1] 0" % ref, path))  # the extent header, zeroed
        out.append(_Cmd(b"sif %s block[2] 0" % ref, path))
        out.append(_Cmd(b"rm " + _q(name), path))

    def _cd_line(self, out: list[_Cmd], node: _Node | None, ino: int | None, path: str) -> None:
        if ino is not None:
            out.append(_Cmd(b"cd " + _ino_ref(ino), path))
            return
        assert node is not None and node.parent is not None
        self._cd_line(out, node.parent, node.parent.ino, path)
        out.append(_Cmd(b"cd " + _q(b"./" + node.name), path))

    def check_space(self, need: SpaceEstimate) -> None:
        free_blocks = self.info.free_blocks + self.freed_blocks
        free_inodes = self.info.free_inodes + self.freed_inodes
        if need.blocks > free_blocks or need.inodes > free_inodes:
            raise BuildError(
                f"{self.image.path.name} has room for {free_blocks} blocks and {free_inodes} inodes "
                f"(removals included), the edit may need {need.blocks} blocks and {need.inodes} inodes",
                hint="grow the image first: Ext4Image.ensure_room(batch.estimate(), limit=<partition size>)",
                where=str(self.image.path),
            )


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
