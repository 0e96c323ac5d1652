"""`airbox-build write` and `verify --against`: a real FAT32 volume mounted with FUSE (fusefat),
a plain folder on the build machine's disk, and the pure parts of the per-OS probing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import run_build, same_tree, write_recipe

from builder.card import (
    CardError,
    Volume,
    WriteOptions,
    check_space,
    compare_card,
    format_hint,
    is_bundle_file,
    normalize_target,
    open_bundle,
    parse_macos_statfs,
    probe_volume,
    read_mountinfo,
    write_card,
)
from builder.card.volume import _mount_of as mount_of
from builder.card.write import _refuse_no_room as refuse_no_room
from builder.events import Reporter

MIB = 1 << 20


# --------------------------------------------------------------------------------------------
# Fixtures: a built bundle, a FUSE-mounted FAT32 card


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    import card_bundle

    missing = card_bundle.missing_tools()
    if missing:  # Windows and macOS runners: tests/test_card_os.py covers them with a carried bundle
        pytest.skip(f"building a bundle needs {', '.join(missing)}")
    vendor_package_session: vf.MiniPackage = request.getfixturevalue("vendor_package_session")
    tmp = tmp_path_factory.mktemp("card-bundle")
    recipe = write_recipe(tmp, vendor_package_session.dir, name="cb")
    return run_build(recipe, tmp / "out", tmp / "cache").out_dir


def fuse_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "fusefat is Linux only"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse in this sandbox: cannot mount a FAT32 volume with fusefat"
    missing = [t for t in ("fusefat", "fusermount", "mkfs.fat", "mcopy") if shutil.which(t) is None]
    return f"missing {', '.join(missing)} (apt-get install fusefat mtools dosfstools)" if missing else None


@dataclass
class FatCard:
    image: Path
    mount: Path
    proc: subprocess.Popen[bytes]

    def unmount(self) -> None:
        if os.path.ismount(self.mount):
            subprocess.run(["fusermount", "-u", str(self.mount)], check=True)
        self.proc.wait(timeout=30)  # fusefat has written everything back when it exits


def mount_fat(image: Path, mount: Path, log: Path, *, kernel_cache: bool = False) -> FatCard:
    """`kernel_cache`: the kernel keeps file pages across opens, as for a card in a reader, so a
    plain buffered read returns what was written even when the medium now holds other bytes."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    mount.mkdir()
    options = "rw+,kernel_cache" if kernel_cache else "rw+"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ["fusefat", "-f", "-o", options, str(image), str(mount)], stdout=subprocess.DEVNULL, stderr=err
        )
    for _ in range(200):
        if os.path.ismount(mount) or proc.poll() is not None:
            break
        time.sleep(0.05)
    if not os.path.ismount(mount):
        proc.kill()
        proc.wait()
        pytest.skip(f"fusefat cannot mount here: {log.read_text(errors='replace')[-300:]}")
    return FatCard(image, mount, proc)


def make_fat32(image: Path, mib: int) -> Path:
    with open(image, "wb") as f:
        f.truncate(mib * MIB)
    # no -n: fusefat would show the volume label entry as a file
    subprocess.run(["mkfs.fat", "-F", "32", str(image)], check=True, capture_output=True)
    return image


@pytest.fixture
def fat_card(tmp_path: Path) -> Iterator[FatCard]:
    card = mount_fat(make_fat32(tmp_path / "card.img", 64), tmp_path / "mnt", tmp_path / "fusefat.log")
    try:
        yield card
    finally:
        card.unmount()


