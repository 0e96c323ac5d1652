"""SDK release archives as `base`: the package is found by content inside a zip, tgz or tar.xz
release, one or more folders deep, beside unrelated files; only it is copied out."""

from __future__ import annotations

import io
import random
import tarfile
import zipfile
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import run_build, write_recipe

from builder.errors import PackageError
from builder.package.source import open_package

NOISE = random.Random("release-noise").randbytes(3 << 20)  # an unrelated SDK file, incompressible


def _package_tgz(pkg: vf.MiniPackage, dest: Path, top: str = "sdcard") -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(pkg.dir, arcname=top)
    return dest


def _other_tgz(dest: Path) -> Path:
    """A tarball of something else (with a file called boot.scr but no boot_emmc.scr)."""
    with tarfile.open(dest, "w:gz") as tar:
        for name, data in (("tools/boot.scr", b"not ours"), ("tools/readme", b"x" * 9000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


def _release_zip(dest: Path, members: dict[str, Path | bytes]) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, src in members.items():
            zf.writestr(name, src if isinstance(src, bytes) else src.read_bytes())
    return dest


def _release_tar(dest: Path, members: dict[str, Path | bytes], mode: str) -> Path:
    with tarfile.open(dest, mode) as tar:
        for name, src in members.items():
            data = src if isinstance(src, bytes) else src.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


def _no_op(base: Path | dict[str, str], tmp: Path, tag: str) -> dict[str, bytes]:
    spec = {"path": str(base)} if isinstance(base, Path) else base
    recipe = write_recipe(tmp / f"r-{tag}", spec, name="rel")  # type: ignore[arg-type]
    res = run_build(recipe, tmp / f"out-{tag}", tmp / f"cache-{tag}")
    return {p.name: p.read_bytes() for p in sorted(res.card.iterdir())}


@pytest.mark.parametrize("form", ["zip", "tgz", "tar.xz"])
def test_a_no_op_build_from_a_release_equals_the_plain_folder(
    vendor_package: vf.MiniPackage, tmp_path: Path, form: str
) -> None:
    inner = _package_tgz(vendor_package, tmp_path / "sdcard.tgz")
    members: dict[str, Path | bytes] = {
        "sdk-v1/README.md": b"release notes\n",
        "sdk-v1/tools/other.tar.gz": _other_tgz(tmp_path / "other.tgz"),
        "sdk-v1/libs/blob.bin": NOISE,
        "sdk-v1/sophon-img/sdcard.tgz": inner,
    }
    if form == "zip":
        rel = _release_zip(tmp_path / "sdk.zip", members)
    else:
        rel = _release_tar(tmp_path / f"sdk.{form}", members, "w:gz" if form == "tgz" else "w:xz")
    assert _no_op(rel, tmp_path, "rel") == _no_op(vendor_package.dir, tmp_path, "plain")

    # only the package is copied out of the release: the unrelated blob is nowhere on disk
    work = tmp_path / "w"
    with open_package(rel, work) as files:
        assert "boot_emmc.scr" in files.names()
    found = [p for p in work.rglob("*") if p.is_file() and p.stat().st_size == len(NOISE)]
    assert not [p for p in found if p.read_bytes() == NOISE]
    with open_package(rel, work) as files:  # a second open reuses what the first copied out
        assert "boot_emmc.scr" in files.names()


def test_two_packages_need_a_member_and_the_error_lists_them(
    vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    a = _package_tgz(vendor_package, tmp_path / "a.tgz")
    b_zip = tmp_path / "b.zip"
    with zipfile.ZipFile(b_zip, "w") as zf:
        for p in sorted(vendor_package.dir.iterdir()):
            zf.write(p, f"sdcard/{p.name}")
    for form in ("zip", "tgz"):
        members: dict[str, Path | bytes] = {
            "r/x/sdcard.tgz": a,
            "r/y/sdcard-alt.zip": b_zip,
            "r/notes": b"n" * 5000,
        }
        rel = (
            _release_zip(tmp_path / f"two.{form}", members)
            if form == "zip"
            else _release_tar(tmp_path / f"two.{form}", members, "w:gz")
        )
        with pytest.raises(PackageError) as e:
            open_package(rel, tmp_path / f"w-{form}").close()
        assert "2 vendor packages" in e.value.message
        assert "r/x/sdcard.tgz (tar.gz)" in e.value.message and "r/y/sdcard-alt.zip (zip)" in e.value.message
        assert "member" in (e.value.hint or "")
        for pick in ("r/x/sdcard.tgz", "r/y/sdcard-alt.zip"):
            with open_package(rel, tmp_path / f"w-{form}", member=pick) as files:
                assert files.size("gpt.gz") == (vendor_package.dir / "gpt.gz").stat().st_size
        with pytest.raises(PackageError, match="is not a vendor package in this archive") as e:
            open_package(rel, tmp_path / f"w-{form}", member="r/notes").close()
        assert "r/x/sdcard.tgz" in (e.value.hint or "")

    # and through a recipe
    rel = _release_zip(tmp_path / "two-again.zip", {"x/sdcard.tgz": a, "y/sdcard-alt.zip": b_zip})
    got = _no_op({"path": str(rel), "member": "y/sdcard-alt.zip"}, tmp_path, "member")
    assert got == _no_op(vendor_package.dir, tmp_path, "plain2")


def test_a_release_without_a_package_says_what_it_holds(tmp_path: Path) -> None:
    rel = _release_zip(tmp_path / "empty.zip", {"sdk/tools/other.tgz": _other_tgz(tmp_path / "o.tgz")})
    with pytest.raises(PackageError) as e:
        open_package(rel, tmp_path / "w").close()
    assert "boot_emmc.scr" in e.value.message and "top level: sdk/" in e.value.message
