"""Checksum manifests: the vendor's md5.txt and our SHA256SUMS."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from builder.errors import PackageError
from builder.pool import worker_pool

MD5_NAME = "md5.txt"
EMPTY_MD5 = hashlib.md5(b"").hexdigest()
_LINE = re.compile(r"^(?P<digest>[0-9a-fA-F]{32}) (?P<mode>[ *])(?P<name>.+)$")


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def parse_md5(text: str, where: str = MD5_NAME) -> list[tuple[str, str]]:
    """Parse GNU md5sum output into (name, digest) pairs, in file order."""
    entries = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise PackageError(
                f"line {n} is not `<md5>  <name>`: {line[:80]!r}",
                where=where,
                hint="md5.txt is the output of `md5sum *` in the package folder",
            )
        entries.append((m["name"], m["digest"].lower()))
    return entries


def _locale_key(name: str) -> tuple[str, str]:
    """An approximation of glibc's en_US collation: punctuation ignored, case folded first."""
    return ("".join(ch for ch in name.casefold() if ch.isalnum()), name)


def md5_order(vendor: Sequence[str]) -> str:
    """Which order the vendor's `md5sum *` listed files in: 'c', 'locale' or 'kept'."""
    if list(vendor) == sorted(vendor):
        return "c"
    if list(vendor) == sorted(vendor, key=_locale_key):
        return "locale"
    return "kept"


def render_md5(names_digests: dict[str, str], vendor_text: str | None) -> str:
    """md5.txt as `md5sum *` would write it for these files, in the vendor's order style.

    When the vendor's md5.txt listed itself (it was made with `md5sum * > md5.txt` over an
    existing md5.txt, which the shell truncates first), ours does too, with the digest of
    an empty file, exactly as the vendor's command would.
    """
    vendor_names = [n for n, _ in parse_md5(vendor_text)] if vendor_text else []
    lists_itself = MD5_NAME in vendor_names
    digests = dict(names_digests)
    digests.pop(MD5_NAME, None)
    if lists_itself:
        digests[MD5_NAME] = EMPTY_MD5
    style = md5_order(vendor_names) if vendor_names else "c"
    if style == "c":
        order = sorted(digests)
    elif style == "locale":
        order = sorted(digests, key=_locale_key)
    else:
        order = [n for n in vendor_names if n in digests] + sorted(
            n for n in digests if n not in vendor_names
        )
    return "".join(f"{digests[n]}  {n}\n" for n in order)


def write_sha256sums(
    dest: Path, base: Path, files: Iterable[Path], known: Mapping[Path, str] | None = None
) -> None:
    """`sha256sum` format, paths relative to `base`, sorted; `sha256sum -c` works from `base`.

    `known` gives digests already established for some files (links to an earlier build's
    files, unchanged since); the others are hashed, side by side (hashlib releases the GIL).
    """
    paths = list(files)
    known = known or {}
    todo = [p for p in paths if p not in known]
    with worker_pool(max(1, min(os.cpu_count() or 1, 8))) as pool:
        fresh = dict(zip(todo, pool.map(file_digest, todo), strict=True))
    lines = [f"{known.get(p) or fresh[p]}  {p.relative_to(base).as_posix()}\n" for p in paths]
    dest.write_text("".join(sorted(lines, key=lambda ln: ln[66:])))  # by path
