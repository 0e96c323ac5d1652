"""sha256 of the host files a build writes into the images (overlays, files), remembered between
builds of a bundle while each file is provably the same: same path, size, mtime, ctime and
inode. The ctime cannot be set back by a user, so a file rewritten and re-dated to its old mtime
is hashed again. Files under the build's own temp folder (staged app trees, rendered templates)
are always hashed: they are new each time.

One JSON file per bundle (OUTPUT/<name>) in CACHE/stat/; it holds what the last build used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from builder.cache import read_json, text_key, write_json_atomic
from builder.manifest import file_digest
from builder.pool import worker_pool

Signature = list[int]  # size, mtime_ns, ctime_ns, inode, device


def memo_file(cache_dir: Path, bundle: Path) -> Path:
    """The memo of the builds of one bundle (OUTPUT/<name>): the same recipe, edited or not."""
    return cache_dir / "stat" / f"sources-{text_key(str(bundle.resolve()))[:24]}.json"


def _signature(path: Path) -> Signature:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class DigestMemo:
    def __init__(self, path: Path | None, *, fresh_under: Sequence[Path] = ()) -> None:
        self.path = path
        self.fresh_under = tuple(str(p.resolve()) + os.sep for p in fresh_under)
        self._known: dict[str, list[object]] | None = None
        self._used: dict[str, list[object]] = {}
        self.hashed = 0  # files read this build (the rest came from the memo)

    def _load(self) -> dict[str, list[object]]:
        if self._known is None:
            data = read_json(self.path) if self.path is not None else None
            entries = data.get("files") if isinstance(data, dict) else None
            self._known = entries if isinstance(entries, dict) else {}
        return self._known

    def digests(self, paths: Sequence[Path], workers: int) -> dict[Path, str]:
        """sha256 of each file: remembered where provably unchanged, else read (side by side)."""
        known = self._load()
        out: dict[Path, str] = {}
        todo: list[tuple[Path, str, Signature | None]] = []
        for p in paths:
            key = str(p.absolute())
            fresh = key.startswith(self.fresh_under) if self.fresh_under else False
            sig = None if fresh else _signature(p)
            entry = known.get(key)
            if sig is not None and entry is not None and entry[:-1] == sig:
                out[p] = str(entry[-1])
                self._used[key] = entry
            else:
                todo.append((p, key, sig))
        with worker_pool(workers) as pool:
            hashed = list(pool.map(lambda t: file_digest(t[0]), todo))
        self.hashed += len(todo)
        for (p, key, sig), digest in zip(todo, hashed, strict=True):
            out[p] = digest
            if sig is not None and _signature(p) == sig:  # not changed while we read it
                self._used[key] = [*sig, digest]
        return out

    def save(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"version": 1, "files": self._used})
