"""One fetch session: an input looked up in order (local path, cache, --input-dir, network), its
checksums verified, parts joined, and the lock's pins applied."""

from __future__ import annotations

import logging
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests

from builder.cache import (
    Cache,
    CacheEntry,
    Digests,
)
from builder.errors import FetchError
from builder.fetching.download import Download
from builder.fetching.options import (
    _NETWORK_ERRORS,
    LOCK_HINT,
    USER_AGENT,
    ChecksumError,
    Fetched,
    FetchOptions,
    _concatenate,
    _content_range,
    _digests_of_entry,
    _fetched,
    _files_under,
    _human,
    _local_size,
    _matches,
    _size_or_none,
    local_path_of,
    rewrite_url,
    url_basename,
)
from builder.inputs import InputSpec
from builder.lockfile import LockedFile, apply_lock

log = logging.getLogger("airbox-build.fetch")


# ---------------------------------------------------------------------------- the fetcher


class FetchSession:
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
            digests = Download(self, spec, url, effective, key, insecure_ok=insecure_ok).run()
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
