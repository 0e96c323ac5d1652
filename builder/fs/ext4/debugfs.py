"""Talking to debugfs: path splitting and quoting for its script language, parsing its output
(ls -p, stat, dumpe2fs) and the runner that ties each error to the operation that caused it."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError, ToolError
from builder.fs.ext4.e2fsprogs import _env
from builder.fs.ext4.inodes import (
    _MARK,
    _MAX_LINE,
    _NAME_MAX,
    _STAT_TYPES,
    DirEntry,
    Ext4Info,
    FileType,
    Inode,
)
from builder.run import run

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
    k = -1
    current: list[bytes] | None = None
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
