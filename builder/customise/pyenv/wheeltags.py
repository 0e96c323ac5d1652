"""Wheel file names and tags, and whether a wheel installs on the target (Python, ABI, platform)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from builder.customise.pyenv.lock import DEFAULT_GLIBC, normalize_name
from builder.errors import BuildError

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
