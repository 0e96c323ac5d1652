"""An app's Python environment, made offline for the target without running anything of it.

Three steps, each usable on its own:

1. ``resolve_lock`` (``airbox-build lock``): ``uv pip compile`` resolves the app's requirements
   for the target (e.g. cp38 on manylinux2014_aarch64), wheels only, with every file's sha256.
   pip cannot do this from an x86 host: it evaluates environment markers for the host
   (pypa/pip#11664). The lock is refused if it pins opencv-python (see FORBIDDEN).
2. ``download_wheels``: the target's wheel of every pin, by hash. Wheels live in the fetch cache
   (content-addressed by sha256, published with the URL key ``wheel:<file name>``), so a second
   build needs no network; a wheel found in an ``--input-dir`` with a pinned hash is used in place.
   Missing ones are downloaded by the host's pip (``python -m pip download --no-deps
   --require-hashes --only-binary=:all: --platform ... --python-version ... --implementation cp
   --abi cp38``) from a requirements file this module writes from the parsed lock, so no option
   in the lock (``--index-url``, ``-e``, ...) reaches pip. Every file is then checked: a wheel
   (not an sdist), its hash pinned, its tags runnable by the target.
3. ``install_wheels``: unpacks the wheels into ``<app>/<target>`` as ``pip install --target``
   lays them out, but by this module: each wheel is a zip, every file is checked against the
   wheel's RECORD hash while it is written, names are checked like any archive's, nothing is
   compiled (no .pyc), no entry-point wrapper or ``.data/scripts`` file is written (they would
   carry the build host's interpreter path in their shebang: that is the "delete bin/" step),
   and each dist-info gets a RECORD of what was installed. Modes: 0755 when the zip marks a
   file executable, else 0644.

Why not ``pip install --target --platform ...``: pip would not check RECORD hashes, would write
host-shebang scripts to delete afterwards, and its output (RECORD, INSTALLER, file order) depends
on the host's pip version. Neither way runs code from the wheels.

Tags a target accepts (``Target``): the python tag ``cp38`` (with abi ``cp38`` or ``none``),
``cp3X`` with ``abi3`` for X <= 8, ``py3``/``py3X`` (X <= 8)/``py2.py3`` with abi ``none``;
the platform ``any``, ``manylinux2014_<arch>`` (glibc 2.17) or ``manylinux_2_N_<arch>`` with
2.N <= the target's glibc (Ubuntu 20.04: 2.31). ``linux_<arch>`` is refused (built for one
machine, not portable), as is every other architecture.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import html
import io
import logging
import os
import re
import shutil
import stat
import sys
import time
import urllib.parse
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

import requests

from builder.cache import Cache, hash_file
from builder.errors import BuildError, FetchError, RecipeError, ToolError
from builder.fetch import FetchOptions, rewrite_url
from builder.pool import worker_pool
from builder.run import find_tool, run

log = logging.getLogger("airbox-build")

PYPI_SIMPLE = "https://pypi.org/simple"
CACHE_URL_PREFIX = "wheel:"
DEFAULT_GLIBC = (2, 31)  # Ubuntu 20.04, the AirBox's system
INSTALLER = "airbox-build"
_CHUNK = 1 << 20

# Packages that must never reach the device: they shadow the vendor's cv2 (sophon-opencv, built
# for the TPU's video and JPEG units) that the apps load from /opt/sophon.
FORBIDDEN = frozenset(
    {
        "opencv-python",
        "opencv-python-headless",
        "opencv-contrib-python",
        "opencv-contrib-python-headless",
    }
)
FORBIDDEN_WHY = (
    "it would shadow sophon-opencv, the TPU-accelerated cv2 the device already has in "
    "/opt/sophon/sophon-opencv-latest/opencv-python (the service puts it on PYTHONPATH)"
)
FORBIDDEN_HINT = (
    "remove it from the requirements; if another package depends on it, pin a version that "
    "does not, or install that package with its dependencies checked by hand"
)


# ---------------------------------------------------------------------------- the lock


@dataclass(frozen=True)
class Pin:
    """One line of a hashed requirements lock: ``name==version --hash=sha256:...``."""

    name: str  # as written
    version: str
    hashes: tuple[str, ...]  # sha256, lower-case hex; the wheel used must have one of them
    line: int

    @property
    def key(self) -> str:
        return normalize_name(self.name)

    def requirement_line(self) -> str:
        hashes = " ".join(f"--hash=sha256:{h}" for h in self.hashes)
        return f"{self.name}=={self.version} {hashes}"


def normalize_name(name: str) -> str:
    """PEP 503: ``Pillow``, ``pillow`` and ``PIL-low`` are the same project."""
    return re.sub(r"[-_.]+", "-", name).lower()


_REQ = re.compile(
    r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[[^\]]*\])?\s*"
    r"===?\s*(?P<version>[A-Za-z0-9._+!-]+)\s*(?P<rest>.*)"
)
_HASH = re.compile(r"--hash[=\s]\s*(?P<algo>[a-z0-9]+):(?P<digest>[0-9a-fA-F]+)")
_COMMENT = re.compile(r"(^|\s+)#.*$")


def parse_lock(path: Path) -> tuple[Pin, ...]:
    """Read a pip requirements lock where every line pins ``==`` a version with sha256 hashes.

    Refused, naming the line: options (``--index-url``, ``-r``, ``-e``, ...: the index is chosen
    by the build, not the lock), URL or unpinned requirements, environment markers (pip would
    evaluate them for the build host), a pin without a sha256 hash, a project pinned twice, and
    the packages in FORBIDDEN.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read the Python lock: {exc.strerror or exc}", where=str(path)) from None
    pins: list[Pin] = []
    seen: dict[str, int] = {}
    for line_no, logical in _logical_lines(text):
        where = f"{path}:{line_no}"
        pin = _parse_pin(logical, line_no, where)
        if pin.key in FORBIDDEN:
            raise RecipeError(f"the lock pins {pin.name}: {FORBIDDEN_WHY}", where=where, hint=FORBIDDEN_HINT)
        if pin.key in seen:
            raise RecipeError(
                f"{pin.name} is pinned twice (first at line {seen[pin.key]})",
                where=where,
                hint="keep one pin; regenerate the lock with `airbox-build lock`",
            )
        seen[pin.key] = line_no
        pins.append(pin)
    if not pins:
        raise RecipeError("the Python lock pins nothing", where=str(path), hint=_LOCK_HINT)
    return tuple(pins)


