"""`EditBatch`: the operations a build records on an image, staged, estimated and applied in one
`debugfs -w` run."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import shutil
import stat as statmod
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from builder.errors import BuildError
from builder.fs.ext4.debugfs import (
    _BENIGN_OUT,
    _check_name,
    _check_scriptable,
    _join,
    _Result,
    _run_debugfs,
    _split,
)
from builder.fs.ext4.e2fsprogs import _check_epoch
from builder.fs.ext4.inodes import (
    _FAST_SYMLINK_MAX,
    _SYMLINK_MAX,
    EditSummary,
    FileType,
    SpaceEstimate,
    _estimate,
)
from builder.fs.ext4.ops import (
    _XATTR_PREFIXES,
    _check_mode,
    _check_owner,
    _Mkdir,
    _Mknod,
    _Op,
    _Remove,
    _RmXattr,
    _SetAttr,
    _SetXattr,
    _Symlink,
    _Write,
)
from builder.fs.ext4.planner import _Cmd, _Planner

if TYPE_CHECKING:
    from builder.fs.ext4.image import Ext4Image

log = logging.getLogger("airbox-build")


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
        self._cleanup: weakref.finalize[Any, Any] | None = None
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
        real_dirs: list[str] = []
        others = list(filenames)
        for d in dirnames:
            (others if os.path.islink(os.path.join(root, d)) else real_dirs).append(d)
        real_dirs.sort(key=os.fsencode)
        dirnames[:] = real_dirs
        yield root, list(real_dirs), sorted(others, key=os.fsencode)
