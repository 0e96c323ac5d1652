"""A rebuild does only what changed: joined vendor images come from the image cache, and a partition
edited exactly as in the last build takes that build's chunks. Every result is checked against a
build from scratch (fresh cache, no earlier bundle), byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import cli, run_build, same_tree, write_recipe

from builder.imagecache import KEEP_PER_LABEL, image_entries

MiB = 1 << 20


def _netplan(address: str) -> dict[str, object]:
    return {"ethernets": {"eth1": {"addresses": [address], "optional": True}}}


def _recipe(tmp: Path, base: Path, address: str, payload: Path, tag: str = "a") -> Path:
    files = [{"path": "/data/payload", "source": str(payload)}]
    return write_recipe(tmp / f"recipe-{tag}", base, name="t", network=_netplan(address), files=files)


def _payload(tmp: Path, seed: int = 1, size: int = 3 * MiB) -> Path:
    p = tmp / f"payload-{seed}.bin"
    block = hashlib.sha256(str(seed).encode()).digest()
    p.write_bytes(block * (size // len(block)))
    return p


def _parts(report_dir: Path) -> dict[str, dict[str, object]]:
    report = json.loads((report_dir / "build-report.json").read_text())
    return {p["label"]: p for p in report["partitions"]}


def _from_scratch(recipe: Path, tmp: Path) -> Path:
    res = run_build(recipe, tmp / "scratch-out", tmp / "scratch-cache", image_cache=False)
    return res.out_dir


def _same_bundle(a: Path, b: Path) -> None:
    assert same_tree(a / "card", b / "card") == []
    assert (a / "SHA256SUMS").read_text() == (b / "SHA256SUMS").read_text()


def _extract(out_dir: Path, tmp: Path) -> Path:
    parts = tmp / "parts"
    res = cli("verify", out_dir, "--simulate", tmp / "emmc.img", "--extract", parts)
    assert res.returncode == 0, res.stderr
    return parts


def _cat(image: Path, path: str) -> bytes:
    return subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True
    ).stdout


def test_netplan_only_rebuild_takes_data_from_the_last_build(
    vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    payload = _payload(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_build(_recipe(tmp_path, vendor_package.dir, "10.0.0.1/24", payload, "a"), out, cache)
    first = _parts(out / "t")
    second_recipe = _recipe(tmp_path, vendor_package.dir, "10.0.0.2/24", payload, "b")
    res = run_build(second_recipe, out, cache)
    parts = _parts(res.out_dir)
    assert parts["DATA"]["same_edits_as_earlier"] is True
    assert parts["DATA"]["fingerprint"] == first["DATA"]["fingerprint"]
    assert parts["DATA"]["recompressed"] == 0
    assert "edit DATA" not in res.report["timings"]  # nothing applied to DATA
    assert parts["ROOTFS"]["same_edits_as_earlier"] is False
    assert parts["ROOTFS"]["fingerprint"] != first["ROOTFS"]["fingerprint"]
    # exactly what a build from nothing gives
    _same_bundle(res.out_dir, _from_scratch(second_recipe, tmp_path))
    assert cli("verify", res.out_dir).returncode == 0
    # and the box sees the new netplan and the payload
    images = _extract(res.out_dir, tmp_path)
    assert _cat(images / "DATA.img", "/payload") == payload.read_bytes()
    netplan = _cat(images / "ROOTFS.img", "/etc/netplan/01-netcfg.yaml").decode()
    assert "10.0.0.2/24" in netplan


def test_same_recipe_again_applies_nothing(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    payload = _payload(tmp_path)
    recipe = _recipe(tmp_path, vendor_package.dir, "10.0.0.1/24", payload)
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_build(recipe, out, cache)
    sums = (out / "t" / "SHA256SUMS").read_text()
    res = run_build(recipe, out, cache)
    changed = [p for p in _parts(res.out_dir).values() if p["changed"]]
    assert changed and all(p["same_edits_as_earlier"] for p in changed)
    assert not [k for k in res.report["timings"] if k.startswith("edit ")]
    assert (res.out_dir / "SHA256SUMS").read_text() == sums


def test_other_bytes_at_the_same_path_apply_the_edits(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    """Same path, size and recipe text: only the payload's bytes differ, and that is seen."""
    payload = _payload(tmp_path)
    recipe = _recipe(tmp_path, vendor_package.dir, "10.0.0.1/24", payload)
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_build(recipe, out, cache)
    st = payload.stat()
    payload.write_bytes(hashlib.sha256(b"other").digest() * (st.st_size // 32))
    os.utime(payload, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    res = run_build(recipe, out, cache)
    assert _parts(res.out_dir)["DATA"]["same_edits_as_earlier"] is False
    images = _extract(res.out_dir, tmp_path)
    assert _cat(images / "DATA.img", "/payload") == payload.read_bytes()
    _same_bundle(res.out_dir, _from_scratch(recipe, tmp_path))


def test_a_chunk_missing_from_the_last_build_means_applying_again(
    vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    payload = _payload(tmp_path)
    recipe = _recipe(tmp_path, vendor_package.dir, "10.0.0.1/24", payload)
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_build(recipe, out, cache)
    data = _parts(out / "t")["DATA"]
    mine = [c for c in data["chunks"] if c["source"] == "compressed"]  # type: ignore[union-attr]
    assert mine
    (out / "t" / "card" / mine[0]["file"]).unlink()
    res = run_build(recipe, out, cache)
    parts = _parts(res.out_dir)
    assert parts["DATA"]["same_edits_as_earlier"] is False and parts["DATA"]["recompressed"] >= 1
    _same_bundle(res.out_dir, _from_scratch(recipe, tmp_path))


def test_a_touched_vendor_chunk_is_joined_again(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    payload = _payload(tmp_path)
    recipe = _recipe(tmp_path, vendor_package.dir, "10.0.0.1/24", payload)
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_build(recipe, out, cache)
    before = {e.label: e.path for e in image_entries(cache)}
    assert {"ROOTFS", "DATA"} <= set(before)
    chunk = sorted(vendor_package.dir.glob("data.*-of-*.gz"))[0]
    os.utime(chunk)  # same bytes, but no longer provably the same file
    res = run_build(recipe, out, cache)
    after = image_entries(cache)
    data_images = [e for e in after if e.label == "DATA"]
    assert len(data_images) == 2 and before["DATA"] in {e.path for e in data_images}
    assert [e.path for e in after if e.label == "ROOTFS"] == [before["ROOTFS"]]  # untouched: reused
    parts = _parts(res.out_dir)
    assert parts["DATA"]["same_edits_as_earlier"] is False  # another vendor image: another fingerprint
    assert parts["ROOTFS"]["same_edits_as_earlier"] is True


def test_cached_images_stay_the_vendors(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    """Builds edit a copy: after two builds every cached image still joins to the vendor's digests."""
    payload = _payload(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_build(_recipe(tmp_path, vendor_package.dir, "10.0.0.1/24", payload, "a"), out, cache)
    run_build(_recipe(tmp_path, vendor_package.dir, "10.0.0.3/24", _payload(tmp_path, 3), "b"), out, cache)
    entries = image_entries(cache)
    assert entries
    for e in entries:
        meta = json.loads(e.path.with_suffix(".json").read_text())
        data = e.path.read_bytes()
        digests = [hashlib.sha256(data[o : o + n]).hexdigest() for o, n in meta["chunk_ranges"]]
        assert digests == meta["chunk_digests"], e.label
        assert e.disk_bytes < e.size  # sparse
        fsck = subprocess.run(["e2fsck", "-fn", str(e.path)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout


def test_each_partition_keeps_its_latest_images(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    payload = _payload(tmp_path)
    recipe = _recipe(tmp_path, vendor_package.dir, "10.0.0.1/24", payload)
    out, cache = tmp_path / "out", tmp_path / "cache"
    chunk = sorted(vendor_package.dir.glob("data.*-of-*.gz"))[0]
    seen = []
    for n in range(KEEP_PER_LABEL + 2):
        os.utime(chunk, (1_600_000_000 + n, 1_600_000_000 + n))
        run_build(recipe, out, cache)
        seen.append({e.path for e in image_entries(cache) if e.label == "DATA"})
    assert [len(s) for s in seen] == [1, 2] + [KEEP_PER_LABEL] * 2
    assert not list((cache / "images").glob("*.partial-*"))


def test_without_the_image_cache_nothing_is_kept(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    payload = _payload(tmp_path)
    recipe = _recipe(tmp_path, vendor_package.dir, "10.0.0.1/24", payload)
    out, cache = tmp_path / "out", tmp_path / "cache"
    res = cli("--quiet", "build", recipe, "-o", out, "--cache-dir", cache, "--no-image-cache")
    assert res.returncode == 0, res.stderr
    assert image_entries(cache) == []
    run_build(recipe, tmp_path / "out2", tmp_path / "cache2")
    _same_bundle(out / "t", tmp_path / "out2" / "t")


def test_a_tarball_package_is_joined_once(vendor_form, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The tarball is extracted anew each build, but names the same bytes: the images are reused."""
    tgz = vendor_form("tgz")
    payload = _payload(tmp_path)
    recipe = _recipe(tmp_path, tgz, "10.0.0.1/24", payload)
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_build(recipe, out, cache)
    first = {e.path: e.last_used for e in image_entries(cache)}
    run_build(_recipe(tmp_path, tgz, "10.0.0.9/24", payload, "b"), out, cache)
    second = {e.path: e.last_used for e in image_entries(cache)}
    assert set(second) == set(first) and all(second[p] > first[p] for p in first)


def test_cache_list_and_prune_cover_images(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    payload = _payload(tmp_path)
    recipe = _recipe(tmp_path, vendor_package.dir, "10.0.0.1/24", payload)
    cache = tmp_path / "cache"
    run_build(recipe, tmp_path / "out", cache)
    n = len(image_entries(cache))
    listed = cli("cache", "list", "--cache-dir", cache)
    assert listed.returncode == 0 and listed.stdout.count("joined ") == n
    killed = cache / "images" / "0123abcd.img.partial-999999"  # a join killed midway
    killed.write_bytes(b"x" * 4096)
    kept = cli("cache", "prune", "--older-than", "1d", "--cache-dir", cache)
    assert kept.returncode == 0 and len(image_entries(cache)) == n and not killed.exists()
    gone = cli("cache", "prune", "--cache-dir", cache)
    assert gone.returncode == 0 and image_entries(cache) == []
    shutil.rmtree(tmp_path / "out")


def test_two_builds_at_once_join_each_image_once(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    payload = _payload(tmp_path)
    cache = tmp_path / "cache"
    recipes = [
        write_recipe(
            tmp_path / n,
            vendor_package.dir,
            name=n,
            network=_netplan(a),
            files=[{"path": "/data/payload", "source": str(payload)}],
        )
        for n, a in (("one", "10.0.0.1/24"), ("two", "10.0.0.2/24"))
    ]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "builder.cli",
                "--quiet",
                "build",
                r,
                "-o",
                tmp_path / "out",
                "--cache-dir",
                cache,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in recipes
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    labels = [e.label for e in image_entries(cache)]
    assert sorted(labels) == sorted(set(labels)) and "ROOTFS" in labels
    for r in recipes:
        name = r.stem
        scratch = run_build(
            r, tmp_path / "scratch" / name, tmp_path / "scratch-cache" / name, image_cache=False
        )
        _same_bundle(tmp_path / "out" / name, scratch.out_dir)


def test_prune_leaves_an_image_a_build_is_reading(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    from builder.imagecache import ImageCache, prune_images
    from builder.package.flashplan import read_flash_plan
    from builder.package.source import open_package

    cache = tmp_path / "cache"
    images = ImageCache(cache / "images", workers=2)
    with open_package(vendor_package.dir, tmp_path / "src") as files:
        part = read_flash_plan(files).partition("ROOTFS")
        base = images.open(files, part, tmp_path)
        again = images.open(files, part, tmp_path)  # a hit: the same file, not joined again
    assert again.path == base.path and base.cached
    assert prune_images(cache, None) == (0, 0)
    assert base.path.exists()
    images.close()
    files_removed, freed = prune_images(cache, None)
    assert files_removed == 1 and freed > 0 and not base.path.exists()


def test_source_digests_are_remembered_while_files_are_unchanged(tmp_path: Path) -> None:
    from builder.digestmemo import DigestMemo
    from builder.manifest import file_digest as file_sha256

    memo_path = tmp_path / "memo.json"
    staged = tmp_path / "build-tmp"
    staged.mkdir()
    files = [_payload(tmp_path, n, 64 << 10) for n in range(4)]
    fresh = staged / "rendered"
    fresh.write_text("rendered template\n")
    first = DigestMemo(memo_path, fresh_under=[staged])
    got = first.digests([*files, fresh], 2)
    assert got == {p: file_sha256(p) for p in [*files, fresh]} and first.hashed == 5
    first.save()

    second = DigestMemo(memo_path, fresh_under=[staged])
    assert second.digests([*files, fresh], 2) == got
    assert second.hashed == 1  # only the file in the build's temp folder
    second.save()

    st = files[0].stat()
    files[0].write_bytes(hashlib.sha256(b"x").digest() * (st.st_size // 32))  # same size
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: the ctime tells
    third = DigestMemo(memo_path, fresh_under=[staged])
    again = third.digests(files, 2)
    assert third.hashed == 1 and again[files[0]] == file_sha256(files[0]) != got[files[0]]


def test_a_small_edit_goes_into_the_cached_image_and_is_undone(make_vendor_package, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With room in ROOTFS (as multi-GB vendor images have), the netplan edit is made on the
    cached image itself (no copy), then undone with e2undo."""
    pkg = make_vendor_package(slack_kb={"ROOTFS": 2048})
    payload = _payload(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_build(_recipe(tmp_path, pkg.dir, "10.0.0.1/24", payload, "a"), out, cache)
    (rootfs,) = [e.path for e in image_entries(cache) if e.label == "ROOTFS"]
    before = rootfs.stat()
    vendor = hashlib.sha256(rootfs.read_bytes()).hexdigest()
    second = _recipe(tmp_path, pkg.dir, "10.0.0.2/24", payload, "b")
    res = run_build(second, out, cache)
    after = rootfs.stat()
    assert after.st_ino == before.st_ino and after.st_mtime_ns > before.st_mtime_ns  # written, in place
    assert hashlib.sha256(rootfs.read_bytes()).hexdigest() == vendor  # and put back
    assert _parts(res.out_dir)["ROOTFS"]["recompressed"] >= 1
    _same_bundle(res.out_dir, _from_scratch(second, tmp_path))


def test_a_build_failing_mid_edit_drops_the_image_it_was_editing(make_vendor_package, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pkg = make_vendor_package(slack_kb={"ROOTFS": 2048})
    payload = _payload(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_build(_recipe(tmp_path, pkg.dir, "10.0.0.1/24", payload, "a"), out, cache)
    second = _recipe(tmp_path, pkg.dir, "10.0.0.2/24", payload, "b")

    def fail(_image: Path) -> None:
        raise RuntimeError("planted failure after the customisation, before the repack")

    with pytest.raises(RuntimeError, match="planted"):
        run_build(second, out, cache, edits={"OPT": [fail]})
    assert "ROOTFS" not in {e.label for e in image_entries(cache)}  # not trusted any more
    assert not [p for p in (cache / "images").glob("*.img") if not p.with_suffix(".json").exists()]
    res = run_build(second, out, cache)
    assert "ROOTFS" in {e.label for e in image_entries(cache)}
    _same_bundle(res.out_dir, _from_scratch(second, tmp_path))


def test_a_staged_app_tree_is_kept_and_taken_by_the_next_build(tmp_path: Path) -> None:
    """The demo app (source, split model archive, single-file model, offline wheels): the
    second build takes the staged tree from the cache; both equal builds from nothing; a new
    source archive stages a new tree."""
    import yaml

    from builder.customise.stagecache import tree_entries

    demo = Path(__file__).resolve().parents[1] / "recipes"
    doc = yaml.safe_load((demo / "demo.yaml").read_text())
    pkg = tmp_path / "vendor"
    vf.build_package(pkg)
    work = tmp_path / "recipes"
    shutil.copytree(demo / "demo", work / "demo")
    shutil.copytree(demo.parent / "overlays", tmp_path / "overlays")
    doc["base"] = {"path": str(pkg / "sdcard")}
    first = work / "demo.yaml"
    first.write_text(yaml.safe_dump(doc, sort_keys=False))
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_build(first, out, cache)
    (tree,) = tree_entries(cache)
    stamp = tree[0].stat().st_mtime_ns
    doc["hostname"] = "another-box"
    second = work / "demo2.yaml"
    second.write_text(yaml.safe_dump(doc, sort_keys=False))
    res = run_build(second, out, cache)
    assert [t[0] for t in tree_entries(cache)] == [tree[0]] and tree[0].stat().st_mtime_ns == stamp
    _same_bundle(res.out_dir, _from_scratch(second, tmp_path))
    assert res.report["apps"] and res.report["apps"][0]["python_packages"] > 0


def test_prune_removes_staged_trees_and_killed_stagings(tmp_path: Path) -> None:
    from builder.customise.stagecache import cached_tree, prune_trees, tree_entries

    root = tmp_path / "cache" / "apps"

    def stage(tree: Path) -> dict[str, object]:
        (tree / "bin").mkdir(parents=True)
        (tree / "bin" / "app").write_bytes(b"x" * 10_000)
        return {"python_packages": 0}

    tree, meta = cached_tree(root, "k1", "app", stage)
    assert (tree / "bin" / "app").is_file() and meta["app"] == "app"
    again, _ = cached_tree(root, "k1", "app", lambda t: pytest.fail("staged twice"))  # type: ignore[arg-type,return-value]
    assert again == tree
    (root / "k2.partial-999999" / "tree").mkdir(parents=True)  # killed while staging
    assert prune_trees(tmp_path / "cache", time.time() - 86400)[0] == 1  # the killed one only
    assert len(tree_entries(tmp_path / "cache")) == 1
    files, freed = prune_trees(tmp_path / "cache", None)
    assert files == 1 and freed >= 10_000 and tree_entries(tmp_path / "cache") == []
