"""The target's wheel of every pin, by hash: from the cache, an --input-dir, or pip download."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder.cache import Cache, hash_file
from builder.customise.pyenv.lock import (
    CACHE_URL_PREFIX,
    DEFAULT_GLIBC,
    FORBIDDEN,
    FORBIDDEN_HINT,
    FORBIDDEN_WHY,
    PYPI_SIMPLE,
    Pin,
    normalize_name,
    parse_lock,
)
from builder.customise.pyenv.wheeltags import Target, WheelName, _tag_rank, parse_wheel_filename, tag_problem
from builder.errors import BuildError, FetchError
from builder.fetch import FetchOptions, rewrite_url
from builder.run import run

log = logging.getLogger("airbox-build")


# ---------------------------------------------------------------------------- downloading


@dataclass(frozen=True)
class Wheel:
    """A verified wheel for the target, ready to install."""

    path: Path
    name: WheelName
    sha256: str
    size: int
    source: str  # "cache" | "download" | "input-dir"
    pin: Pin | None = field(default=None, compare=False)

    @property
    def filename(self) -> str:
        return self.name.filename


@dataclass(frozen=True)
class PipIndex:
    """Where pip downloads from. None: pip's own configuration (pip.conf, PIP_INDEX_URL) or a
    `mirrors:` rewrite of https://pypi.org/simple."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()  # folders or URLs of wheels (offline wheelhouses, tests)
    no_index: bool = False


def download_wheels(
    lock_path: Path,
    platform: str,
    python_version: str,
    dest: Path,
    opts: FetchOptions,
    *,
    index: PipIndex | None = None,
    glibc: tuple[int, int] = DEFAULT_GLIBC,
    where: str = "",
) -> list[Wheel]:
    """The target's wheel of every pin of `lock_path`, verified, linked (or copied) into `dest`.

    From the cache, an input dir, then pip (not with ``opts.offline``). Returns them sorted by
    project name. Raises RecipeError for a bad lock, FetchError when a wheel cannot be had.
    """
    target = Target(python_version, platform, glibc)
    target.arch  # noqa: B018 - validates the platform early
    pins = parse_lock(lock_path)
    cache = Cache(opts.cache_dir)
    found: dict[str, Wheel] = {}
    for pin in pins:
        wheel = _from_cache(cache, pin, target) or _from_input_dirs(cache, opts.input_dirs, pin, target)
        if wheel is not None:
            found[pin.key] = wheel
    missing = [pin for pin in pins if pin.key not in found]
    if missing and opts.offline:
        names = ", ".join(f"{p.name}=={p.version}" for p in missing[:8]) + (
            " ..." if len(missing) > 8 else ""
        )
        raise FetchError(
            f"--offline: {len(missing)} wheel(s) of {lock_path.name} are not in the cache: {names}",
            where=where or str(lock_path),
            hint="run once without --offline, or put the wheels in an --input-dir (matched by sha256)",
        )
    if missing:
        found.update(
            _pip_download(cache, missing, target, index or PipIndex(), opts, where or str(lock_path))
        )
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for pin in sorted(pins, key=lambda p: p.key):
        wheel = found[pin.key]
        placed = dest / wheel.filename
        _link_or_copy(wheel.path, placed)
        wheels.append(Wheel(placed, wheel.name, wheel.sha256, wheel.size, wheel.source, pin))
    return wheels


def _from_cache(cache: Cache, pin: Pin, target: Target) -> Wheel | None:
    candidates: list[Wheel] = []
    for sha in pin.hashes:
        entry = cache.get(sha)
        if entry is None:
            continue
        for url in entry.urls:
            if not url.startswith(CACHE_URL_PREFIX):
                continue
            with contextlib.suppress(ValueError):
                name = parse_wheel_filename(url[len(CACHE_URL_PREFIX) :])
                if _matches_pin(name, pin) and tag_problem(name, target) is None:
                    candidates.append(Wheel(entry.path, name, sha, entry.size, "cache", pin))
                    break
    if not candidates:
        return None
    best = min(candidates, key=lambda w: (_tag_rank(w.name, target), w.filename))
    cache.touch(best.sha256)
    return best


