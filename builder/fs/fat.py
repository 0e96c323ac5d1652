"""FAT volumes in image files, read and written with mtools and dosfstools: no mount, no loop device.

A FAT volume is addressed as (image file, byte offset): a whole-card image with the volume in a
partition is read in place (`mdir -i card.img@@OFFSET`), nothing is copied or unpacked.

mtools is configured only through the environment we pass (see `mtools_env`): a user's
`~/.mtoolsrc` or `MTOOLSRC` could otherwise change how names are shown (lower-casing, VFAT off)
or break every call with a syntax error.
"""

from __future__ import annotations

import builtins
import functools
import io
import logging
import os
import re
import shlex
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, cast

from builder.errors import BuildError, PackageError, ToolError
from builder.run import find_tool, install_hint, require_tools, run

log = logging.getLogger("airbox-build")

READ_TOOLS = ("mdir", "mcopy")
WRITE_TOOLS = ("mcopy", "mmd", "mdir")

# A HOME under /dev/null cannot exist, so mtools finds no ~/.mtoolsrc to parse.
_NO_HOME = "/dev/null/airbox-build-no-home"
# mtools treats these characters in a DOS-side name as a pattern; it has no way to escape them.
_GLOB_CHARS = set("*?[]")


@dataclass(frozen=True)
class FatEntry:
    """One directory entry: `name` is the long (VFAT) name, `path` its '/'-path from the volume root."""

    name: str
    size: int
    is_dir: bool
    path: str


@dataclass(frozen=True)
class BootSector:
    """The fields of a FAT boot sector (BPB) that the builder uses."""

    fs_type: str  # "FAT12", "FAT16" or "FAT32"
    bytes_per_sector: int
    sectors_per_cluster: int
    total_sectors: int
    clusters: int
    volume_id: int | None
    label: str  # the label copy in the boot sector ("" when absent or "NO NAME")

    @property
    def size_bytes(self) -> int:
        return self.total_sectors * self.bytes_per_sector

    @property
    def cluster_bytes(self) -> int:
        return self.sectors_per_cluster * self.bytes_per_sector


def parse_boot_sector(data: bytes) -> BootSector | None:
    """Decode a FAT12/16/32 boot sector; None when `data` (>= 512 bytes) is not one."""
    if len(data) < 512:
        return None
    (bps, spc, reserved, nfats, root_entries, total16, _media, fat16) = struct.unpack_from(
        "<HBHBHHBH", data, 11
    )
    total32, fat32 = struct.unpack_from("<II", data, 32)
    if data[0] not in (0xEB, 0xE9) and data[510:512] != b"\x55\xaa":
        return None
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or spc > 128:
        return None
    fat_sectors = fat16 or fat32
    total = total16 or total32
    if reserved == 0 or nfats == 0 or nfats > 4 or fat_sectors == 0 or total == 0:
        return None
    root_sectors = (root_entries * 32 + bps - 1) // bps
    data_sectors = total - reserved - nfats * fat_sectors - root_sectors
    if data_sectors <= 0:
        return None
    clusters = data_sectors // spc
    # A 16-bit FAT length of 0 means the FAT32 layout, whatever the cluster count: that is how
    # Linux, U-Boot and mtools decide (mkfs.fat -F 32 makes small volumes with few clusters).
    fs_type = "FAT32" if fat16 == 0 else "FAT12" if clusters < 4085 else "FAT16"
    # The extended BPB (volume id + label) sits at 36 on FAT12/16 and at 64 on FAT32.
    ext = 64 if fat16 == 0 else 36
    volume_id = None
    label = ""
    if data[ext + 2] == 0x29:
        volume_id = struct.unpack_from("<I", data, ext + 3)[0]
        label = data[ext + 7 : ext + 18].decode("latin-1").rstrip(" \0")
        if label == "NO NAME":
            label = ""
    return BootSector(fs_type, bps, spc, total, clusters, volume_id, label)