_LOCK_HINT = "regenerate it with `airbox-build lock RECIPE` (uv pip compile --generate-hashes)"


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """(first line number, text) of each requirement, continuations joined, comments dropped."""
    buffer = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", raw).rstrip()
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            yield start, buffer.strip()
        buffer = ""
    if buffer.strip():
        yield start, buffer.strip()


def _parse_pin(logical: str, line_no: int, where: str) -> Pin:
    if logical.startswith("-"):
        option = logical.split()[0].split("=")[0]
        raise RecipeError(
            f"the option {option} is not accepted in a Python lock",
            where=where,
            hint="the package index is set by the build (--index-url, mirrors); "
            "a lock lists only `name==version --hash=sha256:...` lines",
        )
    if ";" in logical:
        raise RecipeError(
            "environment markers (`; ...`) are not accepted: pip would evaluate them for the build host",
            where=where,
            hint=f"resolve the lock for the target platform: {_LOCK_HINT}",
        )
    match = _REQ.fullmatch(logical)
    if match is None or "@" in logical.split("--hash")[0]:
        raise RecipeError(
            f"not an exact pin: {logical.split('--hash')[0].strip()!r}",
            where=where,
            hint=f"every line must be name==version with --hash=sha256:...; {_LOCK_HINT}",
        )
    rest = match["rest"]
    hashes: list[str] = []
    for found in _HASH.finditer(rest):
        if found["algo"] == "sha256" and len(found["digest"]) == 64:
            hashes.append(found["digest"].lower())
    leftover = _HASH.sub("", rest).strip()
    if leftover:
        raise RecipeError(f"unexpected text after the pin: {leftover!r}", where=where, hint=_LOCK_HINT)
    if not hashes:
        raise RecipeError(
            f"{match['name']}=={match['version']} has no --hash=sha256: pin",
            where=where,
            hint=f"every wheel must be pinned by hash; {_LOCK_HINT}",
        )
    return Pin(match["name"], match["version"], tuple(dict.fromkeys(hashes)), line_no)


# ---------------------------------------------------------------------------- wheel names and tags


