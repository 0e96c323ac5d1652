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

import logging
import os
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import requests
import urllib3

from builder.cache import (
    CHUNK,
    Cache,
    CacheEntry,
    Digests,
    Hasher,
    PartialState,
    PruneResult,
    cache_list,
    cache_prune,
    default_cache_dir,
    hash_stream_into,
)
from builder.errors import FetchError
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

log = logging.getLogger("airbox-build.fetch")

USER_AGENT = "airbox-build (+https://github.com/radxa)"
MAX_BACKOFF = 30.0
EVENT_INTERVAL = 1.0  # seconds between progress events / quiet progress lines at most
QUIET_LINE_INTERVAL = 15.0
NOT_FOUND_HINT = (
    "check the URL; if the server cannot be reached from here, use a mirror (`mirrors:` in the recipe "
    "or --mirror FROM=TO) or download the file by hand into an --input-dir"
)
LOCK_HINT = "run `airbox-build lock RECIPE` to pin it by sha256 (and commit the .lock file)"
_NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class FetchOptions:
    """How to fetch. `mirrors` pairs are (FROM prefix, TO prefix), the first match wins, so put the
    command line's --mirror before the recipe's `mirrors:`. `progress` None means: a bar on a TTY."""

    cache_dir: Path
    offline: bool = False
    input_dirs: tuple[Path, ...] = ()
    mirrors: tuple[tuple[str, str], ...] = ()
    locked: bool = False
    lock: Lock | None = None
    progress: bool | None = None
    retries: int = 5
    timeout: float = 30.0
    on_event: Callable[[dict[str, Any]], None] | None = None
    backoff: float = 1.0  # seconds before the first retry; doubles each time, at most 30 s


@dataclass(frozen=True)
class Fetched:
    """A verified input. `sha256`, `md5` and `size` are None only for a local folder."""

    path: Path
    sha256: str | None
    md5: str | None
    size: int | None
    source: str  # "cache" | "download" | "input-dir" | "local"
    url: str | None = None  # as written in the recipe, before mirror rewrites
    parts: tuple[Fetched, ...] = field(default=(), repr=False)  # for a split input, each part


