"""Extra deliverables of a bundle: a whole-card image and a release zip, both deterministic.

The card image (`<name>.img`) is what Etcher, Raspberry Pi Imager or `dd` write to a TF card: a dos
(MBR) label with one FAT32 partition (type 0x0c) at 1 MiB holding the card folder at its root. It
is made without mounting anything: the label is written here in Python, the volume by `mkfs.fat
--invariant` and filled by `mcopy` (builder.fs.fat). The file is sparse: free space takes no disk.

The release zip (`<name>.zip`) holds the card folder's files at its root, sorted, stored (the
chunks are gzip already, and deflate output differs between zlib builds, so stored is what makes
the zip identical byte for byte on every machine), with fixed times and permissions.

Times: the build's epoch (SOURCE_DATE_EPOCH) when given, else 1980-01-01 00:00:00 UTC, the
earliest time FAT and zip can record. Volume serial and disk signature are derived from the
bundle's md5.txt, names and sizes, so the same bundle gives the same image.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError
from builder.events import Reporter
from builder.fs.fat import FatImage, copy_into, make_fat_image
from builder.package.source import is_os_junk

MIB = 1 << 20
PARTITION_START = MIB  # where partition 1 starts, as every card tool does
SECTOR = 512
FAT32_MAX_FILE = (4 << 30) - 1
FAT32_MIN_CLUSTERS = 65525  # below this Windows and the FAT spec call the volume FAT16
FAT_EPOCH = 315532800  # 1980-01-01 00:00:00 UTC: the earliest FAT/zip timestamp
MBR_TYPE_FAT32_LBA = 0x0C
_RESERVED_SECTORS = 32  # mkfs.fat's default for FAT32
_IMAGE_MARGIN_MIN = 8 * MIB
_IMAGE_MARGIN_FRACTION = 0.02
# Microsoft's default FAT32 cluster sizes by volume size (what Windows' format picks).
_CLUSTER_TABLE: tuple[tuple[int, int], ...] = (
    (260 * MIB, 512),
    (8 << 30, 4096),
    (16 << 30, 8192),
    (32 << 30, 16384),
)
_LARGEST_CLUSTER = 32768
_COPY_BLOCK = 4 * MIB


@dataclass(frozen=True)
class Artifact:
    """One deliverable beside card/: `name` relative to the bundle folder."""

    kind: str  # "image" or "zip"
    name: str
    size: int


@dataclass(frozen=True)
class VolumePlan:
    """Geometry of the card image: the FAT32 partition at 1 MiB and the whole image size."""

    cluster_bytes: int
    volume_bytes: int
    image_bytes: int

    @property
    def sectors_per_cluster(self) -> int:
        return self.cluster_bytes // SECTOR


# --------------------------------------------------------------------------------------------
# What to emit


def emit_artifacts(
    card: Path,
    dest_dir: Path,
    name: str,
    *,
    image: bool,
    zip_: bool,
    volume_label: str,
    epoch: int | None,
    reporter: Reporter,
) -> list[Artifact]:
    """Write `<name>.img` and/or `<name>.zip` of the complete `card` folder into `dest_dir`."""
    out: list[Artifact] = []
    if image:
        with reporter.step("card image", file=f"{name}.img"):
            path = write_card_image(card, dest_dir / f"{name}.img", label=volume_label, epoch=epoch)
            out.append(Artifact("image", path.name, path.stat().st_size))
    if zip_:
        with reporter.step("release zip", file=f"{name}.zip"):
            path = write_release_zip(card, dest_dir / f"{name}.zip", epoch=epoch)
            out.append(Artifact("zip", path.name, path.stat().st_size))
    return out


def read_sha256sums(path: Path) -> dict[str, str]:
    """`sha256sum` output -> {relative path: digest}."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if len(line) > 66 and line[64:66] in ("  ", " *"):
            out[line[66:]] = line[:64]
    return out


def result_fields(out_dir: Path, artifacts: Sequence[Artifact]) -> dict[str, object]:
    """The paths and sha256 digests of a built bundle's deliverables, for the CLI's `result` event."""
    sums_path = out_dir / "SHA256SUMS"
    sums = read_sha256sums(sums_path) if sums_path.is_file() else {}
    fields: dict[str, object] = {}
    if sums_path.is_file():
        fields["sha256sums"] = {"path": str(sums_path), "sha256": _sha256_file(sums_path)}
    for a in artifacts:
        fields[a.kind] = {"path": str(out_dir / a.name), "sha256": sums.get(a.name), "size": a.size}
    return fields