@dataclass(frozen=True)
class WheelName:
    """The parts of a wheel file name (PEP 427): name-version(-build)?-python-abi-platform.whl."""

    filename: str
    name: str  # normalized
    version: str
    build: str | None
    pythons: tuple[str, ...]
    abis: tuple[str, ...]
    platforms: tuple[str, ...]


def parse_wheel_filename(filename: str) -> WheelName:
    """Split a wheel file name; ValueError when it is not one (e.g. an sdist)."""
    if not filename.endswith(".whl"):
        raise ValueError(f"{filename} is not a wheel (.whl)")
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename} is not a valid wheel file name")
    name, version = parts[0], parts[1]
    build = parts[2] if len(parts) == 6 else None
    python, abi, platform = parts[-3:]
    return WheelName(
        filename,
        normalize_name(name),
        version,
        build,
        tuple(python.split(".")),
        tuple(abi.split(".")),
        tuple(platform.split(".")),
    )


@dataclass(frozen=True)
class Target:
    """What the device runs: CPython `python` ("3.8" or "3.8.10") on `platform`, with `glibc`.

    `platform` is the tag pip downloads for (``manylinux2014_aarch64``); wheels for any glibc up
    to `glibc` are accepted.
    """

    python: str = "3.8"
    platform: str = "manylinux2014_aarch64"
    glibc: tuple[int, int] = DEFAULT_GLIBC

    @property
    def major_minor(self) -> tuple[int, int]:
        major, minor = self.python.split(".")[:2]
        return int(major), int(minor)

    @property
    def cp(self) -> str:
        major, minor = self.major_minor
        return f"cp{major}{minor}"

    @property
    def arch(self) -> str:
        found = re.fullmatch(
            r"(?:manylinux(?:1|2010|2014)|manylinux_\d+_\d+)_(?P<arch>[a-z0-9_]+)", self.platform
        )
        if found is None:
            raise BuildError(
                f"{self.platform!r} is not a Linux wheel platform",
                hint="use e.g. manylinux2014_aarch64 (the AirBox is aarch64 Linux)",
            )
        return found["arch"]


_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def _platform_problem(platform: str, target: Target) -> str | None:
    if platform == "any":
        return None
    arch = target.arch
    if not platform.endswith("_" + arch):
        return f"is built for {platform}, not {arch}"
    prefix = platform[: -len(arch) - 1]
    if prefix == "linux":
        return f"is tagged {platform}: built for one machine, not a portable manylinux wheel"
    needs = _manylinux_glibc(prefix)
    if needs is None:
        return f"is built for {platform}, not glibc Linux (manylinux)"
    if needs > target.glibc:
        have = f"{target.glibc[0]}.{target.glibc[1]}"
        return f"needs glibc {needs[0]}.{needs[1]} ({platform}); the target has {have}"
    return None


def _manylinux_glibc(prefix: str) -> tuple[int, int] | None:
    """The glibc a manylinux tag (without its arch) needs: manylinux2014 -> (2, 17)."""
    if prefix in _LEGACY_MANYLINUX:
        return _LEGACY_MANYLINUX[prefix]
    found = re.fullmatch(r"manylinux_(\d+)_(\d+)", prefix)
    return (int(found[1]), int(found[2])) if found else None


def _python_abi_ok(python: str, abi: str, target: Target) -> bool:
    major, minor = target.major_minor
    if abi == target.cp:
        return python == target.cp
    if abi == "abi3":
        found = re.fullmatch(rf"cp{major}(\d+)", python)
        return found is not None and int(found[1]) <= minor
    if abi == "none":
        if python in (target.cp, f"py{major}"):
            return True
        found = re.fullmatch(rf"py{major}(\d+)", python)
        return found is not None and int(found[1]) <= minor
    return False


def tag_problem(wheel: WheelName, target: Target) -> str | None:
    """Why the target cannot use this wheel (None: it can): interpreter, ABI, arch or glibc."""
    if not any(_python_abi_ok(p, a, target) for p in wheel.pythons for a in wheel.abis):
        pythons, abis = ".".join(wheel.pythons), ".".join(wheel.abis)
        return f"is built for {pythons}-{abis}, not CPython {target.python} ({target.cp})"
    problems = [_platform_problem(p, target) for p in wheel.platforms]
    if any(p is None for p in problems):
        return None
    return next(p for p in problems if p)


