"""`verify` catches planted defects, each named by file, with exit code 1."""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import cli, flip_middle_byte, mkimage_script, refresh_md5


def _rewrite_script(pkg: Path, name: str, fn: Callable[[str], str]) -> None:
    cmd = pkg / f"{name}.cmd"
    text = fn(cmd.read_text())
    mkimage_script(text, pkg / f"{name}.scr", name)


def truncate_chunk(d: Path) -> None:
    p = d / "rootfs.2-of-6.gz"
    p.write_bytes(p.read_bytes()[:-100])
    refresh_md5(d)


def wrong_unzip_size(d: Path) -> None:
    _rewrite_script(
        d,
        "boot_emmc-opt",
        lambda t: t.replace(
            "unzip ${ramdisk_addr_r} ${unzip_addr} 0x00100000",
            "unzip ${ramdisk_addr_r} ${unzip_addr} 0x000ff000",
            1,
        ),
    )
    refresh_md5(d)


def header_crc(d: Path) -> None:
    p = d / "boot_emmc-data.scr"
    b = bytearray(p.read_bytes())
    b[40] ^= 1  # inside the image name
    p.write_bytes(bytes(b))
    refresh_md5(d)


def data_crc(d: Path) -> None:
    p = d / "boot_emmc-misc.scr"
    b = bytearray(p.read_bytes())
    b[80] ^= 1
    p.write_bytes(bytes(b))
    refresh_md5(d)


def _shift_write(d: Path, name: str, k: int, delta: int) -> None:
    def fn(text: str) -> str:
        writes = list(re.finditer(r"mmc write \$\{unzip_addr\} (0x[0-9a-f]+)", text))
        m = writes[k]
        new = f"0x{int(m.group(1), 16) + delta:08x}"
        return text[: m.start(1)] + new + text[m.end(1) :]

    _rewrite_script(d, name, fn)
    refresh_md5(d)


def overlap(d: Path) -> None:
    _shift_write(d, "boot_emmc-rootfs", 1, -8)


def gap(d: Path) -> None:
    _shift_write(d, "boot_emmc-rootfs", 2, +8)


def outside_partition(d: Path) -> None:
    # DATA's last chunk claims 32 MiB: it would run past the end of its 16 MiB partition
    def fn(text: str) -> str:
        last = list(re.finditer(r"mmc write \$\{unzip_addr\} 0x[0-9a-f]+ (0x[0-9a-f]+)", text))[-1]
        return text[: last.start(1)] + "0x00010000" + text[last.end(1) :]

    _rewrite_script(d, "boot_emmc-data", fn)
    refresh_md5(d)


def missing_chunk(d: Path) -> None:
    (d / "opt.3-of-5.gz").unlink()
    refresh_md5(d)


def stale_md5(d: Path) -> None:
    p = d / "fip.bin"
    p.write_bytes(p.read_bytes() + b"x")


def md5_missing_entry(d: Path) -> None:
    (d / "extra.bin").write_bytes(b"new file")


def boot_scr_emmc(d: Path) -> None:
    (d / "boot.scr.emmc").write_bytes((d / "boot.scr").read_bytes())
    refresh_md5(d)


def huge_compressed_chunk(d: Path) -> None:
    with open(d / "rootfs_rw.1-of-5.gz", "r+b") as f:
        f.truncate(256 << 20)  # sparse: costs no disk
    refresh_md5(d)


def file_over_4gib(d: Path) -> None:
    with open(d / "big.bin", "wb") as f:
        f.truncate(4 << 30)


def trailing_garbage(d: Path) -> None:
    p = d / "recovery.1-of-5.gz"
    p.write_bytes(p.read_bytes() + b"garbage")
    refresh_md5(d)


def gpt_disagrees_with_xml(d: Path) -> None:
    xml = d / "partition32G.xml"
    xml.write_text(
        xml.read_text().replace(
            'label="MISC"       size_in_kb="1024"', 'label="MISC"       size_in_kb="2048"'
        )
    )
    refresh_md5(d)


def bad_fat_name(d: Path) -> None:
    (d / "bad:name.txt").write_bytes(b"x")
    refresh_md5(d)


