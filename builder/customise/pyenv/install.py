"""Installing wheels into a folder for the target, as pip would, without running any of their code."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from builder.customise.pyenv.download import Wheel, _checked_wheel_name
from builder.customise.pyenv.lock import _CHUNK, INSTALLER, normalize_name
from builder.customise.pyenv.wheeltags import Target, tag_problem
from builder.errors import BuildError

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
