"""Card image and release zip: checked with sfdisk, fsck.fat, mtools, unzip and `airbox-build verify`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import vendor_fixture as vf
import yaml
from buildhelp import REPO, cli, run_build, same_tree, sha256, write_recipe
from hypothesis import given
from hypothesis import strategies as st

from builder.emit import (
    FAT32_MIN_CLUSTERS,
    PARTITION_START,
    fat_directory_bytes,
    plan_volume,
    write_card_image,
    write_release_zip,
)
from builder.errors import BuildError
from builder.fs.fat import parse_boot_sector

MIB = 1 << 20


@pytest.fixture(scope="module")
def built(vendor_package_session: vf.MiniPackage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bundle with both extras, volume label MYCARD; the bundle folder is returned."""
    tmp = tmp_path_factory.mktemp("emit")
    recipe = write_recipe(
        tmp,
        vendor_package_session.dir,
        name="rel",
        output={"image": True, "zip": True, "volume_label": "MYCARD"},
    )
    return run_build(recipe, tmp / "out", tmp / "cache").out_dir


def sh(*args: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]


def extract_partition(img: Path, dest: Path) -> Path:
    sh("dd", f"if={img}", f"of={dest}", "bs=1M", "skip=1", "conv=sparse", "status=none")
    return dest


def test_card_image_layout_fsck_and_contents(
    built: Path, vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    img = built / "rel.img"
    assert img.stat().st_size % MIB == 0
    table = json.loads(sh("sfdisk", "--json", img).stdout)["partitiontable"]
    assert table["label"] == "dos"
    (part,) = table["partitions"]
    assert part["start"] == PARTITION_START // 512
    assert part["type"] == "c"
    assert part["start"] + part["size"] == img.stat().st_size // 512
    with open(img, "rb") as f:
        f.seek(PARTITION_START)
        boot = parse_boot_sector(f.read(512))
    assert boot is not None and boot.fs_type == "FAT32" and boot.clusters >= FAT32_MIN_CLUSTERS
    fsck = sh("fsck.fat", "-n", extract_partition(img, tmp_path / "p1.img"))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # fsck.fat counts the volume label entry as a file
    assert f"{len(vendor_package_session.file_names()) + 1} files" in fsck.stdout
    mdir = sh("mdir", "-i", f"{img}@@1M", "::/", env={**os.environ, "MTOOLSRC": os.devnull})
    assert "Volume in drive : is MYCARD" in mdir.stdout
    assert f"{len(vendor_package_session.file_names())} files" in mdir.stdout
    out = tmp_path / "copied"
    out.mkdir()
    assert sh("mcopy", "-s", "-n", "-i", f"{img}@@1M", "::/*", out).returncode == 0
    assert same_tree(out, built / "card") == []
    # free space is holes in the file: it costs no disk
    assert img.stat().st_blocks * 512 < img.stat().st_size // 4


def test_card_image_and_zip_pass_verify(built: Path) -> None:
    for name in ("rel.img", "rel.zip"):
        res = cli("verify", built / name)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("ok:")


def test_sha256sums_lists_image_and_zip(built: Path) -> None:
    listed = dict(reversed(line.split("  ", 1)) for line in (built / "SHA256SUMS").read_text().splitlines())
    assert listed["rel.img"] == sha256(built / "rel.img")
    assert listed["rel.zip"] == sha256(built / "rel.zip")
    assert sh("sha256sum", "-c", "--quiet", "SHA256SUMS", cwd=built).returncode == 0
    report = json.loads((built / "build-report.json").read_text())
    assert report["artifacts"] == {"image": "rel.img", "zip": "rel.zip"}


def test_zip_is_sorted_stored_with_fixed_times(built: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(built / "rel.zip") as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(p.name for p in (built / "card").iterdir())
    assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
    assert len({i.date_time for i in infos}) == 1
    assert {i.external_attr >> 16 for i in infos} == {0o100644}
    assert sh("unzip", "-tq", built / "rel.zip").returncode == 0
    assert sh("unzip", "-q", built / "rel.zip", "-d", tmp_path / "x").returncode == 0
    assert same_tree(tmp_path / "x", built / "card") == []


def test_image_and_zip_are_identical_across_runs_and_time_zones(
    vendor_package_session: vf.MiniPackage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(
        tmp_path, vendor_package_session.dir, name="det", output={"image": True, "zip": True}
    )
    a = run_build(recipe, tmp_path / "a", tmp_path / "cache", epoch=1_700_000_000).out_dir
    monkeypatch.setenv("TZ", "CST-8")  # mtools stamps local time unless the builder pins UTC
    time.sleep(1.1)  # a timestamp taken from the clock would differ
    b = run_build(recipe, tmp_path / "b", tmp_path / "cache", epoch=1_700_000_000).out_dir
    assert sha256(a / "det.img") == sha256(b / "det.img")
    assert sha256(a / "det.zip") == sha256(b / "det.zip")
    assert (a / "SHA256SUMS").read_text() == (b / "SHA256SUMS").read_text()
    # and the build's epoch is what the entries carry
    with zipfile.ZipFile(a / "det.zip") as zf:
        assert zf.infolist()[0].date_time == time.gmtime(1_700_000_000)[:6]
    mdir = sh("mdir", "-i", f"{a / 'det.img'}@@1M", "::/boot.scr", env={**os.environ, "TZ": "UTC"})
    assert "2023-11-14  22:13" in mdir.stdout


def test_tiny_bundle_still_gets_a_valid_fat32(tmp_path: Path) -> None:
    card = tmp_path / "card"
    card.mkdir()
    (card / "boot.scr").write_bytes(b"x" * 100)
    (card / "a-very-long-file-name-that-needs-several-vfat-entries.gz").write_bytes(b"y")
    img = write_card_image(card, tmp_path / "tiny.img", label="T", epoch=None)
    with open(img, "rb") as f:
        f.seek(PARTITION_START)
        boot = parse_boot_sector(f.read(512))
    assert boot is not None and boot.fs_type == "FAT32"
    assert boot.clusters >= FAT32_MIN_CLUSTERS and boot.cluster_bytes == 512
    fsck = sh("fsck.fat", "-n", extract_partition(img, tmp_path / "p.img"))
    assert fsck.returncode == 0 and "3 files" in fsck.stdout, fsck.stdout


def test_image_holds_a_bundle_that_fills_many_clusters(tmp_path: Path) -> None:
    """Real contents near a cluster-size boundary: every byte must fit the planned volume."""
    card = tmp_path / "card"
    card.mkdir()
    rnd = os.urandom(1 << 20)
    for i in range(48):
        (card / f"data.{i + 1}-of-48.gz").write_bytes(rnd[: (1 << 20) - i * 7])
    (card / "boot.scr").write_bytes(b"s")
    img = write_card_image(card, tmp_path / "full.img", label="FULL", epoch=0)
    fsck = sh("fsck.fat", "-n", extract_partition(img, tmp_path / "p.img"))
    assert fsck.returncode == 0 and "50 files" in fsck.stdout
    out = tmp_path / "back"
    out.mkdir()
    assert sh("mcopy", "-s", "-n", "-i", f"{img}@@1M", "::/*", out).returncode == 0
    assert same_tree(out, card) == []


@pytest.mark.parametrize(
    ("total", "cluster"),
    [
        (1 * MIB, 512),
        (200 * MIB, 512),
        (1 << 30, 4096),
        (9 << 30, 8192),
        (20 << 30, 16384),
        (40 << 30, 32768),
    ],
)
def test_cluster_size_follows_the_windows_table(total: int, cluster: int) -> None:
    files = [
        (f"rootfs.{i}-of-{total // (98 * MIB) + 1}.gz", min(98 * MIB, total - i * 98 * MIB))
        for i in range(total // (98 * MIB) + 1)
        if total - i * 98 * MIB > 0
    ]
    plan = plan_volume(files)
    assert plan.cluster_bytes == cluster
    assert plan.image_bytes % MIB == 0 and plan.image_bytes == plan.volume_bytes + PARTITION_START


@given(st.lists(st.integers(min_value=0, max_value=300 * MIB), min_size=1, max_size=40))
def test_planned_volume_always_holds_its_files(sizes: list[int]) -> None:
    files = [(f"f{i}.{i}-of-9.gz", s) for i, s in enumerate(sizes)]
    plan = plan_volume(files)
    c = plan.cluster_bytes
    clusters_needed = sum(-(-s // c) for _, s in files) + -(-fat_directory_bytes([n for n, _ in files]) // c)
    fat_bytes = 2 * ((plan.volume_bytes // c + 2) * 4)
    usable_clusters = (plan.volume_bytes - 32 * 512 - fat_bytes) // c - 1
    assert usable_clusters >= clusters_needed
    assert usable_clusters >= FAT32_MIN_CLUSTERS
    assert plan.volume_bytes - sum(s for _, s in files) >= 8 * MIB  # the margin


def test_a_file_of_4_gib_is_refused_by_name() -> None:
    with pytest.raises(BuildError) as exc:
        plan_volume([("boot.scr", 10), ("rootfs.1-of-1.gz", 4 << 30)])
    assert exc.value.where == "rootfs.1-of-1.gz" and "4 GiB" in exc.value.message


def test_zip_writer_alone_is_deterministic(tmp_path: Path) -> None:
    card = tmp_path / "card"
    (card / "sub").mkdir(parents=True)
    (card / "b.gz").write_bytes(b"b" * 1000)
    (card / "a.scr").write_bytes(b"a")
    (card / "sub" / "c.txt").write_bytes(b"c")
    (card / "._a.scr").write_bytes(b"apple double")  # desktop junk stays out
    one = write_release_zip(card, tmp_path / "1.zip", epoch=None)
    os.utime(card / "a.scr", (1, 1))
    two = write_release_zip(card, tmp_path / "2.zip", epoch=None)
    assert one.read_bytes() == two.read_bytes()
    with zipfile.ZipFile(one) as zf:
        assert zf.namelist() == ["a.scr", "b.gz", "sub/c.txt"]
        assert zf.infolist()[0].date_time == (1980, 1, 1, 0, 0, 0)


def test_cli_flags_override_the_recipe_and_json_result_has_digests(
    vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, vendor_package_session.dir, name="flags", output={"image": True})
    res = cli(
        "--json",
        "build",
        recipe,
        "--no-image",
        "--zip",
        "-o",
        tmp_path / "out",
        "--cache-dir",
        tmp_path / "c",
    )
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    result = events[-1]
    assert result["event"] == "result"
    out = tmp_path / "out" / "flags"
    assert not (out / "flags.img").exists() and "image" not in result
    assert result["zip"]["path"] == str(out / "flags.zip")
    assert result["zip"]["sha256"] == sha256(out / "flags.zip")
    assert result["zip"]["size"] == (out / "flags.zip").stat().st_size
    assert result["sha256sums"]["sha256"] == sha256(out / "SHA256SUMS")
    steps = [e["step"] for e in events if e["event"] == "step-end"]
    assert "release zip" in steps and "card image" not in steps


# --------------------------------------------------------------------------------------------
# The release workflow (examples/github-release.yml): its shell steps run here as on a runner


def _expand(value: str, context: dict[str, str]) -> str:
    return re.sub(r"\$\{\{\s*([^}]+?)\s*\}\}", lambda m: context[m[1]], value)


def test_release_workflow_builds_verifies_and_collects_assets(shared_vendor_form, tmp_path: Path) -> None:
    workflow = yaml.safe_load((REPO / "examples" / "github-release.yml").read_text())
    assert workflow[True]["push"]["tags"] == ["v*"]  # YAML 1.1 reads the key `on` as True
    steps = workflow["jobs"]["bundle"]["steps"]
    build_line = next(s["run"] for s in steps if s.get("id") == "build")
    for flag in ("--json", "--locked", "--image", "--zip"):
        assert flag in build_line

    work = tmp_path / "repo"
    tgz = shared_vendor_form("tgz")
    recipe = write_recipe(work / "recipes", {"path": str(tgz)}, name="wf")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "AIRBOX_BUILD_CACHE": str(tmp_path / "cache"),
        "SOURCE_DATE_EPOCH": "1700000000",
        "GITHUB_OUTPUT": str(tmp_path / "github_output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
    }
    assert sh("airbox-build", "lock", recipe, env=env).returncode == 0  # what the user commits first
    context = {"matrix.recipe": str(recipe.relative_to(work))}
    ran = []
    for step in steps:
        if "run" not in step or step.get("if") or "apt-get" in step["run"] or "rm -rf" in step["run"]:
            continue  # runner set-up and publishing need GitHub
        outputs = (
            dict(line.split("=", 1) for line in Path(env["GITHUB_OUTPUT"]).read_text().splitlines())
            if Path(env["GITHUB_OUTPUT"]).exists()
            else {}
        )
        context.update({f"steps.build.outputs.{k}": v for k, v in outputs.items()})
        context.update({f"steps.assets.outputs.{k}": v for k, v in outputs.items()})
        step_env = {k: _expand(str(v), context) for k, v in step.get("env", {}).items()}
        if "pip install" in step["run"]:
            continue  # airbox-build is installed here already
        res = sh(
            "bash",
            "--noprofile",
            "--norc",
            "-eo",
            "pipefail",
            "-c",
            step["run"],
            cwd=work,
            env={**env, **step_env},
        )
        assert res.returncode == 0, f"{step.get('name')}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
        ran.append(step.get("name", ""))
    assert any(n.startswith("Build") for n in ran) and "Collect release assets" in ran
    release = work / "release"
    assert sorted(p.name for p in release.iterdir()) == ["wf.SHA256SUMS", "wf.img", "wf.zip"]
    assert sh("sha256sum", "-c", "--ignore-missing", "wf.SHA256SUMS", cwd=release).returncode == 0
    assert sha256(release / "wf.img") in Path(env["GITHUB_STEP_SUMMARY"]).read_text()
