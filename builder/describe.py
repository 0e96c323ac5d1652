"""`airbox-build inspect`: what a package holds, as a table or JSON."""

from __future__ import annotations

from typing import Any

from builder.package.flashplan import FlashPlan


def plan_to_json(plan: FlashPlan) -> dict[str, Any]:
    return {
        "chunk_sectors": plan.chunk_sectors,
        "chunk_sectors_inferred": plan.chunk_sectors_inferred,
        "disk_kb": plan.table.disk_kb,
        "partitions": [
            {
                "index": p.index,
                "label": p.label,
                "format": p.fmt_name,
                "readonly": p.readonly,
                "offset_sectors": p.offset_sectors,
                "size_sectors": p.size_sectors,
                "image_bytes": p.image_bytes,
                "script": p.script,
                "compressed_bytes": sum(plan.files[c.file] for c in p.chunks),
                "chunks": [
                    {"file": c.file, "bytes": c.unzip_bytes, "offset_sectors": c.offset_sectors}
                    for c in p.chunks
                ],
            }
            for p in plan.partitions
        ],
        "files": {"count": len(plan.files), "bytes": sum(plan.files.values())},
    }


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def plan_to_table(plan: FlashPlan, form: str) -> str:
    head = ("#", "label", "format", "ro", "offset", "size", "image", "chunks", "compressed")
    rows = [head]
    for p in plan.partitions:
        rows.append(
            (
                str(p.index),
                p.label,
                p.fmt_name,
                "yes" if p.readonly else "no",
                f"0x{p.offset_sectors:08x}",
                _human(p.size_sectors * 512),
                _human(p.image_bytes) if p.chunks else "-",
                str(len(p.chunks)),
                _human(sum(plan.files[c.file] for c in p.chunks)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    chunk_note = "" if plan.chunk_sectors_inferred else " (not measurable: no partition has two chunks)"
    lines += [
        "",
        f"form: {form}; disk {_human(plan.table.disk_kb * 1024)} ({plan.xml_name}); "
        f"chunk size {plan.chunk_sectors} sectors ({_human(plan.chunk_sectors * 512)}){chunk_note}",
        f"files: {len(plan.files)}, {_human(sum(plan.files.values()))}",
    ]
    return "\n".join(lines)
