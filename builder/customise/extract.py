"""Unpack a downloaded tarball or zip into a HOST staging folder, refusing anything unsafe.

The staged tree is later copied into the ext4 image (builder.fs.ext4 ``copy_tree``), which takes
the modes from the host files and sets the owner; so what is written here is exactly what lands on
the device. Every member is checked and written by this module (never ``extractall``: Python 3.10
has no extraction filters).

Refused, with an error naming the archive, the member and the reason:

- absolute names (``/etc/passwd``, ``C:/x``) and names with a ``..`` component (anywhere, as GNU
  tar does: an archive that needs ``..`` is not one we want on a device);
- names with control characters, backslashes or components longer than 255 bytes (ext4's limit;
  debugfs scripts cannot carry CR/LF);
- symlinks whose target is absolute or resolves outside the destination. Targets are resolved
  within the staged tree, following the symlinks already extracted, from the link's folder; all
  links are checked once more at the end, because a later link can change what an earlier
  target means (``a -> d/..`` then ``d -> .``);
- hard links to anything but a regular file extracted earlier from the same archive (they are
  written as copies: the ext4 writer copies files, not inodes);
- devices, FIFOs, sockets and unknown member types; encrypted zip members;
- members written through a symlink (extracted now or already in the destination), and
  members that conflict with an earlier one (the same path twice, a file where a folder is).
  The same folder twice is fine (the last mode wins). A file that already exists in the
  destination is refused unless ``overwrite=True``.

Modes: the permission bits are kept (exec bits included; note that git and GitHub archives are
made with umask 0002, so their files are 0664/0775); setuid, setgid and sticky bits are
dropped with a warning: an app's files never need them, and a downloaded archive must not
install a setuid binary on the device. A zip written on a system without Unix modes gives
0644 files and 0755 folders. Folders are made writable for the owner while extracting and get
their final mode at the end.

Formats are detected by magic bytes: gzip, xz and bzip2 tarballs, plain tar, zip. Tarballs are
streamed (``r|``); zips are read by random access.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, NoReturn

from builder.errors import BuildError

log = logging.getLogger("airbox-build")

EntryKind = Literal["file", "dir", "symlink"]
ArchiveFormat = Literal["tar.gz", "tar.xz", "tar.bz2", "tar", "zip"]

_CHUNK = 1 << 20
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
_MAX_NAME = 255
_MAX_LINK_DEPTH = 40  # as Linux's ELOOP limit
_TAR_STREAM_MODE = {"tar.gz": "r|gz", "tar.xz": "r|xz", "tar.bz2": "r|bz2", "tar": "r|"}
_FORMAT_HINT = "use a .tar.gz, .tar.xz, .tar.bz2, .tar or .zip archive"


@dataclass(frozen=True)
class ExtractedEntry:
    """One path this extraction created, relative to the destination (POSIX form).

    ``mode`` holds the permission bits as written on the host (special bits already dropped;
    ``dropped_bits`` says which were). ``size`` is the file size, the length of a symlink's
    target, 0 for a folder. ``implicit`` marks a parent folder the archive did not list.
    """

    path: str
    kind: EntryKind
    mode: int
    size: int = 0
    target: str | None = None
    dropped_bits: int = 0
    implicit: bool = False


# ---------------------------------------------------------------------------- format detection


def detect_format(archive: Path) -> ArchiveFormat | None:
    """The archive format from its first bytes, or None when it is none we unpack."""
    with open(archive, "rb") as f:
        head = f.read(512)
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "tar.xz"
    if head.startswith(b"BZh"):
        return "tar.bz2"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


# ---------------------------------------------------------------------------- the public entry


def extract_archive(
    archive: Path,
    dest_dir: Path,
    *,
    strip_components: int = 0,
    where: str,
    overwrite: bool = False,
) -> list[ExtractedEntry]:
    """Unpack `archive` into the host folder `dest_dir` (created if needed), safely.

    `strip_components` drops that many leading name components, like tar's option; members with
    no component left are skipped. Returns the created paths, sorted. `where` locates the input
    in the recipe for error messages. Raises BuildError for anything unsafe (see the module doc).
    """
    archive = Path(archive)
    fmt = detect_format(archive)
    if fmt is None:
        raise BuildError(
            f"{archive.name} is not an archive this tool unpacks (not tar, gzip, xz, bzip2 or zip)",
            where=where,
            hint=_FORMAT_HINT + ", or use `dest:` to copy the file as it is",
        )
    if dest_dir.is_symlink():
        raise BuildError(f"the destination {dest_dir} is a symlink", where=where)
    dest_dir.mkdir(parents=True, exist_ok=True)
    writer = _Writer(archive, dest_dir, strip_components, where, overwrite)
    try:
        if fmt == "zip":
            _extract_zip(archive, writer)
        else:
            _extract_tar(archive, _TAR_STREAM_MODE[fmt], writer)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, BuildError):  # pragma: no cover - BuildError is not an OSError
            raise
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise  # writing failed, not reading: the build reports the full disk
        raise BuildError(
            f"cannot read {archive.name} ({fmt}): {exc}",
            where=where,
            hint="the file is damaged or truncated: delete it from the cache and fetch it again",
        ) from None
    writer.finish()
    return writer.entries()


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def unpacked_size(archive: Path, *, strip_components: int = 0, block: int = 4096) -> tuple[int, int]:
    """(block-rounded bytes, members) the archive would unpack to, without writing anything.

    A zip is read from its directory; a tarball's headers are streamed (the whole file is
    decompressed, but nothing is stored). For the size budget, once an archive is fetched.
    """
    fmt = detect_format(archive)
    if fmt is None:
        raise BuildError(f"{archive.name} is not an archive this tool unpacks", hint=_FORMAT_HINT)
    total = members = 0

    def count(name: str, size: int) -> None:
        nonlocal total, members
        if len([p for p in name.split("/") if p not in ("", ".")]) > strip_components:
            total += -(-size // block) * block if size else block
            members += 1

    try:
        if fmt == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    count(info.filename, 0 if info.is_dir() else info.file_size)
        else:
            with open(archive, "rb") as raw, _stream_tar(raw, _TAR_STREAM_MODE[fmt]) as tar:
                for member in tar:
                    count(member.name, member.size if member.isreg() else 0)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise BuildError(f"cannot read {archive.name} ({fmt}): {exc}", hint="fetch it again") from None
    return total, members


# ---------------------------------------------------------------------------- readers


def _stream_tar(raw: IO[bytes], mode: str) -> tarfile.TarFile:
    """A tar archive read as a stream (`r|gz`, `r|xz`, ...: the mode comes from the archive's kind)."""
    return tarfile.open(fileobj=raw, mode=mode)  # type: ignore[call-overload,no-any-return]


def _extract_tar(archive: Path, mode: str, writer: _Writer) -> None:
    with open(archive, "rb") as raw, _stream_tar(raw, mode) as tar:
        for member in tar:
            name = member.name
            if member.isdir():
                writer.directory(name, member.mode)
            elif member.isreg():
                source = tar.extractfile(member)
                assert source is not None
                with source:
                    writer.file(name, member.mode, source, member.size)
            elif member.issym():
                writer.symlink(name, member.linkname)
            elif member.islnk():
                writer.hardlink(name, member.linkname, member.mode)
            else:
                writer.refuse(
                    name, f"is a {_tar_kind(member)}", "an app archive holds only files, folders and links"
                )


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.ischr():
        return "character device"
    if member.isblk():
        return "block device"
    if member.isfifo():
        return "FIFO"
    return f"member of unsupported type {member.type!r}"


def _extract_zip(archive: Path, writer: _Writer) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = info.filename
            unix = info.external_attr >> 16 if info.create_system == 3 else 0
            kind = stat.S_IFMT(unix)
            if info.flag_bits & 0x1:
                writer.refuse(name, "is encrypted", "use an archive without a password")
            if info.is_dir() or kind == stat.S_IFDIR:
                writer.directory(name, stat.S_IMODE(unix) if unix else 0o755)
            elif kind == stat.S_IFLNK:
                if info.file_size > 4096:
                    writer.refuse(name, "is a symlink with an implausibly long target")
                writer.symlink(name, zf.read(info).decode("utf-8", "surrogateescape"))
            elif kind in (0, stat.S_IFREG):
                with zf.open(info) as source:
                    writer.file(name, stat.S_IMODE(unix) if unix else 0o644, source, info.file_size)
            else:
                what = {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}.get(kind)
                what = what or {stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}.get(kind, "special file")
                writer.refuse(name, f"is a {what}", "an app archive holds only files, folders and links")


# ---------------------------------------------------------------------------- the checked writer


class _Writer:
    """Writes members one by one into dest_dir, keeping the model of what it made."""

    def __init__(self, archive: Path, dest: Path, strip: int, where: str, overwrite: bool) -> None:
        self.archive = archive
        self.dest = dest
        self.strip = strip
        self.where = where
        self.overwrite = overwrite
        self.made: dict[str, ExtractedEntry] = {}  # path -> entry, for this extraction
        self.links: dict[str, str] = {}  # symlink path -> target, this extraction
        self.checked_dirs: set[str] = {""}  # host folders known to be real folders
        self.dropped: list[str] = []

    # ---- errors
    def refuse(self, member: str, why: str, hint: str | None = None) -> NoReturn:
        raise BuildError(
            f"{self.archive.name}: member {member!r} {why}; refusing to unpack the archive",
            where=self.where,
            hint=hint or "the archive is unsafe or damaged: check where it comes from",
        )

    # ---- names
    def relpath(self, member: str, name: str | None = None) -> str | None:
        """The checked relative path of a member (or of `name`, a hard link's target) after
        strip_components; None when nothing is left of it."""
        checked = member if name is None else name
        problem = _name_problem(checked)
        if problem is not None:
            why, hint = problem
            if name is not None:
                why = f"is a hard link to {name!r}, a name that {why}"
            self.refuse(member, why, hint)
        parts = [p for p in checked.split("/") if p not in ("", ".")][self.strip :]
        return "/".join(parts) if parts else None

    # ---- member kinds
    def directory(self, member: str, mode: int) -> None:
        rel = self.relpath(member)
        if rel is None:
            return
        self.check_parents(member, rel)
        existing = self.made.get(rel)
        if existing is not None and existing.kind != "dir":
            self.refuse(member, f"is a folder, but the archive also has it as a {existing.kind}")
        host = self.dest / rel
        if existing is None:
            self.check_free(member, rel, host, allow_dir=True)
            host.mkdir(mode=0o700, exist_ok=True)
        perm, dropped = self.permissions(member, mode)
        self.made[rel] = ExtractedEntry(rel, "dir", perm, dropped_bits=dropped)
        self.checked_dirs.add(rel)

    def file(self, member: str, mode: int, source: IO[bytes], size: int) -> None:
        rel = self.relpath(member)
        if rel is None:
            return
        host = self.prepare_leaf(member, rel)
        written = _copy_stream(source, host)
        if written != size:
            self.refuse(member, f"is {written} bytes long but the archive says {size}")
        self.finish_file(member, rel, host, mode, written)

    def hardlink(self, member: str, linkname: str, mode: int) -> None:
        rel = self.relpath(member)
        if rel is None:
            return
        target_rel = self.relpath(member, linkname)
        source = self.made.get(target_rel) if target_rel is not None else None
        if source is None or source.kind != "file":
            self.refuse(
                member,
                f"is a hard link to {linkname!r}, which is not a file extracted earlier from the archive",
            )
        assert target_rel is not None
        host = self.prepare_leaf(member, rel)
        with open(self.dest / target_rel, "rb") as src:
            written = _copy_stream(src, host)
        self.finish_file(member, rel, host, mode, written)

    def symlink(self, member: str, target: str) -> None:
        rel = self.relpath(member)
        if rel is None:
            return
        self.check_link_target(member, rel, target)
        host = self.prepare_leaf(member, rel)
        os.symlink(target, host)
        self.links[rel] = target
        self.made[rel] = ExtractedEntry(rel, "symlink", 0o777, size=len(target.encode()), target=target)

    # ---- checks shared by the kinds
    def prepare_leaf(self, member: str, rel: str) -> Path:
        """Check a file or symlink path is free, make its parents; the host path to write."""
        self.check_parents(member, rel)
        if rel in self.made:
            self.refuse(
                member, f"appears twice in the archive (first as a {self.made[rel].kind})", "fix the archive"
            )
        host = self.dest / rel
        self.check_free(member, rel, host, allow_dir=False)
        return host

    def check_free(self, member: str, rel: str, host: Path, *, allow_dir: bool) -> None:
        """Refuse to replace what an earlier step put in the destination (unless overwrite)."""
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode) and allow_dir:
            return
        if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode) or not self.overwrite:
            what = "symlink" if stat.S_ISLNK(st.st_mode) else "folder" if stat.S_ISDIR(st.st_mode) else "file"
            self.refuse(
                member,
                f"would replace the {what} {rel} already in the destination",
                "two inputs write the same path: unpack them into different folders",
            )
        host.unlink()

    def check_parents(self, member: str, rel: str) -> None:
        """Every parent is a real folder (made if missing), never a symlink or a file."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent in self.checked_dirs:
                continue
            if parent in self.links:
                self.refuse(member, f"would be written through the symlink {parent}")
            made = self.made.get(parent)
            if made is not None and made.kind != "dir":
                self.refuse(member, f"is inside {parent}, which the archive has as a {made.kind}")
            host = self.dest / parent
            try:
                st = os.lstat(host)
            except FileNotFoundError:
                host.mkdir(mode=0o700)
                self.made[parent] = ExtractedEntry(parent, "dir", 0o755, implicit=True)
            else:
                if stat.S_ISLNK(st.st_mode):
                    self.refuse(member, f"would be written through the symlink {parent} in the destination")
                if not stat.S_ISDIR(st.st_mode):
                    self.refuse(member, f"is inside {parent}, which is a file in the destination")
            self.checked_dirs.add(parent)

    def check_link_target(self, member: str, rel: str, target: str) -> None:
        if not target:
            self.refuse(member, "is a symlink with an empty target")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
            self.refuse(member, "is a symlink whose target has a control character")
        if target.startswith("/"):
            self.refuse(
                member,
                f"is a symlink to the absolute path {target!r}, outside the destination",
                "only relative links inside the archive's own folder are allowed",
            )
        if _resolve_inside(posixpath.dirname(rel), target, self.read_link) is None:
            self.refuse(
                member,
                f"is a symlink to {target!r}, which resolves outside the destination",
                "only relative links inside the archive's own folder are allowed",
            )

    def read_link(self, rel: str) -> str | None:
        """The target of the symlink at `rel` in the destination (ours or an earlier step's)."""
        if rel in self.links:
            return self.links[rel]
        if rel in self.made:
            return None
        try:
            return os.readlink(self.dest / rel)
        except OSError:  # missing, or not a symlink
            return None

    def permissions(self, member: str, mode: int) -> tuple[int, int]:
        dropped = mode & _SPECIAL_BITS
        if dropped:
            self.dropped.append(member)
            log.warning(
                "%s: %s: dropped the setuid/setgid/sticky bits (%04o) of %s",
                self.where,
                self.archive.name,
                dropped,
                member,
            )
        return mode & 0o777, dropped

    def finish_file(self, member: str, rel: str, host: Path, mode: int, size: int) -> None:
        perm, dropped = self.permissions(member, mode)
        os.chmod(host, perm)
        self.made[rel] = ExtractedEntry(rel, "file", perm, size=size, dropped_bits=dropped)

    # ---- the end
    def finish(self) -> None:
        # A later link can change what an earlier target resolves to: check them all again.
        for rel, target in sorted(self.links.items()):
            if _resolve_inside(posixpath.dirname(rel), target, self.read_link) is None:
                self.refuse(
                    rel, f"is a symlink to {target!r}, which resolves outside the destination or loops"
                )
        # Folders get their final modes last, deepest first, so we could write into them.
        for rel in sorted((r for r, e in self.made.items() if e.kind == "dir"), key=_depth, reverse=True):
            os.chmod(self.dest / rel, self.made[rel].mode)

    def entries(self) -> list[ExtractedEntry]:
        return [self.made[rel] for rel in sorted(self.made)]


def _name_problem(name: str) -> tuple[str, str | None] | None:
    """Why a member name is unsafe (and a hint), or None."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "has a control character in its name", None
    if "\\" in name:
        return "has a backslash in its name", "re-create the archive with '/' separators"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        return "has an absolute path", None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return "has a '..' component (it could write outside the destination)", None
    for part in parts:
        try:
            encoded = part.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid UTF-8", "re-create the archive with UTF-8 names"
        if len(encoded) > _MAX_NAME:
            return f"has a name component longer than {_MAX_NAME} bytes", None
    return None


def _depth(rel: str) -> int:
    return rel.count("/")


def _copy_stream(source: IO[bytes], host: Path) -> int:
    written = 0
    fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as out:
        while True:
            block = source.read(_CHUNK)
            if not block:
                break
            out.write(block)
            written += len(block)
    return written


def _resolve_inside(start: str, target: str, read_link: Callable[[str], str | None]) -> str | None:
    """Resolve `target` from the folder `start` within the staged tree, following its symlinks.

    Returns the resolved relative path ("" is the destination itself), or None when it leaves
    the destination, is absolute, or loops. Components that do not exist yet resolve lexically.
    """
    stack: list[str] = [p for p in start.split("/") if p]
    pending = list(_components(target))
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(part)
        inner = read_link("/".join(stack))
        if inner is not None:
            hops += 1
            if hops > _MAX_LINK_DEPTH or inner.startswith("/"):
                return None
            stack.pop()
            pending = list(_components(inner)) + pending
    return "/".join(stack)


def _components(path: str) -> Iterator[str]:
    return (p for p in path.split("/") if p not in ("", "."))
