"""What an app's Python tree will take on the device, estimated from its lock before downloading."""

from __future__ import annotations

import html
import logging
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from builder.cache import Cache
from builder.customise.pyenv.download import PipIndex, Wheel, _from_cache, _from_input_dirs, _matches_pin
from builder.customise.pyenv.install import wheels_install_size
from builder.customise.pyenv.lock import DEFAULT_GLIBC, PYPI_SIMPLE, Pin, parse_lock
from builder.customise.pyenv.wheeltags import Target, _tag_rank, parse_wheel_filename, tag_problem
from builder.fetch import FetchOptions, rewrite_url
from builder.pool import worker_pool

log = logging.getLogger("airbox-build")


# ---------------------------------------------------------------------------- estimating from the lock


# Installed (block-rounded) bytes per byte of wheel: 3.9 on the SD-lcm-tpu lock (84 cp38 aarch64
# wheels, 219 MiB -> 849 MiB). Used only for wheels neither cached nor downloaded yet; rounded up.
WHEEL_EXPANSION = 4.5
_SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
_ANCHOR = re.compile(r"<a\s[^>]*href=[\"']([^\"']+)[\"'][^>]*>", re.IGNORECASE)


@dataclass(frozen=True)
class PythonEstimate:
    bytes: int  # block-rounded bytes of the installed tree (an upper estimate when not exact)
    exact: bool  # from the cached wheels themselves
    unknown: tuple[str, ...] = ()  # pins whose size could not be found (not counted in bytes)


def estimate_python_tree(
    lock_path: Path,
    platform: str,
    python_version: str,
    opts: FetchOptions,
    *,
    index: PipIndex | None = None,
    glibc: tuple[int, int] = DEFAULT_GLIBC,
) -> PythonEstimate:
    """The size of the installed tree of a lock, before downloading any wheel.

    Exact when every wheel is in the cache (or an input dir): read from the zip directories.
    Otherwise each missing wheel's size comes from the index (the simple API: PEP 700 sizes in
    its JSON form, else a HEAD of the file an HTML page links), times WHEEL_EXPANSION.
    With ``opts.offline`` (or an unreachable index), missing ones are reported as unknown.
    """
    target = Target(python_version, platform, glibc)
    pins = parse_lock(lock_path)
    cache = Cache(opts.cache_dir)
    have: list[Wheel] = []
    missing: list[Pin] = []
    for pin in pins:
        wheel = _from_cache(cache, pin, target) or _from_input_dirs(cache, opts.input_dirs, pin, target)
        if wheel is None:
            missing.append(pin)
        else:
            have.append(wheel)
    total = wheels_install_size(have).disk_bytes if have else 0
    if not missing:
        return PythonEstimate(total, exact=True)
    if opts.offline:
        return PythonEstimate(total, exact=False, unknown=tuple(f"{p.name}=={p.version}" for p in missing))
    base = _index_url(index or PipIndex(), opts.mirrors)
    with requests.Session() as session, worker_pool(8) as pool:
        session.headers["User-Agent"] = "airbox-build"
        sizes = list(pool.map(lambda p: _index_wheel_size(session, base, p, target, opts.timeout), missing))
    unknown = tuple(f"{p.name}=={p.version}" for p, s in zip(missing, sizes, strict=True) if s is None)
    total += int(sum(s for s in sizes if s is not None) * WHEEL_EXPANSION)
    return PythonEstimate(total, exact=False, unknown=unknown)


def _index_url(index: PipIndex, mirrors: Sequence[tuple[str, str]]) -> str:
    if index.index_url:
        return index.index_url.rstrip("/")
    return rewrite_url(PYPI_SIMPLE + "/", mirrors).rstrip("/")


def _index_wheel_size(
    session: requests.Session, base: str, pin: Pin, target: Target, timeout: float
) -> int | None:
    """The size of the pin's best wheel for the target, from the index; None when unknown."""
    page = f"{base}/{pin.key}/"
    try:
        reply = session.get(page, headers={"Accept": _SIMPLE_ACCEPT}, timeout=timeout)
        reply.raise_for_status()
        candidates: list[tuple[tuple[int, ...], int | None, str]] = []
        if "json" in reply.headers.get("Content-Type", ""):
            for item in reply.json().get("files") or []:
                found = _candidate(
                    pin, target, str(item.get("filename")), (item.get("hashes") or {}).get("sha256")
                )
                if found is not None:
                    size = item.get("size")
                    candidates.append((found, size if isinstance(size, int) else None, str(item.get("url"))))
        else:
            for href in _ANCHOR.findall(reply.text):
                url = urllib.parse.urljoin(reply.url, html.unescape(href))
                path, _, fragment = url.partition("#")
                sha = fragment.split("=", 1)[1] if fragment.startswith("sha256=") else None
                found = _candidate(pin, target, urllib.parse.unquote(path.rsplit("/", 1)[-1]), sha)
                if found is not None:
                    candidates.append((found, None, path))
        if not candidates:
            return None
        _, size, url = min(candidates, key=lambda c: c[0])
        if size is None:
            head = session.head(url, allow_redirects=True, timeout=timeout)
            head.raise_for_status()
            size = int(head.headers["Content-Length"])
        return size
    except (requests.RequestException, ValueError, KeyError) as exc:
        log.debug("no size for %s==%s from %s: %s", pin.name, pin.version, page, exc)
        return None


def _candidate(pin: Pin, target: Target, filename: str, sha256: str | None) -> tuple[int, ...] | None:
    """The rank of an index file when it is a wheel of the pin, pinned and usable by the target."""
    try:
        name = parse_wheel_filename(filename)
    except ValueError:
        return None
    if sha256 not in pin.hashes or not _matches_pin(name, pin) or tag_problem(name, target) is not None:
        return None
    return _tag_rank(name, target)
