"""Parsing the vendor's flash scripts and regenerating only their chunk blocks."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.errors import PackageError
from builder.package.scripts import NewChunk, parse_script, regenerate

ERR_LOAD = (
    "if test $? -ne 0; then\nled status off\nled error off\n"
    'while true; do; echo "ERROR: load package failed"; sleep 0.5; done; fi;\necho\n\n'
)
ERR_WRITE = (
    "if test $? -ne 0; then\nled status off\nled error off\n"
    'while true; do; echo "ERROR: eMMC write failed"; sleep 0.5; done; fi;\necho\n\n'
)


def block(name: str, nbytes: int, offset: int) -> str:
    return (
        f"load ${{devtype}} ${{devnum}}:${{distro_bootpart}} ${{ramdisk_addr_r}} /$ota_path/{name}\n"
        + ERR_LOAD
        + f"unzip ${{ramdisk_addr_r}} ${{unzip_addr}} 0x{nbytes:08x}\n"
        + ERR_LOAD
        + f"mmc write ${{unzip_addr}} 0x{offset:08x} 0x{-(-nbytes // 512):08x}\n"
        + ERR_WRITE
    )


def vendor_script(index: int, label: str, sizes: list[int], offset: int, chunk: int, extra: str = "") -> str:
    head = f"# Partition {index} ({label})\n"
    if index > 2:
        head += f"bm_savelog mmc 0:1 {index}.log\n"
    head += (
        f"\nif test -n $load_partition; then if test $load_partition -eq {index + 1}; then "
        'echo "skip partition $load_partition";  exit; fi; fi;\n\n'
    )
    body = ""
    for k, n in enumerate(sizes, start=1):
        body += block(f"{label}.{k}-of-{len(sizes)}.gz", n, offset + (k - 1) * chunk)
        if extra and k < len(sizes):
            body += extra
    return head + body


def test_parse_vendor_partition_script() -> None:
    text = vendor_script(3, "rootfs", [2048 * 512, 2048 * 512, 1000], 0x647000, 2048)
    s = parse_script(text.encode(), "boot_emmc-rootfs.scr")
    assert [c.file for c in s.chunks] == ["rootfs.1-of-3.gz", "rootfs.2-of-3.gz", "rootfs.3-of-3.gz"]
    assert [c.offset_sectors for c in s.chunks] == [0x647000, 0x647000 + 2048, 0x647000 + 4096]
    assert [c.unzip_bytes for c in s.chunks] == [2048 * 512, 2048 * 512, 1000]
    assert s.chunks[2].count_sectors == 2
    lines = text.split("\n")
    assert lines[s.chunks[0].load_line - 1].startswith("load ")
    assert lines[s.chunks[0].write_line - 1].startswith("mmc write")
    assert all(ld.required for ld in s.loads)


def test_regenerate_same_chunks_is_identity() -> None:
    text = vendor_script(4, "rootfs_rw", [4096 * 512, 77 * 512], 0x1000, 4096)
    s = parse_script(text, "x.scr")
    same = [NewChunk(c.file, c.unzip_bytes or 0, c.offset_sectors, c.count_sectors) for c in s.chunks]
    assert regenerate(s, same) == text


def test_regenerate_more_and_fewer_chunks_matches_vendor_generator() -> None:
    old = parse_script(vendor_script(5, "opt", [2048 * 512, 5], 0x9000, 2048), "x.scr")
    sizes = [2048 * 512, 2048 * 512, 2048 * 512, 333]
    new = [
        NewChunk(f"opt.{k}-of-4.gz", n, 0x9000 + (k - 1) * 2048, -(-n // 512))
        for k, n in enumerate(sizes, start=1)
    ]
    assert regenerate(old, new) == vendor_script(5, "opt", sizes, 0x9000, 2048)
    fewer = [NewChunk("opt.1-of-1.gz", 99, 0x9000, 1)]
    assert regenerate(old, fewer) == vendor_script(5, "opt", [99], 0x9000, 2048)


def test_vendor_lines_between_blocks_are_kept() -> None:
    extra = "echo chunk done\n# vendor note\n\n"
    text = vendor_script(6, "data", [2048 * 512, 2048 * 512, 7], 0x20000, 2048, extra=extra)
    s = parse_script(text, "x.scr")
    assert len(s.chunks) == 3
    new = [
        NewChunk(
            f"data.{k}-of-2.gz", 2048 * 512 if k == 1 else 9, 0x20000 + (k - 1) * 2048, 1 if k == 2 else 2048
        )
        for k in (1, 2)
    ]
    out = regenerate(s, new)
    assert out.count("echo chunk done") == 2  # nothing the vendor wrote is dropped
    assert "data.2-of-2.gz" in out and "0x00000009" in out


def test_optional_and_script_loads() -> None:
    text = (
        "load ${devtype} ${devnum}:${distro_bootpart} ${ramdisk_addr_r} /$ota_path/spi_flash.bin\n"
        "if test $? -eq 0; then\nsf probe\nfi\n"
        "load ${devtype} ${devnum}:${distro_bootpart} ${scriptaddr} /$ota_path/boot_emmc.scr\n"
        "source ${scriptaddr}\n"
        "if load ${devtype} ${devnum}:${distro_bootpart} ${scriptaddr} /$ota_path/post.scr; "
        "then source ${scriptaddr}; fi\n"
    )
    s = parse_script(text, "boot.scr")
    req = {ld.file: ld.required for ld in s.loads}
    assert req == {"spi_flash.bin": False, "boot_emmc.scr": True, "post.scr": False}
    assert [r.file for r in s.sources] == ["boot_emmc.scr", "post.scr"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.replace("${unzip_addr} 0x00100000", "${unzip_addr}", 1), "has no size"),
        (lambda t: t.replace("unzip ${ramdisk_addr_r}", "unzip ${other}", 1), "unzip reads"),
        (
            lambda t: t.replace("mmc write ${unzip_addr} 0x00001000", "mmc write ${unzip_addr} zz", 1),
            "not a number",
        ),
    ],
)
def test_malformed_scripts_name_the_line(mutate, message) -> None:  # type: ignore[no-untyped-def]
    text = mutate(vendor_script(3, "rootfs", [2048 * 512], 0x1000, 2048))
    with pytest.raises(PackageError, match=message) as e:
        parse_script(text, "boot_emmc-rootfs.scr")
    assert e.value.where is not None and e.value.where.startswith("boot_emmc-rootfs.scr:")


@given(st.text(max_size=400))
def test_parser_never_crashes(text: str) -> None:
    with contextlib.suppress(PackageError):
        parse_script(text, "fuzz.scr")


@given(st.lists(st.integers(1, 4 * 2048 * 512), min_size=1, max_size=6), st.integers(1, 2**24))
def test_round_trip_generate_parse(sizes: list[int], offset: int) -> None:
    chunk = 2048
    sizes = [chunk * 512] * (len(sizes) - 1) + [min(sizes[-1], chunk * 512)]
    s = parse_script(vendor_script(3, "rootfs", sizes, offset, chunk), "rt.scr")
    assert [c.unzip_bytes for c in s.chunks] == sizes
    assert [c.offset_sectors for c in s.chunks] == [offset + i * chunk for i in range(len(sizes))]
