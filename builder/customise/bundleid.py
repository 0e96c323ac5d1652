"""The bundle id: `/etc/airbox-build.json` in ROOTFS says which bundle a box runs.

`airbox-build push` reads it back over SSH after an update to confirm that the box came back on
the bundle it sent. The id names the box's content, not the card files (a file inside the bundle
cannot hold the digest of the bundle): the sha256 of the vendor package's own md5 list and of
every edit the build makes, by content (`EditBatch.fingerprint`). Two builds that put the same
bytes on a box get the same id; the compression level or the output folder do not change it.
The time is the build's clock (SOURCE_DATE_EPOCH, else the vendor's boot.scr time), so the file
is reproducible like every other byte of the bundle.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Iterable
from typing import Any

from builder import __version__
from builder.package.flashplan import FileSet

BUNDLE_ID_PATH = "/etc/airbox-build.json"
ORIGIN = "output.bundle_id"


def vendor_digest(files: FileSet, labels: Iterable[str], chunks_of: dict[str, list[str]]) -> str:
    """The vendor package by content: its md5.txt, else the bytes of the edited partitions' chunks."""
    h = hashlib.sha256()
    if "md5.txt" in files.names():
        with files.open("md5.txt") as f:
            h.update(f.read())
        return h.hexdigest()
    for label in sorted(labels):
        for name in chunks_of.get(label, []):
            h.update(name.encode() + b"\0")
            with files.open(name) as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


def content_id(vendor: str, edits: Iterable[tuple[str, str]]) -> str:
    """sha256 of the vendor package's digest and every (partition, edit fingerprint), sorted."""
    record = {"airbox_build": __version__, "vendor": vendor, "edits": sorted(edits)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def bundle_id_doc(name: str, device: str | None, bundle: str, epoch: int) -> dict[str, Any]:
    when = datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc)
    return {
        "airbox_build": __version__,
        "bundle": bundle,
        "device": device,
        "recipe": name,
        "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def encode(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def parse(text: str) -> dict[str, Any] | None:
    """A box's /etc/airbox-build.json, or None when it is not one of ours."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("bundle"), str):
        return None
    return doc