def _tag_rank(wheel: WheelName, target: Target) -> tuple[int, ...]:
    """Lower is preferred, as pip prefers: interpreter-specific, then abi3, then pure."""
    best_abi = min(
        {target.cp: 0, "abi3": 1, "none": 2}.get(a, 9)
        for p in wheel.pythons
        for a in wheel.abis
        if _python_abi_ok(p, a, target)
    )
    arch = target.arch
    glibc = max(
        (
            _manylinux_glibc(p[: -len(arch) - 1]) or (0, 0)
            for p in wheel.platforms
            if _platform_problem(p, target) is None and p != "any"
        ),
        default=(0, 0),
    )
    pure = all(p == "any" for p in wheel.platforms)
    return (int(pure), best_abi, -glibc[0], -glibc[1])


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


# ---------------------------------------------------------------------------- installing


class TreeSize(NamedTuple):
    """A tree's apparent bytes, file and folder counts, and its bytes in 4 KiB blocks."""

    bytes: int
    files: int
    dirs: int
    disk_bytes: int


@dataclass(frozen=True)
class InstalledDist:
    name: str
    version: str
    wheel: str
    files: int
    bytes: int


@dataclass(frozen=True)
class InstallResult:
    target: Path
    dists: tuple[InstalledDist, ...]
    files: int
    bytes: int
    skipped: tuple[str, ...]  # wheel members not installed: scripts with host shebangs

    @property
    def size(self) -> TreeSize:
        return tree_size(self.target)


def install_wheels(
    wheels: Sequence[Wheel | Path], target_dir: Path, *, target: Target | None = None, where: str = ""
) -> InstallResult:
    """Unpack `wheels` into the host folder `target_dir` (a PYTHONPATH entry), checked, no code run.

    Refuses an sdist, a forbidden package, a wheel the `target` (when given) cannot use, a file
    whose hash differs from the wheel's RECORD, unsafe member names or symlinks, and two wheels
    writing different bytes to one path. On error, `target_dir` is left half-filled: discard it.
    """
    if target is not None:
        for wheel in wheels:
            path = wheel.path if isinstance(wheel, Wheel) else Path(wheel)
            problem = tag_problem(_checked_wheel_name(path.name, where or str(path), BuildError), target)
            if problem:
                raise BuildError(
                    f"{path.name} {problem}",
                    where=where or str(path),
                    hint="re-resolve the lock for the target: `airbox-build lock`",
                )
    target_dir.mkdir(parents=True, exist_ok=True)
    owners: dict[str, tuple[str, str]] = {}  # path -> (wheel file name, sha256 of the content)
    dists: list[InstalledDist] = []
    skipped: list[str] = []
    paths = sorted((w.path if isinstance(w, Wheel) else Path(w) for w in wheels), key=lambda p: p.name)
    for path in paths:
        dist, dropped = _install_one(path, target_dir, owners, where)
        dists.append(dist)
        skipped.extend(f"{path.name}: {d}" for d in dropped)
    return InstallResult(
        target=target_dir,
        dists=tuple(dists),
        files=sum(d.files for d in dists),
        bytes=sum(d.bytes for d in dists),
        skipped=tuple(skipped),
    )


class _RecordEntry(NamedTuple):
    algo: str
    digest: str  # urlsafe base64 without padding, as in RECORD
    size: int | None


def _install_one(
    path: Path, target: Path, owners: dict[str, tuple[str, str]], where: str
) -> tuple[InstalledDist, list[str]]:
    name = _checked_wheel_name(path.name, where or str(path), BuildError)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _bad_wheel(path, f"cannot be read as a zip ({exc})") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        dist_info = _dist_info_dir(path, infos)
        data_dir = dist_info[: -len(".dist-info")] + ".data"
        _check_wheel_version(path, zf, dist_info)
        record = _read_record(path, zf, dist_info)
        unhashed = {f"{dist_info}/RECORD", f"{dist_info}/RECORD.jws", f"{dist_info}/RECORD.p7s"}
        installed: list[tuple[str, str, int]] = []  # (installed path, RECORD hash, size)
        skipped: list[str] = []
        for info in sorted(infos, key=lambda i: i.filename):
            member = info.filename
            _check_member(path, info)
            dest_rel = _install_path(path, member, data_dir, name.name)
            if member in unhashed:
                continue
            expected = record.get(member)
            if expected is None:
                raise _bad_wheel(path, f"{member} is not listed with a hash in its RECORD")
            if dest_rel is None:
                skipped.append(member)
                continue
            tmp, sha256, digest, size = _write_member(path, zf, info, target, dest_rel, expected)
            _place(tmp, target, dest_rel, owners, path.name, sha256, where)
            installed.append((dest_rel, f"{expected.algo}={digest}", size))
    _write_record(target, dist_info, installed)
    version = dist_info[: -len(".dist-info")].rsplit("-", 1)[-1]
    files = len(installed) + 2  # + INSTALLER and RECORD
    return InstalledDist(name.name, version, path.name, files, sum(s for _, _, s in installed)), skipped