def probe_filesystem(data: bytes) -> str:
    """Name what the first 2 KiB of a partition hold, for messages: "FAT32", "ext4", "empty", ..."""
    boot = parse_boot_sector(data)
    if boot is not None:
        return boot.fs_type
    if data[3:11] == b"EXFAT   ":
        return "exFAT"
    if data[3:11] == b"NTFS    ":
        return "NTFS"
    if len(data) >= 1082 and data[1080:1082] == b"\x53\xef":
        return "ext2/3/4"
    if not any(data):
        return "empty (zeros)"
    return "unknown"


def mtools_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for every mtools call: fixed output format, no user configuration."""
    env = dict(os.environ)
    env.update(
        MTOOLS_SKIP_CHECK="1",  # images made by other tools may have geometry mtools dislikes
        MTOOLS_FAT_COMPATIBILITY="1",  # ... or a FAT bigger than needed
        MTOOLS_LOWER_CASE="0",
        MTOOLS_NO_VFAT="0",
        MTOOLS_DOTTED_DIR="0",
        MTOOLS_NAME_NUMERIC_TAIL="1",
        MTOOLS_TWENTY_FOUR_HOUR_CLOCK="1",
        MTOOLS_DATE_STRING="yyyy-mm-dd",
        MTOOLSRC=os.devnull,
        HOME=_NO_HOME,
        # Without a UTF-8 locale mtools prints every non-ASCII long-name character as '_'.
        LC_ALL="en_US.UTF-8" if sys.platform == "darwin" else "C.UTF-8",
    )
    if extra:
        env.update(extra)
    return env


# One entry line of `mdir`: short name (base, ext), size or <DIR>, date, time, then the long name
# after two spaces when there is one. The short-name part is matched lazily so that a numeric
# extension is not taken for the size: the date must follow the size.
_ENTRY_RE = re.compile(
    r"^(?P<short>\S.*?) +(?P<size>\d+|<DIR>) +(?P<date>\d{4}-\d\d-\d\d) +(?P<time>\d{1,2}:\d\d)"
    r"(?:  (?P<long>.+?))? ?$"
)
_SECTION_RE = re.compile(r"^Directory for ::(?P<dir>.*)$")
_SUMMARY_RE = re.compile(r"^ +(?P<count>\d+) files? +[\d ]+ bytes$")
_LABEL_RE = re.compile(r"^ Volume in drive \S* ?: is (?P<label>.*)$")


def parse_mdir(text: str, default_dir: str = "/") -> list[FatEntry]:
    """Parse `mdir -a` or `mdir -/ -a` output (with the environment of `mtools_env`).

    Every section's entry count is checked against mdir's own "N files" line, so a line this
    parser does not understand is an error, never a silently missing file.
    """
    entries: list[FatEntry] = []
    current = _norm_dir(default_dir)
    in_section: int | None = 0
    for line in text.splitlines():
        if m := _SECTION_RE.match(line):
            current = _norm_dir(m["dir"])
            in_section = 0
            continue
        if line.startswith("Total files listed"):
            in_section = None  # the grand total of a recursive listing follows
            continue
        if m := _SUMMARY_RE.match(line):
            if in_section is not None and int(m["count"]) != in_section:
                raise PackageError(
                    f"could not parse the mtools listing of ::/{current}: mdir counts {m['count']} "
                    f"entries, {in_section} were understood",
                    hint="please report this with the output of `mdir -a` on that folder",
                )
            continue
        m = _ENTRY_RE.match(line)
        if m is None or in_section is None:
            continue
        in_section += 1
        name = m["long"] if m["long"] is not None else ".".join(m["short"].split())
        if name in (".", ".."):
            continue
        is_dir = m["size"] == "<DIR>"
        path = f"{current}/{name}" if current else name
        entries.append(FatEntry(name, 0 if is_dir else int(m["size"]), is_dir, path))
    return entries


def _norm_dir(d: str) -> str:
    return d.strip("/")


class FatImage:
    """A FAT volume inside an image file, at byte `offset` (0 for a bare filesystem image)."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        if "@@" in str(self.path):
            raise PackageError(
                "mtools cannot address an image whose path contains '@@'",
                where=str(self.path),
                hint="rename the file or the folder",
            )
        require_tools(*READ_TOOLS)
        self._boot: BootSector | None = None

    @property
    def where(self) -> str:
        return f"{self.path}" + (f" at byte offset {self.offset}" if self.offset else "")

    @property
    def spec(self) -> str:
        """The `-i` argument of mtools for this volume."""
        return f"{self.path}@@{self.offset}" if self.offset else str(self.path)

    def boot_sector(self) -> BootSector:
        if self._boot is None:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(512)
            boot = parse_boot_sector(data)
            if boot is None:
                raise PackageError(
                    f"no FAT filesystem here (found: {probe_filesystem(data)})",
                    where=self.where,
                    hint="check the image and the partition offset",
                )
            self._boot = boot
        return self._boot

    def fs_type(self) -> str:
        """ "FAT12", "FAT16" or "FAT32", from the boot sector."""
        return self.boot_sector().fs_type

    def label(self) -> str:
        """The volume label: the root-directory label entry, else the boot-sector copy."""
        out = self._mtools("mdir", "-a", "::/")
        for line in out.splitlines():
            if m := _LABEL_RE.match(line):
                return m["label"].rstrip()
        return self.boot_sector().label

    def list(self, dirpath: str = "/") -> list[FatEntry]:
        """The entries of one directory (hidden ones included), in mdir order."""
        dirpath = "/" + _norm_dir(dirpath)
        text = self._mtools("mdir", "-a", f"::{dirpath}")
        return parse_mdir(text, dirpath)

    def walk(self) -> builtins.list[FatEntry]:
        """Every entry of the volume, from one recursive `mdir -/ -a`, sorted by path."""
        self.boot_sector()
        try:
            text = self._mtools("mdir", "-/", "-a", "::/")
        except ToolError:
            # mdir -/ fails on a volume with an empty root; a plain listing tells them apart.
            if self.list("/"):
                raise
            return []
        entries = parse_mdir(text)
        listed_dirs = {_norm_dir(m["dir"]) for m in map(_SECTION_RE.match, text.splitlines()) if m}
        missing = [e.path for e in entries if e.is_dir and e.path not in listed_dirs]
        if missing:
            raise PackageError(
                f"mdir did not list the folder(s) {', '.join(missing[:5])}",
                where=self.where,
                hint="the FAT filesystem may be damaged: check it with fsck.fat -n",
            )
        return sorted(entries, key=lambda e: e.path)

    def read_to(self, name: str, dest: Path) -> None:
        """Copy the file `name` (a '/'-path on the volume) out to `dest`, overwriting it."""
        self._mtools("mcopy", "-n", f"::{self._dos_path(name)}", str(dest))

    def open_stream(self, name: str) -> BinaryIO:
        """A streaming reader of the file `name` (`mcopy ... -`): nothing is buffered in memory.

        A failing mcopy (missing file, damaged FAT) raises ToolError from the read that hits
        end of data, so a truncated stream is never mistaken for a short file.
        """
        cmd = ["mcopy", "-n", "-i", self.spec, f"::{self._dos_path(name)}", "-"]
        return io.BufferedReader(_ToolReader(cmd, mtools_env()), buffer_size=1 << 20)

    def copy_in(self, files: Iterable[tuple[Path, str]], *, timestamp: int | None = None) -> None:
        copy_into(self, files, timestamp=timestamp)

    def _dos_path(self, name: str) -> str:
        rel = _norm_dir(name)
        if not rel or _GLOB_CHARS & set(rel):
            raise PackageError(
                f"cannot address {name!r} with mtools (empty, or contains one of * ? [ ])",
                where=self.where,
            )
        return "/" + rel

    def _mtools(
        self,
        tool: str,
        *args: str,
        ok_codes: tuple[int, ...] = (0,),
        extra_env: Mapping[str, str] | None = None,
    ) -> str:
        proc = run(
            [tool, "-i", self.spec, *args],
            env=mtools_env(extra_env),
            ok_codes=ok_codes,
            hint=f"mtools could not read/write the FAT volume in {self.where}",
        )
        return proc.stdout.decode("utf-8", "surrogateescape")


