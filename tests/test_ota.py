"""What an update in the field writes, read from the bundle's own scripts (builder.ota), and the
simulator's update from the box's eMMC (`verify --simulate --ota-from N`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import cli, run_build, write_recipe

from builder.errors import AirboxError, PackageError
from builder.ota import exits_early, ota_plan, update_files
from builder.package.flashplan import read_flash_plan
from builder.package.scripts import parse_script
from builder.package.source import open_package

SECTOR = 512


def _plan(folder: Path, tmp: Path):  # type: ignore[no-untyped-def]
    files = open_package(folder, tmp)
    return files, read_flash_plan(files)


def test_the_scripts_say_what_an_update_from_data_skips(
    vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    files, plan = _plan(vendor_package.dir, tmp_path / "w")
    with files:
        data = next(p.index + 1 for p in plan.partitions if p.label == "DATA")
        update = ota_plan(plan, data)
        assert update.holding_label == "DATA" and not update.gpt_written
        assert "DATA" in update.skipped and "ROOTFS" in update.written and "DATA" not in update.written
        changed = update_files(files, plan, update)
    assert set(changed) >= {"boot_emmc-data.scr", "boot_emmc-gpt.scr", "md5.txt"}
    text = changed["boot_emmc-data.cmd"].decode() if "boot_emmc-data.cmd" in changed else ""
    assert "mmc write" not in text and "load_partition" in text  # the vendor's own lines stay
    # MISC is raw: U-Boot cannot load a bundle from it
    with pytest.raises(PackageError, match="cannot load a bundle"):
        ota_plan(plan, next(p.index + 1 for p in plan.partitions if p.label == "MISC"))


def test_skip_lines_are_evaluated_and_unknown_forms_refused() -> None:
    vendor = (
        "if test -n $load_partition; then if test $load_partition -eq 7; then "
        'echo "skip partition $load_partition";  exit; fi; fi;\n'
        "load mmc 0:1 ${ramdisk_addr_r} /$ota_path/x.gz\n"
    )
    script = parse_script(vendor, "s.cmd")
    assert exits_early(script, "7") and not exits_early(script, "6") and not exits_early(script, "")
    gpt = parse_script('if test -n $load_partition; then echo "skip";  exit; fi;\n', "gpt.cmd")
    assert exits_early(gpt, "3") and not exits_early(gpt, "")
    odd = parse_script("if itest.s $load_partition == 7; then exit; fi;\n", "odd.cmd")
    with pytest.raises(PackageError, match="cannot tell what the script does"):
        exits_early(odd, "7")


def test_a_script_that_would_overwrite_the_bundle_is_refused(make_vendor_package, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pkg = make_vendor_package()
    files, plan = _plan(pkg.dir, tmp_path / "w")
    with files:
        data = plan.partition("DATA")
        lines = [ln for ln in plan.scripts[data.script].lines if "load_partition" not in ln]
        bare = parse_script("\n".join(lines) + "\n", data.script)
        plan2 = type(plan)(**{**plan.__dict__, "scripts": {**plan.scripts, data.script: bare}})
        with pytest.raises(PackageError, match="would overwrite the bundle while reading it"):
            ota_plan(plan2, data.index + 1)


def test_simulated_update_keeps_gpt_and_holding_partition(
    vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "r", vendor_package.dir, name="upd", hostname="updated")
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    start = tmp_path / "start.img"
    assert cli("verify", vendor_package.dir, "--simulate", start).returncode == 0
    data = next(p for p in vendor_package.partitions if p.label == "DATA")
    with open(start, "r+b") as f:  # the box's own data, and a GPT the box's first boot rewrote
        f.seek(data.offset_sectors * SECTOR + (1 << 20))
        f.write(b"box data" * 512)
    sim = tmp_path / "sim.img"
    shutil.copyfile(start, sim)
    out = cli("verify", res.out_dir, "--simulate", sim, "--ota-from", str(data.index + 1))
    assert out.returncode == 0, out.stderr
    fresh = tmp_path / "fresh.img"
    assert cli("verify", res.out_dir, "--simulate", fresh).returncode == 0
    with open(sim, "rb") as s, open(start, "rb") as a, open(fresh, "rb") as b:
        for p in vendor_package.partitions:
            size = p.size_sectors * SECTOR
            s.seek(p.offset_sectors * SECTOR)
            got = s.read(size)
            (a if p.label == "DATA" else b).seek(p.offset_sectors * SECTOR)
            want = (a if p.label == "DATA" else b).read(size)
            assert got == want, p.label
    assert cli("verify", res.out_dir, "--ota-from", "7").returncode != 0  # needs --simulate


def test_push_resolves_fleet_devices_to_their_bundles_addresses_and_keys(tmp_path: Path) -> None:
    import json

    from builder.push.bundle import resolve_jobs
    from builder.push.ssh import parse_target

    fleet = tmp_path / "fleet"
    fleet.mkdir()
    (fleet / "known_hosts").write_text("airbox-a ssh-ed25519 AAAA\n")
    (fleet / "fleet.json").write_text(
        json.dumps(
            {
                "devices": {
                    "site-a": {"bundle": "site-a", "hostname": "airbox-a", "addresses": ["10.0.0.11"]},
                    "site-b": {"bundle": "site-b", "hostname": "airbox-b", "addresses": []},
                }
            }
        )
    )
    jobs, known = resolve_jobs(fleet, [], all_devices=True)
    assert known == fleet / "known_hosts"
    assert [(j.target.name, j.target.host, j.bundle.name) for j in jobs] == [
        ("site-a", "10.0.0.11", "site-a"),
        ("site-b", "airbox-b", "site-b"),
    ]
    (one,) = resolve_jobs(fleet, ["linaro@site-b"], all_devices=False)[0]
    assert one.target.user == "linaro" and one.target.label == "site-b (linaro@airbox-b)"
    with pytest.raises(AirboxError, match="not a device of this fleet") as e:
        resolve_jobs(fleet, ["site-c"], all_devices=False)
    assert "site-a, site-b" in (e.value.hint or "")
    with pytest.raises(AirboxError, match="--all needs a fleet output"):
        resolve_jobs(tmp_path, [], all_devices=True)
    t = parse_target("root@[::1]:2222")
    assert (t.user, t.host, t.port) == ("root", "::1", 2222)
    with pytest.raises(AirboxError, match="not a box address"):
        parse_target("a b")
