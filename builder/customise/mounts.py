"""Where a device path lives: the mount points of the eMMC partitions, from the image's
/etc/fstab.emmc.ro (`/dev/mmcblk0pN`, `PARTLABEL=`, `PARTUUID=`)."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass

from builder.package.flashplan import FlashPlan

FSTAB = "/etc/fstab.emmc.ro"
REFUSED_MOUNTS = ("/boot", "/recovery")


@dataclass(frozen=True)
class Mount:
    point: str
    label: str


def _parse_fstab(text: str, plan: FlashPlan) -> list[Mount]:
    """Mount points of the eMMC partitions; the overlay root itself is ROOTFS."""
    by_number = {p.index + 1: p.label for p in plan.partitions}
    by_label = {p.label.upper(): p.label for p in plan.partitions}
    by_partuuid = {
        str(e.unique_guid).lower(): by_number.get(i + 1, "")
        for i, e in enumerate(getattr(plan.gpt, "entries", ()))
        if getattr(e, "unique_guid", None) is not None
    }
    mounts = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 2 or f[0].startswith("#"):
            continue
        dev, point = f[0], posixpath.normpath(f[1])
        label = _device_label(dev, by_number, by_label, by_partuuid)
        if label is None or point == "/":
            continue
        if point in ("/media/root-ro",):
            continue  # the lower layer: device paths under / already go to ROOTFS
        mounts.append(Mount(point, label))
    return mounts


def _device_label(
    dev: str, by_number: Mapping[int, str], by_label: Mapping[str, str], by_partuuid: Mapping[str, str]
) -> str | None:

    m = re.fullmatch(r"/dev/mmcblk\d+p(\d+)", dev)
    if m:
        return by_number.get(int(m[1]))
    if dev.startswith("PARTLABEL="):
        return by_label.get(dev.split("=", 1)[1].strip("\"'").upper())
    if dev.startswith("PARTUUID="):
        return by_partuuid.get(dev.split("=", 1)[1].strip("\"'").lower()) or None
    return None
