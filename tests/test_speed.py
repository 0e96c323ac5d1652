"""What keeps builds fast (see bench/): no debugfs per path, sparse joins, no shrink past the vendor's
size, and a second build that links what the first one wrote instead of redoing it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import cli, run_build, write_recipe

from builder.fs.ext4 import Ext4Image
from builder.fs.ext4 import debugfs as ext4_debugfs
from builder.fs.ext4 import image as ext4_image
from builder.package.chunks import join_partition
from builder.package.flashplan import read_flash_plan
from builder.package.source import open_package

EPOCH = 1_700_000_000


def make_image(tmp: Path, size_mb: int = 32) -> Path:
    tree = tmp / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("airbox\n")
    (tree / "data").mkdir()
    (tree / "data" / "blob").write_bytes(os.urandom(2 << 20))
    image = tmp / "fs.img"
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH))
    subprocess.run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-O",
            "^orphan_file,^metadata_csum_seed",
            "-d",
            str(tree),
            str(image),
        ],
        check=True,
        env=env,
    )
    return image


def count_debugfs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record every debugfs command line the ext4 module runs (the real tool still runs)."""
    calls: list[list[str]] = []
    real = ext4_debugfs.run

    def spy(cmd, *a, **kw):  # type: ignore[no-untyped-def]
        if str(cmd[0]) == "debugfs":
            calls.append([str(c) for c in cmd])
        return real(cmd, *a, **kw)

    for module in (ext4_debugfs, ext4_image):  # the modules that run debugfs
        monkeypatch.setattr(module, "run", spy)
    return calls


def test_stat_below_a_missing_folder_costs_no_debugfs_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = Ext4Image(make_image(tmp_path), epoch=EPOCH)
    calls = count_debugfs(monkeypatch)
    assert img.stat("/app") is None
    assert img.stat("/etc/hostname") is not None
    runs = len(calls)
    assert runs > 0, "the spy saw no debugfs run: it patches the wrong module"
    deep = [f"/app/{'/'.join(['d'] * k)}" for k in range(1, 40)]
    assert all(img.stat(p) is None for p in deep)
    assert img.stat("/etc/hostname/x") is None  # below a regular file: "not a directory"
    assert img.stat("/etc/hostname").size == 7  # known
    assert len(calls) == runs


def test_stat_results_follow_edits_and_outside_writes(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    img = Ext4Image(image, epoch=EPOCH)
    assert img.stat("/app/x") is None and img.stat("/app") is None
    with img.edit() as b:
        b.makedirs("/app", 0o755, 1000, 1000)
        b.write_bytes("/app/x", b"hello\n", 0o644, 1000, 1000)
    st = img.stat("/app/x")
    assert st is not None and st.size == 6 and st.uid == 1000
    # a write by another process (here: debugfs itself) is seen too
    subprocess.run(["debugfs", "-w", "-R", "mkdir /outside", str(image)], check=True, capture_output=True)
    assert img.stat("/outside") is not None and img.stat("/outside").is_dir


def test_shrink_never_goes_below_the_floor(tmp_path: Path) -> None:
    image = make_image(tmp_path, 48)
    subprocess.run(["resize2fs", "-M", str(image)], check=True, capture_output=True)
    info = Ext4Image(image).info()
    os.truncate(image, info.size_bytes)
    floor = image.stat().st_size
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    img = Ext4Image(image, epoch=EPOCH)
    assert img.shrink_to_min(floor_bytes=floor).block_count == info.block_count
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before  # at the floor: not touched

    img.grow_to(floor + (24 << 20))
    with img.edit() as b:
        b.write_bytes("/data/more", os.urandom(1 << 20), 0o644, 0, 0)
    shrunk = img.shrink_to_min(floor_bytes=floor)
    assert floor <= shrunk.size_bytes < floor + (24 << 20)
    assert image.stat().st_size == shrunk.size_bytes
    assert shrunk.size_bytes == max(floor, img.min_blocks() * shrunk.block_size)
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_join_leaves_zeros_as_holes(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> None:
    with open_package(vendor_package_session.dir, tmp_path / "src") as files:
        plan = read_flash_plan(files)
        misc = plan.partition("MISC")
        joined = join_partition(files, misc, tmp_path / "misc.img", workers=2)
    assert joined.path.stat().st_size == misc.image_bytes > 0
    assert joined.path.stat().st_blocks == 0  # all zeros: nothing allocated
    assert joined.chunk_digests[0] == hashlib.sha256(bytes(misc.image_bytes)).hexdigest()


def _netplan(address: str) -> dict[str, object]:
    return {"ethernets": {"eth1": {"addresses": [address], "optional": True}}}


def test_second_build_links_what_the_first_wrote(
    vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 << 20))
    files = [{"path": "/data/blob.bin", "source": str(blob)}]
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = write_recipe(
        tmp_path / "a", vendor_package_session.dir, name="t", network=_netplan("10.0.0.1/24"), files=files
    )
    res1 = run_build(first, out, cache)
    report1 = json.loads((res1.out_dir / "build-report.json").read_text())
    data1 = next(p for p in report1["partitions"] if p["label"] == "DATA")
    assert data1["recompressed"] > 0
    saved = {c["file"]: (res1.card / c["file"]).read_bytes() for c in data1["chunks"]}
    inodes1 = {c["file"]: c["out_stat"][2] for p in report1["partitions"] for c in p["chunks"]}

    second = write_recipe(
        tmp_path / "b", vendor_package_session.dir, name="t", network=_netplan("10.0.0.2/24"), files=files
    )
    res2 = run_build(second, out, cache)
    report2 = json.loads((res2.out_dir / "build-report.json").read_text())
    parts2 = {p["label"]: p for p in report2["partitions"]}
    data2, root2 = parts2["DATA"], parts2["ROOTFS"]
    # DATA got the same edit: nothing compressed again, the first build's bytes linked
    assert data2["recompressed"] == 0 and data2["pooled"] == data1["recompressed"]
    assert {c["source"] for c in data2["chunks"]} <= {"vendor", "earlier build"}
    assert {c["file"]: (res2.card / c["file"]).read_bytes() for c in data2["chunks"]} == saved
    # ROOTFS changed (the netplan): at least one chunk compressed afresh
    assert root2["recompressed"] >= 1
    # copies of vendor chunks are links to the first build's copies (the same inodes)
    boot = parts2["BOOT"]["chunks"]
    assert boot and all((res2.card / c["file"]).stat().st_ino == inodes1[c["file"]] for c in boot)
    # md5.txt (digests partly carried over) and the whole bundle still check out
    md5 = subprocess.run(
        ["md5sum", "-c", "--quiet", "md5.txt"], cwd=res2.card, capture_output=True, check=False
    )
    assert md5.returncode == 0, md5.stdout
    assert cli("verify", res2.out_dir).returncode == 0


def test_a_changed_vendor_file_is_copied_again(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    recipe = write_recipe(tmp_path / "a", vendor_package.dir, name="t", network=_netplan("10.0.0.1/24"))
    res1 = run_build(recipe, out, cache)
    boot = sorted(p.name for p in vendor_package.dir.glob("boot.*-of-*.gz"))[0]
    ino1 = (res1.card / boot).stat().st_ino
    os.utime(vendor_package.dir / boot)  # same bytes, but no longer provably the same file
    res2 = run_build(recipe, out, cache)
    assert (res2.card / boot).stat().st_ino != ino1
    assert (res2.card / boot).read_bytes() == (vendor_package.dir / boot).read_bytes()
