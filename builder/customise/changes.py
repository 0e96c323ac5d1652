"""What the build report says of each path, and which files are secrets (no diff of them)."""

from __future__ import annotations

import difflib
import posixpath
import re
from dataclasses import dataclass

# Files whose changes the report records without a diff: it would show password hashes.
SECRET_FILES = frozenset({"/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-"})
SECRET_DIFF = "(diff redacted: the file holds password hashes or a private key)"
SECRET_NAME = re.compile(r"/etc/ssh/ssh_host_[a-z0-9]+_key")  # private host keys: never in a diff


def is_secret(device_path: str) -> bool:
    path = posixpath.normpath(device_path)
    return path in SECRET_FILES or bool(SECRET_NAME.fullmatch(path))


@dataclass
class Change:
    """One line of the build report: what happened to one path."""

    partition: str
    path: str  # the path inside the partition image
    device_path: str  # the path as the running box sees it
    action: str  # added | changed | removed | shadow-removed | opaque-cleared
    type: str = "file"
    mode: str | None = None
    owner: str | None = None
    size: int | None = None
    sha256: str | None = None
    target: str | None = None  # symlinks
    origin: str = ""
    diff: str | None = None


def _text_diff(old: bytes, new: bytes, name: str) -> str | None:
    try:
        a, b = old.decode("utf-8"), new.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if a == b:
        return ""
    lines = difflib.unified_diff(a.splitlines(True), b.splitlines(True), f"a{name}", f"b{name}")
    return "".join(lines)
