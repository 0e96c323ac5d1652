"""The content-addressed cache of fetched inputs.

Layout under the cache root (``default_cache_dir()`` or ``--cache-dir``)::

    sha256/ab/abcdef...            a verified blob, named by its sha256
    sha256/ab/abcdef....json       its metadata: sha256, md5, size, urls, parts, created, last_used
    md5/2c/2c384a...               index: a file holding the sha256 of the blob with this md5
    url/9f/9f86d0...               index: {"url", "sha256"} for the blob last fetched from a URL
                                   (the file name is the sha256 of the URL as written in the recipe)
    partial/<key>.part             a download in progress (never looks complete: it is renamed
    partial/<key>.json               into sha256/ only after verification); .json holds the URL,
                                     ETag and Last-Modified for a resume with If-Range
    locks/<name>.lock              advisory locks (flock; msvcrt on Windows; O_EXCL as a fallback)
    stat/<hash of path>.json       digests of the user's own files (input dirs, local paths),
                                     trusted while path, size, mtime and inode are unchanged
    bad/<time>-<name>              files that failed verification, kept for inspection

Writers publish every file with an atomic rename, so a reader (or a killed process) never sees a
half-written blob or metadata file. Two builds at once share the cache: a download holds the lock of
its partial key, so the second build waits and then finds the blob.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
try:  # Windows
    import msvcrt
except ImportError:
    msvcrt = None  # type: ignore[assignment]

log = logging.getLogger("airbox-build.cache")

CACHE_ENV = "AIRBOX_BUILD_CACHE"
CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """$AIRBOX_BUILD_CACHE, else the platform's user cache dir + airbox-build."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "airbox-build" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "airbox-build"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "airbox-build"


# ---------------------------------------------------------------------------- digests


@dataclass(frozen=True)
class Digests:
    sha256: str
    md5: str
    size: int


class Hasher:
    """sha256 and md5 of a stream, computed together in one pass."""

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def update(self, data: bytes) -> None:
        self._sha256.update(data)
        self._md5.update(data)
        self.size += len(data)

    def digests(self) -> Digests:
        return Digests(self._sha256.hexdigest(), self._md5.hexdigest(), self.size)


def hash_stream_into(hasher: Hasher, path: Path, limit: int | None = None) -> None:
    """Feed `path` (its first `limit` bytes when given) to `hasher`, 1 MiB at a time."""
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            block = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not block:
                break
            hasher.update(block)
            if remaining is not None:
                remaining -= len(block)


def hash_file(path: Path) -> Digests:
    hasher = Hasher()
    hash_stream_into(hasher, path)
    return hasher.digests()


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- locks


@contextlib.contextmanager
def file_lock(path: Path, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if needed) for the block.

    The lock dies with the process (a SIGKILLed download never blocks the next run), except with
    the O_EXCL fallback, which treats a lock file whose owner pid is gone as stale.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None and msvcrt is None:  # pragma: no cover - exotic platforms
        with _exclusive_file_lock(path, on_wait):
            yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            if on_wait is not None:
                on_wait()
            _wait_lock(fd)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def try_file_lock(path: Path) -> contextlib.AbstractContextManager[bool]:
    """Like file_lock but never waits: the block receives whether the lock was taken."""
    return _try_file_lock(path)