def corrupt_chunk(d: Path) -> None:
    flip_middle_byte(d / "opt.2-of-5.gz")
    refresh_md5(d)


DEFECTS: list[tuple[Callable[[Path], None], str, str]] = [
    (truncate_chunk, "rootfs.2-of-6.gz", "truncated|decompress"),
    (wrong_unzip_size, "boot_emmc-opt.scr", "does not match the unzip size"),
    (header_crc, "boot_emmc-data.scr", "header CRC"),
    (data_crc, "boot_emmc-misc.scr", "data CRC"),
    (overlap, "boot_emmc-rootfs.scr", "overlap"),
    (gap, "boot_emmc-rootfs.scr", "gap"),
    (outside_partition, "boot_emmc-data.scr", "past the end"),
    (missing_chunk, "boot_emmc-opt.scr", "opt.3-of-5.gz, which is not in the package"),
    (stale_md5, "fip.bin", "does not match md5.txt"),
    (md5_missing_entry, "md5.txt", "does not list extra.bin"),
    (boot_scr_emmc, "boot.scr.emmc", "must not be on the card"),
    (huge_compressed_chunk, "rootfs_rw.1-of-5.gz", "overruns unzip_addr"),
    (file_over_4gib, "big.bin", "4 GiB"),
    (trailing_garbage, "recovery.1-of-5.gz", "trailing data"),
    (gpt_disagrees_with_xml, "gpt.gz", "disagrees with partition32G.xml"),
    (bad_fat_name, "bad:name.txt", "not valid on a FAT32 card"),
    (corrupt_chunk, "opt.2-of-5.gz", "decompress"),
]


@pytest.mark.parametrize(("plant", "file", "message"), DEFECTS, ids=[d[0].__name__ for d in DEFECTS])
def test_verify_catches_planted_defect(
    plant: Callable[[Path], None], file: str, message: str, vendor_package: vf.MiniPackage
) -> None:
    plant(vendor_package.dir)
    out = cli("verify", vendor_package.dir)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(("FAIL", "error"))]
    assert any(file in ln and re.search(message, ln) for ln in lines), out.stderr


def test_verify_clean_package_and_card_image(
    vendor_package_session: vf.MiniPackage, shared_vendor_form
) -> None:
    for target in (vendor_package_session.dir, shared_vendor_form("img")):
        out = cli("verify", target)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("ok: 36 chunks")


def test_post_scr_is_optional(make_vendor_package) -> None:
    pkg = make_vendor_package(post_scr=True)
    out = cli("verify", pkg.dir)
    assert out.returncode == 0, out.stderr


def test_verify_json_events(vendor_package: vf.MiniPackage) -> None:
    missing_chunk(vendor_package.dir)
    out = cli("--json", "verify", vendor_package.dir)
    assert out.returncode == 1
    import json

    events = [json.loads(ln) for ln in out.stdout.splitlines()]
    assert any(e["event"] == "failure" and "opt.3-of-5.gz" in e["message"] for e in events)
    assert events[-1]["event"] == "error"


def test_gpt_chunk_unzips_to_17408_bytes(vendor_package_session: vf.MiniPackage) -> None:
    assert len(gzip.decompress((vendor_package_session.dir / "gpt.gz").read_bytes())) == 17408


def test_a_chunk_whose_size_is_not_the_scripts_is_reported(vendor_package: vf.MiniPackage) -> None:
    """Found by mutation testing: a chunk that decompresses to other than the size its script's
    `unzip` names (here: 4 KiB more, with md5.txt made to match) is a failure naming the chunk,
    the script and its line."""
    import gzip as gz

    from buildhelp import cli, refresh_md5

    name = vendor_package.partition("DATA").chunk_files[0]
    chunk = vendor_package.dir / name
    chunk.write_bytes(gz.compress(gz.decompress(chunk.read_bytes()) + bytes(4096), mtime=0))
    refresh_md5(vendor_package.dir)
    res = cli("verify", vendor_package.dir)
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert re.search(
        rf"{re.escape(name)}: holds \d+ bytes uncompressed but boot_emmc-data\.scr line \d+ unzips", out
    ), out
