"""Proof in the real bootloader: a built bundle, flashed by U-Boot 2023.01 under QEMU.

The bundle's own scripts run unchanged from `boot_emmc.scr` (shared/UBOOT-QEMU.md): they load
every chunk from an emulated TF card, unzip it and `mmc write` it to an emulated eMMC. Then the
eMMC is judged by its bytes, never by the log alone: every partition against the image the
edits produced, the GPT by `sgdisk -v`, every ext4 partition by `e2fsck -fn`, the injected files
by `debugfs`, and `airbox-build verify --simulate` must produce the same disk byte for byte.

Slow tier: U-Boot is built once into a cache outside the repo (scripts/ci-slow-deps warms it).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import uboot
import vendor_fixture as vf
from buildhelp import cli, run_build, write_recipe

from builder.ota import ota_plan, update_files
from builder.package.flashplan import read_flash_plan
from builder.package.partxml import parse_partition_xml
from builder.package.source import open_package

pytestmark = pytest.mark.slow

SECTOR = vf.SECTOR
QEMU_TIMEOUT = 240  # seconds; a bundle of a few tens of MiB flashes in well under a minute
LINARO = vf.LINARO_UID

ROOTFS_BLOB = random.Random("rootfs-blob").randbytes(1536 * 1024)  # incompressible: adds chunks
ROOTFS_NOTE = b"flashed by the real U-Boot\n"
DATA_VERSION = b"v2.0.0-airbox\n"
RECOVERY_FILE = b"recovery note\n"
MISC_HEAD = b"boot-recovery\0airbox misc test\0"
MISC_CUT = 300  # MISC ends 300 bytes short of a sector: the last `mmc write` copies stale RAM
STALE_MARK = bytes((i * 37 + 11) & 0xFF or 1 for i in range(4096))  # never zero


def _unavailable(message: str) -> None:
    """CI must run this tier (scripts/ci-slow-deps prepares it); elsewhere, skip with the fix."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def uboot_bin() -> Path:
    try:
        missing = uboot.missing_packages(uboot.TOOL_PACKAGES)
        uboot.install_packages(missing, uboot.Log())
        start = time.monotonic()
        path = uboot.ensure_uboot()
    except uboot.UBootUnavailable as e:
        _unavailable(str(e))
        raise
    took = time.monotonic() - start
    if took > 5:
        print(f"\nU-Boot built in {took:.0f} s")
    return path


# ----------------------------------------------------------------------------- edits


def _sh(*cmd: str | Path) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr.decode(errors='replace')}"
    return proc.stdout.decode(errors="replace")


def _debugfs_write(image: Path, commands: list[str]) -> None:
    script = image.with_suffix(".debugfs")
    script.write_text("\n".join(commands) + "\n")
    proc = subprocess.run(["debugfs", "-w", "-f", str(script), str(image)], capture_output=True, check=False)
    errors = [ln for ln in proc.stderr.decode().splitlines() if not ln.startswith("debugfs ")]
    assert proc.returncode == 0 and not errors, errors


def _grow_ext4(image: Path, extra: int) -> None:
    size_kb = (image.stat().st_size + extra) // 1024
    _sh("resize2fs", image, f"{size_kb}K")


def rootfs_edit(image: Path) -> None:
    """Grow, then write a 1.5 MiB file (linaro, 0640) and a note: the chunk list gets longer."""
    _grow_ext4(image, len(ROOTFS_BLOB) + (1 << 20))
    blob, note = image.parent / "blob.bin", image.parent / "note.txt"
    blob.write_bytes(ROOTFS_BLOB)
    note.write_bytes(ROOTFS_NOTE)
    _debugfs_write(
        image,
        [
            "mkdir /etc/airbox",
            f"write {blob} /etc/airbox/blob.bin",
            f"write {note} /etc/airbox/note.txt",
            "sif /etc/airbox/blob.bin mode 0100640",
            f"sif /etc/airbox/blob.bin uid {LINARO}",
            f"sif /etc/airbox/blob.bin gid {LINARO}",
        ],
    )


