"""The state the customisation steps share: images, routing, accounts, edits and the report.

Steps record edits through this object; nothing touches an image until `finish()`,
which checks the space budget of every partition first, then applies each
partition's edits in one debugfs batch, checks the result and shrinks it again.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.customise.bundleid import (
    BUNDLE_ID_PATH,
    ORIGIN,
    bundle_id_doc,
    content_id,
    encode,
    vendor_digest,
)
from builder.customise.changes import SECRET_DIFF, Change, _text_diff, is_secret
from builder.customise.mounts import FSTAB, REFUSED_MOUNTS, Mount, _parse_fstab
from builder.digestmemo import DigestMemo
from builder.errors import BuildError, RecipeError
from builder.events import Reporter
from builder.fs.ext4 import EditBatch, Ext4Image, Ext4Info, FileType, Inode, SpaceEstimate
from builder.imagecache import BaseImage, IdentifiedFiles, ImageCache
from builder.manifest import file_digest
from builder.package.chunks import JoinedImage, default_workers
from builder.package.flashplan import SECTOR, FlashPlan, PartitionFlash
from builder.previous import EarlierPartition, PreviousBuild, edit_fingerprint
from builder.recipe import Owner, Recipe
from builder.run import find_tool
from builder.units import format_size

if TYPE_CHECKING:
    from builder.fetch import FetchOptions

ROOTFS = "ROOTFS"
ROOTFS_RW = "ROOTFS_RW"
OVERLAY_UPPER = "/overlay"  # upperdir=/media/root-rw/overlay (FORMAT.md section 6)
OPAQUE = "trusted.overlay.opaque"
DIFF_MAX = 64 << 10
IN_PLACE_MAX = 64 << 20  # edits up to this size go into the cached image itself (undo files)
OVERLAY_ROOM = 1 << 20  # free bytes ROOTFS_RW keeps for the overlay's work folder and first boot
OVERLAY_INODES = 64


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str


@dataclass
class _Pending:
    """A file write waiting for finish(): kept to fill the report and the diff."""

    label: str
    inner: str
    device_path: str
    data: bytes | None
    src: Path | None
    mode: int
    uid: int
    gid: int
    origin: str


@dataclass(frozen=True)
class _Link:
    """A symlink a step laid down (its target as written)."""

    target: str


class Customiser:
    def __init__(
        self,
        recipe: Recipe,
        plan: FlashPlan,
        files: IdentifiedFiles,
        work: Path,
        epoch: int,
        reporter: Reporter,
        *,
        fetch_opts: FetchOptions,
        fetched: Mapping[Any, Path] | None = None,
        workers: int | None = None,
        limits: Mapping[str, int] | None = None,
        image_cache: ImageCache | None = None,
        previous: PreviousBuild | None = None,
        digest_memo: DigestMemo | None = None,
        stage_cache: Path | None = None,
        host_keys: Mapping[str, Path] | None = None,
    ) -> None:
        self.recipe = recipe
        self.plan = plan
        self.files = files
        self.work = work
        self.epoch = epoch
        self.reporter = reporter
        self.fetched = dict(fetched or {})
        self.workers = workers
        self.limits = {k.upper(): v for k, v in (limits or {}).items()}  # partition label -> bytes
        self.image_cache = image_cache or ImageCache(None, workers=workers)  # None: join into work
        self.previous = previous  # the last bundle of this recipe: edits it already applied
        self.changes: list[Change] = []
        self._base: dict[str, BaseImage] = {}  # the vendor's images, read here and never edited
        self._digests: dict[Path, str] = {}  # sha256 of host files the batches write
        self.digest_memo = digest_memo or DigestMemo(None)  # ... remembered across builds
        self._images: dict[str, Ext4Image] = {}
        self._batches: dict[str, EditBatch] = {}
        self._pending: list[_Pending] = []
        self._written_root: dict[str, str] = {}  # ROOTFS inner path -> origin, for overlay shadows
        self._removed_upper: set[str] = set()  # upper-layer paths a removal already takes away
        # device path -> what a step wrote there (bytes, a host file or a symlink), None once
        # removed: the root as later steps must see it before finish() applies anything
        self._root_view: dict[str, bytes | Path | _Link | None] = {}
        self._mounts: list[Mount] | None = None
        self._accounts: tuple[dict[str, Account], dict[str, int]] | None = None
        self._stat_cache: dict[tuple[str, str], Inode | None] = {}
        self.after_apply: list[Callable[[], None]] = []
        self.app_results: list[Any] = []
        self.fetch_opts = fetch_opts  # for steps that download (app wheels)
        self.stage_cache = stage_cache  # CACHE/apps: staged app trees kept between builds
        self.host_keys = host_keys  # per-device host keys: type -> private key
        self.bundle_id: dict[str, Any] | None = None  # what /etc/airbox-build.json says, once written

    # ------------------------------------------------------------------ images

    def partition(self, label: str) -> PartitionFlash:
        return self.plan.partition(label)

    def has_partition(self, label: str) -> bool:
        return any(p.label.upper() == label.upper() for p in self.plan.partitions)

    def image(self, label: str) -> Ext4Image:
        """The partition's vendor ext4 image, to read (edits are recorded, and applied to a copy
        in finish()); joined from its chunks on first use, or taken from the image cache."""
        part = self.partition(label)
        key = part.label.upper()
        if key not in self._images:
            if part.fmt != 2:
                raise BuildError(
                    f"partition {part.label} is {part.fmt_name}, not ext4: airbox-build edits only ext4",
                    hint="target a path on ROOTFS, ROOTFS_RW (layer: overlay), OPT or DATA",
                )
            if not part.chunks:
                raise BuildError(f"partition {part.label} has no image in the package to edit")
            base = self.image_cache.open(
                self.files,
                part,
                self.work,
                joining=lambda: self.reporter.progress(f"join {part.label}", part.image_bytes),
            )
            self._base[key] = base
            self._images[key] = Ext4Image(base.path, epoch=self.epoch)
        return self._images[key]

    def is_open(self, label: str) -> bool:
        """Whether a step has read this partition's image already (it is joined)."""
        return self.has_partition(label) and self.partition(label).label.upper() in self._images

    def batch(self, label: str) -> EditBatch:
        key = self.partition(label).label.upper()
        if key not in self._batches:
            self._batches[key] = self.image(key).edit(epoch=self.epoch)
        return self._batches[key]

    def stat(self, label: str, inner: str) -> Inode | None:
        key = (label.upper(), inner)
        if key not in self._stat_cache:
            self._stat_cache[key] = self.image(label).stat(inner)
        return self._stat_cache[key]

    # ------------------------------------------------------------------ routing

    def mounts(self) -> list[Mount]:
        """Mount points from the image's /etc/fstab.emmc.ro, longest first."""
        if self._mounts is None:
            self._mounts = _parse_fstab(self.read_text_root(FSTAB) or "", self.plan)
            self._mounts.sort(key=lambda m: len(m.point), reverse=True)
        return self._mounts

    def route(self, device_path: str, where: str, *, layer: str = "base") -> tuple[str, str]:
        """(partition label, path inside it) for a device path."""
        path = posixpath.normpath(device_path)
        for refused in REFUSED_MOUNTS:
            if path == refused or path.startswith(refused + "/"):
                raise RecipeError(
                    f"writing under {refused} is not supported ({device_path})",
                    where=where,
                    hint="the boot and recovery partitions are kept as the vendor made them",
                )
        label, inner = ROOTFS, path
        for m in self.mounts():
            if path == m.point or path.startswith(m.point.rstrip("/") + "/"):
                label, inner = m.label, "/" + path[len(m.point) :].lstrip("/")
                break
        if layer == "overlay":
            if label.upper() != ROOTFS:
                raise RecipeError(
                    f"layer: overlay applies to root paths only; {device_path} is on {label}",
                    where=where,
                )
            return ROOTFS_RW, posixpath.join(OVERLAY_UPPER, path.lstrip("/")).rstrip("/")
        return label, inner

    # ------------------------------------------------------------------ reading the image

    def read_text_root(self, device_path: str, _hops: int = 0) -> str | None:
        """A text file of the root filesystem as the box will see it: what earlier steps wrote,
        linked or removed first (their edits wait in batches until finish()), then the overlay
        upper layer, then ROOTFS."""
        key = posixpath.normpath(device_path)
        if key in self._root_view:
            pending = self._root_view[key]
            if pending is None:
                return None
            if isinstance(pending, _Link):
                if _hops >= 40:
                    return None  # a loop of links: nothing the box could read either
                target = posixpath.join(posixpath.dirname(key), pending.target)
                return self.read_text_root(target, _hops + 1)
            raw = pending if isinstance(pending, bytes) else pending.read_bytes()
            return raw.decode("utf-8", errors="replace")
        if self.has_partition(ROOTFS_RW) and self.partition(ROOTFS_RW).chunks:
            rw = self.image(ROOTFS_RW)
            upper = posixpath.join(OVERLAY_UPPER, device_path.lstrip("/"))
            st = rw.resolve(upper)
            if st is not None and st.type == FileType.FILE:
                return rw.read_text(upper)
        img = self.image(ROOTFS)
        st = img.resolve(device_path)
        if st is None or st.type != FileType.FILE:
            return None
        return img.read_text(device_path)

    def root_file_exists(self, device_path: str) -> bool:
        """Whether the box will have a file (or a link to one) at this path; its bytes unread."""
        key = posixpath.normpath(device_path)
        if key in self._root_view:
            return self._root_view[key] is not None
        if self._has_rw():
            st = self.image(ROOTFS_RW).resolve(posixpath.join(OVERLAY_UPPER, key.lstrip("/")))
            if st is not None:
                return st.type == FileType.FILE
        st = self.image(ROOTFS).resolve(key)
        return st is not None and st.type == FileType.FILE

    def listdir_root(self, device_path: str) -> list[str]:
        """The names in a root directory as the box will see them (earlier steps, upper, ROOTFS)."""
        folder = posixpath.normpath(device_path)
        names: set[str] = set()
        st = self.image(ROOTFS).resolve(folder)
        if st is not None and st.is_dir:
            names |= set(self.image(ROOTFS).listdir(folder))
        if self._has_rw():
            upper = posixpath.join(OVERLAY_UPPER, folder.lstrip("/"))
            ust = self.image(ROOTFS_RW).resolve(upper)
            if ust is not None and ust.is_dir:
                for e in self.image(ROOTFS_RW).scandir(upper):
                    if e.type is FileType.CHAR:
                        names.discard(e.name)  # a whiteout
                    else:
                        names.add(e.name)
        for path, what in self._root_view.items():
            if posixpath.dirname(path) == folder:
                if what is None:
                    names.discard(posixpath.basename(path))
                else:
                    names.add(posixpath.basename(path))
        return sorted(names)

    def accounts(self) -> tuple[dict[str, Account], dict[str, int]]:
        if self._accounts is None:
            users: dict[str, Account] = {}
            groups: dict[str, int] = {}
            for line in (self.read_text_root("/etc/passwd") or "").splitlines():
                f = line.split(":")
                if len(f) >= 7 and f[2].isdigit() and f[3].isdigit():
                    users[f[0]] = Account(f[0], int(f[2]), int(f[3]), f[5])
            for line in (self.read_text_root("/etc/group") or "").splitlines():
                f = line.split(":")
                if len(f) >= 3 and f[2].isdigit():
                    groups[f[0]] = int(f[2])
            if "root" not in users:
                users["root"] = Account("root", 0, 0, "/root")
            groups.setdefault("root", 0)
            self._accounts = (users, groups)
        return self._accounts

    def user(self, name: str, where: str) -> Account:
        users, _ = self.accounts()
        if name not in users:
            close = difflib.get_close_matches(name, list(users), n=1)
            regular = ", ".join(sorted(u for u in users if users[u].uid >= 1000)) or "none"
            raise RecipeError(
                f"user {name!r} does not exist in the image's /etc/passwd",
                where=where,
                hint=(f"did you mean {close[0]!r}? " if close else "") + f"users in the image: {regular}",
            )
        return users[name]

    def owner(self, owner: Owner | None, where: str) -> tuple[int, int]:
        if owner is None:
            return 0, 0
        acct = self.user(owner.user, where)
        if owner.group is None:
            return acct.uid, acct.gid
        _, groups = self.accounts()
        if owner.group not in groups:
            close = difflib.get_close_matches(owner.group, list(groups), n=1)
            raise RecipeError(
                f"group {owner.group!r} does not exist in the image's /etc/group",
                where=where,
                hint=f"did you mean {close[0]!r}?" if close else "list the groups with: airbox-build inspect",
            )
        return acct.uid, groups[owner.group]

    # ------------------------------------------------------------------ recording edits

    def write(
        self,
        device_path: str,
        *,
        data: bytes | None = None,
        src: Path | None = None,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        origin: str,
        layer: str = "base",
        keep_existing_attrs: bool = False,
    ) -> None:
        """Write a file; with keep_existing_attrs, an existing file keeps its mode and owner."""
        label, inner = self.route(device_path, origin, layer=layer)
        if keep_existing_attrs:
            st = self.stat(label, inner)
            if st is not None and st.type == FileType.FILE:
                mode, uid, gid = st.mode & 0o7777, st.uid, st.gid
        batch = self.batch(label)
        if data is not None:
            batch.write_bytes(inner, data, mode, uid, gid)
        else:
            assert src is not None
            batch.write(inner, src, mode, uid, gid)
        self._pending.append(_Pending(label, inner, device_path, data, src, mode, uid, gid, origin))
        if label.upper() == ROOTFS:
            self._written_root[inner] = origin
        if label.upper() == ROOTFS or layer == "overlay":
            self._root_view[posixpath.normpath(device_path)] = data if data is not None else src
            if posixpath.normpath(device_path) in ("/etc/passwd", "/etc/group"):
                self._accounts = None  # owners named after this write resolve against it

    def mkdir(
        self, device_path: str, *, mode: int, uid: int, gid: int, origin: str, layer: str = "base"
    ) -> None:
        label, inner = self.route(device_path, origin, layer=layer)
        st = self.stat(label, inner)
        if st is None:
            self.batch(label).makedirs(inner, mode, uid, gid)
        elif not st.is_dir:
            raise RecipeError(f"{device_path} exists in the image and is not a directory", where=origin)
        elif (st.mode & 0o7777, st.uid, st.gid) == (mode, uid, gid):
            return
        else:
            self.batch(label).chmod(inner, mode).chown(inner, uid, gid)
        self._record(
            label, inner, device_path, "added" if st is None else "changed", "dir", mode, uid, gid, origin
        )
        if label.upper() == ROOTFS:
            self._written_root[inner] = origin

    def copy_tree(
        self, device_path: str, host_dir: Path, *, uid: int, gid: int, origin: str, files: int, size: int
    ) -> str:
        """Copy a staged host tree to a device path (merged into what is there); returns the partition."""
        label, inner = self.route(device_path, origin)
        self.batch(label).copy_tree(host_dir, inner, uid=uid, gid=gid)
        ch = self._record(label, inner, device_path, "added-tree", "dir", None, uid, gid, origin)
        ch.size = size
        ch.diff = f"{files} files"
        if label.upper() == ROOTFS:
            self._written_root[inner] = origin
        return self.partition(label).label

    def symlink(
        self, device_path: str, target: str, *, uid: int, gid: int, origin: str, layer: str = "base"
    ) -> None:
        label, inner = self.route(device_path, origin, layer=layer)
        st = self.stat(label, inner)
        self.batch(label).symlink(inner, target, uid, gid)
        ch = self._record(
            label,
            inner,
            device_path,
            "added" if st is None else "changed",
            "symlink",
            0o777,
            uid,
            gid,
            origin,
        )
        ch.target = target
        if label.upper() == ROOTFS:
            self._written_root[inner] = origin
        if label.upper() == ROOTFS or layer == "overlay":
            self._root_view[posixpath.normpath(device_path)] = _Link(target)

    def remove(self, device_path: str, *, origin: str, missing_ok: bool = True) -> bool:
        """Remove a path from the box's view: from ROOTFS and from the overlay upper layer."""
        label, inner = self.route(device_path, origin)
        removed = False
        st = self.stat(label, inner)
        if st is not None:
            self.batch(label).remove(inner, recursive=st.is_dir)
            self._record(label, inner, device_path, "removed", st.type.value, None, st.uid, st.gid, origin)
            removed = True
        if label.upper() == ROOTFS and self._has_rw():
            upper = posixpath.join(OVERLAY_UPPER, inner.lstrip("/"))
            ust = self.stat(ROOTFS_RW, upper)
            if ust is not None and not ust.is_whiteout:
                self.batch(ROOTFS_RW).remove(upper, recursive=ust.is_dir)
                self._removed_upper.add(upper)
                self._record(
                    ROOTFS_RW, upper, device_path, "removed", ust.type.value, None, ust.uid, ust.gid, origin
                )
                removed = True
        if label.upper() == ROOTFS:
            gone = posixpath.normpath(device_path)
            for p in [p for p in self._root_view if p == gone or p.startswith(gone + "/")]:
                self._root_view[p] = None
            self._root_view[gone] = None
        if not removed and not missing_ok:
            raise RecipeError(f"{device_path} does not exist in the image", where=origin)
        return removed

    def _record(
        self,
        label: str,
        inner: str,
        device_path: str,
        action: str,
        typ: str,
        mode: int | None,
        uid: int | None,
        gid: int | None,
        origin: str,
    ) -> Change:
        ch = Change(
            partition=self.partition(label).label,
            path=inner,
            device_path=device_path,
            action=action,
            type=typ,
            mode=f"{mode:04o}" if mode is not None else None,
            owner=f"{uid}:{gid}" if uid is not None else None,
            origin=origin,
        )
        self.changes.append(ch)
        return ch

    def _has_rw(self) -> bool:
        return self.has_partition(ROOTFS_RW) and bool(self.partition(ROOTFS_RW).chunks)

    # ------------------------------------------------------------------ finishing

    def _resolve_pending(self) -> None:
        """Fill the report for pending writes: added or changed, digest, diff of config text."""
        by_label: dict[str, list[_Pending]] = {}
        for p in self._pending:
            by_label.setdefault(p.label.upper(), []).append(p)
        for label, items in by_label.items():
            stats = self.image(label).stat_many([p.inner for p in items])
            for p in items:
                data = p.data if p.data is not None else None
                size = len(data) if data is not None else p.src.stat().st_size if p.src else 0
                digest = (
                    hashlib.sha256(data).hexdigest()
                    if data is not None
                    else self._digest(p.src)
                    if p.src is not None
                    else None
                )
                old = stats.get(p.inner)
                ch = self._record(
                    label,
                    p.inner,
                    p.device_path,
                    "added" if old is None else "changed",
                    "file",
                    p.mode,
                    p.uid,
                    p.gid,
                    p.origin,
                )
                ch.size, ch.sha256 = size, digest
                if (
                    old is not None
                    and old.type == FileType.FILE
                    and old.size <= DIFF_MAX
                    and size <= DIFF_MAX
                ):
                    if is_secret(p.device_path):
                        ch.diff = SECRET_DIFF
                        continue
                    new_bytes = data if data is not None else p.src.read_bytes() if p.src else b""
                    ch.diff = _text_diff(self.image(label).read_file(p.inner), new_bytes, p.device_path)

    def _clear_overlay_shadows(self) -> None:
        """A file written to ROOTFS must be what the box sees: drop what ROOTFS_RW puts over it."""
        if not self._written_root or not self._has_rw():
            return
        rw = self.image(ROOTFS_RW)
        candidates: dict[str, str] = {}
        for inner, origin in self._written_root.items():
            parts = [p for p in inner.split("/") if p]
            for i in range(1, len(parts) + 1):
                candidates.setdefault(posixpath.join(OVERLAY_UPPER, *parts[:i]), origin)
        stats = rw.stat_many(sorted(candidates))
        for upper, st in sorted(stats.items()):
            if st is None or upper in self._removed_upper:
                continue
            device = "/" + upper[len(OVERLAY_UPPER) :].lstrip("/")
            origin = candidates[upper]
            exact = device in {"/" + k.lstrip("/") for k in self._written_root}
            if st.is_whiteout or (exact and not st.is_dir):
                self.batch(ROOTFS_RW).remove(upper)
                ch = self._record(
                    ROOTFS_RW,
                    upper,
                    device,
                    "shadow-removed",
                    st.type.value,
                    st.mode & 0o7777,
                    st.uid,
                    st.gid,
                    origin,
                )
                ch.diff = "whiteout" if st.is_whiteout else "upper-layer copy"
                self.reporter.warn(
                    f"ROOTFS_RW held {'a whiteout' if st.is_whiteout else 'a copy'} of {device} "
                    f"that would hide what the recipe writes: removed it"
                )
            elif st.is_dir and rw.get_xattr(upper, OPAQUE) is not None:
                self.batch(ROOTFS_RW).remove_xattr(upper, OPAQUE)
                self._record(
                    ROOTFS_RW,
                    upper,
                    device,
                    "opaque-cleared",
                    "dir",
                    st.mode & 0o7777,
                    st.uid,
                    st.gid,
                    origin,
                )
                self.reporter.warn(
                    f"ROOTFS_RW's overlay made {device} opaque, hiding the recipe's files: cleared it "
                    "(the vendor files under it become visible again)"
                )

    def limit(self, label: str) -> int:
        part = self.partition(label)
        return self.limits.get(part.label.upper(), part.size_sectors * SECTOR)

    def finish(self, *, shrink: bool) -> dict[str, JoinedImage | EarlierPartition]:
        """Apply every batch; return what each changed partition is: the edited image (a copy of
        the vendor's, or for a small edit the cached image itself, put back after packing), or
        the last build's result of the very same edits (builder.previous)."""
        self._write_bundle_id()
        self._clear_overlay_shadows()
        self._check_budget()  # before hashing what is added: a too-big input fails at once
        self._hash_sources()
        self._resolve_pending()
        changed: dict[str, JoinedImage | EarlierPartition] = {}
        for label, batch in sorted(self._batches.items()):
            if not len(batch):
                continue
            base = self._base[label]
            fp = edit_fingerprint(
                batch,
                base_key=base.key,
                epoch=self.epoch,
                limit=self.limit(label),
                shrink=shrink,
                digest=self._digest,
            )
            earlier = self.previous.same_edits(label, fp) if self.previous is not None else None
            if earlier is not None:
                self.reporter.info(
                    f"{earlier.label}: the same edits as the last build ({len(batch)} operations): "
                    "its chunks are reused"
                )
                changed[label] = earlier
                continue
            with self.reporter.step(f"edit {label}", operations=len(batch)):
                need = batch.estimate()
                before = self._images[label].info() if label == ROOTFS_RW else None
                dest = self.work / f"{self.partition(label).stem}.img"
                joined = self.image_cache.writable(base, dest, in_place=self._fits_in_place(label, need))
                undo = None
                if base.cached and joined.path == base.path:
                    undo = self.work / f"undo-{label}"
                    undo.mkdir(exist_ok=True)
                img = Ext4Image(joined.path, epoch=self.epoch, undo_dir=undo)
                writes = img.lifetime_writes()
                batch.retarget(img)
                img.ensure_room(need, limit=self.limit(label), headroom=1 << 20)
                batch.apply()
                if shrink:  # never below the vendor's own size: that would only move blocks
                    img.shrink_to_min(floor_bytes=base.size)
                img.set_lifetime_writes(writes)  # the same bytes whether edited in place or on a copy
                img.check()
                if before is not None:
                    self._check_overlay_room(before, img.info())
            joined = replace(joined, fingerprint=fp)
            if undo is not None:  # the cached image itself: put back once its chunks are packed
                joined = replace(joined, release=functools.partial(self.image_cache.restore, base, img))
            changed[label] = joined
        for fn in self.after_apply:
            fn()
        return changed

    def _write_bundle_id(self) -> None:
        """/etc/airbox-build.json, named after every other edit of the build (builder.customise.bundleid)."""
        mode = self.recipe.output.bundle_id
        if mode == "never":
            return
        self._hash_sources()
        edited = {label: b for label, b in self._batches.items() if len(b)}
        if not edited and mode == "auto":
            return  # the vendor's image as it is: a no-op build stays byte for byte the package
        if not self.has_partition(ROOTFS):
            if mode == "always":
                raise BuildError(
                    "output.bundle_id: always, but the package has no ROOTFS partition to hold "
                    f"{BUNDLE_ID_PATH}",
                    hint="set output.bundle_id: auto or never",
                )
            return
        chunks = {label: [c.file for c in self.partition(label).chunks] for label in edited}
        vendor = vendor_digest(self.files, edited, chunks)
        bundle = content_id(vendor, [(label, b.fingerprint(self._digest)) for label, b in edited.items()])
        doc = bundle_id_doc(self.recipe.name, self.recipe.device, bundle, self.epoch)
        self.write(BUNDLE_ID_PATH, data=encode(doc), mode=0o644, origin=ORIGIN)
        self.bundle_id = doc

    def _check_overlay_room(self, vendor: Ext4Info, built: Ext4Info) -> None:
        """ROOTFS_RW must keep room for the overlay's work folder (and what the box writes at its
        first boot): with none left, overlayfs mounts the box's root read-only and
        systemd-remount-fs fails. A vendor image that had no room either only gets a warning."""

        def room(i: Ext4Info) -> bool:
            return i.free_blocks * i.block_size >= OVERLAY_ROOM and i.free_inodes >= OVERLAY_INODES

        if room(built):
            return
        what = (
            f"ROOTFS_RW would have {format_size(built.free_blocks * built.block_size)} and "
            f"{built.free_inodes} inodes free: the overlay needs room for its work folder "
            f"(at least {format_size(OVERLAY_ROOM)} and {OVERLAY_INODES} inodes), or the box's root "
            "mounts read-only"
        )
        if not room(vendor):
            self.reporter.warn(what + " (the vendor's ROOTFS_RW had no more room either)")
            return
        raise BuildError(
            what,
            hint=f"the vendor's ROOTFS_RW had {format_size(vendor.free_blocks * vendor.block_size)} free: "
            "put "
            "less into the overlay layer (`layer: overlay`), or write to ROOTFS instead (`layer: base`, "
            "the default)",
        )

    def _fits_in_place(self, label: str, need: SpaceEstimate) -> bool:
        """A small edit that fits the vendor image as it is (no grow, shrink or e2fsck repair)
        is made on the cached image itself, with undo files, instead of on a multi-GB copy."""
        info = self._images[label].info()
        headroom = 1 << 20
        return (
            need.bytes <= IN_PLACE_MAX
            and need.blocks + -(-headroom // info.block_size) <= info.free_blocks
            and need.inodes <= info.free_inodes
            and info.state == "clean"
            and not info.features & {"needs_recovery", "quota", "project"}
            and find_tool("e2undo") is not None
        )

    def _hash_sources(self) -> None:
        """sha256 of every host file the batches write, side by side (for the report and the
        edit fingerprints)."""
        todo = sorted({p for b in self._batches.values() for p in b.sources()} - self._digests.keys())
        self._digests.update(self.digest_memo.digests(todo, self.workers or default_workers()))

    def _digest(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return self._digests[path]

    def _check_budget(self) -> None:
        for label, batch in sorted(self._batches.items()):
            if not len(batch):
                continue
            need = batch.estimate()
            info = self._images[label].info()
            limit = self.limit(label)
            available = limit - info.size_bytes + info.free_bytes
            if need.bytes + (1 << 20) > available:
                short = need.bytes + (1 << 20) - available
                suggest = _round_up_gib(limit + short + (limit // 10))
                used = info.size_bytes - info.free_bytes
                raise BuildError(
                    f"partition {label}: the recipe adds about {format_size(need.bytes)} "
                    f"({need.bytes} bytes), "
                    f"but only {format_size(max(available, 0))} ({available} bytes) can be free in its "
                    f"{format_size(limit)} partition (image uses {format_size(used)}); "
                    f"short by {format_size(short)}",
                    hint=f"grow it in the recipe: `layout: {{{label}: {suggest}}}`, or put less into it",
                )

    def report(self) -> list[dict[str, Any]]:
        # vars() rather than asdict(): the fields are plain values, and asdict deep-copies each one
        # (seconds for an app of 20,000 files)
        return [dict(vars(c)) for c in sorted(self.changes, key=lambda c: (c.partition, c.path, c.action))]

    def close(self) -> None:
        """Drop what batches never applied have staged (a failed or interrupted build)."""
        for batch in self._batches.values():
            batch.close()


def _round_up_gib(n: int) -> str:
    gib = 1 << 30
    if n < gib:
        return f"{-(-n // (1 << 20))}MiB"
    return f"{-(-n // gib)}GiB"
