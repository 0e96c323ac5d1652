"""Fetch every input of a build like a package manager: verified, cached, resumable, offline-capable.

One entry point, `fetch(spec, opts)`, serves the vendor package, `files[].url`, and the app's
sources, models and wheels. In order, an input comes from:

1. a local path (`path:`, `file://` or a plain path): verified in place, never copied;
2. the content-addressed cache (`builder.cache`): a hit costs no network;
3. an `--input-dir`: a file the user downloaded by hand, matched by checksum whatever its name;
4. the network (not with `--offline`): streamed to `partial/<key>.part` in the cache, resumed with
   HTTP Range (+ If-Range) after a drop or a killed run, retried with backoff on connection errors,
   timeouts and 5xx, hashed (sha256 and md5 together) while it streams, verified, and only then
   renamed into the cache. A file that fails verification is moved to `<cache>/bad/`.

URLs are rewritten by `mirrors` (first matching prefix wins) before anything is contacted; the lock
file and the cache's URL index use the URL as written in the recipe.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from builder.cache import (
    CacheEntry,
    PruneResult,
    cache_list,
    cache_prune,
    default_cache_dir,
)
from builder.fetching.options import ChecksumError, Fetched, FetchOptions, rewrite_url
from builder.fetching.session import FetchSession
from builder.inputs import InputSpec
from builder.lockfile import Lock, LockedFile, LockEntry, apply_lock, read_lock, write_lock

__all__ = [
    "CacheEntry",
    "ChecksumError",
    "FetchOptions",
    "Fetched",
    "PruneResult",
    "apply_lock",
    "cache_list",
    "cache_prune",
    "default_cache_dir",
    "fetch",
    "head_size",
    "lock_inputs",
    "read_lock",
    "rewrite_url",
    "write_lock",
]


# ---------------------------------------------------------------------------- public API


def fetch(spec: InputSpec, opts: FetchOptions) -> Fetched:
    """Return `spec` as a verified local file (see the module docstring for where it comes from).

    Local `path:` inputs are verified against their pins and returned where they are; a local path
    that is a folder (a vendor package folder) is returned as-is, not hashed. A pin of md5 alone is
    accepted with a warning; an input with no pins is refused with `locked`, and otherwise accepted
    with a warning for https and local files but refused for plain http.
    """
    ctx = FetchSession(opts)
    try:
        return ctx.fetch(spec)
    finally:
        ctx.close()


def head_size(spec: InputSpec, opts: FetchOptions) -> int | None:
    """The size in bytes of an input, without downloading it (None when it cannot be known).

    Uses, in order, the pins (recipe or lock), a local file, the cache, then an HTTP HEAD (following
    redirects; a one-byte Range GET when HEAD gives no length). A local folder counts its files.
    """
    ctx = FetchSession(opts)
    try:
        return ctx.size_of(spec)
    finally:
        ctx.close()


def lock_inputs(specs: Iterable[InputSpec], opts: FetchOptions, existing: Lock | None = None) -> Lock:
    """A lock pinning every given URL input (and each part of a split input) by size and sha256.

    Inputs fully pinned by the recipe or `existing` are kept without network; the others are
    fetched (downloaded, or found in the cache or an input dir) and hashed. Local `path:` inputs
    are not locked.
    """
    ctx = FetchSession(replace(opts, lock=existing, locked=False), need_parts=True)
    lock = Lock()
    try:
        for spec in specs:
            if spec.path is not None:
                continue
            entry = _entry_if_fully_pinned(apply_lock(spec, existing), existing)
            if entry is None:
                entry = _entry_from_fetched(spec, ctx.fetch(spec))
            lock = lock.with_entry(entry)
    finally:
        ctx.close()
    return lock


# ---------------------------------------------------------------------------- lock helpers


def _entry_if_fully_pinned(spec: InputSpec, existing: Lock | None) -> LockEntry | None:
    if not spec.sha256 or spec.size is None:
        return None
    if spec.url:
        return LockEntry(url=spec.url, size=spec.size, sha256=spec.sha256, md5=spec.md5)
    parts = [existing.find_part(p) if existing else None for p in spec.parts]
    if any(p is None for p in parts):
        return None
    return LockEntry(
        size=spec.size, sha256=spec.sha256, md5=spec.md5, parts=tuple(p for p in parts if p is not None)
    )


def _entry_from_fetched(spec: InputSpec, fetched: Fetched) -> LockEntry:
    assert fetched.sha256 is not None and fetched.size is not None
    parts = tuple(
        LockedFile(url=url, size=part.size or 0, sha256=part.sha256 or "", md5=part.md5)
        for url, part in zip(spec.parts, fetched.parts, strict=True)
    )
    return LockEntry(url=spec.url, size=fetched.size, sha256=fetched.sha256, md5=fetched.md5, parts=parts)
