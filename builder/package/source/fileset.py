"""Finding the file set (the folder holding boot.scr and boot_emmc.scr) among paths, and the folder form."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from builder.errors import PackageError
from builder.package.source.base import _DIR_SEARCH_DEPTH, _SET_HINT, MARKERS, _walk_files, is_os_junk
from builder.package.source.scratch import _cache_dir
from builder.package.source.sources import DirSource, PackageSource

# --------------------------------------------------------------------------------------------
# Finding the file set among paths


def find_file_set(paths: Iterable[str], where: str) -> str:
    """The folder ('' for the top) holding both marker files, among '/'-separated file paths."""
    by_name: dict[str, set[str]] = {m: set() for m in MARKERS}
    near: set[str] = set()
    all_paths: list[str] = []
    for p in paths:
        if is_os_junk(p):
            continue
        all_paths.append(p)
        pp = PurePosixPath(p)
        parent = "" if str(pp.parent) == "." else str(pp.parent)
        if pp.name in by_name:
            by_name[pp.name].add(parent)
        elif pp.name.lower() in MARKERS:
            near.add(p)
    candidates = sorted(set.intersection(*by_name.values()))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise PackageError(
            f"{len(candidates)} folders each hold a file set (boot.scr + boot_emmc.scr): "
            + ", ".join(_show_dir(c) for c in candidates),
            where=where,
            hint="keep exactly one vendor file set in the package",
        )
    found = [
        f"{m} in {', '.join(_show_dir(d) for d in sorted(ds)) or 'no folder'}" for m, ds in by_name.items()
    ]
    if near:
        found.append(f"differently-cased {', '.join(sorted(near)[:4])} (names are case-sensitive)")
    top = sorted({p.split("/")[0] + ("/" if "/" in p else "") for p in all_paths})
    raise PackageError(
        "no folder holds both boot.scr and boot_emmc.scr (the vendor file set); found "
        + "; ".join(found)
        + f"; top level: {', '.join(top[:12]) + (' ...' if len(top) > 12 else '') if top else 'nothing'}",
        where=where,
        hint=_SET_HINT,
    )


def _show_dir(d: str) -> str:
    return f"{d}/" if d else "the top folder"


# --------------------------------------------------------------------------------------------
# Folder


def _open_dir(path: Path, workdir: Path) -> PackageSource:
    set_rel = find_file_set(_walk_files(path, max_depth=_DIR_SEARCH_DEPTH), str(path))
    location = f"folder {set_rel}/" if set_rel else ""
    return DirSource("dir", path, location, path / set_rel, _cache_dir(workdir, path))
