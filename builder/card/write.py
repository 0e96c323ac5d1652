"""`write_card`: plan the write (what is stale, what stays, whether it fits), then remove, copy
(boot.scr last) and read every file back."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder.card.bundle import (
    _DEFAULT_CLUSTER,
    FIRST_SCRIPT,
    MISMATCH_CAUSES,
    TRIGGERS,
    Bundle,
    CardError,
    _check_source,
    _Copied,
    _expected_digests,
    _preview,
    _size,
    is_bundle_file,
    list_files,
    open_bundle,
)
from builder.card.fileio import _remove, _sync_dir, copy_file, hash_uncached
from builder.card.volume import Volume, format_hint, probe_volume
from builder.events import Reporter

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