@contextlib.contextmanager
def _try_file_lock(path: Path) -> Iterator[bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None and msvcrt is None:  # pragma: no cover
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        taken = _try_lock(fd)
        try:
            yield taken
        finally:
            if taken:
                _unlock(fd)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    try:  # pragma: no cover - Windows
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _wait_lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    while not _try_lock(fd):  # pragma: no cover - Windows
        time.sleep(0.2)


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    os.lseek(fd, 0, os.SEEK_SET)  # pragma: no cover - Windows
    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # pragma: no cover


@contextlib.contextmanager
def _exclusive_file_lock(
    path: Path, on_wait: Callable[[], None] | None
) -> Iterator[None]:  # pragma: no cover - only without fcntl and msvcrt
    lock = path.with_suffix(path.suffix + ".excl")
    waited = False
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if _stale_lock(lock):
                lock.unlink(missing_ok=True)
                continue
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(0.2)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _stale_lock(lock: Path) -> bool:  # pragma: no cover - only without fcntl and msvcrt
    try:
        pid = int(lock.read_text() or "0")
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return True
    except (OSError, PermissionError):
        return False
    return False


# ---------------------------------------------------------------------------- atomic files


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers see old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class CacheEntry:
    """One verified blob in the cache (or, with partial=True, an unfinished download)."""

    path: Path
    size: int
    sha256: str | None
    md5: str | None = None
    urls: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()  # for a split input: the part URLs it was assembled from
    created: float = 0.0
    last_used: float = 0.0
    partial: bool = False


@dataclass(frozen=True)
class PruneResult:
    files: int
    bytes: int


@dataclass(frozen=True)
class PartialState:
    """What we know about a partial download, for a resume with If-Range."""

    url: str = ""
    etag: str | None = None
    last_modified: str | None = None
    total: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "total": self.total,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> PartialState:
        if not data:
            return cls()
        total = data.get("total")
        return cls(
            url=str(data.get("url") or ""),
            etag=data.get("etag"),
            last_modified=data.get("last_modified"),
            total=total if isinstance(total, int) else None,
        )


class Cache:
    """The cache at `root`. Cheap to construct; creates directories lazily."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- paths
    def blob_path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def meta_path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / f"{sha256}.json"

    def _md5_index(self, md5: str) -> Path:
        return self.root / "md5" / md5[:2] / md5

    def _url_index(self, url: str) -> Path:
        key = text_key(url)
        return self.root / "url" / key[:2] / key

    def partial_key(self, text: str) -> str:
        return text_key(text)[:40]

    def partial_path(self, key: str) -> Path:
        return self.root / "partial" / f"{key}.part"

    def partial_state_path(self, key: str) -> Path:
        return self.root / "partial" / f"{key}.json"

    def lock_path(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"

    def lock(
        self, name: str, on_wait: Callable[[], None] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.lock_path(name), on_wait=on_wait)

    # ---- lookups
    def get(self, sha256: str) -> CacheEntry | None:
        """The entry for `sha256` if its blob is present with the recorded size."""
        sha256 = sha256.lower()
        blob = self.blob_path(sha256)
        meta = read_json(self.meta_path(sha256))
        try:
            size = blob.stat().st_size
        except OSError:
            return None
        if meta is None or meta.get("size") != size:
            # A blob without metadata, or with a different size, was not put there by commit().
            log.warning("cache: ignoring %s (metadata missing or size differs)", blob)
            return None
        return _entry_from_meta(blob, meta)

    def find_md5(self, md5: str) -> CacheEntry | None:
        try:
            sha256 = self._md5_index(md5.lower()).read_text().strip()
        except OSError:
            return None
        entry = self.get(sha256)
        return entry if entry is not None and entry.md5 == md5.lower() else None

    def find_url(self, url: str) -> CacheEntry | None:
        data = read_json(self._url_index(url))
        if not data or data.get("url") != url:
            return None
        return self.get(str(data.get("sha256", "")))

    def touch(self, sha256: str) -> None:
        """Record that a blob was used now (for `cache prune --older-than`)."""
        with self.lock(f"blob-{sha256}"):
            meta = read_json(self.meta_path(sha256))
            if meta is not None:
                meta["last_used"] = time.time()
                write_json_atomic(self.meta_path(sha256), meta)

    # ---- partial downloads
    def read_partial_state(self, key: str) -> PartialState:
        return PartialState.from_json(read_json(self.partial_state_path(key)))

    def write_partial_state(self, key: str, state: PartialState) -> None:
        write_json_atomic(self.partial_state_path(key), state.to_json())

    def discard_partial(self, key: str) -> None:
        self.partial_path(key).unlink(missing_ok=True)
        self.partial_state_path(key).unlink(missing_ok=True)

    # ---- publishing
    def commit(
        self,
        src: Path,
        digests: Digests,
        *,
        url: str | None = None,
        parts: tuple[str, ...] = (),
    ) -> CacheEntry:
        """Move the verified file `src` into place under its sha256 and record its metadata.

        `src` must live on the cache's filesystem (partial/), so the move is an atomic rename.
        """
        blob = self.blob_path(digests.sha256)
        blob.parent.mkdir(parents=True, exist_ok=True)
        fsync_path(src)
        with self.lock(f"blob-{digests.sha256}"):
            now = time.time()
            meta = read_json(self.meta_path(digests.sha256)) or {
                "sha256": digests.sha256,
                "created": now,
                "urls": [],
            }
            urls = list(meta.get("urls") or [])
            if url and url not in urls:
                urls.append(url)
            meta.update({"size": digests.size, "md5": digests.md5, "urls": urls, "last_used": now})
            if parts:
                meta["parts"] = list(parts)
            # Metadata first: a reader then sees no blob, or a blob with its metadata.
            write_json_atomic(self.meta_path(digests.sha256), meta)
            if blob.exists() and blob.stat().st_size == digests.size:
                src.unlink(missing_ok=True)  # another build committed the same bytes first
            else:
                os.replace(src, blob)
        write_atomic(self._md5_index(digests.md5), digests.sha256.encode())
        if url:
            self.remember_url(url, digests.sha256)
        entry = self.get(digests.sha256)
        assert entry is not None
        return entry

    def remember_url(self, url: str, sha256: str) -> None:
        write_json_atomic(self._url_index(url), {"url": url, "sha256": sha256})

    def quarantine(self, src: Path, label: str) -> Path:
        """Move a file that failed verification to bad/, where nothing will use it."""
        bad = self.root / "bad"
        bad.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[-80:] or "input"
        dest = bad / f"{stamp}-{os.getpid()}-{safe}"
        os.replace(src, dest)
        return dest

    # ---- digests of the user's files, so a 10 GB file in --input-dir is hashed once
    def _stat_path(self, path: Path) -> Path:
        return self.root / "stat" / f"{text_key(str(path))}.json"

    def digests_of(self, path: Path) -> Digests:
        """sha256+md5 of a user's file, reusing a previous result while the file is unchanged."""
        path = path.resolve()
        st = path.stat()
        signature = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        memo = read_json(self._stat_path(path))
        if memo and all(memo.get(k) == v for k, v in signature.items()):
            return Digests(str(memo["sha256"]), str(memo["md5"]), int(memo["size"]))
        digests = hash_file(path)
        if path.stat().st_mtime_ns == st.st_mtime_ns:  # not modified while we read it
            with contextlib.suppress(OSError):
                write_json_atomic(
                    self._stat_path(path), {**signature, "sha256": digests.sha256, "md5": digests.md5}
                )
        return digests

    # ---- listing and pruning
    def entries(self) -> list[CacheEntry]:
        found: list[CacheEntry] = []
        for meta_file in sorted((self.root / "sha256").glob("*/*.json")):
            entry = self.get(meta_file.stem)
            if entry is not None:
                found.append(entry)
        for part in sorted((self.root / "partial").glob("*.part")):
            state = self.read_partial_state(part.stem)
            st = part.stat()
            found.append(
                CacheEntry(
                    path=part,
                    size=st.st_size,
                    sha256=None,
                    urls=(state.url,) if state.url else (),
                    created=st.st_mtime,
                    last_used=st.st_mtime,
                    partial=True,
                )
            )
        return found

    def prune(self, older_than: timedelta | None = None) -> PruneResult:
        """Remove blobs not used within `older_than` (all when None), idle partials and bad files."""
        cutoff = time.time() - older_than.total_seconds() if older_than is not None else None
        files = size = 0
        removed: set[str] = set()
        for entry in self.entries():
            if cutoff is not None and entry.last_used >= cutoff:
                continue
            if entry.partial:
                freed = self._remove_partial(entry.path.stem)
            else:
                assert entry.sha256 is not None
                freed = self._remove_blob(entry.sha256, cutoff)
                if freed:
                    removed.add(entry.sha256)
            if freed:
                files += 1
                size += freed
        for bad in sorted((self.root / "bad").glob("*")):
            st = bad.stat()
            if cutoff is None or st.st_mtime < cutoff:
                bad.unlink(missing_ok=True)
                files += 1
                size += st.st_size
        for work in sorted((self.root / "partial").glob("pip-*")):  # a pip download killed midway
            if work.is_dir() and not _pid_alive(work.name.split("-")[1]):
                size += sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
                shutil.rmtree(work, ignore_errors=True)
                files += 1
        self._drop_dangling_indexes(removed)
        if cutoff is None:
            for memo in (self.root / "stat").glob("*.json"):
                memo.unlink(missing_ok=True)
        return PruneResult(files=files, bytes=size)

    def _remove_blob(self, sha256: str, cutoff: float | None) -> int:
        with self.lock(f"blob-{sha256}"):
            meta = read_json(self.meta_path(sha256)) or {}
            if cutoff is not None and float(meta.get("last_used", 0)) >= cutoff:
                return 0  # used by a build since we listed it
            blob = self.blob_path(sha256)
            try:
                freed = blob.stat().st_size
            except OSError:
                freed = 0
            blob.unlink(missing_ok=True)
            self.meta_path(sha256).unlink(missing_ok=True)
            return freed

    def _remove_partial(self, key: str) -> int:
        with try_file_lock(self.lock_path(f"download-{key}")) as taken:
            if not taken:
                return 0  # a download is running right now
            part = self.partial_path(key)
            try:
                freed = part.stat().st_size
            except OSError:
                freed = 0
            self.discard_partial(key)
            return freed

    def _drop_dangling_indexes(self, removed: set[str]) -> None:
        for index in (self.root / "md5").glob("*/*"):
            with contextlib.suppress(OSError):
                if index.read_text().strip() in removed:
                    index.unlink()
        for index in (self.root / "url").glob("*/*"):
            data = read_json(index)
            if data is None or data.get("sha256") in removed:
                index.unlink(missing_ok=True)


def _pid_alive(text: str) -> bool:
    """Whether the process whose pid is `text` runs (True when that cannot be told)."""
    try:
        os.kill(int(text), 0)
    except ValueError:
        return False
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def _entry_from_meta(blob: Path, meta: dict[str, Any]) -> CacheEntry:
    return CacheEntry(
        path=blob,
        size=int(meta["size"]),
        sha256=str(meta.get("sha256") or blob.name),
        md5=meta.get("md5"),
        urls=tuple(meta.get("urls") or ()),
        parts=tuple(meta.get("parts") or ()),
        created=float(meta.get("created", 0.0)),
        last_used=float(meta.get("last_used", 0.0)),
    )


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on read-only fds
        pass
    finally:
        os.close(fd)


def cache_list(cache_dir: Path) -> list[CacheEntry]:
    """Every verified blob in the cache, then the unfinished downloads (partial=True)."""
    return Cache(cache_dir).entries()


def cache_prune(cache_dir: Path, older_than: timedelta | None = None) -> PruneResult:
    """Delete what was not used within `older_than` (everything when None); returns what was freed."""
    return Cache(cache_dir).prune(older_than)
