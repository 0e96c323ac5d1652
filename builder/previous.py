"""What the last bundle of the same recipe (output/<name>/) offers the next build.

- Its chunks, by the length and sha256 of their bytes (a ChunkPool): a chunk it compressed is
  linked instead of compressed again.
- Its edited partitions, each with the fingerprint of the edits that made it: a partition the
  new build edits in exactly the same way (same vendor chunks, same operations, same bytes in,
  same tools) is the same image, so its chunks are taken as they are; nothing is applied,
  checked or hashed again. This is what makes a netplan-only rebuild cheap when the recipe
  also puts a large app into DATA.

Only what the bundle's build-report.json lists, and only while each file keeps the size (and for
links, the identity) it had, is offered. A missing or unreadable report offers nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import __version__
from builder.fs.ext4 import EditBatch, e2fsprogs_version
from builder.package.chunks import ChunkPool, EarlierFile, FileStat

log = logging.getLogger("airbox-build")

REPORT_NAME = "build-report.json"
SUMS_NAME = "SHA256SUMS"
# Bump when what an edit batch writes changes for the same operations (planning, debugfs use).
EDIT_MEMO_VERSION = 1


@dataclass(frozen=True)
class EarlierPartition:
    """A partition the last build edited with the same fingerprint: its chunks, in order."""

    label: str
    fingerprint: str
    image_bytes: int
    chunks: tuple[dict[str, Any], ...]  # that report's entries: file, bytes, sha256, source, vendor_file


@dataclass
class PreviousBuild:
    bundle: Path
    pool: ChunkPool = field(default_factory=ChunkPool)
    edited: dict[str, EarlierPartition] = field(default_factory=dict)  # by upper-case label

    def same_edits(self, label: str, fingerprint: str) -> EarlierPartition | None:
        """The earlier result of these very edits, if every chunk of it can still be taken."""
        earlier = self.edited.get(label.upper())
        if earlier is None or earlier.fingerprint != fingerprint:
            return None
        for c in earlier.chunks:
            if c.get("source") == "vendor" and c.get("vendor_file"):
                continue  # the vendor's own chunk: the fingerprint pins the vendor files
            if self.pool.find(int(c["bytes"]), str(c["sha256"])) is None:
                log.info("partition %s: the last build's %s is gone; applying the edits", label, c["file"])
                return None
        return earlier


def edit_fingerprint(
    batch: EditBatch,
    *,
    base_key: str,
    epoch: int,
    limit: int,
    shrink: bool,
    digest: Callable[[Path], str],
) -> str:
    """Everything the edited image depends on: the vendor partition (its key), the operations and
    the bytes they write, the clock debugfs is given, the room it may grow into, whether it is
    shrunk, and the tools and code that do it."""
    record = {
        "memo": EDIT_MEMO_VERSION,
        "airbox_build": __version__,
        "e2fsprogs": list(e2fsprogs_version()),
        "base": base_key,
        "epoch": epoch,
        "limit": limit,
        "shrink": shrink,
        "ops": batch.fingerprint(digest),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def load_previous(bundle: Path) -> PreviousBuild:
    """What the bundle at `bundle` (card/ + build-report.json + SHA256SUMS) offers; see the module doc."""
    prev = PreviousBuild(bundle)
    pool = prev.pool
    try:
        report = json.loads((bundle / REPORT_NAME).read_text())
        sums = _read_sha256sums(bundle / SUMS_NAME)
        for part in report.get("partitions", []):
            chunks = part.get("chunks", []) or []
            for c in chunks:
                name = str(c["file"])
                earlier = EarlierFile(
                    bundle / "card" / name,
                    _stat_tuple(c.get("out_stat")),
                    md5=c.get("md5"),
                    sha256=sums.get(f"card/{name}"),
                    gz_bytes=c.get("gz_bytes"),
                )
                if c.get("sha256") and earlier.gz_bytes is not None:
                    pool.add(int(c["bytes"]), str(c["sha256"]), earlier)
                vstat = _stat_tuple(c.get("vendor_stat"))
                if c.get("vendor_file") and vstat is not None and earlier.out_stat is not None:
                    pool.add_copy(str(c["vendor_file"]), vstat, earlier)
            fp = part.get("fingerprint")
            if fp and chunks and all(c.get("sha256") and c.get("bytes") is not None for c in chunks):
                label = str(part["label"])
                prev.edited[label.upper()] = EarlierPartition(
                    label, str(fp), int(part["image_bytes_after"]), tuple(chunks)
                )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.debug("nothing reusable in %s", bundle)
    return prev


def _read_sha256sums(path: Path) -> dict[str, str]:
    """`sha256sum` lines of an earlier bundle: relative path -> digest (empty when absent)."""
    out: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if sep and len(digest) == 64:
            out[name] = digest
    return out


def _stat_tuple(value: object) -> FileStat | None:
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return (value[0], value[1], value[2])
    return None
