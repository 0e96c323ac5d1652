"""`boot BUNDLE --update-from BASE`: try an update in the field before pushing it to a fleet.

The box's eMMC is BASE as the card path installs it (the simulator), with the box's first-boot
growth of the partition that receives the update; BUNDLE is placed there the way `push` places it
(the copy of builder.ota.update_files in `ota/` on DATA, i.e. /data/ota on the box) and the
update is played from that partition, as U-Boot plays it (`verify --simulate --ota-from`; proved
byte-equal to the real U-Boot in the slow tier). The VM then boots what the update left.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from builder.cache import read_json, write_json_atomic
from builder.errors import AirboxError
from builder.fs.ext4 import EditBatch, Ext4Image
from builder.ota import ota_plan, update_files
from builder.package.chunks import pwrite_over
from builder.package.flashplan import SECTOR, FileSet, read_flash_plan
from builder.package.source import open_package
from builder.push.box import layout_differences
from builder.units import format_size
from builder.vm.machine import Bundle, Flash, VMError, _bundle_digest, _pow2, _root_parts

HOLDING_LABEL = "DATA"  # push's default folder /data/ota lies on DATA, mounted at /data
OTA_FOLDER = "/ota"  # inside that partition


def flash_update(bundle: Bundle, base: Path, info: object = None) -> Flash:
    from builder.verify import verify_fileset

    state = bundle.state
    state.mkdir(parents=True, exist_ok=True)
    image, meta = state / "flash.img", state / "flash.json"
    with tempfile.TemporaryDirectory(prefix="airbox-boot-", dir=state) as tmp:
        work = Path(tmp)
        with (
            open_package(base, work / "base") as base_files,
            open_package(bundle.card, work / "new") as files,
        ):
            digest = hashlib.sha256(
                b"update\0" + _bundle_digest(files).encode() + b"\0" + _bundle_digest(base_files).encode()
            ).hexdigest()
            old = read_json(meta) if image.exists() else None
            if old is not None and old.get("digest") == digest:
                return Flash(image, old["ro_part"], old["rw_part"], digest, True)
            part = image.with_suffix(".part")
            first = verify_fileset(base_files, simulate=part)
            _refuse(first, str(base))
            assert first.plan is not None
            rep_plan = read_flash_plan(files)
            diffs = layout_differences(first.plan.gpt, rep_plan.gpt)
            if diffs:
                raise VMError(
                    f"the bundle's partition table differs from the base's ({'; '.join(diffs[:3])}): "
                    "an update in the field does not rewrite it",
                    hint="boot the bundle without --update-from: only the card path can change the layout",
                )
            holding = next((p for p in rep_plan.partitions if p.label.upper() == HOLDING_LABEL), None)
            if holding is None:
                raise VMError(f"the bundle has no {HOLDING_LABEL} partition to receive the update")
            number = holding.index + 1
            try:
                update = ota_plan(rep_plan, number)
            except AirboxError as e:
                raise VMError(e.message, hint=e.hint) from None
            changed = update_files(files, rep_plan, update)
            epoch = rep_plan.headers["boot.scr"].timestamp  # deterministic, like the build's clock
            _place(part, holding.offset_sectors, holding.size_sectors, files, changed, work, epoch)
            second = verify_fileset(files, simulate=part, ota=number)
            _refuse(second, str(bundle.path))
            ro, rw = _root_parts(rep_plan)
            with open(part, "r+b") as f:
                f.truncate(_pow2(os.fstat(f.fileno()).st_size))
            part.replace(image)
            write_json_atomic(meta, {"digest": digest, "ro_part": ro, "rw_part": rw, "update_from": number})
    if callable(info):
        info(
            f"eMMC: {base} installed, then updated to the bundle from p{number} ({holding.label}{OTA_FOLDER})"
        )
    return Flash(image, ro, rw, digest, False)


def _refuse(report: object, what: str) -> None:
    failures = getattr(report, "failures", [])
    if failures or getattr(report, "plan", None) is None:
        first = failures[0] if failures else None
        raise VMError(
            f"{what} does not verify ({len(failures)} problem(s)"
            + (f"; first: {first.file}: {first.message}" if first else "")
            + ")",
            hint=f"run `airbox-build verify {what}` for the list",
        )


def _place(
    image: Path, offset: int, size: int, files: FileSet, changed: dict[str, bytes], work: Path, epoch: int
) -> None:
    """The partition's filesystem grown to the whole partition (the box's first boot does that),
    then the bundle (with the update's own scripts) in OTA_FOLDER, as push leaves it."""
    from builder.verify import cut_area

    cut = cut_area(image, offset * SECTOR, size * SECTOR, work / "holding.img")
    fs = Ext4Image(cut, epoch=epoch)
    info = fs.grow_to(size * SECTOR)
    names = files.names()
    need = sum(len(changed[n]) if n in changed else files.size(n) for n in names)
    free = info.free_blocks * info.block_size
    if need + (4 << 20) > free:
        raise VMError(
            f"the partition that receives the update has {format_size(free)} free, the bundle needs "
            f"{format_size(need)} (push would refuse this box too)",
            hint="a box whose DATA partition can hold the bundle: a bigger partition in the base's layout",
        )
    staged = work / "bundle"
    staged.mkdir()
    with EditBatch(fs, epoch=epoch) as batch:
        batch.mkdir(OTA_FOLDER)
        for name in names:
            dest = staged / name
            if name in changed:
                dest.write_bytes(changed[name])
            else:
                files.copy_to(name, dest)  # type: ignore[attr-defined]
            batch.write(f"{OTA_FOLDER}/{name}", dest)
    fs.check()
    fd = os.open(image, os.O_RDWR)
    try:
        with open(cut, "rb") as src:
            pos = 0
            while block := src.read(1 << 20):
                pwrite_over(fd, block, offset * SECTOR + pos)  # zero runs stay holes
                pos += len(block)
    finally:
        os.close(fd)