def _place(
    tmp: Path, target: Path, rel: str, owners: dict[str, tuple[str, str]], wheel: str, sha256: str, where: str
) -> None:
    """Move a written member into place; the same path from two wheels must hold the same bytes."""
    if rel in owners:
        tmp.unlink()
        if owners[rel][1] != sha256:
            raise BuildError(
                f"{wheel} and {owners[rel][0]} both install {rel}, with different contents",
                where=where or str(target),
                hint="two pins provide the same module: drop one of them from the requirements",
            )
        return
    os.replace(tmp, target / rel)
    owners[rel] = (wheel, sha256)


def _bad_wheel(path: Path, why: str, hint: str | None = None) -> BuildError:
    return BuildError(
        f"{path.name}: {why}; refusing to install it",
        where=str(path),
        hint=hint or "the wheel is damaged or tampered with: delete it from the cache and download it again",
    )


def _dist_info_dir(path: Path, infos: list[zipfile.ZipInfo]) -> str:
    tops = {i.filename.split("/", 1)[0] for i in infos}
    found = sorted(t for t in tops if t.endswith(".dist-info"))
    if len(found) != 1:
        raise _bad_wheel(path, f"has {len(found)} .dist-info folders (a wheel has exactly one)")
    return found[0]


def _check_wheel_version(path: Path, zf: zipfile.ZipFile, dist_info: str) -> None:
    try:
        text = zf.read(f"{dist_info}/WHEEL").decode("utf-8")
    except KeyError:
        raise _bad_wheel(path, "has no WHEEL file") from None
    version = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Wheel-Version:")), ""
    )
    if version.split(".")[0] != "1":
        raise _bad_wheel(path, f"has Wheel-Version {version or '(none)'}; only 1.x is understood")


def _read_record(path: Path, zf: zipfile.ZipFile, dist_info: str) -> dict[str, _RecordEntry]:
    try:
        text = zf.read(f"{dist_info}/RECORD").decode("utf-8")
    except KeyError:
        raise _bad_wheel(path, "has no RECORD") from None
    record: dict[str, _RecordEntry] = {}
    for row in csv.reader(io.StringIO(text)):
        if not row or not row[0]:
            continue
        member, hash_field = row[0], row[1] if len(row) > 1 else ""
        size_field = row[2] if len(row) > 2 else ""
        if not hash_field:
            continue  # RECORD itself; files without a hash are refused when met
        algo, _, digest = hash_field.partition("=")
        if algo not in ("sha256", "sha384", "sha512"):
            raise _bad_wheel(path, f"RECORD hashes {member} with {algo!r} (sha256 or stronger needed)")
        record[member] = _RecordEntry(algo, digest, int(size_field) if size_field.isdigit() else None)
    return record


def _check_member(path: Path, info: zipfile.ZipInfo) -> None:
    member = info.filename
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in member) or "\\" in member:
        raise _bad_wheel(path, f"member {member!r} has a control character or backslash in its name")
    parts = member.split("/")
    if member.startswith("/") or ".." in parts or "" in parts or "." in parts:
        raise _bad_wheel(path, f"member {member!r} would be written outside its folder")
    if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16):
        raise _bad_wheel(path, f"member {member!r} is a symlink, which wheels cannot hold")
    if info.flag_bits & 0x1:
        raise _bad_wheel(path, f"member {member!r} is encrypted")


