"""The lock file `<recipe>.lock`: every downloaded input of a recipe, pinned by size and sha256.

`airbox-build lock recipe.yaml` writes ``recipe.yaml.lock`` next to the recipe; a build reads it when
present, and ``--locked`` refuses any input the recipe or the lock does not pin by sha256.

Format: YAML, written in a fixed order so that diffs read well::

    # airbox-build lock file: written by `airbox-build lock`; commit it next to the recipe.
    version: 1
    inputs:
    - url: https://dl.radxa.com/.../sdcard.img.zip   # exactly as written in the recipe,
      size: 1288490188                              #   before any mirror rewrite
      sha256: 9f86d081884c7d65...                   # 64 lowercase hex
      md5: 2c384ae51ce63cf2...                      # optional, kept when known
    - parts:                                        # a split input: parts in order,
      - url: https://example.com/model.bin.aa       #   each pinned on its own,
        size: 1048576
        sha256: ...
      - url: https://example.com/model.bin.ab
        size: 4242
        sha256: ...
      size: 1052818                                 # and the concatenation as a whole
      sha256: ...

An entry is found by its URL, or for a split input by its list of part URLs. Local ``path:`` inputs
are the user's own files and are not locked (the build report records their digests).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from builder.cache import write_atomic
from builder.errors import FetchError, RecipeError
from builder.inputs import InputSpec

log = logging.getLogger("airbox-build.lock")

LOCK_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_HEADER = (
    "# airbox-build lock file: written by `airbox-build lock`; commit it next to the recipe.\n"
    "# Keys are URLs as written in the recipe (before mirror rewrites).\n"
)


@dataclass(frozen=True)
class LockedFile:
    """One downloaded file: a whole input or one part of a split input."""

    url: str
    size: int
    sha256: str
    md5: str | None = None


@dataclass(frozen=True)
class LockEntry:
    """The pins of one input: by `url`, or by `parts` (then size/sha256 are of the whole)."""

    size: int
    sha256: str
    url: str | None = None
    md5: str | None = None
    parts: tuple[LockedFile, ...] = ()

    @property
    def key(self) -> str | tuple[str, ...]:
        return self.url if self.url is not None else tuple(p.url for p in self.parts)


@dataclass(frozen=True)
class Lock:
    entries: tuple[LockEntry, ...] = ()

    def find(self, spec: InputSpec) -> LockEntry | None:
        key = spec_key(spec)
        if key is None:
            return None
        return next((e for e in self.entries if e.key == key), None)

    def find_part(self, url: str) -> LockedFile | None:
        """The pins of a part URL, from whichever split input lists it."""
        for entry in self.entries:
            for part in entry.parts:
                if part.url == url:
                    return part
        return None

    def with_entry(self, entry: LockEntry) -> Lock:
        """A lock with `entry` added, replacing any entry with the same key."""
        kept = tuple(e for e in self.entries if e.key != entry.key)
        return Lock((*kept, entry))


def spec_key(spec: InputSpec) -> str | tuple[str, ...] | None:
    if spec.url:
        return spec.url
    if spec.parts:
        return tuple(spec.parts)
    return None


def lock_path_for(recipe: Path) -> Path:
    """`recipe.yaml` -> `recipe.yaml.lock`, beside it."""
    return recipe.with_name(recipe.name + ".lock")


def apply_lock(spec: InputSpec, lock: Lock | None, *, strict: bool = False) -> InputSpec:
    """The spec with the lock's pins filled in where the recipe has none.

    When the recipe pins something the lock contradicts (the recipe was edited after locking), the
    recipe wins with a warning; with `strict` (``--locked``) that is an error.
    """
    entry = lock.find(spec) if lock is not None else None
    if entry is None:
        return spec
    conflicts = [
        f"{name}: recipe {mine}, lock {theirs}"
        for name, mine, theirs in (
            ("sha256", _lower(spec.sha256), entry.sha256),
            ("md5", _lower(spec.md5), entry.md5),
            ("size", spec.size, entry.size),
        )
        if mine is not None and theirs is not None and mine != theirs
    ]
    if conflicts:
        message = f"the lock file disagrees with the recipe for {spec.display} ({'; '.join(conflicts)})"
        hint = "the recipe changed since the lock was written: run `airbox-build lock RECIPE` again"
        if strict:
            raise FetchError(message, hint=hint, where=spec.where or None)
        log.warning("%s; using the recipe's pins (%s)", message, hint)
        return spec
    return replace(
        spec,
        sha256=_lower(spec.sha256) or entry.sha256,
        md5=_lower(spec.md5) or entry.md5,
        size=spec.size if spec.size is not None else entry.size,
    )


def _lower(value: str | None) -> str | None:
    return value.lower() if value else None


# ---------------------------------------------------------------------------- reading


def read_lock(path: Path) -> Lock:
    """Parse and validate a lock file; errors name the file and the key path."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"cannot read the lock file: {e.strerror}", where=str(path)) from e
    except yaml.YAMLError as e:
        raise RecipeError(
            f"the lock file is not valid YAML: {e}",
            where=str(path),
            hint="regenerate it with `airbox-build lock RECIPE`",
        ) from e
    if not isinstance(data, dict):
        raise _bad(path, "", "expected a mapping with `version` and `inputs`")
    if data.get("version") != LOCK_VERSION:
        raise _bad(path, "version", f"unsupported version {data.get('version')!r} (expected {LOCK_VERSION})")
    unknown = set(data) - {"version", "inputs"}
    if unknown:
        raise _bad(path, sorted(unknown)[0], "unknown key")
    inputs = data.get("inputs") or []
    if not isinstance(inputs, list):
        raise _bad(path, "inputs", "expected a list")
    return Lock(tuple(_parse_entry(path, f"inputs[{i}]", item) for i, item in enumerate(inputs)))


