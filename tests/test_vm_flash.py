"""The VM's eMMC without a VM: `airbox-build boot` flashes a bundle with the project's simulator,
whatever form it comes in, reuses the flash of an unchanged bundle, and refuses one that does not
verify. (Booting it is tests/test_vm.py, in the slow tier.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import cli, flip_middle_byte, run_build, write_recipe

from builder.vm import machine


@pytest.fixture
def bundle(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> Path:
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package_session.dir,
        name="flashme",
        hostname="airbox-flash",
        output={"image": True},
    )
    return run_build(recipe, tmp_path / "out", tmp_path / "cache").out_dir


def test_every_form_flashes_the_same_emmc(bundle: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref.img"
    assert cli("verify", bundle, "--simulate", ref).returncode == 0
    for form in (bundle, bundle / "card", bundle / "flashme.img"):
        b = machine.locate(form, state=tmp_path / f"state-{form.name}")
        fl = machine.flash(b)
        assert not fl.reused and (fl.ro_part, fl.rw_part) == (4, 5)
        size = fl.image.stat().st_size
        assert size & (size - 1) == 0 and size >= ref.stat().st_size  # QEMU's SD card wants 2^n
        with open(fl.image, "rb") as got, open(ref, "rb") as want:
            assert got.read(ref.stat().st_size) == want.read()
            assert not got.read().strip(b"\0")
        assert machine.flash(b).reused  # unchanged bundle: flashed once
    assert machine.locate(bundle).state == bundle / "boot"
    assert machine.locate(bundle / "card").state == bundle / "boot"
    assert machine.locate(bundle / "flashme.img").state == bundle / "flashme.img.boot"


def test_a_changed_bundle_is_flashed_again_and_a_bad_one_refused(bundle: Path, tmp_path: Path) -> None:
    b = machine.locate(bundle, state=tmp_path / "state")
    first = machine.flash(b)
    chunk = next(p for p in sorted((bundle / "card").glob("rootfs.*-of-*.gz")))
    flip_middle_byte(chunk)
    with pytest.raises(machine.VMError, match="does not verify") as e:
        machine.flash(b)
    assert "airbox-build verify" in (e.value.hint or "")
    assert first.image.exists()  # the earlier flash is left as it was


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (package qemu-utils)")
def test_the_box_state_is_an_overlay_of_the_pristine_flash(bundle: Path, tmp_path: Path) -> None:
    b = machine.locate(bundle, state=tmp_path / "state")
    fl = machine.flash(b)
    disk, new = machine.prepare_disk(b.state, fl, fresh=False)
    assert new
    info = subprocess.run(["qemu-img", "info", str(disk)], capture_output=True, text=True, check=True).stdout
    assert "file format: qcow2" in info and "backing file: flash.img" in info
    (b.state / "known_hosts").write_text("airbox-vm ssh-ed25519 AAAA\n")
    assert machine.prepare_disk(b.state, fl, fresh=False) == (disk, False)  # the same box
    assert (b.state / "known_hosts").exists()
    assert machine.prepare_disk(b.state, fl, fresh=True)[1]  # --fresh: a new box, keys recorded anew
    assert not (b.state / "known_hosts").exists()


def test_update_from_a_package_leaves_the_bundle_on_data_and_its_root_as_built(
    vendor_package_session: vf.MiniPackage, bundle: Path, tmp_path: Path
) -> None:
    """`boot --update-from`: the vendor install, the bundle placed on DATA as push places it, the
    update played from there; ROOTFS/ROOTFS_RW are the bundle's, DATA keeps the bundle."""
    from builder.vm.update import flash_update

    b = machine.locate(bundle, state=tmp_path / "state")
    fl = flash_update(b, vendor_package_session.dir)
    assert not fl.reused and (fl.ro_part, fl.rw_part) == (4, 5)
    fresh = tmp_path / "fresh.img"
    assert cli("verify", bundle, "--simulate", fresh).returncode == 0
    parts = {p.label: p for p in vendor_package_session.partitions}
    with open(fl.image, "rb") as got, open(fresh, "rb") as want:
        for label in ("ROOTFS", "ROOTFS_RW", "OPT"):
            p = parts[label]
            got.seek(p.offset_sectors * 512)
            want.seek(p.offset_sectors * 512)
            assert got.read(p.size_sectors * 512) == want.read(p.size_sectors * 512), label
    data = parts["DATA"]
    cut = tmp_path / "data.img"
    with open(fl.image, "rb") as src:
        src.seek(data.offset_sectors * 512)
        cut.write_bytes(src.read(data.size_sectors * 512))
    listing = subprocess.run(["debugfs", "-R", "ls -l /ota", str(cut)], capture_output=True, text=True).stdout
    assert "boot_emmc.scr" in listing and "md5.txt" in listing
    assert subprocess.run(["e2fsck", "-fn", str(cut)], capture_output=True).returncode == 0
    assert flash_update(b, vendor_package_session.dir).reused