def _from_input_dirs(cache: Cache, dirs: Sequence[Path], pin: Pin, target: Target) -> Wheel | None:
    prefix = pin.key.replace("-", "_")
    for top in dirs:
        for path in sorted(Path(top).rglob("*.whl")):
            if not normalize_name(path.name).replace("-", "_").startswith(prefix):
                continue
            with contextlib.suppress(ValueError):
                name = parse_wheel_filename(path.name)
                if not _matches_pin(name, pin) or tag_problem(name, target) is not None:
                    continue
                digests = cache.digests_of(path)
                if digests.sha256 in pin.hashes:
                    log.info("using %s from the input dir for %s==%s", path, pin.name, pin.version)
                    return Wheel(path, name, digests.sha256, digests.size, "input-dir", pin)
    return None


def _matches_pin(name: WheelName, pin: Pin) -> bool:
    return name.name == pin.key and _same_version(name.version, pin.version)


def _same_version(a: str, b: str) -> bool:
    return a.lower().replace("_", "-") == b.lower().replace("_", "-") or _release(a) == _release(b)


def _release(version: str) -> tuple[str, ...]:
    """`1.0` and `1.0.0` are the same version to pip."""
    parts = version.lower().split(".")
    while len(parts) > 1 and parts[-1] == "0":
        parts.pop()
    return tuple(parts)


def pip_python_version(version: str) -> tuple[str, bool]:
    """(the --python-version to give pip, whether to add --ignore-requires-python).

    pip reads "3.8" as 3.8.0 when it checks Requires-Python, so a package needing >= 3.8.1 would
    be refused; with a two-part version that check is left to the resolver (uv), which made the
    lock. Give the full version (3.8.10) to have pip check it too.
    """
    if re.fullmatch(r"\d+\.\d+", version):
        return version, True
    return version, False


def pip_download_command(
    requirements: Path,
    out_dir: Path,
    target: Target,
    index: PipIndex,
    mirrors: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """The pip command that downloads exactly the pinned wheels for the target."""
    version, ignore_requires_python = pip_python_version(target.python)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--require-hashes", "--only-binary=:all:",
        "--platform", target.platform, "--python-version", version,
        "--implementation", "cp", "--abi", target.cp,
        "--dest", str(out_dir), "--requirement", str(requirements),
        "--no-cache-dir", "--progress-bar", "off", "--disable-pip-version-check", "--no-input",
    ]  # fmt: skip
    if ignore_requires_python:
        cmd.append("--ignore-requires-python")
    index_url = index.index_url
    if index_url is None and mirrors:
        rewritten = rewrite_url(PYPI_SIMPLE + "/", mirrors)
        if rewritten != PYPI_SIMPLE + "/":
            index_url = rewritten
    if index.no_index:
        cmd.append("--no-index")
    elif index_url:
        cmd += ["--index-url", index_url]
    for url in index.extra_index_urls:
        cmd += ["--extra-index-url", url]
    for host in index.trusted_hosts:
        cmd += ["--trusted-host", host]
    for link in index.find_links:
        cmd += ["--find-links", link]
    return cmd