class ChecksumError(FetchError):
    """An input's bytes differ from its pins. The bad file (if it was ours) is in `moved_to`."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        expected: dict[str, str | int],
        actual: dict[str, str | int],
        moved_to: Path | None,
        hint: str | None,
        where: str | None,
    ) -> None:
        super().__init__(message, hint=hint, where=where)
        self.url = url
        self.expected = expected
        self.actual = actual
        self.moved_to = moved_to


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


# ---------------------------------------------------------------------------- public API


def fetch(spec: InputSpec, opts: FetchOptions) -> Fetched:
    """Return `spec` as a verified local file (see the module docstring for where it comes from).

    Local `path:` inputs are verified against their pins and returned where they are; a local path
    that is a folder (a vendor package folder) is returned as-is, not hashed. A pin of md5 alone is
    accepted with a warning; an input with no pins is refused with `locked`, and otherwise accepted
    with a warning for https and local files but refused for plain http.
    """
    ctx = _Context(opts)
    try:
        return ctx.fetch(spec)
    finally:
        ctx.close()


def head_size(spec: InputSpec, opts: FetchOptions) -> int | None:
    """The size in bytes of an input, without downloading it (None when it cannot be known).

    Uses, in order, the pins (recipe or lock), a local file, the cache, then an HTTP HEAD (following
    redirects; a one-byte Range GET when HEAD gives no length). A local folder counts its files.
    """
    ctx = _Context(opts)
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
    ctx = _Context(replace(opts, lock=existing, locked=False), need_parts=True)
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


def rewrite_url(url: str, mirrors: Iterable[tuple[str, str]]) -> str:
    """Apply the first mirror whose FROM prefix starts `url`."""
    for prefix, target in mirrors:
        if prefix and url.startswith(prefix):
            return target + url[len(prefix) :]
    return url


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


# ---------------------------------------------------------------------------- the fetcher


class _Context:
    """The state of one fetch call: options, cache, an HTTP session opened on first use."""

    def __init__(self, opts: FetchOptions, *, need_parts: bool = False) -> None:
        self.opts = opts
        self.cache = Cache(opts.cache_dir)
        # lock_inputs needs the digests of every part, so a split input is not served whole.
        self.need_parts = need_parts
        self._session: requests.Session | None = None

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
            self._session.headers["User-Agent"] = USER_AGENT
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()

    # ---- events
    def emit(self, event: str, spec: InputSpec, **data: Any) -> None:
        if self.opts.on_event is not None:
            self.opts.on_event({"event": event, "input": spec.name, "where": spec.where, **data})

    def warn(self, spec: InputSpec, message: str) -> None:
        log.warning("%s%s", f"{spec.where}: " if spec.where else "", message)
        self.emit("warning", spec, message=message)

    def done(self, spec: InputSpec, fetched: Fetched) -> Fetched:
        self.emit(
            "done",
            spec,
            url=fetched.url,
            path=str(fetched.path),
            source=fetched.source,
            sha256=fetched.sha256,
            size=fetched.size,
        )
        return fetched

    # ---- dispatch
    def fetch(self, spec: InputSpec) -> Fetched:
        if self.opts.lock is not None:
            spec = apply_lock(spec, self.opts.lock, strict=self.opts.locked)
        if spec.path is not None:
            return self.fetch_local(spec, Path(spec.path), url=None)
        if spec.parts:
            self.check_pin_policy(spec, [self.effective(p) for p in spec.parts])
            return self.fetch_split(spec)
        if not spec.url:
            raise FetchError("the input has neither url, path nor parts", where=spec.where or None)
        effective = self.effective(spec.url)
        self.check_pin_policy(spec, [effective])
        return self.fetch_url(spec, spec.url)

    def effective(self, url: str) -> str:
        return rewrite_url(url, self.opts.mirrors)

    def check_pin_policy(self, spec: InputSpec, effective_urls: list[str]) -> None:
        if spec.sha256:
            return
        where = spec.where or None
        if self.opts.locked:
            raise FetchError(
                f"{spec.display} is not pinned by sha256, and --locked refuses unpinned inputs",
                where=where,
                hint=f"{LOCK_HINT}, or add `sha256:` to the recipe",
            )
        if spec.md5:
            self.warn(spec, f"{spec.display} is pinned by md5 only; {LOCK_HINT}")
            return
        insecure = [u for u in effective_urls if urllib.parse.urlsplit(u).scheme == "http"]
        if insecure:
            raise FetchError(
                f"refusing to download {insecure[0]} over plain http without a checksum",
                where=where,
                hint="add `sha256:` to the recipe, or use an https URL or mirror",
            )
        self.warn(spec, f"{spec.display} has no checksum, so it is trusted as served; {LOCK_HINT}")

    def fetch_url(self, spec: InputSpec, url: str, *, insecure_ok: bool = False) -> Fetched:
        """One URL (a whole input or a part): local file, cache, input dir, then the network.

        `insecure_ok`: an unpinned part of a pinned split input may be redirected to plain http,
        because the whole is verified.
        """
        effective = self.effective(url)
        local = local_path_of(effective, spec.where or None)
        if local is not None:
            return self.fetch_local(spec, local, url=url)
        hit = self.cache_hit(spec, url)
        if hit is not None:
            return hit
        found = self.from_input_dirs(spec, url)
        if found is not None:
            return found
        if self.opts.offline:
            raise self.missing_offline(spec, url, effective)
        return self.download(spec, url, effective, insecure_ok=insecure_ok)

    # ---- local files
    def fetch_local(self, spec: InputSpec, path: Path, *, url: str | None) -> Fetched:
        where = spec.where or None
        if not path.exists():
            raise FetchError(
                f"{path} does not exist", where=where, hint="check the path (relative to the recipe file)"
            )
        if path.is_dir():
            if spec.sha256 or spec.md5 or spec.size is not None:
                self.warn(spec, f"{path} is a folder: its checksums and size cannot be checked")
            return self.done(spec, Fetched(path, None, None, None, "local", url=url))
        digests = self.cache.digests_of(path)
        self.verify(spec, url or str(path), digests, path, ours=False)
        return self.done(spec, _fetched(path, digests, "local", url))

    # ---- cache
    def cache_hit(self, spec: InputSpec, url: str) -> Fetched | None:
        entry = self.lookup(spec, url)
        if entry is None:
            return None
        assert entry.sha256 is not None
        self.check_other_pins(spec, url, entry)
        self.cache.touch(entry.sha256)
        return self.done(spec, _fetched(entry.path, _digests_of_entry(entry), "cache", url))

    def lookup(self, spec: InputSpec, url: str) -> CacheEntry | None:
        if spec.sha256:
            return self.cache.get(spec.sha256)
        if spec.md5:
            return self.cache.find_md5(spec.md5)
        return self.cache.find_url(url)

    def check_other_pins(self, spec: InputSpec, url: str, entry: CacheEntry) -> None:
        """A blob found by one pin must match the others too (else the recipe contradicts itself)."""
        self.verify(spec, url, _digests_of_entry(entry), entry.path, ours=False)

    # ---- input dirs
    def from_input_dirs(self, spec: InputSpec, url: str | None) -> Fetched | None:
        if not self.opts.input_dirs:
            return None
        name = url_basename(url) if url else ""
        candidates = list(_files_under(self.opts.input_dirs))
        if not (spec.sha256 or spec.md5):
            return self.input_dir_by_name(spec, url, name, candidates)
        if spec.size is not None:
            candidates = [c for c in candidates if _size_or_none(c) == spec.size]
        candidates.sort(key=lambda c: c.name != name)  # a file with the URL's name is hashed first
        for candidate in candidates:
            digests = self.cache.digests_of(candidate)
            if _matches(spec, digests):
                log.info("using %s from the input dir for %s", candidate, url or spec.display)
                return self.done(spec, _fetched(candidate, digests, "input-dir", url))
            if name and candidate.name == name:
                self.warn(spec, f"{candidate} has the name of {url} but not its checksum; ignored")
        return None

    def input_dir_by_name(
        self, spec: InputSpec, url: str | None, name: str, candidates: list[Path]
    ) -> Fetched | None:
        match = next((c for c in candidates if name and c.name == name), None)
        if match is None:
            return None
        self.warn(spec, f"using {match} for {url}, matched by name only (the input has no checksum)")
        digests = self.cache.digests_of(match)
        self.verify(spec, url or str(match), digests, match, ours=False)
        return self.done(spec, _fetched(match, digests, "input-dir", url))

    def missing_offline(self, spec: InputSpec, url: str, effective: str) -> FetchError:
        partial = self.cache.partial_path(self.cache.partial_key(effective))
        note = ""
        if partial.exists():
            note = f" (a partial download of {partial.stat().st_size} bytes is waiting to be resumed)"
        by = (
            "matched by checksum, whatever its name"
            if spec.sha256 or spec.md5
            else f"named {url_basename(url)!r}"
        )
        return FetchError(
            f"--offline: {url} is not in the cache {self.cache.root}{note}",
            where=spec.where or None,
            hint=f"run once without --offline to download it, or put the file in an --input-dir ({by})",
        )

    # ---- network
    def download(self, spec: InputSpec, url: str, effective: str, *, insecure_ok: bool) -> Fetched:
        key = self.cache.partial_key(effective)

        def waiting() -> None:
            log.info("waiting for another airbox-build that is downloading %s", effective)

        with self.cache.lock(f"download-{key}", on_wait=waiting):
            hit = self.cache_hit(spec, url)  # the other build may have just finished it
            if hit is not None:
                return hit
            digests = _Download(self, spec, url, effective, key, insecure_ok=insecure_ok).run()
            part = self.cache.partial_path(key)
            try:
                self.verify(spec, url, digests, part, ours=True)
            except ChecksumError:
                self.cache.discard_partial(key)
                raise
            entry = self.cache.commit(part, digests, url=url)
            self.cache.partial_state_path(key).unlink(missing_ok=True)
        log.info("downloaded %s (%s, sha256 %s)", url, _human(digests.size), digests.sha256)
        return self.done(spec, _fetched(entry.path, digests, "download", url))

    # ---- split inputs
    def fetch_split(self, spec: InputSpec) -> Fetched:
        index_key = "parts:" + "\n".join(spec.parts)
        if not self.need_parts:
            whole = self.cache_hit(spec, index_key) or self.from_input_dirs(spec, None)
            if whole is not None:
                return whole
        pinned = bool(spec.sha256 or spec.md5)
        parts = tuple(
            self.fetch_url(self.part_spec(spec, i), url, insecure_ok=pinned)
            for i, url in enumerate(spec.parts)
        )
        total = sum(p.size or 0 for p in parts)
        if spec.size is not None and total != spec.size:
            raise FetchError(
                f"the {len(parts)} parts of {spec.display} add up to {total} bytes, expected {spec.size}",
                where=spec.where or None,
                hint="check the list of parts (all of them, in order) and the recipe's size",
            )
        key = self.cache.partial_key(index_key)
        with self.cache.lock(f"download-{key}"):
            hit = self.cache_hit(spec, index_key)
            if hit is not None:
                return replace(hit, parts=parts)
            target = self.cache.partial_path(key)
            digests = _concatenate([p.path for p in parts], target)
            self.verify(spec, spec.display, digests, target, ours=True)
            entry = self.cache.commit(target, digests, parts=spec.parts)
            self.cache.remember_url(index_key, digests.sha256)
        sources = {p.source for p in parts}
        source = next(s for s in ("download", "input-dir", "local", "cache") if s in sources)
        return self.done(spec, replace(_fetched(entry.path, digests, source, None), parts=parts))

    def part_spec(self, spec: InputSpec, index: int) -> InputSpec:
        url = spec.parts[index]
        pins: LockedFile | None = self.opts.lock.find_part(url) if self.opts.lock else None
        return InputSpec(
            url=url,
            sha256=pins.sha256 if pins else None,
            md5=pins.md5 if pins else None,
            size=pins.size if pins else None,
            where=f"{spec.where} parts[{index}]" if spec.where else f"parts[{index}]",
            name=f"{spec.name or 'input'} part {index + 1}/{len(spec.parts)}",
        )

    # ---- verification
    def verify(self, spec: InputSpec, what: str, digests: Digests, path: Path, *, ours: bool) -> None:
        """Compare `digests` with every pin of `spec`; on a mismatch, move our file aside and fail."""
        expected: dict[str, str | int] = {}
        actual: dict[str, str | int] = {}
        for name, pin, got in (
            ("size", spec.size, digests.size),
            ("sha256", spec.sha256.lower() if spec.sha256 else None, digests.sha256),
            ("md5", spec.md5.lower() if spec.md5 else None, digests.md5),
        ):
            if pin is not None and pin != got:
                expected[name], actual[name] = pin, got
        if not expected:
            return
        moved = self.cache.quarantine(path, url_basename(what) or "input") if ours else None
        details = "; ".join(f"{k}: expected {expected[k]}, got {actual[k]}" for k in expected)
        hint = "the file on the server (or mirror) is not the one the recipe pins: check the URL and pins"
        if moved is not None:
            hint += f"; the bad download was moved to {moved}"
        elif not ours:
            hint = "the file is not the one the recipe pins: check the path and the pins"
        raise ChecksumError(
            f"checksum mismatch for {what}: {details}",
            url=what,
            expected=expected,
            actual=actual,
            moved_to=moved,
            hint=hint,
            where=spec.where or None,
        )

    # ---- sizes
    def size_of(self, spec: InputSpec) -> int | None:
        if self.opts.lock is not None:
            spec = apply_lock(spec, self.opts.lock)
        if spec.size is not None:
            return spec.size
        if spec.path is not None:
            return _local_size(Path(spec.path))
        if spec.parts:
            sizes = [self.url_size(self.part_spec(spec, i), u) for i, u in enumerate(spec.parts)]
            return None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)
        return self.url_size(spec, spec.url) if spec.url else None

    def url_size(self, spec: InputSpec, url: str) -> int | None:
        if spec.size is not None:
            return spec.size
        effective = self.effective(url)
        local = local_path_of(effective)
        if local is not None:
            return _local_size(local)
        entry = self.lookup(spec, url)
        if entry is not None:
            return entry.size
        if self.opts.offline:
            return None
        try:
            with self.session.head(effective, allow_redirects=True, timeout=self.opts.timeout) as resp:
                length = resp.headers.get("Content-Length")
                if resp.status_code == 200 and length is not None and length.isdigit():
                    return int(length)
            headers = {"Range": "bytes=0-0", "Accept-Encoding": "identity"}
            with self.session.get(effective, headers=headers, stream=True, timeout=self.opts.timeout) as resp:
                if resp.status_code == 206:
                    return _content_range(resp.headers.get("Content-Range"))[2]
                length = resp.headers.get("Content-Length")
                if resp.status_code == 200 and length is not None and length.isdigit():
                    return int(length)
        except _NETWORK_ERRORS as e:
            log.debug("size of %s unknown: %s", effective, e)
        return None


class _Download:
    """Stream one URL into its partial file, resuming and retrying until it is complete."""

    def __init__(
        self, ctx: _Context, spec: InputSpec, url: str, effective: str, key: str, *, insecure_ok: bool
    ) -> None:
        self.ctx = ctx
        self.insecure_ok = insecure_ok
        self.opts = ctx.opts
        self.spec = spec
        self.url = url
        self.effective = effective
        self.key = key
        self.part = ctx.cache.partial_path(key)
        self.hasher = Hasher()
        self.progress: _Progress | None = None
        state = ctx.cache.read_partial_state(key)
        if state.url != effective or not self.part.exists():
            ctx.cache.discard_partial(key)
            state = PartialState(url=effective)
        self.state = state

    def run(self) -> Digests:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self.part.touch()
        failures = 0
        try:
            while True:
                offset = self.prepare_offset()
                try:
                    self.attempt(offset)
                    return self.hasher.digests()
                except _Retryable as e:
                    if self.part.stat().st_size > offset:
                        failures = 0  # progress was made: a flaky link is not a dead one
                    failures += 1
                    if failures > self.opts.retries:
                        raise FetchError(
                            f"download of {self.effective} failed after {self.opts.retries} retries: {e}",
                            where=self.spec.where or None,
                            hint="run again to resume where it stopped; "
                            "if the server is unreachable from here, use a mirror or --input-dir",
                        ) from e
                    self.pause(failures, e)
        except FetchError:
            if not _size_or_none(self.part):
                self.ctx.cache.discard_partial(self.key)  # nothing worth resuming
            raise
        finally:
            if self.progress is not None:
                self.progress.close()

    def prepare_offset(self) -> int:
        """The size of the partial file, with the hasher fed exactly those bytes."""
        offset = self.part.stat().st_size
        if self.spec.size is not None and offset > self.spec.size:
            self.restart()
            offset = 0
        if self.hasher.size != offset:
            self.hasher = Hasher()
            hash_stream_into(self.hasher, self.part, offset)
        return offset

    def restart(self) -> None:
        with open(self.part, "wb"):
            pass
        self.hasher = Hasher()

    def pause(self, failures: int, error: _Retryable) -> None:
        delay = min(self.opts.backoff * 2 ** (failures - 1), MAX_BACKOFF)
        if error.retry_after is not None:
            delay = min(max(delay, error.retry_after), 60.0)
        message = f"{self.effective}: {error}; retry {failures}/{self.opts.retries} in {delay:.1f} s"
        log.warning("%s", message)
        self.ctx.emit("warning", self.spec, url=self.url, message=message)
        time.sleep(delay)

    def request_headers(self, offset: int) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
            # If-Range: a server whose file changed sends it whole (200) instead of a stale tail.
            etag = self.state.etag
            validator = etag if etag and not etag.startswith("W/") else self.state.last_modified
            if validator:
                headers["If-Range"] = validator
        return headers

    def attempt(self, offset: int) -> None:
        try:
            resp = self.ctx.session.get(
                self.effective,
                headers=self.request_headers(offset),
                stream=True,
                timeout=self.opts.timeout,
                allow_redirects=True,
            )
        except requests.exceptions.SSLError as e:
            raise FetchError(
                f"TLS verification failed for {self.effective}: {e}",
                where=self.spec.where or None,
                hint="a private CA can be trusted with REQUESTS_CA_BUNDLE=/path/to/ca.pem",
            ) from e
        except _NETWORK_ERRORS as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from e
        with resp:
            offset, total = self.check_response(resp, offset)
            self.check_size_early(total)
            self.remember_validators(resp, total)
            self.stream_body(resp, offset, total)

    def check_response(self, resp: requests.Response, offset: int) -> tuple[int, int | None]:
        """Interpret the status; returns the offset the body starts at and the full size if known."""
        status = resp.status_code
        if status == 416 and offset > 0:
            total = _content_range(resp.headers.get("Content-Range"))[2]
            if total == offset:
                return offset, total  # the partial file was already complete
            self.restart()
            raise _Retryable("the server refused the resume range; starting over")
        if status >= 500 or status in (408, 425, 429):
            raise _Retryable(f"HTTP {status} {resp.reason}", _retry_after(resp))
        if status in (404, 410):
            raise FetchError(
                f"{self.effective}: HTTP {status} {resp.reason}",
                where=self.spec.where or None,
                hint=NOT_FOUND_HINT,
            )
        if status not in (200, 206):
            raise FetchError(
                f"{self.effective}: HTTP {status} {resp.reason}",
                where=self.spec.where or None,
                hint="check the URL and whether the server needs a login (cloud drives: use --input-dir)",
            )
        self.check_final_scheme(resp)
        if status == 206:
            start, _end, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                self.restart()
                raise _Retryable(f"the server resumed at byte {start} instead of {offset}")
            return offset, total
        if offset > 0:
            log.info("%s: the server sent the whole file again (no resume, or it changed)", self.effective)
            self.restart()
        length = resp.headers.get("Content-Length")
        return 0, int(length) if length and length.isdigit() else None

    def check_final_scheme(self, resp: requests.Response) -> None:
        if self.insecure_ok or self.spec.sha256 or self.spec.md5:
            return
        if urllib.parse.urlsplit(resp.url).scheme == "http":
            raise FetchError(
                f"{self.effective} redirected to plain http ({resp.url}), and the input has no checksum",
                where=self.spec.where or None,
                hint="add `sha256:` to the recipe",
            )

    def check_size_early(self, total: int | None) -> None:
        if self.spec.size is not None and total is not None and total != self.spec.size:
            self.ctx.cache.discard_partial(self.key)
            raise FetchError(
                f"size mismatch for {self.url}: the server announces {total} bytes, "
                f"expected {self.spec.size}",
                where=self.spec.where or None,
                hint="the URL (or mirror) serves a different file than the recipe pins: "
                "check the URL, size and checksums",
            )

    def remember_validators(self, resp: requests.Response, total: int | None) -> None:
        state = PartialState(
            url=self.effective,
            etag=resp.headers.get("ETag"),
            last_modified=resp.headers.get("Last-Modified"),
            total=total,
        )
        if state != self.state:
            self.state = state
            self.ctx.cache.write_partial_state(self.key, state)

    def stream_body(self, resp: requests.Response, offset: int, total: int | None) -> None:
        if self.progress is None:
            self.progress = _Progress(self.ctx, self.spec, self.url, total, offset)
        else:
            self.progress.reset(total, offset)
        body = _body_blocks(resp.raw)
        with open(self.part, "ab") as out:
            while True:
                try:
                    block = next(body, None)
                except _NETWORK_ERRORS as e:
                    raise _Retryable(f"connection lost after {self.hasher.size} bytes ({e})") from e
                if block is None:
                    break
                out.write(block)
                self.hasher.update(block)
                self.progress.update(len(block), self.hasher.size)
                if self.spec.size is not None and self.hasher.size > self.spec.size:
                    self.ctx.cache.discard_partial(self.key)
                    raise FetchError(
                        f"size mismatch for {self.url}: more than the expected {self.spec.size} bytes",
                        where=self.spec.where or None,
                        hint="the URL serves a different file than the recipe pins",
                    )
        if total is not None and self.hasher.size < total:
            raise _Retryable(f"connection closed after {self.hasher.size} of {total} bytes")


class _Progress:
    """A tqdm bar on a TTY, otherwise an info line now and then; plus throttled progress events."""

    def __init__(self, ctx: _Context, spec: InputSpec, url: str, total: int | None, initial: int) -> None:
        self.ctx = ctx
        self.spec = spec
        self.url = url
        self.total = total
        show = ctx.opts.progress if ctx.opts.progress is not None else sys.stderr.isatty()
        self.bar: Any = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=spec.name or url_basename(url),
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )
        resumed = f", resuming at {_human(initial)}" if initial else ""
        log.info("downloading %s (%s%s)", url, _human(total) if total else "size unknown", resumed)
        ctx.emit("start", spec, url=url, size=total, offset=initial)
        self.last_event = self.last_line = time.monotonic()

    def reset(self, total: int | None, initial: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.reset(total=total)
            self.bar.update(initial)

    def update(self, n: int, done: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        now = time.monotonic()
        if now - self.last_event >= EVENT_INTERVAL:
            self.last_event = now
            self.ctx.emit("progress", self.spec, url=self.url, bytes=done, total=self.total)
        if self.bar is None and now - self.last_line >= QUIET_LINE_INTERVAL:
            self.last_line = now
            of = f" of {_human(self.total)}" if self.total else ""
            log.info("%s: %s%s", url_basename(self.url), _human(done), of)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- small helpers


def local_path_of(url: str, where: str | None = None) -> Path | None:
    """The local path a `file://` URL or a plain path names; None for a network URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if parts.scheme in ("", *(chr(c) for c in range(ord("a"), ord("z") + 1))):
        return Path(url).expanduser().absolute()  # a plain path (or C:\... on Windows)
    if parts.scheme in ("http", "https"):
        return None
    raise FetchError(
        f"unsupported URL scheme {parts.scheme!r} in {url}",
        where=where,
        hint="use https://, http:// or file:// (or a mirror that rewrites it to one of them)",
    )


