"""uImage script codec against the real mkimage and dumpimage."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
from buildhelp import mkimage_script
from hypothesis import given
from hypothesis import strategies as st

from builder.errors import PackageError
from builder.package.uimage import decode_script, encode_script


def mkimage(tmp_path: Path, text: bytes, name: str) -> bytes:
    scr = tmp_path / "x.scr"
    mkimage_script(text, scr, name, epoch=1717660800)
    return scr.read_bytes()


def test_decode_matches_mkimage_and_reencodes_byte_for_byte(tmp_path: Path) -> None:
    text = b"# Partition 3 (rootfs)\nbm_savelog mmc 0:1 3.log\n\necho done\n"
    blob = mkimage(tmp_path, text, "boot_emmc-rootfs")
    img = decode_script(blob, "x.scr")
    assert img.text == text
    assert img.name == "boot_emmc-rootfs"
    assert img.timestamp == 1717660800
    assert encode_script(img.text, img.name, img.timestamp) == blob


def test_encoded_script_is_accepted_by_dumpimage(tmp_path: Path) -> None:
    scr = tmp_path / "ours.scr"
    scr.write_bytes(encode_script(b"echo hello\n", "ours", 0))
    out = subprocess.run(["dumpimage", "-l", str(scr)], capture_output=True, text=True, check=True).stdout
    assert "AArch64 Linux Script (uncompressed)" in out
    assert "Image Name:   ours" in out


@pytest.mark.parametrize(
    ("offset", "message"),
    [(0, "bad uImage magic"), (10, "header CRC"), (70, "data CRC")],
)
def test_corruption_is_named(tmp_path: Path, offset: int, message: str) -> None:
    blob = bytearray(mkimage(tmp_path, b"echo hi\n", "t"))
    blob[offset] ^= 0xFF
    with pytest.raises(PackageError, match=message) as e:
        decode_script(bytes(blob), "boot.scr")
    assert e.value.where == "boot.scr"


def test_truncated(tmp_path: Path) -> None:
    blob = mkimage(tmp_path, b"echo hi\n", "t")
    with pytest.raises(PackageError, match="data size mismatch"):
        decode_script(blob[:-2], "boot.scr")
    with pytest.raises(PackageError, match="too short"):
        decode_script(blob[:20], "boot.scr")


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_package_error(data: bytes) -> None:
    with contextlib.suppress(PackageError):
        decode_script(data, "fuzz.scr")


@given(
    st.binary(max_size=2000),
    st.text(alphabet="abcdefgh-_.0123456789", max_size=40),
    st.integers(0, 2**32 - 1),
)
def test_round_trip(text: bytes, name: str, ts: int) -> None:
    img = decode_script(encode_script(text, name, ts), "rt.scr")
    assert (img.text, img.name, img.timestamp) == (text, name[:32], ts)