def _pip_download(
    cache: Cache, pins: list[Pin], target: Target, index: PipIndex, opts: FetchOptions, where: str
) -> dict[str, Wheel]:
    work = cache.root / "partial" / f"pip-{os.getpid()}-{time.monotonic_ns()}"
    out_dir = work / "wheels"
    out_dir.mkdir(parents=True)
    try:
        requirements = work / "requirements.txt"
        requirements.write_text("".join(pin.requirement_line() + "\n" for pin in pins), encoding="utf-8")
        cmd = pip_download_command(requirements, out_dir, target, index, opts.mirrors)
        log.info("downloading %d wheel(s) for %s %s with pip", len(pins), target.cp, target.platform)
        if opts.on_event is not None:
            opts.on_event({"event": "pip-download", "wheels": len(pins), "where": where})
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
        proc = run(cmd, env=env, check=False)
        if proc.returncode != 0:
            raise _pip_failure(proc.stderr.decode(errors="replace"), pins, target, where)
        return _adopt_downloads(cache, out_dir, pins, target, where)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pip_failure(stderr: str, pins: list[Pin], target: Target, where: str) -> FetchError:
    lines = [line for line in stderr.splitlines() if line.strip()]
    tail = "\n".join(lines[-12:])
    found = re.search(r"requirement ([A-Za-z0-9._-]+)==([^\s(]+)", stderr)
    if "No matching distribution" in stderr or "Could not find a version" in stderr:
        what = f"{found[1]}=={found[2]}" if found else "a pinned package"
        return FetchError(
            f"no wheel of {what} for {target.cp} {target.platform} on the index: it has only a source "
            f"distribution (refused: building it would run its code) or no build for this platform\n{tail}",
            where=where,
            hint="pick a version that has a wheel for the target, or check the index (--index-url, "
            "mirrors); then run `airbox-build lock` again",
        )
    if "DO NOT MATCH THE HASHES" in stderr:
        return FetchError(
            f"a downloaded wheel does not match the hashes in the lock\n{tail}",
            where=where,
            hint="the index (or a mirror) serves different files: check it, or re-run `airbox-build lock`",
        )
    return FetchError(
        f"pip could not download the wheels ({len(pins)} pins)\n{tail}",
        where=where,
        hint="check the network and the index (--index-url, mirrors:, pip.conf), or put the wheels in "
        "an --input-dir",
    )


def _adopt_downloads(
    cache: Cache, out_dir: Path, pins: list[Pin], target: Target, where: str
) -> dict[str, Wheel]:
    by_key = {pin.key: pin for pin in pins}
    found: dict[str, Wheel] = {}
    for path in sorted(out_dir.iterdir()):
        name = _checked_wheel_name(path.name, where)
        pin = by_key.get(name.name)
        if pin is None or not _same_version(name.version, pin.version):
            raise FetchError(f"pip downloaded {path.name}, which the lock does not pin", where=where)
        problem = tag_problem(name, target)
        if problem:
            raise FetchError(
                f"{path.name} {problem}",
                where=where,
                hint="re-resolve the lock for the target: `airbox-build lock`",
            )
        digests = cache.digests_of(path)
        if digests.sha256 not in pin.hashes:
            raise FetchError(
                f"{path.name} has sha256 {digests.sha256}, which the lock does not pin for {pin.name}",
                where=where,
            )
        entry = cache.commit(path, digests, url=CACHE_URL_PREFIX + path.name)
        found[pin.key] = Wheel(entry.path, name, digests.sha256, digests.size, "download", pin)
    absent = [p for p in pins if p.key not in found]
    if absent:
        raise FetchError(
            f"pip did not download {', '.join(f'{p.name}=={p.version}' for p in absent)}", where=where
        )
    return found


def _checked_wheel_name(
    filename: str, where: str, error: type[FetchError] | type[BuildError] = FetchError
) -> WheelName:
    try:
        name = parse_wheel_filename(filename)
    except ValueError:
        raise error(
            f"{filename} is not a wheel (a source distribution?): sdists are refused, because "
            "building them runs their code and would build for the host",
            where=where,
            hint="pin a version that has a wheel for the target; `airbox-build lock` resolves wheels only",
        ) from None
    if name.name in FORBIDDEN:
        raise error(f"{filename}: {FORBIDDEN_WHY}", where=where, hint=FORBIDDEN_HINT)
    return name


def _link_or_copy(src: Path, dest: Path) -> None:
    if dest.exists():
        if os.path.samefile(src, dest):
            return
        if dest.stat().st_size == src.stat().st_size and hash_file(dest).sha256 == hash_file(src).sha256:
            return
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
