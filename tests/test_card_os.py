"""`write` and `verify --against` on the machine's own card path, on any OS, with no e2fsprogs.

These run where the builder's tools do not: on the Windows and macOS runners of
.github/workflows/card.yml, which mount a real FAT32 volume (a VHD made and formatted FAT32 with
diskpart; an hdiutil "MS-DOS FAT32" image) and name it in AIRBOX_TEST_FAT_VOLUME. The bundle is a
real one, built on Linux by tests/card_bundle.py and named in AIRBOX_TEST_BUNDLE; where the tools
are at hand it is built here. Without a FAT volume or a bundle the tests that need them skip,
saying so. On Linux without that variable they mount a FAT32 image of their own with fusefat.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FAT_VOLUME = os.environ.get("AIRBOX_TEST_FAT_VOLUME")


def airbox(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "builder.cli", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def make_bundle(out: Path, seed: int = 1) -> Path:
    """An output folder as a build leaves it: card/ with scripts, chunks and md5.txt, SHA256SUMS."""
    card = out / "card"
    card.mkdir(parents=True)
    rng = __import__("random").Random(seed)
    files = {
        "boot.scr": b"'V" + rng.randbytes(300),
        "boot_emmc.scr": b"'V" + rng.randbytes(500),
        "boot_emmc-rootfs.scr": b"'V" + rng.randbytes(400),
        "rootfs.1-of-2.gz": rng.randbytes(3 << 20),
        "rootfs.2-of-2.gz": rng.randbytes(700_000),
        "partition32G.xml": b'<physical_partition size_in_kb="20971520">\n</physical_partition>\n',
    }
    for name, data in files.items():
        (card / name).write_bytes(data)
    md5 = "".join(f"{hashlib.md5(d).hexdigest()}  {n}\n" for n, d in sorted(files.items()))
    (card / "md5.txt").write_text(md5)
    sums = ""
    for p in sorted(card.iterdir()):
        sums += f"{hashlib.sha256(p.read_bytes()).hexdigest()}  card/{p.name}\n"
    (out / "SHA256SUMS").write_text(sums)
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("AIRBOX_TEST_BUNDLE")
    if given:
        return Path(given)
    import card_bundle

    missing = card_bundle.missing_tools()
    if missing:
        pytest.skip(f"no AIRBOX_TEST_BUNDLE and no tools to build one here (missing {', '.join(missing)})")
    return card_bundle.build_bundle(tmp_path_factory.mktemp("card-os"))


@pytest.fixture(scope="module")
def fat_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The runner's FAT32 volume (AIRBOX_TEST_FAT_VOLUME); on Linux without one, a FAT32 image
    of our own mounted with fusefat (test_card's helpers), so these run in Linux CI too."""
    if FAT_VOLUME:
        yield Path(FAT_VOLUME)
        return
    from test_card import fuse_unavailable, make_fat32, mount_fat

    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"no AIRBOX_TEST_FAT_VOLUME, and {reason}")
    tmp = tmp_path_factory.mktemp("fat-volume")
    card = mount_fat(make_fat32(tmp / "card.img", 64), tmp / "mnt", tmp / "fusefat.log")
    try:
        yield card.mount
    finally:
        card.unmount()


def clear(root: Path) -> None:
    """Empty the volume of what earlier tests wrote (desktop metadata stays)."""
    for p in root.iterdir():
        if p.is_file() and not p.name.startswith((".", "System Volume")):
            p.unlink()


# --------------------------------------------------------------------------------------------
# Everywhere


def test_a_folder_on_the_system_disk_is_refused_as_not_fat(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "out")
    target = tmp_path / "not-a-card"
    target.mkdir()
    res = airbox("write", bundle, target)
    assert res.returncode == 1
    assert "FAT" in res.stderr and not list(target.iterdir())


def test_a_staging_folder_takes_the_bundle_with_allow_non_fat(bundle: Path, tmp_path: Path) -> None:
    target = tmp_path / "staging"
    target.mkdir()
    res = airbox("write", "--allow-non-fat", bundle, target)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in (bundle / "card").iterdir())
    assert airbox("verify", target, "--against", bundle).returncode == 0


# --------------------------------------------------------------------------------------------
# On a real FAT32 volume


def test_write_then_verify_on_a_real_fat32_volume(bundle: Path, fat_volume: Path) -> None:
    root = fat_volume
    clear(root)
    res = airbox("write", bundle, root)
    assert res.returncode == 0, res.stdout + res.stderr
    names = sorted(p.name for p in (bundle / "card").iterdir())
    assert sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")) == names
    for name in names:
        assert (root / name).read_bytes() == (bundle / "card" / name).read_bytes(), name
    res = airbox("verify", root, "--against", bundle)
    assert res.returncode == 0, res.stdout + res.stderr


def test_stale_files_of_an_older_bundle_are_removed(bundle: Path, fat_volume: Path) -> None:
    root = fat_volume
    clear(root)
    assert airbox("write", bundle, root).returncode == 0
    (root / "boot.scr.sd").write_bytes(b"an override an older tool left")
    (root / "data.7-of-99.gz").write_bytes(os.urandom(1000))  # a chunk of an older bundle
    refused = airbox("write", bundle, root)  # no --yes and no terminal: nothing is removed
    assert refused.returncode == 1 and (root / "boot.scr.sd").exists()
    res = airbox("write", "--yes", bundle, root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (root / "boot.scr.sd").exists() and not (root / "data.7-of-99.gz").exists()
    assert airbox("verify", root, "--against", bundle).returncode == 0


def test_a_card_that_does_not_hold_the_bundle_is_reported(bundle: Path, fat_volume: Path) -> None:
    root = fat_volume
    clear(root)
    assert airbox("write", bundle, root).returncode == 0
    victim = next(
        p for p in sorted(root.iterdir()) if p.name.startswith("rootfs.") and p.name.endswith(".gz")
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(victim, "r+b") as f:
        f.seek(len(data) // 2)
        f.write(bytes([data[len(data) // 2]]))
        f.flush()
        os.fsync(f.fileno())
    res = airbox("verify", root, "--against", bundle)
    assert res.returncode == 1
    assert victim.name in res.stdout + res.stderr


def test_the_volume_is_seen_as_fat_with_its_free_space(fat_volume: Path) -> None:
    from builder.card import probe_volume

    vol = probe_volume(fat_volume)
    assert vol.is_fat, vol
    if vol.fstype.startswith("fuse"):
        pytest.skip(f"{vol.fstype} reports no sizes (statvfs says 0 blocks); the runners' volumes do")
    assert vol.free_bytes is not None and vol.free_bytes > 0, vol
