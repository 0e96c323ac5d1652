"""One HTTP download: streamed into its partial file, resumed with Range/If-Range, retried with
backoff, hashed while it streams, with progress events."""

from __future__ import annotations

import logging
import sys
import time
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

import requests

from builder.cache import (
    Digests,
    Hasher,
    PartialState,
    hash_stream_into,
)
from builder.errors import FetchError
from builder.fetching.options import (
    _NETWORK_ERRORS,
    EVENT_INTERVAL,
    MAX_BACKOFF,
    NOT_FOUND_HINT,
    QUIET_LINE_INTERVAL,
    _body_blocks,
    _content_range,
    _human,
    _retry_after,
    _Retryable,
    _size_or_none,
    url_basename,
)
from builder.inputs import InputSpec

log = logging.getLogger("airbox-build.fetch")

if TYPE_CHECKING:
    from builder.fetching.session import FetchSession


class Download:
    """Stream one URL into its partial file, resuming and retrying until it is complete."""

    def __init__(
        self, ctx: FetchSession, spec: InputSpec, url: str, effective: str, key: str, *, insecure_ok: bool
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

    def __init__(self, ctx: FetchSession, spec: InputSpec, url: str, total: int | None, initial: int) -> None:
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
