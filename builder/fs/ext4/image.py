"""`Ext4Image`: read an image (stat, read, list, walk, xattrs), check, grow and shrink it, and the
superblock's lifetime-writes counter."""

from __future__ import annotations

import logging
import math
import os
import posixpath
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from builder.errors import BuildError
from builder.fs.ext4.batch import EditBatch
from builder.fs.ext4.debugfs import (
    _check_scriptable,
    _ino_ref,
    _join,
    _parse_dumpe2fs,
    _parse_ls_p,
    _parse_stat,
    _q,
    _Result,
    _run_debugfs,
    _split,
)
from builder.fs.ext4.e2fsprogs import _check_epoch, _env, require_e2fsprogs
from builder.fs.ext4.inodes import _MAX_READ, DirEntry, Ext4Info, FileType, Inode, SpaceEstimate, _estimate
from builder.run import require_tools, run

log = logging.getLogger("airbox-build")


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
