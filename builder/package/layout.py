"""Layout changes: new partition sizes from a recipe's `layout:` applied to the vendor's table,
and which partitions move (the XML is read and written by partxml, the GPT by gpt)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from builder.errors import BuildError
from builder.package.partxml import KIB, PartitionTable, _ceil_div, _check_fits, _with_sizes

# --------------------------------------------------------------------------------------------
# Layout changes


@dataclass(frozen=True)
class LayoutChange:
    table: PartitionTable
    resized: tuple[str, ...]  # labels whose size changed
    moved: tuple[str, ...]  # labels whose first sector changed

    @property
    def sizes_kb(self) -> dict[str, int]:
        """label -> size_in_kb for every partition: feed to rewrite_partition_xml."""
        return {p.label: p.size_kb for p in self.table.partitions}


def apply_layout(
    table: PartitionTable,
    new_sizes: Mapping[str, int],
    min_bytes: Mapping[str, int] | None = None,
) -> LayoutChange:
    """Resize partitions (sizes in BYTES, rounded UP to whole KiB) and re-pack the ones after them.

    Labels are matched case-insensitively. Errors (BuildError) carry the numbers: an unknown label
    (with a did-you-mean), a size that is not positive, a partition smaller than its `min_bytes`
    (e.g. the size of the image that must go into it), a layout past the end of the disk.
    """
    sizes_kb: dict[int, int] = {}
    for label, size_bytes in new_sizes.items():
        part = table.get(label, error=BuildError)
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
            raise BuildError(
                f"partition {part.label}: requested size {size_bytes!r} bytes is not a positive integer",
                hint="give the partition size in bytes",
            )
        sizes_kb[part.index] = _ceil_div(size_bytes, KIB)
    new_table = _with_sizes(table, sizes_kb)
    for label, minimum in (min_bytes or {}).items():
        part = new_table.get(label, error=BuildError)
        if part.size_bytes < minimum:
            requested = "requested" if part.index in sizes_kb else "current"
            raise BuildError(
                f"partition {part.label}: {requested} size {part.size_bytes} bytes ({part.size_kb} KiB) is "
                f"smaller than the {minimum} bytes it must hold (short by {minimum - part.size_bytes} bytes)",
                hint=f"make {part.label} at least {_ceil_div(minimum, KIB)} KiB",
            )
    _check_fits(new_table, BuildError)
    pairs = list(zip(table.partitions, new_table.partitions, strict=True))
    resized = tuple(new.label for old, new in pairs if old.size_kb != new.size_kb)
    moved = tuple(new.label for old, new in pairs if old.offset_sectors != new.offset_sectors)
    return LayoutChange(new_table, resized, moved)