# --------------------------------------------------------------------------------------------
# Card image


def card_files(card: Path) -> list[tuple[Path, str]]:
    """(file, '/'-path on the card) for every file of the card folder, sorted; desktop junk skipped."""
    files = []
    for p in sorted(card.rglob("*")):
        rel = p.relative_to(card).as_posix()
        if p.is_file() and not is_os_junk(rel):
            files.append((p, rel))
    return sorted(files, key=lambda f: f[1])


def plan_volume(files: Sequence[tuple[str, int]]) -> VolumePlan:
    """Size a FAT32 volume for `files` ('/'-path, bytes): contents + FAT overhead + a margin.

    The cluster size is the one Windows would choose for that volume size; the volume has at least
    65525 clusters, so every implementation (Windows, macOS, Linux, U-Boot) agrees it is FAT32.
    """
    for name, size in files:
        if size > FAT32_MAX_FILE:
            raise BuildError(
                f"{size} bytes: FAT32 cannot hold a file of 4 GiB or more",
                where=name,
                hint="chunks must stay below 4 GiB; check the package's chunk size",
            )
    for limit, cluster in _CLUSTER_TABLE:
        volume = _volume_bytes(files, cluster)
        if volume <= limit:
            break
    else:
        cluster = _LARGEST_CLUSTER
        volume = _volume_bytes(files, cluster)
    image = _round_up(PARTITION_START + volume, MIB)
    return VolumePlan(cluster, image - PARTITION_START, image)


