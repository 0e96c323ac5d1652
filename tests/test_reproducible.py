"""Reproducibility: the same recipe and inputs give the same bundle, byte for byte.

Two builds of the rich recipe (tests/faultkit.py: ROOTFS, ROOTFS_RW, OPT and DATA changed, an app, a
download, the card image and the release zip), from copies of the recipe folder at two
different paths, started from different working directories (one with a relative recipe path,
one with an absolute one), at different times, with umask 022 and 077 and TZ UTC and
Asia/Shanghai, each with its own cache and output root, must produce the same card/ folder,
SHA256SUMS, <name>.img and <name>.zip (sha256 of every file). SOURCE_DATE_EPOCH, when set,
stamps everything the build creates: new inodes, regenerated scripts, the zip and the image.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from buildhelp import cli
from faultkit import (
    BLOB,
    NAME,
    build_args,
    bundle_digests,
    cli_env,
    compare_bundles,
    run_cli,
    write_rich_recipe,
)
from httpserver import LocalHTTPServer

EPOCH_A = 1_700_000_000  # 2023-11-14
EPOCH_B = 1_710_000_000  # 2024-03-09
NEW_FILES = (
    ("ROOTFS", "/etc/motd"),
    ("ROOTFS_RW", "/overlay/etc/profile.d/x.sh"),
    ("OPT", "/rich/data.bin"),
    ("DATA", "/blob.bin"),
)


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    with LocalHTTPServer() as srv:
        srv.add("/files/blob.bin", BLOB)
        yield srv


@pytest.fixture(scope="module")
def recipe_folder(shared_vendor_form, server, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """A self-contained recipe folder: the recipe, every local input (base included), relative paths."""
    folder = tmp_path_factory.mktemp("repro") / "recipe"
    folder.mkdir()
    tgz = shared_vendor_form("tgz")
    shutil.copyfile(tgz, folder / "sdcard.tgz")
    base = {"path": "sdcard.tgz", "sha256": hashlib.sha256(tgz.read_bytes()).hexdigest()}
    write_rich_recipe(folder, base, server.url("/files/blob.bin"))
    return folder


def _copy(folder: Path, dest: Path, *, group_writable: bool = False) -> Path:
    """Copy the recipe folder; `group_writable` re-makes the overlay as a checkout made with
    umask 002 would have it (0775 folders, 0664 files, exec bits kept)."""
    shutil.copytree(folder, dest, symlinks=True)
    if group_writable:
        for p in [*sorted((dest / "overlay").rglob("*")), dest / "overlay"]:
            os.chmod(p, (p.stat().st_mode & 0o777) | 0o020)
    return dest / f"{NAME}.yaml"


def _build(recipe: Path, root: Path, *, cwd: Path, umask: int, tz: str, relative: bool, **env: str) -> Path:
    out, cache = root / "out", root / "cache"
    args = build_args(Path(os.path.relpath(recipe, cwd)) if relative else recipe, out, cache)
    run = run_cli(args, cli_env(root / "tmp", TZ=tz, **env), cwd=cwd, umask=umask)
    assert run.returncode == 0, run.stderr
    return out / NAME


def test_two_builds_anywhere_anytime_give_the_same_bytes(recipe_folder: Path, tmp_path: Path) -> None:
    a = _copy(recipe_folder, tmp_path / "alice" / "work" / "recipe")
    b = _copy(recipe_folder, tmp_path / "bob" / "recipe-copy", group_writable=True)
    first = _build(a, tmp_path / "A", cwd=a.parent, umask=0o022, tz="UTC", relative=True)
    time.sleep(1.1)  # a clock that ticked between the builds must not show
    second = _build(b, tmp_path / "B", cwd=tmp_path, umask=0o077, tz="Asia/Shanghai", relative=False)
    digests = bundle_digests(first)
    assert {"SHA256SUMS", f"{NAME}.img", f"{NAME}.zip"} <= set(digests)
    assert len([k for k in digests if k.startswith("card/")]) > 40
    assert compare_bundles(first, second) == []
    # and it is a real bundle: every file checks against SHA256SUMS
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=second).returncode == 0


def _uimage_time(scr: Path) -> int:
    return struct.unpack(">I", scr.read_bytes()[8:12])[0]


def _debugfs(image: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    ).stdout


def _inode_times(image: Path, path: str) -> dict[str, int]:
    """The four times of an inode, in seconds since the epoch (debugfs prints them in hex)."""
    out = _debugfs(image, f"stat {path}")
    times = {}
    for line in out.splitlines():
        for field in ("ctime", "atime", "mtime", "crtime"):
            if line.strip().startswith(f"{field}:"):
                times[field] = int(line.split()[1].split(":")[0], 16)
    return times


def _partitions(bundle: Path, tmp: Path) -> Path:
    parts = tmp / "parts"
    tmp.mkdir(parents=True)
    res = cli("verify", bundle, "--simulate", tmp / "emmc.img", "--extract", parts)
    assert res.returncode == 0, res.stderr
    return parts


@pytest.mark.slow
def test_source_date_epoch_is_honoured(recipe_folder: Path, tmp_path: Path) -> None:
    """Same SOURCE_DATE_EPOCH: same bytes (other folder, umask, TZ). Another one: the changed
    partitions' chunks, the regenerated scripts, the image and the zip change, nothing else;
    and everything the build made carries the epoch."""
    a = _copy(recipe_folder, tmp_path / "a")
    b = _copy(recipe_folder, tmp_path / "b")
    c = _copy(recipe_folder, tmp_path / "c")
    sde = {"SOURCE_DATE_EPOCH": str(EPOCH_A)}
    first = _build(a, tmp_path / "A", cwd=tmp_path, umask=0o022, tz="UTC", relative=False, **sde)
    time.sleep(1.1)
    second = _build(b, tmp_path / "B", cwd=b.parent, umask=0o077, tz="Asia/Shanghai", relative=True, **sde)
    assert compare_bundles(first, second) == []
    other = _build(
        c, tmp_path / "C", cwd=tmp_path, umask=0o022, tz="UTC", relative=False, SOURCE_DATE_EPOCH=str(EPOCH_B)
    )
    plain = _build(c, tmp_path / "D", cwd=tmp_path, umask=0o022, tz="UTC", relative=False)

    import json

    report = json.loads((first / "build-report.json").read_text())
    changed = {p["label"]: p for p in report["partitions"] if p["changed"]}
    assert set(changed) == {"ROOTFS", "ROOTFS_RW", "OPT", "DATA"}
    fresh = {c["file"] for p in changed.values() for c in p["chunks"] if c["source"] == "compressed"}
    regenerated = set(report["scripts_regenerated"])
    assert fresh and regenerated
    differ = set(compare_bundles(first, other))
    # another epoch changes the recompressed chunks, the regenerated scripts and whatever lists
    # them (md5.txt, SHA256SUMS), the image and the zip; the vendor's files stay as they were
    expected = {f"card/{n}" for n in fresh | regenerated} | {
        "card/md5.txt",
        "SHA256SUMS",
        f"{NAME}.img",
        f"{NAME}.zip",
    }
    assert differ <= expected and {f"card/{n}" for n in regenerated} <= differ
    assert any(f"card/{n}" in differ for n in fresh)
    assert f"card/{sorted(regenerated)[0][: -len('.scr')]}.cmd" not in differ  # the text is the same

    # everything made by the build carries its epoch; without SOURCE_DATE_EPOCH, the vendor's time
    vendor_time = _uimage_time(plain / "card" / "boot.scr")
    for bundle, epoch in ((first, EPOCH_A), (other, EPOCH_B), (plain, vendor_time)):
        for scr in regenerated:
            assert _uimage_time(bundle / "card" / scr) == epoch, (scr, epoch)
        assert _uimage_time(bundle / "card" / "boot.scr") == vendor_time  # not regenerated
        with zipfile.ZipFile(bundle / f"{NAME}.zip") as zf:
            stamp = dt.datetime(*zf.getinfo("boot.scr").date_time, tzinfo=dt.timezone.utc)
        assert int(stamp.timestamp()) == epoch - epoch % 2
        listing = subprocess.run(
            ["mdir", "-i", f"{bundle / f'{NAME}.img'}@@1M", "::/boot.scr"],
            capture_output=True, text=True, check=True, env={**os.environ, "TZ": "UTC"},
        ).stdout  # fmt: skip
        when = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
        assert f"{when:%Y-%m-%d}  {when.hour:2d}:{when:%M}" in listing, listing
        parts = _partitions(bundle, tmp_path / f"sim-{epoch}")
        for label, path in NEW_FILES:
            times = _inode_times(parts / f"{label}.img", path)
            assert set(times.values()) == {epoch}, (label, path, times)