class _ToolReader(io.RawIOBase):
    """Raw reader of a tool's stdout; the tool's exit status is checked at end of data."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        exe = find_tool(cmd[0])
        if exe is None:
            raise ToolError(f"missing system tool: {cmd[0]}", hint=install_hint([cmd[0]]))
        self._cmd = [exe, *cmd[1:]]
        log.debug("run (streaming): %s", shlex.join(self._cmd))
        # stderr goes to a file: a pipe we do not drain could fill up and stall the tool.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        assert self._proc.stdout is not None
        n: int = cast(io.BufferedReader, self._proc.stdout).readinto(buffer)
        if n == 0 and len(buffer) > 0 and not self._eof:
            self._eof = True
            self._check_exit()
        return n

    def _check_exit(self) -> None:
        code = self._proc.wait()
        if code != 0:
            self._stderr.seek(0)
            err = self._stderr.read().decode(errors="replace").strip()
            raise ToolError(
                f"{Path(self._cmd[0]).name} failed (exit {code}): {shlex.join(self._cmd[1:])[:300]}"
                + (f"\n{err}" if err else ""),
            )

    def close(self) -> None:
        if not self.closed:
            if self._proc.poll() is None:
                self._proc.kill()  # the reader stopped early; the tool has nothing left to say
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc.wait()
            self._stderr.close()
        super().close()


def make_fat_image(
    path: Path,
    size_bytes: int,
    label: str,
    fat_bits: int = 32,
    offset: int = 0,
    *,
    volume_id: int | None = None,
    sectors_per_cluster: int | None = None,
) -> FatImage:
    """Format a FAT volume of `size_bytes` at byte `offset` of `path` (created or grown, sparse).

    Deterministic: mkfs.fat runs with --invariant, so the same arguments give the same bytes;
    pass `volume_id` to choose the serial number. The size is rounded down to whole KiB (mkfs.fat
    counts 1 KiB blocks). With an offset the boot sector records it as hidden sectors, as a
    partitioned card needs.
    """
    require_tools("mkfs.fat", *WRITE_TOOLS)
    if fat_bits not in (12, 16, 32):
        raise BuildError(f"FAT size must be 12, 16 or 32 bits, not {fat_bits}")
    if offset % 512:
        raise BuildError(f"a FAT volume must start on a 512-byte sector, not at byte {offset}")
    if len(label) > 11 or not label.isascii() or any(c in label for c in '*?.,;:/\\|+=<>[]"'):
        raise BuildError(
            f"invalid FAT volume label {label!r}",
            hint="use at most 11 ASCII letters, digits, spaces, '-' or '_'",
        )
    kib = size_bytes // 1024
    if kib <= 0:
        raise BuildError(f"FAT volume size {size_bytes} bytes is too small")
    path = Path(path)
    end = offset + kib * 1024
    with open(path, "ab") as f:  # create it if missing, never truncate what is already there
        if f.seek(0, os.SEEK_END) < end:
            f.truncate(end)
    cmd: list[str | Path] = ["mkfs.fat", "--invariant", "-F", str(fat_bits)]
    cmd += ["-n", label.upper() or "NO NAME"]
    if volume_id is not None:
        cmd += ["-i", f"{volume_id & 0xFFFFFFFF:08x}"]
    if sectors_per_cluster is not None:
        cmd += ["-s", str(sectors_per_cluster)]
    hint = f"mkfs.fat could not make a FAT{fat_bits} volume of {kib} KiB" + (
        " (FAT32 needs at least ~33 MiB, FAT16 at least ~9 MiB)" if fat_bits != 12 else ""
    )
    if offset == 0:
        run([*cmd, path, str(kib)], hint=hint)
    elif _mkfs_has_offset():
        run([*cmd, f"--offset={offset // 512}", "-h", str(offset // 512), path, str(kib)], hint=hint)
    else:
        # dosfstools < 4.2 (Ubuntu 20.04) has no --offset: format a sparse scratch file, splice it in.
        with tempfile.TemporaryDirectory(prefix=".mkfs-", dir=path.parent) as scratch:
            volume = Path(scratch) / "volume.img"
            with open(volume, "wb") as f:
                f.truncate(kib * 1024)
            run([*cmd, "-h", str(offset // 512), volume, str(kib)], hint=hint)
            _splice(volume, path, offset)
    return FatImage(path, offset)


@functools.cache
def _mkfs_has_offset() -> bool:
    proc = run(["mkfs.fat", "--help"], check=False)
    return b"--offset" in proc.stdout + proc.stderr


def _splice(src: Path, dest: Path, offset: int) -> None:
    """Write `src` into `dest` at `offset`; zero blocks are written only where `dest` is not zero."""
    block_size = 1 << 20
    with open(src, "rb") as s, open(dest, "r+b") as d:
        pos = offset
        while block := s.read(block_size):
            if block.count(0) == len(block):
                d.seek(pos)
                if d.read(len(block)).count(0) != len(block):
                    d.seek(pos)
                    d.write(block)
            else:
                d.seek(pos)
                d.write(block)
            pos += len(block)


def copy_into(
    img: FatImage | Path,
    files: Iterable[tuple[Path, str]],
    *,
    offset: int = 0,
    timestamp: int | None = None,
) -> None:
    """Copy host files into the volume: each (source, '/'-path on the volume); folders are made.

    Existing files of the same name are overwritten. Entry times are the sources' mtimes, or
    `timestamp` (seconds since the epoch) for every file when given, for reproducible images.
    Names longer than 8.3 or mixed-case get VFAT long names.
    """
    fat = img if isinstance(img, FatImage) else FatImage(Path(img), offset)
    require_tools(*WRITE_TOOLS)
    fat.boot_sector()
    items = [(Path(src), fat._dos_path(name)) for src, name in files]
    for src, _ in items:
        if not src.is_file():
            raise BuildError(f"cannot copy {src} into the FAT image: not a file", where=fat.where)
    env = {"SOURCE_DATE_EPOCH": str(timestamp)} if timestamp is not None else None
    _make_dirs(fat, {str(PurePosixPath(dos).parent) for _, dos in items}, env)
    keep_mtime = [] if timestamp is not None else ["-m"]
    # Files whose name on the volume is their own base name go in one mcopy per folder.
    batches: dict[str, list[str]] = {}
    for src, dos in items:
        parent = str(PurePosixPath(dos).parent)
        if src.name == PurePosixPath(dos).name:
            batches.setdefault(parent, []).append(str(src))
        else:
            fat._mtools("mcopy", "-n", "-o", *keep_mtime, str(src), f"::{dos}", extra_env=env)
    for parent, srcs in sorted(batches.items()):
        for i in range(0, len(srcs), 200):
            target = "::" + (parent.rstrip("/") + "/")
            fat._mtools("mcopy", "-n", "-o", *keep_mtime, *srcs[i : i + 200], target, extra_env=env)


def _make_dirs(fat: FatImage, dirs: set[str], env: Mapping[str, str] | None) -> None:
    needed: set[str] = set()
    for d in dirs:
        p = PurePosixPath(d)
        needed.update(str(a) for a in [p, *p.parents] if str(a) != "/")
    if not needed:
        return
    tree = fat.walk()
    existing = {"/" + e.path for e in tree if e.is_dir}
    clash = {"/" + e.path for e in tree if not e.is_dir} & needed
    if clash:
        raise BuildError(f"cannot make folder(s) {sorted(clash)}: a file has that name", where=fat.where)
    missing = sorted(needed - existing, key=lambda d: (d.count("/"), d))
    if missing:
        fat._mtools("mmd", *(f"::{d}" for d in missing), extra_env=env)