def airbox(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with no terminal on stdin (so it cannot ask)."""
    return subprocess.run(
        [sys.executable, "-m", "builder.cli", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        check=False,
    )


def mcopy_out(image: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run(
        ["mcopy", "-s", "-n", "-i", str(image), "::/*", str(dest)], check=True, capture_output=True
    )
    return dest


def fsck(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fsck.fat", "-n", str(image)], capture_output=True, text=True, check=False)


def card_names(bundle: Path) -> list[str]:
    return sorted(p.name for p in (bundle / "card").iterdir())


# --------------------------------------------------------------------------------------------
# Writing to a real FAT32 volume


def test_write_to_fat32_then_read_with_mtools(bundle: Path, fat_card: FatCard, tmp_path: Path) -> None:
    res = airbox("write", bundle, fat_card.mount)
    assert res.returncode == 0, res.stderr
    assert "all match the bundle" in res.stdout
    assert "all done" in res.stdout and "hold the power button" in res.stdout
    assert probe_volume(fat_card.mount).is_fat
    ok = airbox("verify", fat_card.mount, "--against", bundle)
    assert ok.returncode == 0, ok.stderr
    assert "every file matches" in ok.stdout
    fat_card.unmount()
    assert fsck(fat_card.image).returncode == 0
    assert same_tree(mcopy_out(fat_card.image, tmp_path / "back"), bundle / "card") == []
    # the card image (a bare FAT volume) opens as a package and matches the bundle
    res = airbox("verify", fat_card.image, "--against", bundle)
    assert res.returncode == 0, res.stderr


def test_second_write_only_rewrites_boot_scr(bundle: Path, fat_card: FatCard) -> None:
    assert airbox("write", bundle, fat_card.mount).returncode == 0
    res = airbox("--json", "write", bundle, fat_card.mount)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.splitlines()[-1])
    assert result["event"] == "result" and result["ok"] is True
    assert result["written"] == 1  # boot.scr: removed first and written last, always
    assert result["unchanged"] == len(card_names(bundle)) - 1
    assert result["bytes_verified"] == sum(p.stat().st_size for p in (bundle / "card").iterdir())


def test_stale_files_need_yes_without_a_terminal(bundle: Path, fat_card: FatCard, tmp_path: Path) -> None:
    for f in (bundle / "card").iterdir():
        shutil.copyfile(f, fat_card.mount / f.name)  # copyfile: fusefat has no chmod/utime
    (fat_card.mount / "boot.scr.emmc").write_bytes(b"old eMMC script")
    (fat_card.mount / "rootfs.9-of-9.gz").write_bytes(b"stale chunk")
    (fat_card.mount / "boot.scr").unlink()  # fusefat does not shrink a file on O_TRUNC
    (fat_card.mount / "boot.scr").write_bytes(b"an older boot.scr")
    refused = airbox("write", bundle, fat_card.mount)
    assert refused.returncode == 1
    assert "boot.scr.emmc" in refused.stderr and "rootfs.9-of-9.gz" in refused.stderr
    assert "--yes" in refused.stderr and "nothing was changed" in refused.stderr
    assert (fat_card.mount / "boot.scr").read_bytes() == b"an older boot.scr"
    assert (fat_card.mount / "boot.scr.emmc").exists()

    res = airbox("--json", "write", "--yes", bundle, fat_card.mount)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.splitlines()[-1])
    assert sorted(result["removed"]) == ["boot.scr.emmc", "rootfs.9-of-9.gz"]
    fat_card.unmount()
    assert same_tree(mcopy_out(fat_card.image, tmp_path / "back"), bundle / "card") == []


def test_confirmation_is_asked_and_honoured(bundle: Path, fat_card: FatCard) -> None:
    (fat_card.mount / "boot.scr.sd").write_bytes(b"sd script")
    asked: list[list[str]] = []

    def no(names: object) -> bool:
        asked.append(list(names))  # type: ignore[call-overload]
        return False

    with pytest.raises(CardError, match="nothing was changed"):
        write_card(bundle, fat_card.mount, WriteOptions(), Reporter(quiet=True), confirm=no)
    assert asked == [["boot.scr.sd"]]
    assert sorted(os.listdir(fat_card.mount)) == ["boot.scr.sd"]
    result = write_card(bundle, fat_card.mount, WriteOptions(), Reporter(quiet=True), confirm=lambda _: True)
    assert result.removed == ["boot.scr.sd"]
    assert sorted(os.listdir(fat_card.mount)) == card_names(bundle)


def damage_under_the_mount(image: Path, original: bytes) -> None:
    """Flip a byte of a file's data in the card's backing image, not through the mount: the
    kernel's cached copy of the file still holds the good bytes."""
    probe = original[len(original) // 2 : len(original) // 2 + 4096]
    with open(image, "r+b") as f:
        data = f.read()
        at = data.find(probe)
        assert at > 0 and data.find(probe, at + 1) < 0, "the probe must be found once in the image"
        f.seek(at + 100)
        f.write(bytes([data[at + 100] ^ 0xFF]))


CORRUPTING_WRITE = """
import sys
from pathlib import Path

import builder.card.write as card
from builder.cli import run

image, victim, original = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]).read_bytes()
tests_dir = sys.argv[4]
sync_dir = card._sync_dir


done = []


def sync_then_damage(target):
    sync_dir(target)
    if done or not (target / victim).exists() or (target / victim).stat().st_size != len(original):
        return
    assert (target / victim).read_bytes() == original  # the kernel now caches the good bytes
    sys.path.insert(0, tests_dir)
    from test_card import damage_under_the_mount

    damage_under_the_mount(image, original)
    done.append(victim)


card._sync_dir = sync_then_damage
sys.argv = ["airbox-build", "write", *sys.argv[5:]]
run()
"""


def test_forced_mismatch_after_copy_names_the_file(bundle: Path, tmp_path: Path) -> None:
    """The card loses a byte of a chunk after the copy (below the filesystem, where a bad card
    or reader loses it): the read-back must bypass the cache to see it, name the file, and make
    the card inert. The damage is done by a wrapper around the CLI, not by the product."""
    victim = next(n for n in card_names(bundle) if n.startswith("rootfs.") and n.endswith(".gz"))
    card = mount_fat(
        make_fat32(tmp_path / "card.img", 64), tmp_path / "mnt", tmp_path / "log", kernel_cache=True
    )
    try:
        script = tmp_path / "corrupting_write.py"
        script.write_text(CORRUPTING_WRITE)
        cmd = [sys.executable, script, card.image, victim, bundle / "card" / victim, Path(__file__).parent]
        cmd += [bundle, card.mount]  # the write's own arguments
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert res.returncode == 1
        assert victim in res.stderr
        assert "counterfeit" in res.stderr and "reader" in res.stderr
        # the damaged card is made inert: U-Boot finds no boot.scr
        assert not (card.mount / "boot.scr").exists()
    finally:
        card.unmount()


def test_verify_reads_the_card_not_the_cache(bundle: Path, tmp_path: Path) -> None:
    """A card written, then damaged below the filesystem while the kernel still caches the good
    bytes: a buffered read would call it good; `verify --against` must not."""
    card = mount_fat(
        make_fat32(tmp_path / "card.img", 64), tmp_path / "mnt", tmp_path / "log", kernel_cache=True
    )
    try:
        assert airbox("write", bundle, card.mount).returncode == 0
        victim = next(n for n in card_names(bundle) if n.startswith("data.") and n.endswith(".gz"))
        original = (bundle / "card" / victim).read_bytes()
        assert (card.mount / victim).read_bytes() == original  # cached now
        damage_under_the_mount(card.image, original)
        assert (card.mount / victim).read_bytes() == original, "the kernel cache must still hold it"
        res = airbox("verify", card.mount, "--against", bundle)
        assert res.returncode == 1, res.stdout + res.stderr
        assert victim in res.stdout + res.stderr
    finally:
        card.unmount()


def test_card_full_fails_naming_the_file_and_leaves_no_boot_scr(bundle: Path, tmp_path: Path) -> None:
    big_bundle = tmp_path / "big"
    shutil.copytree(bundle / "card", big_bundle)
    (big_bundle / "data.9-of-9.gz").write_bytes(os.urandom(40 * MIB))
    card = mount_fat(make_fat32(tmp_path / "small.img", 34), tmp_path / "mnt", tmp_path / "fusefat.log")
    try:
        res = airbox("write", big_bundle, card.mount)
        assert res.returncode == 1
        assert "data.9-of-9.gz" in res.stderr and "full" in res.stderr
        assert not (card.mount / "boot.scr").exists()
    finally:
        card.unmount()
    assert fsck(card.image).returncode == 0


def test_desktop_junk_is_ignored(bundle: Path, fat_card: FatCard) -> None:
    junk = [
        "._boot.scr",
        ".Spotlight-V100/Store-V2/x",
        ".fseventsd/0000001",
        ".Trashes/501/old",
        "System Volume Information/IndexerVolumeGuid",
        ".DS_Store",
    ]
    for rel in junk:
        (fat_card.mount / rel).parent.mkdir(parents=True, exist_ok=True)
        (fat_card.mount / rel).write_bytes(b"desktop metadata")
    res = airbox("write", bundle, fat_card.mount)
    assert res.returncode == 0, res.stderr
    for rel in junk:
        assert (fat_card.mount / rel).read_bytes() == b"desktop metadata"
    res = airbox("verify", fat_card.mount, "--against", bundle)
    assert res.returncode == 0, res.stderr


def test_foreign_files_mean_the_wrong_disk(bundle: Path, fat_card: FatCard) -> None:
    (fat_card.mount / "holiday.jpg").write_bytes(b"photo")
    res = airbox("write", "--yes", bundle, fat_card.mount)
    assert res.returncode == 1
    assert "holiday.jpg" in res.stderr and "nothing was changed" in res.stderr
    assert os.listdir(fat_card.mount) == ["holiday.jpg"]


def test_a_folder_inside_the_card_is_refused(bundle: Path, fat_card: FatCard) -> None:
    (fat_card.mount / "sub").mkdir()
    res = airbox("write", bundle, fat_card.mount / "sub")
    assert res.returncode == 1
    assert "top" in res.stderr and str(fat_card.mount) in res.stderr
    assert os.listdir(fat_card.mount / "sub") == []


def test_fusefat_volume_is_detected_as_fat(fat_card: FatCard) -> None:
    vol = probe_volume(fat_card.mount)
    assert vol.kind == "FAT" and vol.fstype == "fuse.fusefat"
    assert vol.is_root and vol.mount_point == fat_card.mount
    assert probe_volume(fat_card.mount / ".").is_root


# --------------------------------------------------------------------------------------------
# A plain folder on the build machine's own disk


def findmnt_fstype(path: Path) -> str:
    return subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/mountinfo")
def test_the_build_machines_disk_is_detected_and_refused(bundle: Path, tmp_path: Path) -> None:
    target = tmp_path / "not-a-card"
    target.mkdir()
    vol = probe_volume(target)
    fstype = findmnt_fstype(target)
    assert vol.fstype == fstype and not vol.is_root and not vol.is_fat
    res = airbox("write", bundle, target)
    assert res.returncode == 1
    assert fstype in res.stderr and "FAT32" in res.stderr
    assert "mkfs.vfat -F 32" in res.stderr  # the fix, for this OS
    assert "/dev/sdX1" in res.stderr  # a placeholder, never the system's own disk
    assert "--allow-non-fat" in res.stderr
    assert os.listdir(target) == []


def test_plain_folder_with_allow_non_fat(bundle: Path, tmp_path: Path) -> None:
    target = tmp_path / "staging"
    target.mkdir()
    res = airbox("write", "--allow-non-fat", bundle / "card", target)  # a card folder works as well
    assert res.returncode == 0, res.stderr
    assert "staging folder" in res.stderr
    assert same_tree(target, bundle / "card") == []
    # verify --against: a changed file and a stale one are named
    victim = target / "boot_emmc.scr"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    (target / "rootfs.9-of-9.gz").write_bytes(b"stale")
    res = airbox("verify", target, "--against", bundle)
    assert res.returncode == 1
    assert "boot_emmc.scr" in res.stderr and "rootfs.9-of-9.gz" in res.stderr


def test_target_overlapping_the_bundle_is_refused(bundle: Path) -> None:
    res = airbox("write", "--allow-non-fat", bundle, bundle)
    assert res.returncode == 1 and "overlap" in res.stderr


def test_bundle_problems_are_found_before_the_card_is_touched(bundle: Path, tmp_path: Path) -> None:
    card = tmp_path / "bad"
    shutil.copytree(bundle / "card", card)
    with open(card / "rootfs.1-of-1.gz", "wb") as f:
        f.truncate(4 << 30)  # sparse: costs nothing
    with pytest.raises(CardError, match="4 GiB") as exc:
        open_bundle(card)
    assert "rootfs.1-of-1.gz" in exc.value.message
    (card / "rootfs.1-of-1.gz").unlink()
    (card / "boot.scr.sd").write_bytes(b"x")
    with pytest.raises(CardError, match=r"instead of boot\.scr"):
        open_bundle(card)
    # an output folder whose card/ no longer matches SHA256SUMS
    out = tmp_path / "out"
    shutil.copytree(bundle, out)
    (out / "card" / "extra.txt").write_bytes(b"x")
    with pytest.raises(CardError, match="SHA256SUMS"):
        open_bundle(out)


def test_damaged_bundle_file_stops_the_write(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(bundle, out)
    chunk = next(p for p in sorted((out / "card").glob("*.gz")))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    target = tmp_path / "t"
    target.mkdir()
    res = airbox("write", "--allow-non-fat", out, target)
    assert res.returncode == 1
    assert chunk.name in res.stderr and "SHA256SUMS" in res.stderr
    assert not (target / "boot.scr").exists()


def test_json_events_for_ci(bundle: Path, tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    res = airbox("--json", "write", "--allow-non-fat", bundle, target)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    kinds = {e["event"] for e in events}
    assert {"step-start", "step-end", "progress", "volume", "warning", "result"} <= kinds
    steps = [e["step"] for e in events if e["event"] == "step-end"]
    assert steps == ["check", "remove", "compare", "write", "read back"]
    done = [e for e in events if e["event"] == "progress" and e["label"] == "read back"][-1]
    assert done["done"] == done["total"] == sum(p.stat().st_size for p in (bundle / "card").iterdir())
    bad = airbox("--json", "write", bundle, tmp_path / "missing")
    assert bad.returncode == 1
    last = json.loads(bad.stdout.splitlines()[-1])
    assert last["event"] == "error" and last["hint"]


# --------------------------------------------------------------------------------------------
# Pure parts: mount table, macOS statfs, hints, space, names


def test_mountinfo_parsing_and_lookup() -> None:
    text = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 8:17 / /media/me/NO\\040NAME rw,nosuid shared:9 - vfat /dev/sdb1 rw,fmask=0022\n"
        "41 40 0:50 / /media/me/NO\\040NAME rw - fuse.fusefat fusefat rw\n"
    )
    mounts = read_mountinfo(text)
    assert mounts[1].point == "/media/me/NO NAME" and mounts[1].source == "/dev/sdb1"
    assert mount_of(Path("/media/me/NO NAME/x"), mounts) == mounts[2]  # the last of stacked mounts
    assert mount_of(Path("/media/me/NO NAMEX"), mounts) == mounts[0]
    assert mount_of(Path("/"), mounts) == mounts[0]


def test_macos_statfs_layout() -> None:
    raw = bytearray(2168)
    struct.pack_into("<IiQQQ", raw, 0, 32768, 0, 1000, 600, 500)
    raw[72:77] = b"msdos"
    name = b"/Volumes/NO NAME"
    raw[88 : 88 + len(name)] = name
    raw[1112 : 1112 + 12] = b"/dev/disk4s1"
    info = parse_macos_statfs(bytes(raw))
    assert info == {
        "bsize": 32768,
        "blocks": 1000,
        "bavail": 500,
        "fstypename": "msdos",
        "mntonname": "/Volumes/NO NAME",
        "mntfromname": "/dev/disk4s1",
    }


def test_format_hints_per_os() -> None:
    mac = Volume(Path("/Volumes/CARD"), "exFAT", "exfat", Path("/Volumes/CARD"), "/dev/disk4s1")
    assert "diskutil eraseDisk FAT32 AIRBOX MBRFormat /dev/disk4" in format_hint(mac, "darwin")
    win = Volume(Path("E:\\"), "exFAT", "exFAT", Path("E:\\"), "E:")
    assert "File Explorer right-click E:" in format_hint(win, "win32")
    assert "Raspberry Pi" in format_hint(win, "win32")
    lin = Volume(Path("/media/me/C"), "NTFS", "ntfs3", Path("/media/me/C"), "/dev/mmcblk0p1")
    hint = format_hint(lin, "linux")
    assert "mkfs.vfat -F 32 -n AIRBOX /dev/mmcblk0p1" in hint and "parted /dev/mmcblk0 " in hint
    # a folder somewhere on the system disk never gets its device in a mkfs line
    sysdisk = Volume(Path("/home/me/x"), "ext4", "ext4", Path("/"), "/dev/nvme0n1p2")
    assert "nvme0n1" not in format_hint(sysdisk, "linux")


def test_windows_drive_letter_means_its_top_folder() -> None:
    assert str(normalize_target("E:")).endswith("\\")
    assert normalize_target("/media/x") == Path("/media/x")


def test_space_check_counts_clusters_and_what_removal_frees(bundle: Path) -> None:
    b = open_bundle(bundle)
    need_clusters = sum(-(-s // 32768) for s in b.sizes.values())
    tight = Volume(bundle, "FAT32", "vfat", bundle, None, 10 * MIB, need_clusters * 32768 - 1, 32768)
    state = compare_card(b, {})
    space = check_space(b, state, tight)
    assert not space.fits
    with pytest.raises(CardError, match="needs") as exc:
        refuse_no_room(space, tight)
    assert "free space" in (exc.value.hint or "")
    # an old bundle on the card: what it occupies will be free
    old = {"rootfs.1-of-40.gz": 5 * MIB, "boot.scr": 900}
    assert check_space(b, compare_card(b, old), tight).fits
    tiny = Volume(bundle, "FAT32", "vfat", bundle, None, 100_000, 100_000, 32768)
    with pytest.raises(CardError) as exc:
        refuse_no_room(check_space(b, state, tiny), tiny)
    assert exc.value.hint == "use a bigger card"


def test_what_counts_as_a_bundle_file() -> None:
    for name in (
        "rootfs.9-of-9.gz",
        "BOOT.SCR",
        "boot.scr.emmc",
        "boot_emmc-data.cmd",
        "md5.txt",
        "partition32G.xml",
        "spi_flash_bm1684x.bin",
        "BOOT",
        "gpt.gz",
        "fip.bin",
    ):
        assert is_bundle_file(name), name
    for name in ("holiday.jpg", "notes.txt", "sub/boot.scr", "rootfs.img"):
        assert not is_bundle_file(name), name


def _mtools_volume(image: Path) -> Volume:
    """What a real FAT volume says of itself, read with mtools (fusefat's statvfs says nothing)."""
    info = subprocess.run(["minfo", "-i", image, "::"], capture_output=True, text=True, check=True).stdout
    sector = int(re.search(r"sector size: (\d+) bytes", info)[1])  # type: ignore[index]
    cluster = int(re.search(r"cluster size: (\d+) sectors", info)[1]) * sector  # type: ignore[index]
    total = int(re.search(r"big size: (\d+) sectors", info)[1]) * sector  # type: ignore[index]
    return Volume(image, "FAT32", "vfat", image, None, total, _mtools_free(image), cluster)


def _mtools_free(image: Path) -> int:
    listing = subprocess.run(["mdir", "-i", image, "::"], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"([\d ]+) bytes free", listing)[1].replace(" ", ""))  # type: ignore[index]


def test_space_check_against_a_real_small_fat_volume(bundle: Path, tmp_path: Path) -> None:
    """The check's cluster arithmetic against what a real FAT32 volume (mkfs.fat, mtools) uses
    and has free: a bundle that fits is accounted at least at its real cost and at most a few
    clusters more; one 2 MiB larger than the free space is refused before anything changes."""
    image = make_fat32(tmp_path / "small.img", 34)
    b = open_bundle(bundle)
    vol = _mtools_volume(image)
    space = check_space(b, compare_card(b, {}), vol)
    assert space.fits
    before = _mtools_free(image)
    subprocess.run(
        ["mcopy", "-i", image, *[bundle / "card" / n for n in b.sizes], "::/"],
        check=True,
        capture_output=True,
    )
    used = before - _mtools_free(image)
    assert used <= space.needed <= used + 4 * vol.cluster_bytes  # type: ignore[operator]
    assert fsck(image).returncode == 0

    big = tmp_path / "big"
    shutil.copytree(bundle / "card", big)
    filler = (vol.free_bytes or 0) - space.needed + (2 << 20)
    (big / "data.9-of-9.gz").write_bytes(os.urandom(filler))
    empty = make_fat32(tmp_path / "empty.img", 34)
    vol = _mtools_volume(empty)
    over = check_space(open_bundle(big), compare_card(open_bundle(big), {}), vol)
    assert not over.fits
    with pytest.raises(CardError, match="nothing was changed"):
        refuse_no_room(over, vol)


# --------------------------------------------------------------------------------------------
# Found by mutation testing (scripts/mutants.py): each test fails on a mutant that survived.


def test_the_plain_read_back_hashes_every_byte(tmp_path: Path) -> None:
    """The read-back macOS and Windows (and Linux without O_DIRECT) take."""
    from builder.card.fileio import _hash_plain

    data = os.urandom(9 << 20)
    (tmp_path / "f").write_bytes(data)
    seen: list[int] = []
    assert _hash_plain(tmp_path / "f", seen.append) == hashlib.sha256(data).hexdigest()
    assert sum(seen) == len(data)


def test_a_file_that_cannot_be_removed_is_named_with_the_systems_reason(tmp_path: Path) -> None:
    from builder.card.fileio import _remove

    (tmp_path / "boot.scr").mkdir()  # not a file: unlink fails
    with pytest.raises(CardError) as e:
        _remove(tmp_path / "boot.scr")
    assert str(e.value.args[0]) == "cannot remove boot.scr: Is a directory"


def test_a_card_folder_without_sha256sums_is_checked_by_its_md5_txt(bundle: Path, tmp_path: Path) -> None:
    """The bundle given as its card/ folder (no SHA256SUMS beside it): digests are computed and
    checked against md5.txt, and an intact card passes."""
    card = tmp_path / "card"
    shutil.copytree(bundle / "card", card)
    target = tmp_path / "target"
    shutil.copytree(bundle / "card", target)
    res = airbox("verify", target, "--against", card)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_file_missing_from_the_card_is_named(bundle: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    shutil.copytree(bundle / "card", target)
    victim = next(n for n in card_names(bundle) if n.startswith("rootfs."))
    (target / victim).unlink()
    res = airbox("verify", target, "--against", bundle)
    assert res.returncode == 1
    assert f"{victim}: missing on the card" in res.stdout + res.stderr


def test_sizes_are_shown_for_humans() -> None:
    from builder.card.bundle import _size

    assert _size(None) == "?" and _size(512) == "512 bytes"
