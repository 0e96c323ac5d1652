"""End to end on the miniature package: no-op round trips, repacking, inspect, verify --simulate."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import cli, debugfs, refresh_md5, run_build, same_tree, write_recipe

from builder.package.flashplan import read_flash_plan
from builder.package.source import open_package

FORMS = ["dir", "tgz", "zip", "img", "img.zip", "img.xz"]


@pytest.mark.parametrize("form", FORMS)
def test_noop_build_is_byte_identical_for_every_form(
    form: str, shared_vendor_form, vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    src = shared_vendor_form(form)
    recipe = write_recipe(tmp_path / "r", src)
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    assert same_tree(res.card, vendor_package_session.dir) == []
    assert all(not p["changed"] for p in res.report["partitions"])
    sums = (res.out_dir / "SHA256SUMS").read_text()
    check = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=res.out_dir)
    assert check.returncode == 0
    assert len(sums.splitlines()) == len(list(res.card.iterdir()))


def test_inspect_json_matches_the_package(vendor_package_session: vf.MiniPackage) -> None:
    out = cli("inspect", "--json", vendor_package_session.dir)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["chunk_sectors"] == vendor_package_session.chunk_sectors
    assert [p["label"] for p in doc["partitions"]] == [p.label for p in vendor_package_session.partitions]
    for got, exp in zip(doc["partitions"], vendor_package_session.partitions, strict=True):
        assert got["offset_sectors"] == exp.offset_sectors
        assert got["size_sectors"] == exp.size_sectors
        assert got["format"] == {0: "raw", 1: "fat", 2: "ext4"}[exp.fmt]
        assert got["readonly"] == exp.readonly
        assert got["image_bytes"] == exp.image_bytes
        assert [c["file"] for c in got["chunks"]] == list(exp.chunk_files)
        assert [c["bytes"] for c in got["chunks"]] == list(exp.chunk_bytes)
        offsets = [
            exp.offset_sectors + i * vendor_package_session.chunk_sectors for i in range(len(exp.chunk_files))
        ]
        assert [c["offset_sectors"] for c in got["chunks"]] == offsets


def test_inspect_table(shared_vendor_form) -> None:
    out = cli("inspect", shared_vendor_form("img"))
    assert out.returncode == 0, out.stderr
    assert "ROOTFS_RW" in out.stdout and "form: img" in out.stdout and "2048 sectors" in out.stdout


def test_chunk_size_is_read_from_the_package(make_vendor_package, tmp_path: Path) -> None:
    pkg = make_vendor_package(chunk_sectors=1536)
    with open_package(pkg.dir, tmp_path / "w") as files:
        plan = read_flash_plan(files)
    assert plan.chunk_sectors == 1536 and plan.chunk_sectors_inferred


def test_verify_simulate_reproduces_every_partition_image(
    vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    emmc = tmp_path / "emmc.img"
    out = cli("verify", vendor_package_session.dir, "--simulate", emmc, "--extract", tmp_path / "parts")
    assert out.returncode == 0, out.stderr
    assert emmc.stat().st_size == vendor_package_session.disk_kb * 1024
    assert emmc.stat().st_blocks * 512 < emmc.stat().st_size  # sparse
    with open(emmc, "rb") as f:
        assert f.read(17408) == vendor_package_session.gpt_bytes
        for p in vendor_package_session.partitions:
            if p.image is None:
                continue
            data = p.image.read_bytes()
            f.seek(p.offset_sectors * 512)
            assert f.read(len(data)) == data, p.label


def _ext4_edit(files: dict[str, bytes]):  # type: ignore[no-untyped-def]
    """An edit that writes files into an ext4 image with debugfs (growing it first)."""

    def edit(image: Path) -> None:
        grow = sum(len(b) for b in files.values()) + (1 << 20)
        size = image.stat().st_size + grow
        subprocess.run(["resize2fs", str(image), f"{size // 1024}K"], check=True, capture_output=True)
        cmds = []
        for i, (path, data) in enumerate(files.items()):
            src = image.parent / f"edit-{i}"
            src.write_bytes(data)
            cmds.append(f"write {src} {path}")
        script = image.parent / "edit.debugfs"
        script.write_text("\n".join(cmds) + "\n")
        subprocess.run(["debugfs", "-w", "-f", str(script), str(image)], check=True, capture_output=True)

    return edit


def test_edit_recompresses_only_changed_chunks_and_regenerates_only_its_script(
    vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    # 3 MiB of incompressible data: the image grows by several chunks, so the chunk list changes
    payload = os.urandom(3 << 20)
    recipe = write_recipe(tmp_path / "r", vendor_package.dir)
    res = run_build(
        recipe, tmp_path / "out", tmp_path / "cache", edits={"DATA": [_ext4_edit({"/blob": payload})]}
    )
    card = res.card
    data = next(p for p in res.report["partitions"] if p["label"] == "DATA")
    assert data["changed"] and data["script_regenerated"]
    assert data["chunks_after"] > data["chunks_before"]
    assert data["reused"] >= 1 and data["recompressed"] >= 1
    assert res.report["scripts_regenerated"] == ["boot_emmc-data.scr"]
    old = vendor_package.dir
    # every other partition's files are untouched, byte for byte
    for name in os.listdir(old):
        if not name.startswith(("data.", "boot_emmc-data.", "md5.txt")):
            assert (card / name).read_bytes() == (old / name).read_bytes(), name
    # a reused chunk keeps the vendor's gzip bytes (with the vendor's name in its header)
    vendor_gz = {(old / n).read_bytes() for n in os.listdir(old) if n.startswith("data.")}
    new_gz = [card / n for n in os.listdir(card) if n.startswith("data.")]
    assert sum(1 for p in new_gz if p.read_bytes() in vendor_gz) == data["reused"]
    # recompressed ones are deterministic gzip: mtime 0, no file name
    for p in new_gz:
        raw = p.read_bytes()
        if raw not in vendor_gz:
            assert raw[3] & 0x08 == 0 and raw[4:8] == b"\0\0\0\0"
    # the regenerated script keeps the vendor's other lines
    old_cmd = (old / "boot_emmc-data.cmd").read_text().splitlines()
    new_cmd = (card / "boot_emmc-data.cmd").read_text().splitlines()
    assert new_cmd[:4] == old_cmd[:4]
    assert subprocess.run(["md5sum", "-c", "--quiet", "md5.txt"], cwd=card).returncode == 0
    # and the card flashes to an image holding the file, fsck-clean
    out = cli("verify", res.out_dir, "--simulate", tmp_path / "emmc.img", "--extract", tmp_path / "parts")
    assert out.returncode == 0, out.stderr
    img = tmp_path / "parts" / "DATA.img"
    assert subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True).returncode == 0
    dumped = tmp_path / "blob.out"
    debugfs(img, f"dump /blob {dumped}")
    assert dumped.read_bytes() == payload


def test_untouched_partition_is_never_decompressed(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    # a DATA chunk that does not decompress, but is the one md5.txt lists (damaged at the
    # source), shows that DATA is copied, not read, when only OPT changes: the build checks its
    # gzip frame, size trailer and md5 (see test_bad_inputs for one damaged after md5.txt)
    bad = vendor_package.dir / "data.2-of-5.gz"
    damaged = bytearray(bad.read_bytes())
    damaged[20 : len(damaged) - 8] = bytes(len(damaged) - 28)
    bad.write_bytes(bytes(damaged))
    refresh_md5(vendor_package.dir)
    recipe = write_recipe(tmp_path / "r", vendor_package.dir)
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache", edits={"OPT": [_ext4_edit({"/x": b"x"})]})
    assert (res.card / "data.2-of-5.gz").read_bytes() == bytes(damaged)
    opt = next(p for p in res.report["partitions"] if p["label"] == "OPT")
    assert opt["changed"]


def test_small_edit_keeps_chunk_list_and_script(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    def poke(image: Path) -> None:
        with open(image, "r+b") as f:
            f.seek(1000)
            f.write(b"airbox")

    recipe = write_recipe(tmp_path / "r", vendor_package.dir)
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache", edits={"MISC": [poke]})
    misc = next(p for p in res.report["partitions"] if p["label"] == "MISC")
    assert misc == misc | {"changed": True, "script_regenerated": False, "recompressed": 1, "reused": 0}
    assert (res.card / "boot_emmc-misc.scr").read_bytes() == (
        vendor_package.dir / "boot_emmc-misc.scr"
    ).read_bytes()
    data = gzip.decompress((res.card / "misc.1-of-1.gz").read_bytes())
    assert data[1000:1006] == b"airbox" and len(data) == vendor_package.partition("MISC").image_bytes


def test_output_replaces_previous_only_when_complete(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r", vendor_package.dir)
    out = tmp_path / "out"
    first = run_build(recipe, out, tmp_path / "cache")
    marker = first.out_dir / "card" / "boot.scr"
    before = marker.read_bytes()

    def boom(image: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_build(recipe, out, tmp_path / "cache", edits={"OPT": [boom]})
    assert marker.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["t"]  # no temp folder left behind


def test_layout_moves_offsets_and_rewrites_xml_gpt_and_only_moved_scripts(
    vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    pkg = vendor_package_session
    recipe = write_recipe(tmp_path / "r", pkg.dir, name="lay", layout={"ROOTFS": "32MiB", "DATA": "20MiB"})
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    card = res.card
    assert sorted(res.report["scripts_regenerated"]) == [
        "boot_emmc-data.scr",
        "boot_emmc-opt.scr",
        "boot_emmc-rootfs_rw.scr",
    ]
    # every chunk is the vendor's, byte for byte; the XML changed only in two size values
    for p in pkg.partitions:
        for name in p.chunk_files:
            assert (card / name).read_bytes() == (pkg.dir / name).read_bytes()
    old_xml, new_xml = pkg.xml_text.splitlines(), (card / "partition32G.xml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(old_xml, new_xml, strict=True) if a != b]
    assert (
        len(changed) == 2 and 'size_in_kb="32768"' in changed[0][1] and 'size_in_kb="20480"' in changed[1][1]
    )
    # the GPT, read by sgdisk, has the new starts; the names and read-only flag are kept
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(pkg.disk_kb * 1024)
        f.write(gzip.decompress((card / "gpt.gz").read_bytes()))
    shown = subprocess.run(["sgdisk", "-p", str(disk)], capture_output=True, text=True).stdout
    starts = {ln.split()[-1]: int(ln.split()[1]) for ln in shown.splitlines() if ln.strip()[:1].isdigit()}
    rootfs = pkg.partition("ROOTFS")
    assert starts["ROOTFS_RW"] == rootfs.offset_sectors + 32 * 2048
    assert starts["DATA"] == starts["OPT"] + pkg.partition("OPT").size_sectors
    # the bundle flashes: every image lands at its new offset
    out = cli("verify", res.out_dir, "--simulate", tmp_path / "emmc.img")
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "emmc.img", "rb") as f:
        for p in pkg.partitions:
            f.seek(starts[p.label] * 512)
            assert f.read(p.image_bytes) == p.image.read_bytes(), p.label


@pytest.mark.parametrize(
    ("layout", "message"),
    [({"DATA": "200MiB"}, "disk"), ({"ROOTFS": "1MiB"}, "smaller than"), ({"ROOTFX": "30MiB"}, "ROOTFS")],
)
def test_bad_layout_is_refused_with_numbers(layout, message, vendor_package_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = write_recipe(tmp_path, vendor_package_session.dir, name="badlay", layout=layout)
    out = cli(recipe, "-o", tmp_path / "out")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert message in out.stderr, out.stderr


def test_a_stale_md5_line_for_an_intact_chunk_only_warns(
    vendor_package: vf.MiniPackage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """md5.txt gives another md5 for a chunk the recipe leaves alone, but the chunk decompresses
    fine: the build goes on, says so, and the card's md5.txt has the right digest."""
    pkg = vendor_package.dir
    md5 = pkg / "md5.txt"
    wrong = "0" * 32
    lines = [
        f"{wrong}  {ln.split()[1]}" if ln.endswith("opt.2-of-5.gz") else ln
        for ln in md5.read_text().splitlines()
    ]
    md5.write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path / "r", pkg, files=[{"path": "/data/x.txt", "content": "x\n"}])
    with caplog.at_level(logging.WARNING, logger="airbox-build"):
        res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    assert any("opt.2-of-5.gz" in r.getMessage() and "stale" in r.getMessage() for r in caplog.records)
    check = subprocess.run(["md5sum", "-c", "--quiet", "md5.txt"], cwd=res.card, capture_output=True)
    assert check.returncode == 0, check.stdout