def _volume_bytes(files: Sequence[tuple[str, int]], cluster: int) -> int:
    data = sum(_round_up(size, cluster) for _, size in files)
    data += _round_up(fat_directory_bytes([n for n, _ in files]), cluster)
    data += cluster * len(_folders([n for n, _ in files]))
    margin = max(_IMAGE_MARGIN_MIN, int(data * _IMAGE_MARGIN_FRACTION))
    clusters = max(-(-(data + margin) // cluster), FAT32_MIN_CLUSTERS + 64)
    fat = _round_up((clusters + 2) * 4, SECTOR)
    # mkfs.fat aligns the data area to a cluster boundary: one more cluster covers it.
    return _RESERVED_SECTORS * SECTOR + 2 * fat + (clusters + 1) * cluster


def _folders(names: Sequence[str]) -> set[str]:
    return {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}


def fat_directory_bytes(names: Sequence[str]) -> int:
    """Directory entries: one short entry plus one VFAT entry per 13 characters of the long name."""
    per_dir: dict[str, int] = {}
    for n in names:
        parent, _, base = n.rpartition("/")
        per_dir[parent] = per_dir.get(parent, 0) + 32 * (1 + -(-len(base) // 13))
    return sum(per_dir.values()) + 32 * 4  # the volume label entry and some slack


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def write_card_image(card: Path, dest: Path, *, label: str, epoch: int | None) -> Path:
    """Write `dest`: a dos label, one FAT32 partition at 1 MiB with the card folder at its root."""
    files = card_files(card)
    if not files:
        raise BuildError("the card folder is empty", where=str(card))
    sized = [(rel, p.stat().st_size) for p, rel in files]
    plan = plan_volume(sized)
    ident = bundle_identity(card, sized)
    dest.unlink(missing_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.truncate(plan.image_bytes)  # sparse
        fat = make_fat_image(
            tmp,
            plan.volume_bytes,
            label,
            32,
            offset=PARTITION_START,
            volume_id=ident,
            sectors_per_cluster=plan.sectors_per_cluster,
        )
        _check_fat32(fat, plan)
        write_mbr(tmp, plan.image_bytes, disk_signature=ident ^ 0xA1B0C0DE)
        with _utc():
            copy_into(fat, files, timestamp=_fat_time(epoch))
        _check_contents(fat, sized)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def bundle_identity(card: Path, sized: Sequence[tuple[str, int]]) -> int:
    """A 32-bit number that changes with the bundle: from md5.txt (every file's md5), names, sizes."""
    h = hashlib.sha256()
    md5 = card / "md5.txt"
    if md5.is_file():
        h.update(md5.read_bytes())
    for name, size in sized:
        h.update(f"{name}\0{size}\n".encode())
    return int.from_bytes(h.digest()[:4], "little") or 1


def write_mbr(path: Path, image_bytes: int, *, disk_signature: int) -> None:
    """A dos partition table: partition 1, type 0x0c (FAT32 LBA), active, 1 MiB to the end."""
    start = PARTITION_START // SECTOR
    count = image_bytes // SECTOR - start
    mbr = bytearray(SECTOR)
    struct.pack_into("<I", mbr, 440, disk_signature & 0xFFFFFFFF)
    entry = struct.pack(
        "<B3sB3sII", 0x80, _chs(start), MBR_TYPE_FAT32_LBA, _chs(start + count - 1), start, count
    )
    mbr[446 : 446 + 16] = entry
    mbr[510:512] = b"\x55\xaa"
    with open(path, "r+b") as f:
        f.write(mbr)


def _chs(lba: int, heads: int = 255, sectors: int = 63) -> bytes:
    """The legacy cylinder/head/sector triple; 1023/254/63 beyond what CHS can address."""
    cyl, rem = divmod(lba, heads * sectors)
    if cyl > 1023:
        return bytes((254, 0xFF, 0xFF))
    head, sec = divmod(rem, sectors)
    return bytes((head, ((cyl >> 2) & 0xC0) | (sec + 1), cyl & 0xFF))


def _check_fat32(fat: FatImage, plan: VolumePlan) -> None:
    boot = fat.boot_sector()
    if boot.fs_type != "FAT32" or boot.clusters < FAT32_MIN_CLUSTERS:
        raise BuildError(
            f"mkfs.fat made {boot.fs_type} with {boot.clusters} clusters of {boot.cluster_bytes} bytes "
            f"for a {plan.volume_bytes}-byte volume; a FAT32 card needs at least {FAT32_MIN_CLUSTERS}",
            where=fat.where,
            hint="please report this with the output of `minfo -i IMAGE@@1M`",
        )


def _check_contents(fat: FatImage, sized: Sequence[tuple[str, int]]) -> None:
    """Every file is on the volume with its size (mcopy stops quietly on some errors)."""
    listed = {e.path: e.size for e in fat.walk() if not e.is_dir}
    wrong = [n for n, s in sized if listed.get(n) != s]
    if wrong:
        raise BuildError(
            f"{len(wrong)} file(s) missing or short in the card image: {', '.join(wrong[:5])}",
            where=fat.where,
            hint="the volume may be too small; please report this",
        )


def _fat_time(epoch: int | None) -> int:
    """A timestamp FAT can record (1980..2107), even number of seconds (FAT's resolution)."""
    t = FAT_EPOCH if epoch is None else min(max(epoch, FAT_EPOCH), 4354819198)
    return t - t % 2


@contextlib.contextmanager
def _utc() -> Iterator[None]:
    """mtools stamps entries in local time: pin UTC so every machine writes the same bytes.

    copy_into passes our environment to mtools and has no time zone parameter; the build runs
    this step on one thread, with no other child process starting meanwhile.
    """
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old


# --------------------------------------------------------------------------------------------
# Release zip


def write_release_zip(card: Path, dest: Path, *, epoch: int | None) -> Path:
    """Write `dest`: the card folder's files at the zip's root, deterministic byte for byte."""
    files = card_files(card)
    if not files:
        raise BuildError("the card folder is empty", where=str(card))
    stamp = time.gmtime(_fat_time(epoch))[:6]
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for src, rel in files:
                _add_stored(zf, src, rel, stamp)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _add_stored(zf: zipfile.ZipFile, src: Path, rel: str, stamp: tuple[int, ...]) -> None:
    info = zipfile.ZipInfo(rel, date_time=stamp)  # type: ignore[arg-type]
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # unix, whatever machine builds it
    info.external_attr = 0o100644 << 16
    info.file_size = src.stat().st_size  # lets zipfile choose zip64 up front for big members
    with open(src, "rb") as s, zf.open(info, "w") as d:
        while block := s.read(_COPY_BLOCK):
            d.write(block)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_COPY_BLOCK):
            h.update(block)
    return h.hexdigest()


def artifact_names(artifacts: Sequence[Artifact]) -> Mapping[str, str]:
    return {a.kind: a.name for a in artifacts}