def _install_path(path: Path, member: str, data_dir: str, project: str) -> str | None:
    """Where a member goes under the target (None: not installed), as pip --target lays it out."""
    if not member.startswith(data_dir + "/"):
        return member
    parts = member.split("/")
    if len(parts) < 3:
        raise _bad_wheel(path, f"member {member!r} is not inside a .data category folder")
    category, rest = parts[1], "/".join(parts[2:])
    if category in ("purelib", "platlib"):
        return rest
    if category == "scripts":
        return None  # host shebangs: never installed
    if category == "headers":
        return f"include/{project}/{rest}"
    if category == "data":
        return None if rest.startswith("bin/") else rest
    raise _bad_wheel(path, f"member {member!r} is in the unknown .data category {category!r}")


def _write_member(
    path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, rel: str, expected: _RecordEntry
) -> tuple[Path, str, str, int]:
    """Write one member to a temporary file beside its place, checked against RECORD.

    Returns (the temporary file, sha256 hex, the RECORD digest, size)."""
    _makedirs(target, rel.rsplit("/", 1)[0] if "/" in rel else "")
    dest = target / rel
    checker = hashlib.new(expected.algo)
    sha256 = hashlib.sha256()
    size = 0
    tmp = dest.with_name(f".{dest.name}.airbox-tmp")
    with zf.open(info) as src, open(tmp, "wb") as out:
        while block := src.read(_CHUNK):
            checker.update(block)
            sha256.update(block)
            out.write(block)
            size += len(block)
    digest = base64.urlsafe_b64encode(checker.digest()).rstrip(b"=").decode()
    if digest != expected.digest.rstrip("=") or (expected.size is not None and expected.size != size):
        tmp.unlink()
        raise _bad_wheel(
            path,
            f"{info.filename} does not match its RECORD ({expected.algo} {digest}, size {size}; "
            f"RECORD says {expected.digest}, size {expected.size})",
        )
    executable = info.create_system == 3 and (info.external_attr >> 16) & 0o111
    os.chmod(tmp, 0o755 if executable else 0o644)
    return tmp, sha256.hexdigest(), digest, size


def _makedirs(target: Path, rel: str) -> None:
    """Make the folders of `rel` under `target`, each 0755 whatever the umask."""
    here = target
    for part in rel.split("/") if rel else ():
        here = here / part
        if not here.is_dir():
            here.mkdir()
            os.chmod(here, 0o755)


