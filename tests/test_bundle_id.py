"""/etc/airbox-build.json: the bundle id a box reports after an update (read back by `push`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import run_build, write_recipe
from test_customise import cat, simulate

from builder.errors import RecipeError
from builder.recipe import load_recipe


def _id_on_box(out_dir: Path, tmp: Path) -> dict[str, object] | None:
    tmp.mkdir()
    parts = simulate(out_dir, tmp)
    raw = subprocess.run(
        ["debugfs", "-R", "cat /etc/airbox-build.json", str(parts / "ROOTFS.img")], capture_output=True
    ).stdout
    return json.loads(raw) if raw.strip() else None


def test_a_customised_bundle_names_itself_in_the_image_and_the_report(
    vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "r", vendor_package.dir, name="ided", hostname="box-1")
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    doc = _id_on_box(res.out_dir, tmp_path / "sim")
    report = json.loads((res.out_dir / "build-report.json").read_text())
    assert doc is not None and doc == report["bundle_id"]
    assert doc["recipe"] == "ided" and doc["device"] is None and len(str(doc["bundle"])) == 64
    assert str(doc["time"]).endswith("Z")
    change = [c for c in report["changes"] if c["path"] == "/etc/airbox-build.json"]
    assert change and change[0]["origin"] == "output.bundle_id"

    # the same content from another place and at another compression level: the same id
    again = run_build(recipe, tmp_path / "out2", tmp_path / "cache2", level=1)
    assert json.loads((again.out_dir / "build-report.json").read_text())["bundle_id"] == doc
    # other content: another id
    other = write_recipe(tmp_path / "r2", vendor_package.dir, name="ided", hostname="box-2")
    res2 = run_build(other, tmp_path / "out3", tmp_path / "cache")
    doc2 = json.loads((res2.out_dir / "build-report.json").read_text())["bundle_id"]
    assert doc2["bundle"] != doc["bundle"]


def test_auto_leaves_a_noop_build_byte_exact_always_writes_never_skips(
    vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    noop = write_recipe(tmp_path / "a", vendor_package.dir, name="noop")
    res = run_build(noop, tmp_path / "out", tmp_path / "cache")
    for f in sorted(vendor_package.dir.iterdir()):
        assert (res.card / f.name).read_bytes() == f.read_bytes(), f.name
    assert json.loads((res.out_dir / "build-report.json").read_text())["bundle_id"] is None

    always = write_recipe(tmp_path / "b", vendor_package.dir, name="noop", output={"bundle_id": "always"})
    res = run_build(always, tmp_path / "out2", tmp_path / "cache")
    doc = _id_on_box(res.out_dir, tmp_path / "sim")
    assert doc is not None and doc["recipe"] == "noop"

    never = write_recipe(
        tmp_path / "c", vendor_package.dir, name="never", hostname="x", output={"bundle_id": False}
    )
    res = run_build(never, tmp_path / "out3", tmp_path / "cache")
    assert _id_on_box(res.out_dir, tmp_path / "sim3") is None
    (tmp_path / "sim4").mkdir()
    assert cat(simulate(res.out_dir, tmp_path / "sim4") / "ROOTFS.img", "/etc/hostname") == b"x\n"


def test_bad_bundle_id_value(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tmp_path, name="x", output={"bundle_id": "sometimes"})
    with pytest.raises(RecipeError, match="'sometimes' is not one of: auto, always, never"):
        load_recipe(path, check_files=False)


# ---------------------------------------------------------------------------------------------
# Found by mutation testing (scripts/mutants.py): each test fails on a mutant that survived.


def _bundle(pkg: vf.MiniPackage, tmp: Path, tag: str) -> str:
    recipe = write_recipe(tmp / f"r-{tag}", pkg.dir, name="vid", hostname="box-1")
    res = run_build(recipe, tmp / f"out-{tag}", tmp / f"cache-{tag}")
    return str(json.loads((res.out_dir / "build-report.json").read_text())["bundle_id"]["bundle"])


def test_the_id_names_the_whole_vendor_package_not_only_what_the_recipe_edits(
    make_vendor_package, tmp_path: Path
) -> None:
    """Two vendor packages that differ only in DATA, a partition the recipe does not touch: the
    same edits give two ids (the vendor's md5.txt is part of the id); the same package twice,
    one id."""
    a = make_vendor_package(extra_files={"DATA": {"/release.txt": "2024-06\n"}})
    b = make_vendor_package(extra_files={"DATA": {"/release.txt": "2024-07\n"}})
    assert (a.dir / "md5.txt").read_bytes() != (b.dir / "md5.txt").read_bytes()
    same = a.copy_to(tmp_path / "copy")
    assert _bundle(a, tmp_path, "a") == _bundle(same, tmp_path, "same") != _bundle(b, tmp_path, "b")


def test_a_package_without_md5_txt_is_named_by_the_edited_partitions_chunks(
    make_vendor_package, tmp_path: Path
) -> None:
    """No md5.txt: the id comes from the chunks of the partitions the build edits (names and
    bytes): ROOTFS content differing outside what the recipe writes gives another id."""
    a = make_vendor_package(extra_files={"ROOTFS": {"/etc/release": "a\n"}})
    b = make_vendor_package(extra_files={"ROOTFS": {"/etc/release": "b\n"}})
    for pkg in (a, b):
        (pkg.dir / "md5.txt").unlink()
    assert _bundle(a, tmp_path, "a") != _bundle(b, tmp_path, "b")


def test_only_our_own_document_is_read_as_a_bundle_id() -> None:
    from builder.customise.bundleid import parse

    assert parse('{"bundle": "' + "0" * 64 + '", "recipe": "r"}') == {"bundle": "0" * 64, "recipe": "r"}
    assert parse('["not", "a", "mapping"]') is None
    assert parse('{"bundle": 12}') is None
    assert parse("not json") is None