def load_lock_if_present(recipe: Path) -> Lock | None:
    lock_file = lock_path_for(recipe)
    return read_lock(lock_file) if lock_file.exists() else None


def _parse_entry(path: Path, where: str, item: Any) -> LockEntry:
    if not isinstance(item, dict):
        raise _bad(path, where, "expected a mapping")
    _no_unknown_keys(path, where, item, {"url", "parts", "size", "sha256", "md5"})
    has_url, has_parts = "url" in item, "parts" in item
    if has_url == has_parts:
        raise _bad(path, where, "needs exactly one of `url` or `parts`")
    parts: tuple[LockedFile, ...] = ()
    if has_parts:
        if not isinstance(item["parts"], list) or not item["parts"]:
            raise _bad(path, f"{where}.parts", "expected a non-empty list")
        parts = tuple(_parse_file(path, f"{where}.parts[{i}]", p) for i, p in enumerate(item["parts"]))
    return LockEntry(
        url=_url(path, where, item) if has_url else None,
        size=_size(path, where, item),
        sha256=_digest(path, where, item, "sha256", _SHA256, required=True) or "",
        md5=_digest(path, where, item, "md5", _MD5, required=False),
        parts=parts,
    )


def _parse_file(path: Path, where: str, item: Any) -> LockedFile:
    if not isinstance(item, dict):
        raise _bad(path, where, "expected a mapping with url, size and sha256")
    _no_unknown_keys(path, where, item, {"url", "size", "sha256", "md5"})
    return LockedFile(
        url=_url(path, where, item),
        size=_size(path, where, item),
        sha256=_digest(path, where, item, "sha256", _SHA256, required=True) or "",
        md5=_digest(path, where, item, "md5", _MD5, required=False),
    )


def _no_unknown_keys(path: Path, where: str, item: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        expected = ", ".join(sorted(allowed))
        raise _bad(path, f"{where}.{unknown[0]}", f"unknown key (expected one of {expected})")


def _url(path: Path, where: str, item: dict[str, Any]) -> str:
    url = item.get("url")
    if not isinstance(url, str) or not url:
        raise _bad(path, f"{where}.url", "expected a URL string")
    return url


def _size(path: Path, where: str, item: dict[str, Any]) -> int:
    size = item.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(path, f"{where}.size", f"expected a size in bytes, got {size!r}")
    return size


def _digest(
    path: Path, where: str, item: dict[str, Any], key: str, pattern: re.Pattern[str], *, required: bool
) -> str | None:
    value = item.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not pattern.match(value.lower()):
        raise _bad(path, f"{where}.{key}", f"expected {key} as hex, got {value!r}")
    return value.lower()


def _bad(path: Path, key: str, message: str) -> RecipeError:
    return RecipeError(
        f"bad lock file: {message}",
        where=f"{path}: {key}" if key else str(path),
        hint="regenerate it with `airbox-build lock RECIPE`",
    )


# ---------------------------------------------------------------------------- writing


def lock_to_yaml(lock: Lock) -> str:
    inputs: list[dict[str, Any]] = []
    for entry in lock.entries:
        item: dict[str, Any] = {}
        if entry.url is not None:
            item["url"] = entry.url
        else:
            item["parts"] = [_file_dict(p) for p in entry.parts]
        item["size"] = entry.size
        item["sha256"] = entry.sha256
        if entry.md5:
            item["md5"] = entry.md5
        inputs.append(item)
    body = yaml.safe_dump(
        {"version": LOCK_VERSION, "inputs": inputs}, sort_keys=False, default_flow_style=False, width=1000
    )
    return _HEADER + body


def _file_dict(part: LockedFile) -> dict[str, Any]:
    item: dict[str, Any] = {"url": part.url, "size": part.size, "sha256": part.sha256}
    if part.md5:
        item["md5"] = part.md5
    return item


def write_lock(path: Path, lock: Lock) -> None:
    """Write the lock atomically (a reader sees the old or the new lock, never half of one)."""
    write_atomic(Path(path), lock_to_yaml(lock).encode("utf-8"))
