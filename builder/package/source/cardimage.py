"""Card images: the file set found on their FAT partitions, read in place with mtools."""

from __future__ import annotations

from pathlib import Path

from builder.errors import PackageError, ToolError
from builder.fs.fat import FatEntry, FatImage, parse_boot_sector, probe_filesystem
from builder.package.source.base import _SET_HINT, _preview_paths
from builder.package.source.fileset import find_file_set
from builder.package.source.partitions import Partition, read_partitions
from builder.package.source.sources import FatSource, PackageSource

# --------------------------------------------------------------------------------------------
# Card images: find the file set on the FAT partitions


def _open_image(image: Path, base: int, length: int, form: str, origin: Path, cache: Path) -> PackageSource:
    where = str(origin)
    parts = read_partitions(image, base, length)
    seen: list[str] = []
    found: list[tuple[Partition, FatImage, str, list[FatEntry]]] = []
    no_set: list[str] = []
    for part in parts:
        desc = _describe_partition(part)
        if part.start >= length:
            seen.append(f"{desc}: beyond the end of the image (truncated)")
            continue
        with open(image, "rb") as f:
            f.seek(base + part.start)
            head = f.read(2048)
        fs = probe_filesystem(head)
        seen.append(f"{desc}: {fs}")
        if not fs.startswith("FAT"):
            continue
        boot = parse_boot_sector(head)
        assert boot is not None
        if part.start + boot.size_bytes > length:
            raise PackageError(
                f"{desc}: the {fs} volume needs {boot.size_bytes} bytes but the image ends "
                f"{length - part.start} bytes into it (truncated download?)",
                where=where,
                hint="download the image again and check its published MD5",
            )
        fat = FatImage(image, base + part.start)
        entries = _walk_fat(fat, f"{where} ({desc})")
        files = [e.path for e in entries if not e.is_dir]
        try:
            set_rel = find_file_set(files, f"{where} ({desc})")
        except PackageError as exc:
            if "no folder holds" not in exc.message:
                raise
            no_set.append(f"{desc} holds {_preview_paths(files)}")
            continue
        found.append((part, fat, set_rel, entries))
    fat_seen = [s for s in seen if ": FAT" in s]
    if not fat_seen:
        raise PackageError(
            "no FAT partition in the card image; found " + "; ".join(seen or ["no partitions"]),
            where=where,
            hint="the vendor TF-card image carries its file set on a FAT16/FAT32 partition",
        )
    if not found:
        raise PackageError(
            "no FAT partition holds boot.scr and boot_emmc.scr (the vendor file set): " + "; ".join(no_set),
            where=where,
            hint=_SET_HINT,
        )
    if len(found) > 1:
        raise PackageError(
            "several FAT partitions hold a file set: "
            + ", ".join(f"{_describe_partition(p)} folder /{d}" for p, _, d, _ in found),
            where=where,
            hint="keep exactly one vendor file set on the card image",
        )
    part, fat, set_rel, entries = found[0]
    location = f"{_describe_partition(part)} ({fat.fs_type()}), folder /{set_rel}"
    return FatSource(form, origin, location, fat, set_rel, entries, cache)


def _walk_fat(fat: FatImage, where: str) -> list[FatEntry]:
    try:
        return fat.walk()
    except ToolError as exc:
        raise PackageError(
            f"mtools cannot read the FAT volume: {exc.message}",
            where=where,
            hint="the image may be damaged or truncated; download it again",
        ) from exc


def _describe_partition(part: Partition) -> str:
    if part.scheme == "none":
        return "the whole image (a bare FAT volume)"
    return f"partition {part.number} ({part.scheme.upper()} {part.kind}, at byte {part.start})"
