"""The operations an `EditBatch` records, checked as they are recorded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError
from builder.fs.ext4.debugfs import _join
from builder.fs.ext4.inodes import FileType

# ----------------------------------------------------------------------------- batches: operations


@dataclass(frozen=True)
class _Op:
    parts: tuple[bytes, ...]

    @property
    def path(self) -> str:
        return _join(self.parts)


@dataclass(frozen=True)
class _Mkdir(_Op):
    mode: int
    uid: int
    gid: int
    set_existing: bool  # mkdir: make an existing dir match; makedirs: leave it


@dataclass(frozen=True)
class _Write(_Op):
    src: Path
    size: int
    mode: int | None  # None: keep the replaced file's (else 0644 root:root)
    uid: int | None
    gid: int | None


@dataclass(frozen=True)
class _Symlink(_Op):
    target: bytes
    uid: int
    gid: int


@dataclass(frozen=True)
class _Mknod(_Op):
    kind: FileType
    major: int
    minor: int
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class _Remove(_Op):
    recursive: bool
    missing_ok: bool


@dataclass(frozen=True)
class _SetAttr(_Op):
    mode: int | None
    uid: int | None
    gid: int | None


@dataclass(frozen=True)
class _SetXattr(_Op):
    name: bytes
    value_file: Path
    size: int


@dataclass(frozen=True)
class _RmXattr(_Op):
    name: bytes


_XATTR_PREFIXES = (b"user.", b"trusted.", b"security.", b"system.")


def _check_owner(uid: int, gid: int) -> None:
    for v, what in ((uid, "uid"), (gid, "gid")):
        if not isinstance(v, int) or not 0 <= v < 1 << 32:
            raise BuildError(f"{what} {v!r} is not a valid owner id", hint="use 0..4294967295")


def _check_mode(mode: int, path: str) -> int:
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise BuildError(
            f"mode {mode!r} for {path} is not a permission mode", hint="use 0..0o7777, e.g. 0o644"
        )
    return mode
