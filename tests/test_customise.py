"""Customising the images end to end, read back from a simulated flash with the real tools."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import cli, run_build, write_recipe

from builder.errors import BuildError, RecipeError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExample me@laptop"
HASH = "$6$saltsalt$" + "a" * 86


def simulate(out_dir: Path, tmp: Path) -> Path:
    parts = tmp / "parts"
    res = cli("verify", out_dir, "--simulate", tmp / "emmc.img", "--extract", parts)
    assert res.returncode == 0, res.stderr
    return parts


def stat(image: Path, path: str) -> dict[str, int | str]:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True).stdout
    fields: dict[str, int | str] = {}
    for line in out.splitlines():
        if line.startswith("Inode:"):
            parts = line.split()
            fields["type"] = parts[3]
            fields["mode"] = int(parts[5], 8)
        if line.startswith("User:"):
            parts = line.split()
            fields["uid"], fields["gid"] = int(parts[1]), int(parts[3])
    return fields


def cat(image: Path, path: str) -> bytes:
    return subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True
    ).stdout


def full_recipe(tmp: Path, base: Path) -> Path:
    (tmp / "files").mkdir(parents=True)
    (tmp / "files" / "notes.txt").write_bytes(b"binary\x00notes")
    (tmp / "templates").mkdir()
    (tmp / "templates" / "app.env.j2").write_text("SITE={{ vars.site }}\nNAME={{ recipe.name }}\n")
    ov = tmp / "overlay"
    (ov / "etc" / "profile.d").mkdir(parents=True)
    (ov / "etc" / "profile.d" / "airbox.sh").write_text("export AIRBOX=1\n")
    os.chmod(ov / "etc" / "profile.d" / "airbox.sh", 0o755)
    (ov / "etc" / "airbox.conf.j2").write_text("host={{ recipe.hostname }}\n")
    (ov / "opt" / "custom").mkdir(parents=True)
    (ov / "opt" / "custom" / "data.bin").write_bytes(b"\x01" * 5000)
    os.symlink("/opt/custom/data.bin", ov / "etc" / "custom-link")
    return write_recipe(
        tmp,
        base,
        name="full",
        vars={"site": "lab-3"},
        hostname="airbox-01",
        network={
            "ethernets": {
                "eth0": {"dhcp4": True},
                "eth1": {
                    "addresses": ["192.168.150.1/24"],
                    "gateway4": "192.168.150.254",
                    "nameservers": ["223.5.5.5", "119.29.29.29"],
                    "optional": True,
                },
            }
        },
        apt={"mirror": "https://mirrors.tuna.tsinghua.edu.cn/ubuntu-ports/"},
        pip={"index_url": "https://pypi.tuna.tsinghua.edu.cn/simple"},
        users={"linaro": {"ssh_authorized_keys": [KEY], "password_hash": HASH}},
        files=[
            {"path": "/etc/motd", "content": "Welcome to {{ recipe.name }}\n"},
            {"path": "/home/linaro/notes.txt", "source": "files/notes.txt", "owner": "linaro:linaro"},
            {"path": "/etc/default/app", "template": "templates/app.env.j2", "mode": "0600"},
            {"path": "/data/hello.txt", "content": "hi\n", "owner": "linaro", "mode": "0640"},
            {"path": "/etc/profile.d/x.sh", "content": "export X=1\n", "layer": "overlay"},
        ],
        overlays=[{"path": "overlay"}],
        remove=["/etc/update-motd.d/50-landscape-sysinfo"],
        services={"enable": ["resize-helper.service"], "disable": ["apt-daily.timer"]},
    )


@pytest.fixture(scope="module")
def full_build(vendor_package_session: vf.MiniPackage, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("full")
    recipe = full_recipe(tmp / "r", vendor_package_session.dir)
    res = run_build(recipe, tmp / "out", tmp / "cache")
    return res, simulate(res.out_dir, tmp), vendor_package_session


def test_every_injected_path_reads_back(full_build) -> None:  # type: ignore[no-untyped-def]
    _res, parts, _pkg = full_build
    rootfs, data, opt, rw = (parts / f"{n}.img" for n in ("ROOTFS", "DATA", "OPT", "ROOTFS_RW"))
    expected = {
        (rootfs, "/etc/motd"): (b"Welcome to full\n", 0o644, 0, 0),
        (rootfs, "/etc/hostname"): (b"airbox-01\n", 0o644, 0, 0),
        (rootfs, "/home/linaro/notes.txt"): (b"binary\x00notes", 0o644, 1000, 1000),
        (rootfs, "/etc/default/app"): (b"SITE=lab-3\nNAME=full\n", 0o600, 0, 0),
        (rootfs, "/etc/airbox.conf"): (b"host=airbox-01\n", 0o644, 0, 0),
        (rootfs, "/etc/profile.d/airbox.sh"): (b"export AIRBOX=1\n", 0o755, 0, 0),
        (rootfs, "/home/linaro/.ssh/authorized_keys"): (KEY.encode() + b"\n", 0o600, 1000, 1000),
        (data, "/hello.txt"): (b"hi\n", 0o640, 1000, 1000),
        (opt, "/custom/data.bin"): (b"\x01" * 5000, 0o644, 0, 0),
        (rw, "/overlay/etc/profile.d/x.sh"): (b"export X=1\n", 0o644, 0, 0),
    }
    for (img, path), (content, mode, uid, gid) in expected.items():
        assert cat(img, path) == content, path
        st = stat(img, path)
        assert (st["mode"], st["uid"], st["gid"]) == (mode, uid, gid), path
    assert stat(rootfs, "/home/linaro/.ssh") | {} == {
        "type": "directory",
        "mode": 0o700,
        "uid": 1000,
        "gid": 1000,
    }
    net = stat(rootfs, "/etc/netplan/01-netcfg.yaml")
    assert (net["mode"], net["uid"], net["gid"]) == (0o600, 0, 0)
    netplan = cat(rootfs, "/etc/netplan/01-netcfg.yaml").decode()
    assert (
        "                eth1:\n                        addresses: [192.168.150.1/24]\n"
        "                        optional: true\n" in netplan
    )
    import yaml

    doc = yaml.safe_load(netplan)["network"]
    assert doc["ethernets"]["eth1"]["gateway4"] == "192.168.150.254"
    assert doc["ethernets"]["eth1"]["nameservers"] == {"addresses": ["223.5.5.5", "119.29.29.29"]}
    assert "127.0.1.1\tairbox-01\n" in cat(rootfs, "/etc/hosts").decode()
    sources = cat(rootfs, "/etc/apt/sources.list").decode()
    mirror = "https://mirrors.tuna.tsinghua.edu.cn/ubuntu-ports/"
    for suite in ("focal", "focal-updates", "focal-backports", "focal-security"):
        assert f"deb {mirror} {suite} main restricted universe multiverse" in sources
    pipconf = cat(rootfs, "/etc/pip.conf").decode()
    assert "index-url = https://pypi.tuna.tsinghua.edu.cn/simple" in pipconf
    assert "trusted-host = pypi.tuna.tsinghua.edu.cn" in pipconf
    shadow = cat(rootfs, "/etc/shadow").decode()
    assert f"linaro:{HASH}:" in shadow
    sh = stat(rootfs, "/etc/shadow")
    assert (sh["mode"], sh["gid"]) == (0o640, 42)  # kept as the vendor had it
    link = subprocess.run(
        ["debugfs", "-R", "stat /etc/custom-link", str(rootfs)], capture_output=True, text=True
    )
    assert 'Fast link dest: "/opt/custom/data.bin"' in link.stdout
    wants = subprocess.run(
        ["debugfs", "-R", "ls /etc/systemd/system/timers.target.wants", str(rootfs)],
        capture_output=True,
        text=True,
    ).stdout
    assert "apt-daily.timer" not in wants
    gone = subprocess.run(
        ["debugfs", "-R", "stat /etc/update-motd.d/50-landscape-sysinfo", str(rootfs)],
        capture_output=True,
        text=True,
    )
    assert "not found" in gone.stderr


def test_all_ext4_clean_and_untouched_partitions_identical(full_build) -> None:  # type: ignore[no-untyped-def]
    res, parts, pkg = full_build
    for p in pkg.partitions:
        if p.fmt == vf.FMT_EXT4:
            r = subprocess.run(
                ["e2fsck", "-fn", str(parts / f"{p.label}.img")], capture_output=True, text=True
            )
            assert r.returncode == 0, (p.label, r.stdout)
    for label in ("BOOT", "RECOVERY", "MISC"):
        for name in pkg.partition(label).chunk_files:
            assert (res.card / name).read_bytes() == (pkg.dir / name).read_bytes()
    changed = {p["label"] for p in res.report["partitions"] if p["changed"]}
    assert changed == {"ROOTFS", "ROOTFS_RW", "OPT", "DATA"}


def test_only_chunks_with_changed_blocks_are_recompressed(full_build) -> None:  # type: ignore[no-untyped-def]
    res, parts, pkg = full_build
    step = pkg.chunk_sectors * 512
    for p in res.report["partitions"]:
        if not p["changed"]:
            continue
        old = pkg.partition(p["label"]).image.read_bytes()
        with open(parts / f"{p['label']}.img", "rb") as f:
            new = f.read(p["image_bytes_after"])
        differing = 0
        for k in range(-(-len(new) // step)):
            a, b = old[k * step : (k + 1) * step], new[k * step : (k + 1) * step]
            differing += a != b
        assert p["recompressed"] == differing, p


def test_report_lists_changes_with_digests_and_diffs(full_build) -> None:  # type: ignore[no-untyped-def]
    res, _parts, _pkg = full_build
    report = json.loads((res.out_dir / "build-report.json").read_text())
    by_path = {(c["partition"], c["path"]): c for c in report["changes"]}
    motd = by_path[("ROOTFS", "/etc/motd")]
    assert (
        motd["action"] == "added"
        and motd["size"] == 16
        and motd["mode"] == "0644"
        and len(motd["sha256"]) == 64
    )
    hosts = by_path[("ROOTFS", "/etc/hosts")]
    assert hosts["action"] == "changed" and "+127.0.1.1\tairbox-01" in hosts["diff"]
    assert by_path[("ROOTFS", "/etc/update-motd.d/50-landscape-sysinfo")]["action"] == "removed"
    assert by_path[("ROOTFS_RW", "/overlay/etc/profile.d/x.sh")]["action"] == "added"


def test_shadowed_files_in_rootfs_rw_are_removed(make_vendor_package, tmp_path: Path) -> None:
    pkg = make_vendor_package(
        rw_overlay_files={"/etc/netplan/01-netcfg.yaml": "network: {version: 2}\n"},
        rw_whiteouts=("/etc/motd",),
        rw_opaque_dirs=("/etc/default",),
    )
    recipe = write_recipe(
        tmp_path / "r",
        pkg.dir,
        name="shadow",
        network={"ethernets": {"eth0": {"dhcp4": True}}},
        files=[{"path": "/etc/motd", "content": "hello\n"}, {"path": "/etc/default/app", "content": "A=1\n"}],
    )
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    parts = simulate(res.out_dir, tmp_path)
    rw = parts / "ROOTFS_RW.img"
    for path in ("/overlay/etc/netplan/01-netcfg.yaml", "/overlay/etc/motd"):
        r = subprocess.run(["debugfs", "-R", f"stat {path}", str(rw)], capture_output=True, text=True)
        assert "not found" in r.stderr, path
    xattrs = subprocess.run(
        ["debugfs", "-R", "ea_list /overlay/etc/default", str(rw)], capture_output=True, text=True
    )
    assert "trusted.overlay.opaque" not in xattrs.stdout
    actions = {(c["path"], c["action"]) for c in res.report["changes"]}
    assert ("/overlay/etc/netplan/01-netcfg.yaml", "shadow-removed") in actions
    assert ("/overlay/etc/motd", "shadow-removed") in actions
    assert ("/overlay/etc/default", "opaque-cleared") in actions
    assert cat(parts / "ROOTFS.img", "/etc/motd") == b"hello\n"


def test_too_big_file_stops_with_numbers_and_layout_hint(vendor_package_session, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) * 20)  # 20 MiB into a 16 MiB DATA partition
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package_session.dir,
        name="big",
        files=[{"path": "/data/big.bin", "source": str(big)}],
    )
    with pytest.raises(BuildError) as e:
        run_build(recipe, tmp_path / "out", tmp_path / "cache")
    assert "DATA" in e.value.message and "short by" in e.value.message
    assert "layout: {DATA:" in (e.value.hint or "")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"users": {"nobody2": {"ssh_authorized_keys": [KEY]}}}, "does not exist in the image's /etc/passwd"),
        ({"files": [{"path": "/etc/x", "content": "a", "owner": "linaro:nogroup2"}]}, "group 'nogroup2'"),
        ({"files": [{"path": "/etc/x", "content": "{{ vars.nope }}"}]}, "unknown template variable"),
        ({"files": [{"path": "/boot/x", "content": "a"}]}, "writing under /boot is not supported"),
        ({"services": {"enable": ["nosuch.service"]}}, "no unit file"),
    ],
)
def test_build_time_errors_name_the_recipe_entry(
    sections: dict, message: str, vendor_package_session, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="bad", **sections)
    with pytest.raises((RecipeError, BuildError)) as e:
        run_build(recipe, tmp_path / "out", tmp_path / "cache")
    assert message in str(e.value)
    assert "bad.yaml" in (e.value.where or "")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ({"ethernets": {"eth1": {"addresses": ["192.168.150.300/24"]}}}, "CIDR|address"),
        ({"ethernets": {"eth1": {"addresses": ["10.0.0.2/24"], "gateway4": "10.0.1.1"}}}, "subnet"),
        (
            {"ethernets": {"eth0": {"addresses": ["10.0.0.2/24"]}, "eth1": {"addresses": ["10.0.0.2/24"]}}},
            "already an address",
        ),
        ({"ethernets": {"eth/0": {"dhcp4": True}}}, "interface name"),
        (
            {"ethernets": {"eth0": {"dhcp4": True}}, "bonds": {"bond0": {"interfaces": ["eth0", "eth9"]}}},
            "eth9",
        ),
    ],
)
def test_network_validation_errors_via_cli(
    network: dict, message: str, vendor_package_session, tmp_path: Path
) -> None:
    import re

    recipe = write_recipe(tmp_path, vendor_package_session.dir, name="net", network=network)
    out = cli(recipe, "-o", tmp_path / "out")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert re.search(message, out.stderr), out.stderr
    assert "net.yaml:" in out.stderr


def test_plaintext_password_and_traversal_refused(vendor_package_session, tmp_path: Path) -> None:
    r1 = write_recipe(
        tmp_path / "a", vendor_package_session.dir, name="pw", users={"linaro": {"password": "linaro"}}
    )
    out = cli(r1)
    assert out.returncode == 1 and "plaintext" in out.stderr
    r2 = write_recipe(
        tmp_path / "b",
        vendor_package_session.dir,
        name="dots",
        files=[{"path": "/etc/../../x", "content": "a"}],
    )
    out = cli(r2)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "dots.yaml:" in out.stderr


def test_overlay_symlink_pointing_out_is_refused(vendor_package_session, tmp_path: Path) -> None:
    ov = tmp_path / "r" / "ov" / "etc"
    ov.mkdir(parents=True)
    os.symlink("../../../../host-secret", ov / "evil")
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="ovl", overlays=[{"path": "ov"}])
    with pytest.raises(RecipeError, match="points out of the overlay"):
        run_build(recipe, tmp_path / "out", tmp_path / "cache")


def test_overlay_dir_symlink_is_laid_down_not_followed(vendor_package_session, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    ov = tmp_path / "r" / "ov" / "etc"
    ov.mkdir(parents=True)
    os.symlink(outside, ov / "linked")  # absolute host path: laid down as a link, never read
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="ovl2", overlays=[{"path": "ov"}])
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    parts = simulate(res.out_dir, tmp_path)
    r = subprocess.run(
        ["debugfs", "-R", "stat /etc/linked", str(parts / "ROOTFS.img")], capture_output=True, text=True
    )
    assert "Type: symlink" in r.stdout
    r = subprocess.run(
        ["debugfs", "-R", "stat /etc/linked/secret", str(parts / "ROOTFS.img")],
        capture_output=True,
        text=True,
    )
    assert "not found" in r.stderr or "secret" not in r.stdout
    # nothing of the host file reached any partition
    images = sorted(parts.glob("*.img"))
    assert images
    for image in images:
        with open(image, "rb") as f:
            tail = b""
            while block := f.read(1 << 20):
                assert b"host secret" not in tail + block, image
                tail = block[-16:]


def test_recompressed_chunks_are_deterministic_gzip(full_build) -> None:  # type: ignore[no-untyped-def]
    res, _parts, pkg = full_build
    vendor = {p.read_bytes() for p in pkg.dir.glob("*.gz")}
    for gz in res.card.glob("*.gz"):
        raw = gz.read_bytes()
        if raw not in vendor:
            # gzip, deflate, no flags (so no file name), mtime 0, OS "unknown": the same bytes anywhere
            assert raw[:4] == b"\x1f\x8b\x08\x00" and raw[4:8] == b"\0\0\0\0" and raw[9] == 0xFF, raw[
                :10
            ].hex()
            gzip.decompress(raw)


def _features(image: Path) -> set[str]:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Filesystem features:"))
    return set(line.split(":", 1)[1].split())


def test_ext4_feature_set_is_kept(full_build) -> None:  # type: ignore[no-untyped-def]
    _res, parts, pkg = full_build
    for label in ("ROOTFS", "ROOTFS_RW", "OPT", "DATA"):
        before = _features(pkg.partition(label).image)
        after = _features(parts / f"{label}.img")
        assert after == before, label
        assert "orphan_file" not in after and "metadata_csum_seed" not in after


def test_a_unit_written_by_files_can_be_enabled(vendor_package_session, tmp_path: Path) -> None:
    """Steps see what earlier steps wrote: a unit laid down by `files:` is enabled by `services:`."""
    unit = "[Unit]\nDescription=hi\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package_session.dir,
        name="unitfiles",
        files=[{"path": "/etc/systemd/system/hello.service", "content": unit}],
        services={"enable": ["hello.service"]},
    )
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    parts = simulate(res.out_dir, tmp_path)
    assert cat(parts / "ROOTFS.img", "/etc/systemd/system/hello.service") == unit.encode()
    wants = "/etc/systemd/system/multi-user.target.wants/hello.service"
    link = stat(parts / "ROOTFS.img", wants)
    assert link["type"] == "symlink"
    r = subprocess.run(
        ["debugfs", "-R", f"stat {wants}", str(parts / "ROOTFS.img")],
        capture_output=True,
        text=True,
    )
    assert '"/etc/systemd/system/hello.service"' in r.stdout


def test_rootfs_rw_keeps_room_for_the_overlay(make_vendor_package, tmp_path: Path) -> None:
    """A ROOTFS_RW filled by the recipe would make the box mount its root read-only: refused."""
    pkg = make_vendor_package(slack_kb={"ROOTFS_RW": 3072})
    blob = tmp_path / "r" / "blob.bin"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(random.Random(7).randbytes(2560 * 1024))
    big = write_recipe(
        tmp_path / "r",
        pkg.dir,
        name="rwfull",
        files=[{"path": "/etc/blob.bin", "source": "blob.bin", "layer": "overlay"}],
    )
    out = cli("--json", big, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert out.returncode == 1
    err = [json.loads(ln) for ln in out.stdout.splitlines()][-1]
    assert "ROOTFS_RW would have" in err["message"] and "read-only" in err["message"]
    assert "layer: base" in err["hint"]
    small = write_recipe(
        tmp_path / "r",
        pkg.dir,
        name="rwok",
        files=[{"path": "/etc/x.conf", "content": "x\n", "layer": "overlay"}],
    )
    assert cli(small, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache").returncode == 0


def test_a_unit_linked_by_an_overlay_can_be_enabled(vendor_package_session, tmp_path: Path) -> None:
    """A unit file written by `files:` and linked into /etc/systemd/system by an overlay (as
    packages link their units) is found through the pending link by `services:`."""
    unit = "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"
    ov = tmp_path / "r" / "ov" / "etc" / "systemd" / "system"
    ov.mkdir(parents=True)
    os.symlink("../../../usr/local/lib/hello/hello.service", ov / "hello.service")
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package_session.dir,
        name="unitlink",
        overlays=[{"path": "ov"}],
        files=[{"path": "/usr/local/lib/hello/hello.service", "content": unit}],
        services={"enable": ["hello.service"]},
    )
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    parts = simulate(res.out_dir, tmp_path)
    wants = "/etc/systemd/system/multi-user.target.wants/hello.service"
    assert stat(parts / "ROOTFS.img", wants)["type"] == "symlink"
    assert cat(parts / "ROOTFS.img", "/usr/local/lib/hello/hello.service") == unit.encode()


def test_a_vendor_unit_not_enabled_in_the_image_gets_its_links(
    vendor_package_session, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """services.enable on a unit the image ships but does not enable: the link `systemctl enable`
    makes (WantedBy=sysinit.target) appears, pointing at the vendor's unit file."""
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package_session.dir,
        name="enable",
        services={"enable": ["systemd-timesyncd.service"]},
    )
    wants = "/etc/systemd/system/sysinit.target.wants/systemd-timesyncd.service"
    before = subprocess.run(
        ["debugfs", "-R", f"stat {wants}", str(vendor_package_session.partition("ROOTFS").image)],
        capture_output=True,
        text=True,
    )
    assert "File not found" in before.stderr  # not enabled in the vendor image
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    parts = simulate(res.out_dir, tmp_path)
    assert stat(parts / "ROOTFS.img", wants)["type"] == "symlink"
    r = subprocess.run(
        ["debugfs", "-R", f"stat {wants}", str(parts / "ROOTFS.img")], capture_output=True, text=True
    )
    assert '"/lib/systemd/system/systemd-timesyncd.service"' in r.stdout
    added = [c for c in res.report["changes"] if c["device_path"] == wants]
    assert added and added[0]["action"] == "added"


# ---------------------------------------------------------------------------------------------
# Found by mutation testing (scripts/mutants.py): each test fails on a mutant that survived.


def test_netplan_defaults_renderer_and_optional(full_build) -> None:  # type: ignore[no-untyped-def]
    """An ethernet the recipe leaves `optional` unset is written optional (the vendor's bm_set_ip
    edits the range up to `optional`), and the renderer is networkd unless the recipe says."""
    import yaml

    _res, parts, _pkg = full_build
    doc = yaml.safe_load(cat(parts / "ROOTFS.img", "/etc/netplan/01-netcfg.yaml"))["network"]
    assert doc["renderer"] == "networkd"
    assert doc["ethernets"]["eth0"] == {"dhcp4": True, "addresses": [], "optional": True}


def test_a_missing_group_names_the_groups_there_are(vendor_package_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = write_recipe(
        tmp_path / "r", vendor_package_session.dir, name="grp", users={"linaro": {"groups": ["wheel"]}}
    )
    with pytest.raises(RecipeError) as e:
        run_build(recipe, tmp_path / "out", tmp_path / "cache")
    assert "group 'wheel'" in str(e.value)
    assert e.value.hint is not None and e.value.hint.startswith("groups: ") and "sudo" in e.value.hint


def test_disabling_a_unit_the_image_does_not_enable_warns(vendor_package_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = write_recipe(
        tmp_path / "r", vendor_package_session.dir, name="dis", services={"disable": ["apt-daily.service"]}
    )
    res = cli("--json", "build", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    warnings = [json.loads(line) for line in res.stdout.splitlines() if '"warning"' in line]
    assert any(
        "apt-daily.service is not enabled in the image; nothing to disable" in w["message"] for w in warnings
    )


def test_an_overlay_with_a_boot_folder_is_refused_naming_the_overlay(
    vendor_package_session, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    ov = tmp_path / "r" / "ov"
    (ov / "boot").mkdir(parents=True)
    (ov / "boot" / "uEnv.txt").write_text("x\n")
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="ovb", overlays=[{"path": "ov"}])
    with pytest.raises(
        RecipeError, match=r"overlay .* has a boot/ folder; writing under /boot is not supported"
    ):
        run_build(recipe, tmp_path / "out", tmp_path / "cache")


def test_an_overlay_holding_a_fifo_is_refused(vendor_package_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ov = tmp_path / "r" / "ov" / "etc"
    ov.mkdir(parents=True)
    os.mkfifo(ov / "pipe")
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="ovf", overlays=[{"path": "ov"}])
    with pytest.raises(RecipeError, match="is not a regular file, folder or symlink"):
        run_build(recipe, tmp_path / "out", tmp_path / "cache")


def _inode(image: Path, path: str) -> int:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True).stdout
    return int(out.split()[1])


def test_an_overlay_is_laid_down_in_name_order_not_in_the_hosts_listing_order(  # type: ignore[no-untyped-def]
    vendor_package_session, tmp_path: Path
) -> None:
    """The overlay's folders are walked in sorted order, not in the order the host's filesystem
    lists them (ext4 lists by hash, tmpfs by age): the folders get their inodes in name order,
    so the image does not depend on the machine that built it."""
    names = [f"d{i:02d}" for i in range(24)]
    ov = tmp_path / "r" / "ov" / "srv"
    for name in names[::-1]:
        (ov / name).mkdir(parents=True)
        (ov / name / "f").write_text(name)
    assert os.listdir(ov) != names  # the host does not list them sorted (else this proves nothing)
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="ovo", overlays=[{"path": "ov"}])
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    parts = simulate(res.out_dir, tmp_path)
    inodes = [_inode(parts / "ROOTFS.img", f"/srv/{name}") for name in names]
    assert inodes == sorted(inodes)


def test_fstab_mount_points_by_device_partlabel_and_partuuid(vendor_package_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The image's fstab.emmc.ro names partitions as /dev/mmcblk0pN, PARTLABEL= or PARTUUID= (the
    GPT's unique GUID); entries of other devices (tmpfs, proc, /dev/root) and the root are not
    mount points of a partition."""
    from builder.customise.mounts import _parse_fstab
    from builder.package.flashplan import read_flash_plan
    from builder.package.source import open_package

    with open_package(vendor_package_session.dir, tmp_path / "work") as files:
        plan = read_flash_plan(files)
    mounts = {(m.point, m.label) for m in _parse_fstab(vf.FSTAB_EMMC_RO, plan)}
    assert mounts == {("/media/root-rw", "ROOTFS_RW"), ("/opt", "OPT"), ("/data", "DATA"), ("/boot", "BOOT")}
    data_guid = str(plan.gpt.entries[6].unique_guid).upper()
    text = f"PARTUUID={data_guid}\t/data\text4\tdefaults\t0\t2\nPARTLABEL=OPT\t/opt\text4\tdefaults\t0\t2\n"
    text += "tmpfs\t/run/x\ttmpfs\tdefaults\t0\t0\nLABEL=nothing\t/mnt\text4\tdefaults\t0\t0\n"
    assert {(m.point, m.label) for m in _parse_fstab(text, plan)} == {("/data", "DATA"), ("/opt", "OPT")}


def test_the_overlay_layer_takes_root_paths_only(vendor_package_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package_session.dir,
        name="lay",
        files=[{"path": "/data/x", "content": "x", "layer": "overlay"}],
    )
    with pytest.raises(RecipeError, match=r"layer: overlay applies to root paths only; /data/x is on DATA"):
        run_build(recipe, tmp_path / "out", tmp_path / "cache")


def test_report_diffs_are_unified_diffs_line_by_line(full_build) -> None:  # type: ignore[no-untyped-def]
    res, _parts, _pkg = full_build
    hostname = next(c for c in res.report["changes"] if c["path"] == "/etc/hostname")
    lines = hostname["diff"].splitlines(keepends=True)
    assert lines[0] == "--- a/etc/hostname\n" and lines[1] == "+++ b/etc/hostname\n"
    assert lines[2].startswith("@@ ") and "+airbox-01\n" in lines


def test_hostname_keeps_the_files_attributes_and_adds_the_hosts_line(
    make_vendor_package, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """An image whose /etc/hostname is 0640 keeps 0640; an /etc/hosts without a 127.0.1.1 line
    gets one right after 127.0.0.1, as Debian's installer writes it."""
    pkg = make_vendor_package(
        extra_files={
            "ROOTFS": {
                "/etc/hostname": vf.file_node(b"bm1684\n", 0o640),
                "/etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n",
            }
        }
    )
    recipe = write_recipe(tmp_path / "r", pkg.dir, name="hn", hostname="airbox-07")
    res = run_build(recipe, tmp_path / "out", tmp_path / "cache")
    parts = simulate(res.out_dir, tmp_path)
    assert stat(parts / "ROOTFS.img", "/etc/hostname")["mode"] == 0o640
    assert cat(parts / "ROOTFS.img", "/etc/hostname") == b"airbox-07\n"
    hosts = cat(parts / "ROOTFS.img", "/etc/hosts").decode()
    assert hosts == "127.0.0.1\tlocalhost\n127.0.1.1\tairbox-07\n::1\tlocalhost ip6-localhost\n"