def data_edit(image: Path) -> None:
    """Replace /ota/version.txt (linaro, 0600)."""
    _grow_ext4(image, 1 << 20)
    new = image.parent / "version.txt"
    new.write_bytes(DATA_VERSION)
    _debugfs_write(
        image,
        [
            "rm /ota/version.txt",
            f"write {new} /ota/version.txt",
            "sif /ota/version.txt mode 0100600",
            f"sif /ota/version.txt uid {LINARO}",
            f"sif /ota/version.txt gid {LINARO}",
        ],
    )


RECOVERY_BYTES = 6 << 20  # six full chunks of the miniature's 1 MiB


def recovery_edit(image: Path) -> None:
    """Grow to six full chunks, add a file, and mark the free last block (what MISC's tail reads)."""
    _sh("resize2fs", image, f"{RECOVERY_BYTES // 1024}K")
    note = image.parent / "recovery.txt"
    note.write_bytes(RECOVERY_FILE)
    _debugfs_write(image, [f"write {note} /airbox.txt"])
    last = RECOVERY_BYTES // 4096 - 1
    assert "not in use" in _sh("debugfs", "-R", f"testb {last}", image), "last block is used"
    with open(image, "r+b") as f:
        f.seek(RECOVERY_BYTES - len(STALE_MARK))
        f.write(STALE_MARK)


