"""An app's Python lock: hashed pins (pip's --require-hashes format), parsed and checked, and the
packages that must never reach the device."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from builder.errors import RecipeError

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
