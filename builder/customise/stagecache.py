"""Staged app trees, kept in the cache: the same inputs always stage the same tree, so a rebuild
(a netplan change, say) neither extracts the source and models nor installs the wheels again.

Layout under the cache root::

    apps/<key>/tree             the staged tree, as the apps step made it (read, never changed)
    apps/<key>.json             its record: app name, Python packages, created, last use
    apps/<key>.partial-<pid>/   a tree being staged (renamed when complete)
    apps/<key>.lock             held while staging or taking it

`key` is a digest of everything the tree is made of: the sha256 of the source archive and of
every model archive unpacked into it, how each is unpacked (strip_components, where), the Python
lock's bytes with its target, platform and interpreter, the empty folders, and the versions of
this code. Each app name keeps its KEEP_PER_APP most recently used trees; `cache prune` drops
the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from builder import __version__
from builder.cache import Cache, file_lock, read_json, try_file_lock, write_json_atomic
from builder.outdir import tree_bytes
from builder.recipe import App

STAGE_VERSION = 1
KEEP_PER_APP = 2


def stage_key(app: App, fetched: Callable[[Any], Path], cache: Cache) -> str:
    """The digest of what `app`'s staged tree is made of (see the module doc)."""

    def digest(path: Path) -> str:
        return cache.digests_of(path).sha256

    record: dict[str, Any] = {
        "version": STAGE_VERSION,
        "airbox_build": __version__,
        "source": None
        if app.source is None
        else [digest(fetched(app.source.input)), app.source.strip_components],
        "models": [
            [digest(fetched(m.input)), m.extract, m.strip_components]
            for m in app.models
            if m.extract is not None
        ],
        "models_dest": sorted({os.path.dirname(m.dest) for m in app.models if m.dest is not None}),
        "python": None
        if app.python is None
        else [
            hashlib.sha256(app.python.lock.read_bytes()).hexdigest(),
            app.python.target,
            app.python.platform,
            app.python.python,
        ],
        "dirs": list(app.dirs),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def cached_tree(
    root: Path, key: str, app_name: str, stage: Callable[[Path], dict[str, Any]]
) -> tuple[Path, dict[str, Any]]:
    """The staged tree for `key` and its record: taken from `root` (CACHE/apps), or staged by
    `stage(tree)` into a partial folder that becomes the entry when complete."""
    root.mkdir(parents=True, exist_ok=True)
    final, meta_path = root / key, root / f"{key}.json"
    with file_lock(root / f"{key}.lock"):
        meta = read_json(meta_path)
        if meta is not None and (final / "tree").is_dir():
            meta["last_used"] = time.time()
            with contextlib.suppress(OSError):
                write_json_atomic(meta_path, meta)
            return final / "tree", meta
        meta_path.unlink(missing_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        for stale in root.glob(f"{key}.partial-*"):  # a killed staging (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        partial = root / f"{key}.partial-{os.getpid()}"
        partial.mkdir()
        try:
            info = stage(partial / "tree")
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        now = time.time()
        meta = {"app": app_name, **info, "created": now, "last_used": now}
        write_json_atomic(meta_path, meta)
    _evict(root, app_name, keep=key)
    return final / "tree", meta


def _evict(root: Path, app_name: str, *, keep: str) -> None:
    same = []
    for meta_file in root.glob("*.json"):
        meta = read_json(meta_file)
        if meta is not None and meta.get("app") == app_name and meta_file.stem != keep:
            same.append((float(meta.get("last_used", 0)), meta_file.stem))
    for _, key in sorted(same, reverse=True)[KEEP_PER_APP - 1 :]:
        _remove(root, key)


def _remove(root: Path, key: str) -> int:
    """Delete one tree unless a build holds it right now; the bytes it took."""
    with try_file_lock(root / f"{key}.lock") as free:
        if not free:
            return 0
        (root / f"{key}.json").unlink(missing_ok=True)
        freed = tree_bytes(root / key)
        shutil.rmtree(root / key, ignore_errors=True)
        return freed


def tree_entries(cache_dir: Path) -> list[tuple[Path, str, int, float]]:
    """(tree, app name, bytes on disk, last use) of every complete staged tree."""
    root = cache_dir / "apps"
    out = []
    for meta_file in sorted(root.glob("*.json")):
        meta = read_json(meta_file)
        tree = root / meta_file.stem / "tree"
        if meta is not None and tree.is_dir():
            out.append((tree, str(meta.get("app")), tree_bytes(tree), float(meta.get("last_used", 0))))
    return out


def prune_trees(cache_dir: Path, cutoff: float | None) -> tuple[int, int]:
    """Remove staged trees unused since `cutoff` (all when None) and killed stagings."""
    root = cache_dir / "apps"
    files = freed = 0
    for meta_file in sorted(root.glob("*.json")):
        meta = read_json(meta_file) or {}
        if cutoff is not None and float(meta.get("last_used", 0)) >= cutoff:
            continue
        freed += _remove(root, meta_file.stem)
        files += 1
    for partial in sorted(root.glob("*.partial-*")):
        key = partial.name.split(".", 1)[0]
        with try_file_lock(root / f"{key}.lock") as free:
            if free:
                freed += tree_bytes(partial)
                shutil.rmtree(partial, ignore_errors=True)
                files += 1
    return files, freed