def _write_record(target: Path, dist_info: str, installed: list[tuple[str, str, int]]) -> None:
    folder = target / dist_info
    installer = (INSTALLER + "\n").encode()
    (folder / "INSTALLER").write_bytes(installer)
    os.chmod(folder / "INSTALLER", 0o644)
    digest = base64.urlsafe_b64encode(hashlib.sha256(installer).digest()).rstrip(b"=").decode()
    rows = [*installed, (f"{dist_info}/INSTALLER", f"sha256={digest}", len(installer))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for rel, hash_field, size in sorted(rows):
        writer.writerow([rel, hash_field, size])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    (folder / "RECORD").write_text(out.getvalue(), encoding="utf-8")
    os.chmod(folder / "RECORD", 0o644)


def tree_size(top: Path, block_size: int = 4096) -> TreeSize:
    """Bytes, files (symlinks included), folders (the top excluded) and block-rounded bytes."""
    size = files = dirs = disk = 0
    for root, dirnames, filenames in os.walk(top):
        dirs += len(dirnames)
        disk += block_size * len(dirnames)
        for name in filenames:
            st = os.lstat(os.path.join(root, name))
            files += 1
            if stat.S_ISLNK(st.st_mode):
                # A link target under 60 bytes lives in the inode (a "fast" symlink).
                disk += 0 if st.st_size < 60 else block_size
                continue
            size += st.st_size
            disk += -(-st.st_size // block_size) * block_size
        for name in list(dirnames):
            if os.path.islink(os.path.join(root, name)):
                dirnames.remove(name)  # counted above as a folder; never followed
    return TreeSize(size, files, dirs, disk)


def wheels_install_size(wheels: Sequence[Wheel | Path], block_size: int = 4096) -> TreeSize:
    """What install_wheels would write, from the wheels' zip directories (nothing unpacked)."""
    size = files = disk = 0
    folders: set[str] = set()
    for wheel in wheels:
        path = wheel.path if isinstance(wheel, Wheel) else Path(wheel)
        project = normalize_name(path.name.split("-", 1)[0])
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            data_dir = _dist_info_dir(path, infos)[: -len(".dist-info")] + ".data"
            for info in infos:
                rel = _install_path(path, info.filename, data_dir, project)
                if rel is None:
                    continue
                files += 1
                size += info.file_size
                disk += -(-info.file_size // block_size) * block_size
                parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
                while parent and parent not in folders:
                    folders.add(parent)
                    parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
        files += 1  # INSTALLER
        disk += block_size
    return TreeSize(size, files, len(folders), disk + block_size * len(folders))


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


# ---------------------------------------------------------------------------- resolving (the lock command)


def uv_platform(platform: str) -> str:
    """A wheel platform tag as uv's --python-platform: manylinux2014_aarch64 -> aarch64-manylinux2014."""
    found = re.fullmatch(r"(?P<libc>manylinux2014|manylinux_\d+_\d+)_(?P<arch>aarch64|x86_64)", platform)
    if found is None:
        raise BuildError(
            f"cannot resolve for the platform {platform!r}",
            hint="use manylinux2014_aarch64 or manylinux_2_N_aarch64 (the AirBox: aarch64, glibc 2.31)",
        )
    return f"{found['arch']}-{found['libc']}"


def find_uv() -> list[str]:
    """The command that runs uv: `uv` from PATH, else `python -m uv`."""
    exe = find_tool("uv")
    if exe is not None:
        return [exe]
    if find_spec("uv") is not None:
        return [sys.executable, "-m", "uv"]
    raise ToolError(
        "uv is needed to resolve a Python lock for another platform, and it is not installed",
        hint=f"install it: {sys.executable} -m pip install uv  (or see https://docs.astral.sh/uv/)",
    )


def resolve_lock(
    requirements_in: Path,
    out: Path,
    python_version: str,
    platform: str,
    exclude_newer: str | None,
    *,
    index: PipIndex | None = None,
) -> tuple[Pin, ...]:
    """Resolve `requirements_in` for the target with ``uv pip compile`` into the hashed lock `out`.

    Wheels only (``--only-binary :all:``); `exclude_newer` (``2024-08-15``) makes the resolution
    repeatable. The result is parsed (refusing e.g. opencv-python) before it replaces `out`.
    """
    index = index or PipIndex()
    args = [
        "pip", "compile", requirements_in.name,
        "--python-platform", uv_platform(platform), "--python-version", python_version,
        "--only-binary", ":all:", "--generate-hashes", "--no-header",
    ]  # fmt: skip
    # Any interpreter will do (nothing is installed into it): naming ours skips uv's search for a
    # Python of the target's version, which can take seconds and would find nothing useful.
    interpreter = ["--python", sys.executable]
    if exclude_newer:
        args += ["--exclude-newer", exclude_newer]
    if index.index_url:
        args += ["--index-url", index.index_url]
    for url in index.extra_index_urls:
        args += ["--extra-index-url", url]
    for link in index.find_links:
        args += ["--find-links", link]
    if index.no_index:
        args.append("--no-index")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    uv = find_uv()
    uv_version = run([*uv, "--version"]).stdout.decode(errors="replace").strip()
    cmd = [*uv, *args, *interpreter, "--output-file", str(tmp.resolve())]
    shown = " ".join(["uv", *args, "-o", out.name])
    env = {**os.environ, "UV_NO_PROGRESS": "1", "UV_PYTHON_DOWNLOADS": "never"}
    try:
        proc = run(cmd, cwd=requirements_in.parent, env=env, check=False)
        if proc.returncode != 0:
            err = "\n".join(proc.stderr.decode(errors="replace").strip().splitlines()[-15:])
            raise BuildError(
                f"uv could not resolve {requirements_in.name} for {platform} Python {python_version}\n{err}",
                where=str(requirements_in),
                hint="a package may have no wheel for the target: pin another version, or check the index",
            )
        header = (
            f"# Python lock for {platform}, CPython {python_version}: written by `airbox-build lock`.\n"
            f"# Resolved with {uv_version}: {shown}\n"
            "# Every pin is a wheel pinned by sha256; edit the .in file and re-run the lock command.\n"
        )
        body = tmp.read_text(encoding="utf-8")
        tmp.write_text(header + body, encoding="utf-8")
        pins = parse_lock(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return pins