def misc_edit(image: Path) -> None:
    """Raw bytes, and an image that ends mid-sector."""
    size = image.stat().st_size
    with open(image, "r+b") as f:
        f.write(MISC_HEAD)
        f.seek(size // 2)
        f.write(b"\xa5" * 4096)
        f.truncate(size - MISC_CUT)


def snapshot(dest: Path) -> Callable[[Path], None]:
    def keep(image: Path) -> None:
        shutil.copyfile(image, dest)

    return keep


EDITS: dict[str, Callable[[Path], None]] = {
    "RECOVERY": recovery_edit,
    "MISC": misc_edit,
    "ROOTFS": rootfs_edit,
    "DATA": data_edit,
}


def edits_with_snapshots(expected: Path) -> dict[str, list[Callable[[Path], None]]]:
    """Each edit, then a copy of the edited image into `expected/<LABEL>.img` (the reference)."""
    expected.mkdir(parents=True, exist_ok=True)
    return {label: [edit, snapshot(expected / f"{label}.img")] for label, edit in EDITS.items()}


# ----------------------------------------------------------------------------- flashing


@dataclass(frozen=True)
class Flashed:
    emmc: Path
    run: uboot.QemuRun
    disk_bytes: int
    card_bytes: int


def bundle_bytes(card: Path) -> int:
    return sum(p.stat().st_size for p in card.rglob("*") if p.is_file())


def flash_with_uboot(uboot_bin: Path, card_dir: Path, work: Path) -> Flashed:
    """Card image from the bundle, empty eMMC of the XML's disk size, one U-Boot run."""
    table = parse_partition_xml((card_dir / "partition32G.xml").read_text(), "partition32G.xml")
    card = uboot.make_card_image(card_dir, work / "sd.img")
    emmc = uboot.make_sparse(work / "emmc.img", uboot.power_of_two_at_least(table.disk_bytes))
    env = uboot.make_env_image(work / "env.bin", uboot.flash_env("boot_emmc.scr"))
    run = uboot.run_qemu(uboot_bin, env, emmc, card, timeout=QEMU_TIMEOUT, log=work / "qemu.log")
    print(
        f"\nQEMU: {run.seconds:.1f} s for a {bundle_bytes(card_dir) / (1 << 20):.1f} MiB bundle "
        f"({card.stat().st_size >> 20} MiB card, {emmc.stat().st_size >> 20} MiB eMMC)"
    )
    return Flashed(emmc, run, table.disk_bytes, card.stat().st_size)


def assert_u_boot_finished(run: uboot.QemuRun, log: Path) -> None:
    assert not run.timed_out, f"QEMU timed out after {run.seconds:.0f} s; console in {log}"
    assert run.returncode == 0, f"QEMU exited {run.returncode}; console in {log}"
    assert "Loading Environment from Flash... OK" in run.log, f"env.bin not used; console in {log}"
    assert run.finished, f"the entry script did not return to bootcmd; console in {log}"
    assert "eMMC update done" in run.log
    assert uboot.log_problems(run.log) == []


MMC_WRITE_LOG = re.compile(r"MMC write: dev # 0, block # (\d+), count (\d+) \.\.\. (\d+) blocks written: OK")
MMC_WRITE_CMD = re.compile(r"^mmc write \S+ (0x[0-9a-fA-F]+) (0x[0-9a-fA-F]+)", re.M)
SCRIPT_LOAD = re.compile(r"^load .*/(boot_emmc-[^/\s]+)\.scr$", re.M)


def scripted_writes(card: Path) -> list[tuple[int, int]]:
    """(sector, count) of every `mmc write`, in the order boot_emmc.cmd sources the scripts."""
    writes = []
    for stem in SCRIPT_LOAD.findall((card / "boot_emmc.cmd").read_text()):
        text = (card / f"{stem}.cmd").read_text()
        writes += [(int(a, 16), int(b, 16)) for a, b in MMC_WRITE_CMD.findall(text)]
    return writes


def logged_writes(log: str) -> list[tuple[int, int]]:
    out = []
    for block, count, done in MMC_WRITE_LOG.findall(log):
        assert count == done
        out.append((int(block), int(count)))
    return out


# ----------------------------------------------------------------------------- judging the eMMC


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def cut(emmc: Path, offset_sectors: int, size_sectors: int, dest: Path) -> Path:
    """The partition's area of the eMMC as its own (sparse) file."""
    with open(emmc, "rb") as src, open(dest, "wb") as dst:
        src.seek(offset_sectors * SECTOR)
        left = size_sectors * SECTOR
        while left:
            buf = src.read(min(1 << 20, left))
            assert buf, f"{emmc} ends inside the partition at sector {offset_sectors}"
            if buf.count(0) == len(buf):
                dst.seek(len(buf), os.SEEK_CUR)
            else:
                dst.write(buf)
            left -= len(buf)
        dst.truncate(size_sectors * SECTOR)
    return dest


def first_nonzero(path: Path, start: int, end: int) -> int | None:
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            buf = f.read(min(1 << 20, end - pos))
            if not buf:
                return None
            if buf.count(0) != len(buf):
                return pos + next(i for i, b in enumerate(buf) if b)
            pos += len(buf)
    return None


def differing_ranges(a: Path, b: Path, length: int, limit: int = 8) -> list[tuple[int, int]]:
    """Where a and b differ in their first `length` bytes: up to `limit` ranges, each from the first
    differing byte to the end of the last differing 4 KiB block next to it."""
    ranges: list[tuple[int, int]] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while pos < length and len(ranges) < limit:
            n = min(1 << 20, length - pos)
            x, y = fa.read(n).ljust(n, b"\0"), fb.read(n).ljust(n, b"\0")
            if x != y:
                for off in range(0, n, 4096):
                    if x[off : off + 4096] != y[off : off + 4096]:
                        i = next(k for k in range(off, min(off + 4096, n)) if x[k] != y[k])
                        start = pos + i
                        if ranges and ranges[-1][1] >= start - 4096:
                            ranges[-1] = (ranges[-1][0], pos + off + 4096)
                        else:
                            ranges.append((start, pos + off + 4096))
            pos += n
    return ranges


def check_gpt(emmc: Path, work: Path, table_labels: list[str], starts: list[int]) -> None:
    """sgdisk -v: only the missing backup GPT is a problem; after `sgdisk -e`, none."""
    proc = subprocess.run(["sgdisk", "-v", str(emmc)], capture_output=True, text=True, check=False)
    report = proc.stdout + proc.stderr
    assert "Identified 1 problems!" in report, report
    assert "Main header: OK" in report and "Main partition table: OK" in report, report
    assert "Backup header: ERROR" in report, report
    fixed = work / "emmc-sgdisk-e.img"
    _sh("cp", "--sparse=always", emmc, fixed)
    _sh("sgdisk", "-e", fixed)
    report = _sh("sgdisk", "-v", fixed)
    assert "No problems found" in report, report
    listing = _sh("sgdisk", "-p", fixed)
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+.*?\s(\S+)$", listing, re.M)
    assert [(int(n), int(s), name) for n, s, _e, name in rows] == [
        (i + 1, start, label) for i, (label, start) in enumerate(zip(table_labels, starts, strict=True))
    ], listing
    fixed.unlink()


def check_ext4(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{image.name}: e2fsck -fn exited {proc.returncode}\n{proc.stdout}"


def stat_of(image: Path, path: str) -> tuple[str, int, int, int, int]:
    """(type, permission bits, uid, gid, size) of a file inside an ext4 image, read by debugfs."""
    out = _sh("debugfs", "-R", f"stat {path}", image)
    mode = re.search(r"Type:\s+(\S+)\s+Mode:\s+(\d+)", out)
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)\s+.*Size:\s+(\d+)", out)
    assert mode and owner, out
    perms = int(mode.group(2), 8)
    return mode.group(1), perms, int(owner.group(1)), int(owner.group(2)), int(owner.group(3))


def file_of(image: Path, path: str, work: Path) -> bytes:
    dest = work / "dumped"
    _sh("debugfs", "-R", f"dump {path} {dest}", image)
    data = dest.read_bytes()
    dest.unlink()
    return data


def expected_images(pkg: vf.MiniPackage, edited: Path) -> dict[str, Path]:
    """The image each partition must hold: the edited copy, else the vendor's own."""
    out = {}
    for p in pkg.partitions:
        assert p.image is not None
        mine = edited / f"{p.label}.img"
        out[p.label] = mine if mine.exists() else p.image
    return out


def check_partitions(
    emmc: Path,
    layout: list[tuple[str, int, int, int]],
    expected: Mapping[str, Path],
    stale_tail: Mapping[str, bytes],
    parts_dir: Path,
) -> dict[str, Path]:
    """Every partition area: the expected image, then (past it) only the stale tail and zeros."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    cut_out = {}
    for label, offset, size, _fmt in layout:
        area = cut(emmc, offset, size, parts_dir / f"{label}.img")
        cut_out[label] = area
        want = expected[label]
        n = want.stat().st_size
        diff = differing_ranges(area, want, n)
        assert diff == [], f"{label}: eMMC differs from the expected image at byte ranges {diff}"
        tail = stale_tail.get(label, b"")
        assert read_at(area, n, len(tail)) == tail, f"{label}: bytes past the image's end"
        nonzero = first_nonzero(area, n + len(tail), size * SECTOR)
        assert nonzero is None, f"{label}: byte {nonzero} is not zero, past everything written"
    return cut_out


# ----------------------------------------------------------------------------- the tests


def test_real_uboot_flashes_an_edited_bundle_exactly_as_verify_simulates(
    uboot_bin: Path, vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    edited = tmp_path / "edited"
    recipe = write_recipe(tmp_path / "r", vendor_package.dir, name="qemu")
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache", edits=edits_with_snapshots(edited))
    changed = {p["label"]: p for p in res.report["partitions"] if p["changed"]}
    assert sorted(changed) == sorted(EDITS)
    assert changed["ROOTFS"]["chunks_after"] > changed["ROOTFS"]["chunks_before"]
    assert changed["RECOVERY"]["chunks_after"] == RECOVERY_BYTES >> 20

    work = tmp_path / "qemu"
    work.mkdir()
    flashed = flash_with_uboot(uboot_bin, res.card, work)
    assert_u_boot_finished(flashed.run, work / "qemu.log")
    # every chunk written once, in script order: no script re-sourced after a failed load
    assert logged_writes(flashed.run.log) == scripted_writes(res.card)

    layout = [(p.label, p.offset_sectors, p.size_sectors, p.fmt) for p in vendor_package.partitions]
    expected = expected_images(vendor_package, edited)
    # MISC ends mid-sector: `mmc write` rounds up and copies what the last full chunk left in RAM
    stale = {"MISC": STALE_MARK[-MISC_CUT:]}
    assert read_at(flashed.emmc, 0, len(vendor_package.gpt_bytes)) == vendor_package.gpt_bytes
    parts = check_partitions(flashed.emmc, layout, expected, stale, work / "parts")

    labels = [p.label for p in vendor_package.partitions]
    check_gpt(flashed.emmc, work, labels, [p.offset_sectors for p in vendor_package.partitions])
    for label, _off, _size, fmt in layout:
        if fmt == vf.FMT_EXT4:
            check_ext4(parts[label])
    _sh("fsck.fat", "-n", parts["BOOT"])

    rootfs, data, recovery = parts["ROOTFS"], parts["DATA"], parts["RECOVERY"]
    assert stat_of(rootfs, "/etc/airbox/blob.bin") == ("regular", 0o640, LINARO, LINARO, len(ROOTFS_BLOB))
    assert file_of(rootfs, "/etc/airbox/blob.bin", work) == ROOTFS_BLOB
    assert file_of(rootfs, "/etc/airbox/note.txt", work) == ROOTFS_NOTE
    assert stat_of(data, "/ota/version.txt") == ("regular", 0o600, LINARO, LINARO, len(DATA_VERSION))
    assert file_of(data, "/ota/version.txt", work) == DATA_VERSION
    assert file_of(recovery, "/airbox.txt", work) == RECOVERY_FILE
    assert read_at(parts["MISC"], 0, len(MISC_HEAD)) == MISC_HEAD

    # airbox-build verify --simulate must write the very same disk
    sim = tmp_path / "sim.img"
    out = cli("verify", res.out_dir, "--simulate", sim, "--extract", tmp_path / "sim-parts")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sim.stat().st_size == flashed.disk_bytes
    diff = differing_ranges(sim, flashed.emmc, flashed.disk_bytes)
    assert diff == [], f"verify --simulate and U-Boot disagree at byte ranges {diff}"
    assert first_nonzero(flashed.emmc, flashed.disk_bytes, flashed.emmc.stat().st_size) is None
    for label, *_ in layout:
        extracted = tmp_path / "sim-parts" / f"{label}.img"
        assert differing_ranges(extracted, parts[label], parts[label].stat().st_size) == [], label


def test_real_uboot_flashes_the_full_recipes_own_card_image_as_verify_simulates(
    uboot_bin: Path, vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    """Every customisation a recipe can make (test_customise's full recipe: files in every
    partition, the overlay layer, users, netplan, apt, pip, services, removals), built with its
    card image (`<name>.img`, output.image), and that very image given to the real U-Boot as
    the SD card: the eMMC it writes equals `verify --simulate` byte for byte, and every ext4
    partition is fsck-clean with the recipe's files in it."""
    from test_customise import full_recipe

    res = run_build(
        full_recipe(tmp_path / "r", vendor_package.dir), tmp_path / "out", tmp_path / "cache", image=True
    )
    (artifact,) = [a for a in res.artifacts if a.kind == "image"]
    card_image = tmp_path / "sd.img"
    shutil.copyfile(res.out_dir / artifact.name, card_image)  # QEMU opens it read-write
    # written to a card, as `dd` or a card writer would: the card is larger than the image (and
    # QEMU's SD model takes power-of-two sizes only)
    os.truncate(card_image, uboot.power_of_two_at_least(card_image.stat().st_size))
    table = parse_partition_xml((res.card / "partition32G.xml").read_text(), "partition32G.xml")
    work = tmp_path / "qemu"
    work.mkdir()
    emmc = uboot.make_sparse(work / "emmc.img", uboot.power_of_two_at_least(table.disk_bytes))
    env = uboot.make_env_image(work / "env.bin", uboot.flash_env("boot_emmc.scr"))
    run = uboot.run_qemu(uboot_bin, env, emmc, card_image, timeout=QEMU_TIMEOUT, log=work / "qemu.log")
    assert_u_boot_finished(run, work / "qemu.log")
    assert logged_writes(run.log) == scripted_writes(res.card)

    sim = tmp_path / "sim.img"
    out = cli("verify", res.out_dir, "--simulate", sim, "--extract", tmp_path / "sim-parts")
    assert out.returncode == 0, out.stdout + out.stderr
    assert differing_ranges(sim, emmc, table.disk_bytes) == [], "verify --simulate and U-Boot disagree"
    assert first_nonzero(emmc, table.disk_bytes, emmc.stat().st_size) is None
    parts = {}
    for p in table.partitions:
        parts[p.label] = cut(emmc, p.offset_sectors, p.size_sectors, work / f"{p.label}.img")
        if p.fmt == vf.FMT_EXT4 and p.label in ("ROOTFS", "ROOTFS_RW", "OPT", "DATA"):
            check_ext4(parts[p.label])
    assert file_of(parts["ROOTFS"], "/etc/motd", work) == b"Welcome to full\n"
    assert file_of(parts["ROOTFS"], "/etc/hostname", work) == b"airbox-01\n"
    assert file_of(parts["DATA"], "/hello.txt", work) == b"hi\n"
    assert file_of(parts["ROOTFS_RW"], "/overlay/etc/profile.d/x.sh", work) == b"export X=1\n"


LAYOUT_GROW = {"ROOTFS_RW": 20 << 20}


def test_real_uboot_flashes_a_bundle_with_a_new_layout(
    uboot_bin: Path, vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    """ROOTFS_RW grows: OPT and DATA move, the GPT changes; ROOTFS and DATA are edited too."""
    edited = tmp_path / "edited"
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package.dir,
        name="qemu-layout",
        layout={label: f"{size >> 20}MiB" for label, size in LAYOUT_GROW.items()},
    )
    edits = {k: v for k, v in edits_with_snapshots(edited).items() if k in ("ROOTFS", "DATA")}
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache", edits=edits)

    new_layout = tuple(
        replace(p, size_kb=LAYOUT_GROW[p.label] // 1024) if p.label in LAYOUT_GROW else p
        for p in vendor_package.options.layout
    )
    starts = vf.partition_offsets(new_layout)
    table = parse_partition_xml((res.card / "partition32G.xml").read_text(), "partition32G.xml")
    assert [(p.label, p.size_kb) for p in table.partitions] == [(p.label, p.size_kb) for p in new_layout]

    work = tmp_path / "qemu"
    work.mkdir()
    flashed = flash_with_uboot(uboot_bin, res.card, work)
    assert_u_boot_finished(flashed.run, work / "qemu.log")
    assert logged_writes(flashed.run.log) == scripted_writes(res.card)

    layout = [(p.label, s, p.size_sectors, p.fmt) for p, s in zip(new_layout, starts, strict=True)]
    expected = expected_images(vendor_package, edited)
    parts = check_partitions(flashed.emmc, layout, expected, {}, work / "parts")
    check_gpt(flashed.emmc, work, [p.label for p in new_layout], starts)
    for label, _off, _size, fmt in layout:
        if fmt == vf.FMT_EXT4:
            check_ext4(parts[label])
    assert file_of(parts["ROOTFS"], "/etc/airbox/blob.bin", work) == ROOTFS_BLOB
    assert file_of(parts["DATA"], "/ota/version.txt", work) == DATA_VERSION

    sim = tmp_path / "sim.img"
    out = cli("verify", res.out_dir, "--simulate", sim)
    assert out.returncode == 0, out.stdout + out.stderr
    diff = differing_ranges(sim, flashed.emmc, flashed.disk_bytes)
    assert diff == [], f"verify --simulate and U-Boot disagree at byte ranges {diff}"


def test_deb_src_entry_is_found_or_written_for_bookworm(tmp_path: Path) -> None:
    """The helper that lets `apt-get source u-boot` work reads both apt formats."""
    (tmp_path / "sources.list.d").mkdir()
    lst, d = tmp_path / "sources.list", tmp_path / "sources.list.d"
    lst.write_text("deb [arch=amd64] http://deb.debian.org/debian bookworm main\n# deb-src x bookworm main\n")
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.test/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /k.gpg\n\n"
        "Types: deb deb-src\nURIs: http://mirror.test/debian\nSuites: trixie\nComponents: main\n"
    )
    found = uboot.read_apt_sources(lst, d)
    assert not uboot.has_deb_src(found, "bookworm") and uboot.has_deb_src(found, "trixie")
    stanza = uboot.deb_src_stanza(found, "bookworm")
    # the first binary entry for bookworm gives the mirror; it names no key, so Debian's keyring
    keyring = f"Signed-By: {uboot.DEBIAN_KEYRING}\n" if Path(uboot.DEBIAN_KEYRING).exists() else ""
    head = "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n"
    assert stanza == head + keyring
    (d / "ours.sources").write_text(stanza)
    assert uboot.has_deb_src(uboot.read_apt_sources(lst, d), "bookworm")
    (d / "ours.sources").write_text("Enabled: no\n" + stanza)
    assert not uboot.has_deb_src(uboot.read_apt_sources(lst, d), "bookworm")


# ----------------------------------------------------------------------------- update in the field

OTA_DIR = "/ota/airbox"  # where push puts a bundle on DATA (/data/ota/airbox on the box)


def update_folder(card: Path, number: int, dest: Path) -> Path:
    """The bundle as push sends it for an update from partition `number` (builder.ota)."""
    with open_package(card, dest.parent / "src") as files:
        plan = read_flash_plan(files)
        changed = update_files(files, plan, ota_plan(plan, number))
    shutil.copytree(card, dest)
    for name, data in changed.items():
        (dest / name).write_bytes(data)
    return dest


def place_bundle(emmc: Path, part: vf.BuiltPartition, card: Path, work: Path) -> None:
    """What push leaves on the box: the partition's filesystem grown to the whole partition (the
    box's first boot does that), the bundle's files in OTA_DIR. Written with debugfs, rootless."""
    image = cut(emmc, part.offset_sectors, part.size_sectors, work / "holding.img")
    _sh("e2fsck", "-fy", image)
    _sh("resize2fs", image, f"{part.size_sectors // 2}K")
    cmds = (
        ["mkdir /ota", f"mkdir {OTA_DIR}"]
        if "/ota" not in _sh("debugfs", "-R", "ls -p /", image)
        else [f"mkdir {OTA_DIR}"]
    )
    cmds += [f"write {p} {OTA_DIR}/{p.name}" for p in sorted(card.iterdir())]
    _debugfs_write(image, cmds)
    check_ext4(image)
    with open(emmc, "r+b") as f:
        f.seek(part.offset_sectors * SECTOR)
        f.write(image.read_bytes())


def test_real_uboot_updates_from_the_emmc_itself_exactly_as_verify_simulates(
    uboot_bin: Path, vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    """The update `push` arms: the bundle on the box's DATA (p7), `load_partition=7`; U-Boot reads
    every chunk from the eMMC it writes. DATA and the GPT stay; the rest is the new bundle."""
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package.dir,
        name="ota",
        hostname="airbox-ota",
        files=[{"path": "/etc/airbox/ota-note.txt", "content": "updated in the field\n"}],
    )
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    bundle_id = res.report["bundle_id"]["bundle"]
    holding = next(p for p in vendor_package.partitions if p.label == "DATA")
    number = vendor_package.partitions.index(holding) + 1

    # the box as the vendor package installed it, then the bundle placed where push puts it
    start = tmp_path / "start.img"
    out = cli("verify", vendor_package.dir, "--simulate", start)
    assert out.returncode == 0, out.stderr
    size = start.stat().st_size
    with open(start, "r+b") as f:
        f.truncate(uboot.power_of_two_at_least(size))
    work = tmp_path / "qemu"
    work.mkdir()
    pushed = update_folder(res.card, number, work / "pushed")
    assert (pushed / "gpt.gz").read_bytes() == (res.card / "gpt.gz").read_bytes()
    assert (pushed / "boot_emmc-data.scr").read_bytes() != (res.card / "boot_emmc-data.scr").read_bytes()
    assert subprocess.run(["md5sum", "-c", "--quiet", "md5.txt"], cwd=pushed).returncode == 0
    place_bundle(start, holding, pushed, work)
    holding_before = read_at(start, holding.offset_sectors * SECTOR, holding.size_sectors * SECTOR)

    emmc = work / "emmc.img"
    shutil.copyfile(start, emmc)
    card = uboot.make_sparse(work / "no-card.img", 1 << 20)  # nothing in the card slot
    env = uboot.flash_env("boot_emmc.scr", devnum="0", distro_bootpart=str(number), ota_path=OTA_DIR[1:])
    env["load_partition"] = str(number)
    env["bootcmd"] = env["bootcmd"].replace(
        "mmc 1:1 ${scriptaddr} /", f"mmc 0:{number} ${{scriptaddr}} {OTA_DIR}/"
    )
    env = uboot.make_env_image(work / "env.bin", env)
    run = uboot.run_qemu(uboot_bin, env, emmc, card, timeout=QEMU_TIMEOUT, log=work / "qemu.log")
    print(f"\nQEMU: {run.seconds:.1f} s for an update from p{number}")
    assert_u_boot_finished(run, work / "qemu.log")
    assert "skip empty part_num partition" in run.log  # the GPT script saw load_partition
    assert f"skip partition {number}" in run.log
    written = logged_writes(run.log)
    assert written and all(block >= 8192 for block, _ in written)  # never the GPT
    inside = holding.offset_sectors, holding.offset_sectors + holding.size_sectors
    assert not [w for w in written if inside[0] <= w[0] < inside[1]]  # never the bundle's partition

    # the partition that holds the bundle and the GPT are as they were; the bundle is still there
    assert read_at(emmc, holding.offset_sectors * SECTOR, holding.size_sectors * SECTOR) == holding_before
    assert read_at(emmc, 0, 34 * SECTOR) == read_at(start, 0, 34 * SECTOR)
    rootfs = next(p for p in vendor_package.partitions if p.label == "ROOTFS")
    image = cut(emmc, rootfs.offset_sectors, rootfs.size_sectors, work / "rootfs.img")
    check_ext4(image)
    assert file_of(image, "/etc/hostname", work) == b"airbox-ota\n"
    assert file_of(image, "/etc/airbox/ota-note.txt", work) == b"updated in the field\n"
    assert f'"bundle": "{bundle_id}"' in file_of(image, "/etc/airbox-build.json", work).decode()

    # the simulator's update of the same start image writes the very same disk
    sim = tmp_path / "sim.img"
    shutil.copyfile(start, sim)
    out = cli("verify", res.out_dir, "--simulate", sim, "--ota-from", str(number))
    assert out.returncode == 0, out.stdout + out.stderr
    diff = differing_ranges(sim, emmc, emmc.stat().st_size)
    assert diff == [], f"verify --simulate --ota-from and U-Boot disagree at byte ranges {diff}"