def url_basename(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])


def _body_blocks(raw: Any) -> Iterator[bytes]:
    """The raw body (never decoded: a .gz stays a .gz) in blocks of at most 1 MiB, each handed over
    as soon as it arrives, so the partial file and the progress bar follow a slow link closely."""
    if not hasattr(raw, "read1"):  # urllib3 < 2.3
        yield from raw.stream(CHUNK, decode_content=False)
        return
    while block := raw.read1(CHUNK, decode_content=False):
        yield block


def _files_under(dirs: Iterable[Path]) -> Iterator[Path]:
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            subdirs.sort()
            for name in sorted(files):
                yield Path(root) / name


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _local_size(path: Path) -> int | None:
    if path.is_dir():
        return sum(s for s in (_size_or_none(f) for f in _files_under([path])) if s is not None)
    return _size_or_none(path)


def _matches(spec: InputSpec, digests: Digests) -> bool:
    return (
        (spec.sha256 is None or spec.sha256.lower() == digests.sha256)
        and (spec.md5 is None or spec.md5.lower() == digests.md5)
        and (spec.size is None or spec.size == digests.size)
    )


def _fetched(path: Path, digests: Digests, source: str, url: str | None) -> Fetched:
    return Fetched(path, digests.sha256, digests.md5, digests.size, source, url=url)


def _digests_of_entry(entry: CacheEntry) -> Digests:
    assert entry.sha256 is not None
    return Digests(entry.sha256, entry.md5 or "", entry.size)


def _concatenate(sources: list[Path], target: Path) -> Digests:
    """Write `sources` one after the other into `target`, hashing as we go."""
    target.parent.mkdir(parents=True, exist_ok=True)
    hasher = Hasher()
    with open(target, "wb") as out:
        for source in sources:
            with open(source, "rb") as f:
                while block := f.read(CHUNK):
                    out.write(block)
                    hasher.update(block)
    return hasher.digests()


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 199, 1000); `bytes */1000` -> (None, None, 1000)."""
    if not value or not value.startswith("bytes "):
        return None, None, None
    span, _, total_text = value[6:].partition("/")
    total = int(total_text) if total_text.strip().isdigit() else None
    start_text, _, end_text = span.partition("-")
    if start_text.strip().isdigit() and end_text.strip().isdigit():
        return int(start_text), int(end_text), total
    return None, None, total


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _human(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover
