"""The vendor-package fixture checked with the real tools (it is the yardstick for the product)."""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
import vendor_fixture as vf

TRIPLE = re.compile(
    r"^load \$\{devtype\} \$\{devnum\}:\$\{distro_bootpart\} \$\{ramdisk_addr_r\} /\$ota_path/(\S+)\n"
    r"(?:.*\n){5}\n"
    r"unzip \$\{ramdisk_addr_r\} \$\{unzip_addr\} (0x[0-9a-f]{8})\n"
    r"(?:.*\n){5}\n"
    r"mmc write \$\{unzip_addr\} (0x[0-9a-f]{8}) (0x[0-9a-f]{8})\n",
    re.MULTILINE,
)
# ext4 features e2fsck 1.45.4 (the device's initramfs) understands and mke2fs 1.45 enables.
OLD_FEATURES = {
    "has_journal",
    "ext_attr",
    "resize_inode",
    "dir_index",
    "filetype",
    "extent",
    "64bit",
    "flex_bg",
    "sparse_super",
    "large_file",
    "huge_file",
    "dir_nlink",
    "extra_isize",
    "metadata_csum",
}


def run(*cmd: str | Path, cwd: Path | None = None, stderr: bool = True) -> str:
    """Run a tool that must succeed; its stdout (+ stderr, where tools like sgdisk warn)."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, cwd=cwd, check=False)
    assert proc.returncode == 0, f"{cmd}: rc={proc.returncode}\n{proc.stderr.decode()}"
    return proc.stdout.decode(errors="replace") + (proc.stderr.decode(errors="replace") if stderr else "")


def debugfs(image: Path | None, request: str) -> str:
    assert image is not None
    return run("debugfs", "-R", request, image, stderr=False)


def triples(text: str) -> list[tuple[str, int, int, int]]:
    return [(m[1], int(m[2], 16), int(m[3], 16), int(m[4], 16)) for m in TRIPLE.finditer(text)]


def gz_header(data: bytes) -> tuple[int, str]:
    """(mtime, stored file name) from a gzip member header."""
    magic, method, flags, mtime = struct.unpack("<HBBI", data[:8])
    assert (magic, method) == (0x8B1F, 8)
    assert flags & 0x08, "no FNAME: the vendor's `gzip FILE` always stores the name"
    name = data[10 : data.index(b"\0", 10)].decode()
    return mtime, name


def expand_gpt(gpt: bytes, disk_kb: int, path: Path) -> Path:
    with open(path, "wb") as f:
        f.write(gpt)
        f.truncate(disk_kb * 1024)
    return path


# ----------------------------------------------------------------------------- file set


def test_file_set_is_the_vendor_listing(vendor_package_session: vf.MiniPackage) -> None:
    pkg = vendor_package_session
    expected = {
        "BOOT",
        "fip.bin",
        "spi_flash.bin",
        "spi_flash_bm1684.bin",
        "spi_flash_bm1684x.bin",
        "partition32G.xml",
        "md5.txt",
        "gpt.gz",
    }
    for base in ("boot", "boot_spif", "boot_emmc", "boot_emmc-gpt"):
        expected |= {f"{base}.cmd", f"{base}.scr"}
    for p in pkg.partitions:
        expected |= {f"boot_emmc-{p.name}.cmd", f"boot_emmc-{p.name}.scr", *p.chunk_files}
        m = len(p.chunk_files)
        assert list(p.chunk_files) == [f"{p.name}.{k}-of-{m}.gz" for k in range(1, m + 1)]
    assert set(pkg.file_names()) == expected
    assert (pkg.dir / "BOOT").stat().st_size == 0
    # several chunks, last one partial, for the ext4 partitions (the point of a small C)
    rootfs = pkg.partition("ROOTFS")
    assert len(rootfs.chunk_files) >= 3
    assert rootfs.chunk_bytes[-1] < pkg.chunk_sectors * vf.SECTOR


def test_scr_files_wrap_the_cmd_text(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> None:
    scrs = sorted(vendor_package_session.dir.glob("*.scr"))
    assert len(scrs) == 4 + len(vendor_package_session.partitions)
    for scr in scrs:
        listing = run("dumpimage", "-l", scr)
        assert f"Image Name:   {scr.stem}\n" in listing
        assert "Image Type:   AArch64 Linux Script (uncompressed)" in listing
        assert "Load Address: 00000000" in listing and "Entry Point:  00000000" in listing
        out = tmp_path / f"{scr.stem}.payload"
        run("dumpimage", "-T", "script", "-p", "0", "-o", out, scr)
        text = scr.with_suffix(".cmd").read_bytes()
        payload = out.read_bytes()
        assert payload[:8] == struct.pack(">II", len(text), 0)
        assert payload[8:] == text
        assert scr.read_bytes()[72:] == text


def test_gpt_script_is_the_documented_text(vendor_package_session: vf.MiniPackage) -> None:
    err = "if test $? -ne 0; then\nled status off\nled error off\n"
    load_failed = 'while true; do; echo "ERROR: load package failed"; sleep 0.5; done; fi;\n'
    expected = (
        "# mmc gpt file\n\n"
        'if test -n $load_partition; then echo "skip empty part_num partition ";  exit; fi;\n\n'
        "load ${devtype} ${devnum}:${distro_bootpart} ${ramdisk_addr_r} /$ota_path/gpt.gz\n"
        f"{err}{load_failed}echo\n\n"
        "unzip ${ramdisk_addr_r} ${unzip_addr} 0x00004400\n"
        f"{err}{load_failed}echo\n\n"
        "mmc write ${unzip_addr} 0x00000000 0x00000022\n"
        f'{err}while true; do; echo "ERROR: eMMC write failed"; sleep 0.5; done; fi;\necho\n\n'
    )
    assert (vendor_package_session.dir / "boot_emmc-gpt.cmd").read_text() == expected


def test_partition_scripts_describe_their_chunks(vendor_package_session: vf.MiniPackage) -> None:
    pkg = vendor_package_session
    c = pkg.chunk_sectors
    for p in pkg.partitions:
        text = (pkg.dir / p.script).read_text()
        lines = text.splitlines()
        assert lines[0] == f"# Partition {p.index} ({p.name})"
        assert (lines[1] == f"bm_savelog mmc 0:1 {p.index}.log") == (p.index > 2)
        skip = f"if test $load_partition -eq {p.index + 1}; then"
        assert sum(skip in ln for ln in lines) == 1
        found = triples(text)
        assert [t[0] for t in found] == list(p.chunk_files)
        for k, (name, nbytes, offset, count) in enumerate(found):
            unzipped = gzip.decompress((pkg.dir / name).read_bytes())
            assert nbytes == len(unzipped) == p.chunk_bytes[k]
            assert offset == p.offset_sectors + k * c
            assert count == -(-nbytes // 512)
            assert nbytes == c * 512 or k == len(found) - 1


def test_emmc_script_sources_every_partition_in_order(vendor_package_session: vf.MiniPackage) -> None:
    pkg = vendor_package_session
    text = (pkg.dir / "boot_emmc.cmd").read_text()
    sourced = re.findall(r"^load .* \$\{scriptaddr\} /\$ota_path/(boot_emmc-\S+)\.scr$", text, re.MULTILINE)
    assert sourced == ["boot_emmc-gpt"] + [f"boot_emmc-{p.name}" for p in pkg.partitions]
    assert text.startswith("# eMMC image\n\nmmc dev 0\n")
    assert text.splitlines()[-4:-2] == ["echo eMMC update done", "bm_savelog mmc 0:1 end.log"]


def test_top_script(vendor_package_session: vf.MiniPackage) -> None:
    lines = (vendor_package_session.dir / "boot.cmd").read_text().splitlines()
    assert lines[:2] == ["# Bitmain sdcard recovery U-Boot script", "# Created Thu Jun  6 10:20:30 CST 2024"]
    assert "# open fan" in lines  # the AirBox (Radxa) packer
    assert (
        lines.index("echo update SPI flash") < lines.index("echo update eMMC") < lines.index("echo all done")
    )
    assert not any("post.scr" in ln for ln in lines)
    assert lines[-1] == 'echo "Please remove the installation medium, then reboot"; sleep 0.5; done;'


def test_chunks_gunzip_to_the_image(vendor_package_session: vf.MiniPackage) -> None:
    pkg = vendor_package_session
    for p in pkg.partitions:
        assert p.image is not None
        joined = b"".join(gzip.decompress((pkg.dir / n).read_bytes()) for n in p.chunk_files)
        assert joined == p.image.read_bytes()
        for n in p.chunk_files:
            mtime, name = gz_header((pkg.dir / n).read_bytes())
            assert (mtime, name) == (pkg.options.epoch, n.removesuffix(".gz"))
        # the real gunzip reads the chunks as one multi-member stream, as a user would
        cat = b"".join((pkg.dir / n).read_bytes() for n in p.chunk_files)
        out = subprocess.run(["gunzip", "-c"], input=cat, capture_output=True, check=True).stdout
        assert hashlib.sha256(out).digest() == hashlib.sha256(joined).digest()


def test_md5_txt_is_md5sum_star(vendor_package_session: vf.MiniPackage) -> None:
    pkg = vendor_package_session
    run("md5sum", "-c", "--quiet", "md5.txt", cwd=pkg.dir)
    lines = (pkg.dir / "md5.txt").read_text().splitlines()
    names = [ln.split("  ", 1)[1] for ln in lines]
    assert all(re.fullmatch(r"[0-9a-f]{32}  \S+", ln) for ln in lines)
    assert names == sorted(n for n in pkg.file_names() if n != "md5.txt")  # not itself, C order
    digest = hashlib.md5((pkg.dir / "gpt.gz").read_bytes()).hexdigest()
    assert f"{digest}  gpt.gz" in lines


def test_xml_layout(vendor_package_session: vf.MiniPackage) -> None:
    pkg = vendor_package_session
    text = pkg.xml_text
    root = ET.fromstring(text)
    assert root.tag == "physical_partition" and root.get("size_in_kb") == str(vf.MINI_DISK_KB)
    parts = [
        (e.get("label"), int(e.get("size_in_kb", 0)), e.get("readonly"), int(e.get("format", -1)))
        for e in root
    ]
    assert parts == [(p.label, p.size_kb, "true" if p.readonly else "false", p.fmt) for p in vf.MINI_LAYOUT]
    assert all(ln.startswith("\t<partition label=") for ln in text.splitlines()[1:-1])
    assert text.endswith("</physical_partition>\n")
    # the packer's own parse (grep -Po 'label=".+"' | awk -F'"' '{print $2}') sees the same labels
    labels = run("bash", "-c", f"grep -Po 'label=\".+\"' {pkg.xml} | awk -F'\"' '{{print tolower($2)}}'")
    assert labels.split() == [p.name for p in pkg.partitions]


# ----------------------------------------------------------------------------- GPT


def test_gpt_file_reads_back_with_sgdisk(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> None:
    pkg = vendor_package_session
    gpt = gzip.decompress((pkg.dir / "gpt.gz").read_bytes())
    assert gpt == pkg.gpt_bytes and len(gpt) == vf.GPT_FILE_BYTES
    assert gpt[510:512] == b"\x55\xaa" and gpt[450] == 0xEE and gpt[512:520] == b"EFI PART"
    disk = expand_gpt(gpt, pkg.disk_kb, tmp_path / "disk.img")
    listing = run("sgdisk", "-p", disk)
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+.*?\s0700\s+(\S+)$", listing, re.MULTILINE)
    assert [(int(n), int(s), int(e), name) for n, s, e, name in rows] == [
        (p.index + 1, p.offset_sectors, p.offset_sectors + p.size_sectors - 1, p.label)
        for p in pkg.partitions
    ]
    for p in pkg.partitions:
        info = run("sgdisk", "-i", str(p.index + 1), disk)
        assert "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" in info
        assert ("Attribute flags: 1000000000000000" in info) == p.readonly
    verify = run("sgdisk", "-v", disk)
    assert "Main header: OK" in verify and "Main partition table: OK" in verify
    assert "Backup header: ERROR" in verify  # mk_gpt writes no backup GPT
    run("sgdisk", "-e", disk)  # what resize-helper does on first boot
    assert "No problems found" in run("sgdisk", "-v", disk)


def test_gpt_is_seeded() -> None:
    a = vf.encode_gpt(vf.MINI_LAYOUT, vf.MINI_DISK_KB, 1)
    assert a == vf.encode_gpt(vf.MINI_LAYOUT, vf.MINI_DISK_KB, 1)
    b = vf.encode_gpt(vf.MINI_LAYOUT, vf.MINI_DISK_KB, 2)
    assert a[:512] == b[:512] and a[568:584] != b[568:584]


# ----------------------------------------------------------------------------- partition images


def test_ext4_images_are_clean_shrunk_and_focal_compatible(vendor_package_session: vf.MiniPackage) -> None:
    for p in vendor_package_session.partitions:
        if p.fmt != vf.FMT_EXT4:
            continue
        assert p.image is not None
        run("e2fsck", "-fn", p.image)
        head = run("dumpe2fs", "-h", p.image)
        features = set(re.search(r"^Filesystem features:\s+(.*)$", head, re.MULTILINE)[1].split())
        assert features <= OLD_FEATURES and "metadata_csum" in features and "has_journal" in features
        free = int(re.search(r"^Free blocks:\s+(\d+)$", head, re.MULTILINE)[1])
        total = int(re.search(r"^Block count:\s+(\d+)$", head, re.MULTILINE)[1])
        assert "Block size:               4096" in head
        assert free < total // 20, "resize2fs -M leaves almost no free blocks"
        assert p.image.stat().st_size == total * 4096 < p.size_sectors * 512


def test_boot_is_a_full_size_fat(vendor_package_session: vf.MiniPackage) -> None:
    boot = vendor_package_session.partition("BOOT")
    assert boot.image is not None and boot.image.stat().st_size == boot.size_sectors * 512
    run("fsck.fat", "-n", boot.image)
    listing = run("mdir", "-i", boot.image, "-b", "::/")
    assert "::/Image" in listing and "::/emmcboot.itb" in listing


def test_misc_is_zeros(vendor_package_session: vf.MiniPackage) -> None:
    misc = vendor_package_session.partition("MISC")
    assert misc.image is not None
    assert misc.image.read_bytes() == bytes(misc.size_sectors * 512)


def test_rootfs_is_a_miniature_focal(vendor_package_session: vf.MiniPackage) -> None:
    rootfs = vendor_package_session.partition("ROOTFS").image
    assert rootfs is not None
    passwd = debugfs(rootfs, "cat /etc/passwd")
    assert "linaro:x:1000:1000:" in passwd and "admin:x:1001:1001:" in passwd
    assert "VERSION_CODENAME=focal" in debugfs(rootfs, "cat /usr/lib/os-release")
    assert 'Fast link dest: "../usr/lib/os-release"' in debugfs(rootfs, "stat /etc/os-release")
    assert "127.0.1.1\tbm1684" in debugfs(rootfs, "cat /etc/hosts")
    fstab = debugfs(rootfs, "cat /etc/fstab.emmc.ro")
    for dev, mnt in (
        ("p4", "/media/root-ro"),
        ("p5", "/media/root-rw"),
        ("p6", "/opt"),
        ("p7", "/data"),
        ("p1", "/boot"),
    ):
        assert re.search(rf"^/dev/mmcblk0{dev}\t{mnt}\t", fstab, re.MULTILINE), dev
    netplan = debugfs(rootfs, "cat /etc/netplan/01-netcfg.yaml")
    assert "\n        ethernets:\n" in netplan and "addresses: [192.168.150.1/24]" in netplan
    assert "ports.ubuntu.com/ubuntu-ports/ focal main" in debugfs(rootfs, "cat /etc/apt/sources.list")
    home = debugfs(rootfs, "stat /home/linaro")
    assert re.search(r"User:\s+1000\s+Group:\s+1000", home)
    shadow = debugfs(rootfs, "stat /etc/shadow")
    assert "Mode:  0640" in shadow and re.search(r"Group:\s+42\b", shadow)
    wants = debugfs(rootfs, "ls /etc/systemd/system/multi-user.target.wants")
    assert "bmrt_setup.service" in wants and "resize-helper.service" in wants
    assert "Mode:  0755" in debugfs(rootfs, "stat /usr/sbin/bm_set_ip")
    assert "Mode:  04755" in debugfs(rootfs, "stat /usr/bin/sudo")
    assert "Type: symlink" in debugfs(rootfs, "stat /etc/update-motd.d/50-landscape-sysinfo")
    assert "Links: 2" in debugfs(rootfs, "stat /usr/bin/perl")


def test_other_ext4_partitions(vendor_package_session: vf.MiniPackage) -> None:
    pkg = vendor_package_session
    opt, rw, data = (pkg.partition(x).image for x in ("OPT", "ROOTFS_RW", "DATA"))
    assert opt is not None and rw is not None and data is not None
    assert "Size: 60000" in debugfs(opt, "stat /sophon/libsophon-0.5.1/lib/libbmlib.so.0")
    assert "opencv-python" in debugfs(opt, "ls /sophon/sophon-opencv_1.8.0")
    rw_root = debugfs(rw, "ls /")
    assert "overlay " in rw_root and "overlay-workdir" in rw_root
    assert "README.txt" in debugfs(data, "ls /")


# ----------------------------------------------------------------------------- determinism and copies


def test_build_is_reproducible(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> None:
    again = vf.build_package(tmp_path / "again")
    a, b = vendor_package_session, again
    assert a.file_names() == b.file_names()
    for name in a.file_names():
        assert (a.dir / name).read_bytes() == (b.dir / name).read_bytes(), name
    for pa, pb in zip(a.partitions, b.partitions, strict=True):
        assert pa.image is not None and pb.image is not None
        assert pa.image.read_bytes() == pb.image.read_bytes(), pa.label


def test_fresh_copy_is_independent(
    vendor_package: vf.MiniPackage, vendor_package_session: vf.MiniPackage
) -> None:
    assert vendor_package.dir != vendor_package_session.dir
    (vendor_package.dir / "boot.cmd").write_text("changed\n")
    assert (vendor_package_session.dir / "boot.cmd").read_text().startswith("# Bitmain")
    assert vendor_package.partition("ROOTFS").image.parent == vendor_package.images_dir  # type: ignore[union-attr]


def test_existing_root_is_refused(vendor_package_session: vf.MiniPackage) -> None:
    with pytest.raises(vf.FixtureError, match="already exists"):
        vf.build_package(vendor_package_session.root)


# ----------------------------------------------------------------------------- variants


def test_variant_chunk_size_and_layout(make_vendor_package: Callable[..., vf.MiniPackage]) -> None:
    layout = (*vf.MINI_LAYOUT[:6], vf.PartSpec("DATA", 20 * 1024))
    pkg = make_vendor_package(chunk_sectors=777, layout=layout, disk_kb=256 * 1024)
    assert 'size_in_kb="20480"' in pkg.xml_text and 'size_in_kb="262144"' in pkg.xml_text
    for p in pkg.partitions:
        assert p.image is not None
        assert len(p.chunk_files) == -(-p.image.stat().st_size // (777 * 512))
        offsets = [t[2] for t in triples((pkg.dir / p.script).read_text())]
        assert offsets == [p.offset_sectors + k * 777 for k in range(len(p.chunk_files))]
    run("md5sum", "-c", "--quiet", "md5.txt", cwd=pkg.dir)


def test_variant_script_lines(make_vendor_package: Callable[..., vf.MiniPackage]) -> None:
    extra = vf.ExtraLines(
        after_header=("# vendor note",), between_chunks=("echo chunk ok",), at_end=("# done",)
    )
    pkg = make_vendor_package(
        post_scr=True, extra_lines={"rootfs": extra}, flavour="sophgo", local_update=True
    )
    top = (pkg.dir / "boot.cmd").read_text()
    assert "# open fan" not in top
    assert top.index("echo all done") < top.index("/$ota_path/post.scr") < top.index("Please remove")
    rootfs = pkg.partition("ROOTFS")
    text = (pkg.dir / rootfs.script).read_text()
    assert text.count("echo chunk ok\n") == len(rootfs.chunk_files) - 1
    assert text.endswith("echo\n\n# done\n") and "\n\n# vendor note\nload " in text
    assert [t[0] for t in triples(text)] == list(rootfs.chunk_files)
    assert "local_update.sh" in (pkg.dir / "md5.txt").read_text()


def test_variant_skipped_partition_and_raw_image(make_vendor_package: Callable[..., vf.MiniPackage]) -> None:
    pkg = make_vendor_package(skip_images=frozenset({"RECOVERY"}), raw_images={"MISC": b"\x01" * 1001})
    rec = pkg.partition("RECOVERY")
    assert rec.image is None and rec.chunk_files == ()
    assert not (pkg.dir / "boot_emmc-recovery.cmd").exists()
    assert "recovery" not in (pkg.dir / "boot_emmc.cmd").read_text()
    assert "-eq 3; then" in (pkg.dir / "boot_emmc-misc.cmd").read_text()  # numbering kept
    ((name, nbytes, _, count),) = triples((pkg.dir / "boot_emmc-misc.cmd").read_text())
    assert (name, nbytes, count) == ("misc.1-of-1.gz", 1001, 2)


def test_variant_rootfs_rw_shadows(make_vendor_package: Callable[..., vf.MiniPackage]) -> None:
    pkg = make_vendor_package(
        rw_overlay_files={"/etc/netplan/01-netcfg.yaml": "network: {version: 2}\n"},
        rw_whiteouts=("/etc/update-motd.d/50-landscape-sysinfo",),
        rw_opaque_dirs=("/etc/apt/sources.list.d",),
        extra_files={
            "DATA": {"/app/a b.txt": b"x"},
            "BOOT": {"/extra.txt": "y"},
            "ROOTFS": {"/etc/motd": vf.file_node("hi\n", 0o600, 1000, 1000)},
        },
    )
    rw = pkg.partition("ROOTFS_RW").image
    assert rw is not None
    run("e2fsck", "-fn", rw)
    assert debugfs(rw, "cat /overlay/etc/netplan/01-netcfg.yaml").endswith("network: {version: 2}\n")
    wo = debugfs(rw, "stat /overlay/etc/update-motd.d/50-landscape-sysinfo")
    assert "Type: character special" in wo and "Mode:  0000" in wo
    assert re.search(r"Device major/minor number: 00:00", wo)
    assert 'trusted.overlay.opaque (1) = "y"' in debugfs(rw, "ea_list /overlay/etc/apt/sources.list.d")
    assert debugfs(pkg.partition("DATA").image, 'cat "/app/a b.txt"').endswith("x")  # type: ignore[arg-type]
    assert run("mtype", "-i", pkg.partition("BOOT").image, "::/extra.txt") == "y"  # type: ignore[arg-type]
    motd = debugfs(pkg.partition("ROOTFS").image, "stat /etc/motd")  # type: ignore[arg-type]
    assert "Mode:  0600" in motd and re.search(r"User:\s+1000\s+Group:\s+1000", motd)


# ----------------------------------------------------------------------------- forms


@pytest.mark.parametrize(
    ("form", "top", "prefix"),
    [("tgz", "sdcard", "sdcard/"), ("tar.gz", None, ""), ("tgz", "sophon-img/sdcard", "sophon-img/sdcard/")],
)
def test_tarball_forms(shared_vendor_form, vendor_package_session, form, top, prefix) -> None:  # type: ignore[no-untyped-def]
    tarball = shared_vendor_form(form, top=top)
    names = run("tar", "tzf", tarball).split()
    files = [n for n in names if not n.endswith("/")]
    assert sorted(files) == [prefix + n for n in vendor_package_session.file_names()]
    got = subprocess.run(["tar", "xzOf", tarball, prefix + "boot_emmc.scr"], capture_output=True, check=True)
    assert got.stdout == (vendor_package_session.dir / "boot_emmc.scr").read_bytes()


@pytest.mark.parametrize("top", [None, "sdcard"])
def test_zip_form(shared_vendor_form, vendor_package_session, top) -> None:  # type: ignore[no-untyped-def]
    z = shared_vendor_form("zip", top=top)
    listing = run("unzip", "-l", z)
    prefix = f"{top}/" if top else ""
    for name in vendor_package_session.file_names():
        assert re.search(rf"\s{re.escape(prefix + name)}$", listing, re.MULTILINE), name
    got = subprocess.run(["unzip", "-p", z, prefix + "gpt.gz"], capture_output=True, check=True).stdout
    assert got == (vendor_package_session.dir / "gpt.gz").read_bytes()


@pytest.mark.parametrize(("label", "fat"), [("dos", 32), ("gpt", 16)])
def test_card_image_form(shared_vendor_form, vendor_package_session, tmp_path, label, fat) -> None:  # type: ignore[no-untyped-def]
    img = shared_vendor_form("img", label=label, fat=fat)
    size = img.stat().st_size
    assert size & (size - 1) == 0, "QEMU's sd-card wants a power-of-two image"
    if label == "dos":
        table = run("sfdisk", "-d", img)
        assert "label: dos" in table and re.search(r"start=\s*2048, size=.*type=c", table)
    else:
        assert re.search(r"^\s+1\s+2048\s+\d+\s+.*0700", run("sgdisk", "-p", img), re.MULTILINE)
        assert "No problems found" in run("sgdisk", "-v", img)
    at = f"{img}@@1M"
    assert f'disk type="FAT{fat}' in run("minfo", "-i", at, "::")
    listing = run("mdir", "-i", at, "::/")
    assert " boot_emmc-rootfs_rw.scr" in listing  # the long name is stored (VFAT)
    out = tmp_path / "back"
    out.mkdir()
    run("mcopy", "-n", "-i", at, "::/*", out)
    assert sorted(p.name for p in out.iterdir()) == vendor_package_session.file_names()
    for p in out.iterdir():
        assert p.read_bytes() == (vendor_package_session.dir / p.name).read_bytes(), p.name
    part = tmp_path / "part.img"
    run("dd", f"if={img}", f"of={part}", "bs=1M", "skip=1", "status=none")
    run("fsck.fat", "-n", part)


def test_compressed_card_image_forms(shared_vendor_form, tmp_path) -> None:  # type: ignore[no-untyped-def]
    img = shared_vendor_form("img").read_bytes()
    z = shared_vendor_form("img.zip")
    assert "sdcard.img" in run("unzip", "-l", z)
    assert subprocess.run(["unzip", "-p", z], capture_output=True, check=True).stdout == img
    xz = shared_vendor_form("img.xz", level=0)
    assert subprocess.run(["xz", "-dc", xz], capture_output=True, check=True).stdout == img


def test_card_image_is_reproducible(
    vendor_package_session: vf.MiniPackage, shared_vendor_form, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    again = vf.make_card_image(vendor_package_session, tmp_path / "again.img")
    assert again.read_bytes() == shared_vendor_form("img").read_bytes()


def test_variant_merged_usr(shared_vendor_package: Callable[..., vf.MiniPackage]) -> None:
    pkg = shared_vendor_package(merged_usr=True, hostname="box-7")
    assert pkg is shared_vendor_package(merged_usr=True, hostname="box-7")  # cached per session
    rootfs = pkg.partition("ROOTFS").image
    assert 'Fast link dest: "usr/lib"' in debugfs(rootfs, "stat /lib")
    # debugfs follows the /lib link in the middle of a path, as the product's tools must
    assert "ExecStart=/usr/sbin/bmrt_setup.sh" in debugfs(
        rootfs, "cat /lib/systemd/system/bmrt_setup.service"
    )
    assert "127.0.1.1\tbox-7" in debugfs(rootfs, "cat /etc/hosts")
    run("e2fsck", "-fn", rootfs)  # type: ignore[arg-type]


def test_vendor_form_fixture_gives_private_copies(
    vendor_form: Callable[..., Path], vendor_package_session: vf.MiniPackage
) -> None:
    folder = vendor_form("dir")
    assert folder != vendor_package_session.dir
    assert sorted(p.name for p in folder.iterdir()) == vendor_package_session.file_names()
    tarball = vendor_form("tgz", top=None)
    assert tarball.name == "sdcard.tgz" and "boot.scr" in run("tar", "tzf", tarball).split()
    with pytest.raises(vf.FixtureError, match="unknown form"):
        vendor_form("rar")
