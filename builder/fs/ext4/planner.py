"""The planner: resolves every operation of a batch against a model of the directories involved
(read in one read-only debugfs run) and expands it into debugfs commands addressed by inode."""

from __future__ import annotations

import os
import stat as statmod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from builder.errors import BuildError
from builder.fs.ext4.debugfs import (
    _ino_ref,
    _join,
    _ls_dot,
    _parse_ls_p,
    _parse_stat,
    _q,
    _raw_path,
    _Result,
    _run_debugfs,
)
from builder.fs.ext4.inodes import DirEntry, Ext4Info, FileType, Inode, SpaceEstimate
from builder.fs.ext4.ops import _Mkdir, _Mknod, _Op, _Remove, _RmXattr, _SetAttr, _SetXattr, _Symlink, _Write

if TYPE_CHECKING:
    from builder.fs.ext4.image import Ext4Image


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
