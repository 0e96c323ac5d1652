"""What a fetch is told and what it gives back: options, results, checksum errors, and the small
helpers about URLs, mirrors, sizes and digests that every part of fetching shares."""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import urllib3

from builder.cache import (
    CHUNK,
    CacheEntry,
    Digests,
    Hasher,
)
from builder.errors import FetchError
from builder.inputs import InputSpec
from builder.lockfile import Lock

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


def rewrite_url(url: str, mirrors: Iterable[tuple[str, str]]) -> str:
    """Apply the first mirror whose FROM prefix starts `url`."""
    for prefix, target in mirrors:
        if prefix and url.startswith(prefix):
            return target + url[len(prefix) :]
    return url


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
