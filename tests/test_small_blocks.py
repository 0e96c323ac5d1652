"""Small-block filesystems: the vendor's plain `mkfs.ext4` gives a partition under 512 MiB 1 KiB
blocks and 128-byte inodes (mke2fs' "small" type, e2fsprogs 1.45). Customising such images must
work and stay `e2fsck -fn` clean."""

from __future__ import annotations

import random
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import run_build, write_recipe
from test_customise import cat, simulate, stat

# the miniature layout with an OPT of 256 MiB (and a disk to hold it)
LAYOUT = tuple(replace(p, size_kb=256 * 1024) if p.label == "OPT" else p for p in vf.MINI_LAYOUT)
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB ops@x"
BIG = random.Random("small-blocks").randbytes(3 << 20)  # grows the image: more block groups


@pytest.fixture(scope="module")
def small_package(tmp_path_factory: pytest.TempPathFactory) -> vf.MiniPackage:
    return vf.build_package(
        tmp_path_factory.mktemp("vendor-small"), layout=LAYOUT, disk_kb=512 * 1024, size_types=True
    )


def _fs(image: Path) -> dict[str, str]:
    head = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"^([A-Za-z ]+):\s+(.*)$", head, re.M))


def test_customising_1k_block_images_stays_clean(small_package: vf.MiniPackage, tmp_path: Path) -> None:
    for p in small_package.partitions:
        if p.fmt == vf.FMT_EXT4 and p.image is not None:
            assert _fs(p.image)["Block size"] == "1024", p.label  # what the vendor's mkfs would do
            assert _fs(p.image)["Inode size"] == "128", p.label
    (tmp_path / "big.bin").write_bytes(BIG)
    recipe = write_recipe(
        tmp_path / "r",
        small_package.dir,
        name="small",
        hostname="airbox-small",
        files=[
            {"path": "/opt/airbox/model.bin", "source": str(tmp_path / "big.bin"), "owner": "linaro:linaro"},
            {"path": "/data/airbox/note.txt", "content": "on DATA\n", "mode": "0600"},
            {"path": "/etc/airbox/deep/er/file.txt", "content": "x" * 5000},
        ],
        users={"ops": {"create": True, "ssh_authorized_keys": [KEY]}},
        remove=["/etc/motd"],
    )
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    changed = {p["label"] for p in res.report["partitions"] if p["changed"]}
    assert {"ROOTFS", "OPT", "DATA"} <= changed
    parts = simulate(res.out_dir, tmp_path)
    for label in ("ROOTFS", "OPT", "DATA"):
        image = parts / f"{label}.img"
        fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
        assert fsck.returncode == 0, f"{label}: {fsck.stdout}{fsck.stderr}"
        assert _fs(image)["Block size"] == "1024"
    assert cat(parts / "OPT.img", "/airbox/model.bin") == BIG
    assert stat(parts / "OPT.img", "/airbox/model.bin")["uid"] == vf.LINARO_UID
    assert cat(parts / "DATA.img", "/airbox/note.txt") == b"on DATA\n"
    assert stat(parts / "DATA.img", "/airbox/note.txt")["mode"] & 0o7777 == 0o600
    assert cat(parts / "ROOTFS.img", "/etc/airbox/deep/er/file.txt") == b"x" * 5000
    assert cat(parts / "ROOTFS.img", "/etc/hostname") == b"airbox-small\n"
    assert b"ops:" in cat(parts / "ROOTFS.img", "/etc/passwd")
