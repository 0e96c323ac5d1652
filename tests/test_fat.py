"""builder.fs.fat: FAT volumes read and written with mtools/dosfstools, checked with the real tools."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from builder.errors import BuildError, PackageError, ToolError
from builder.fs.fat import (
    FatImage,
    copy_into,
    make_fat_image,
    mtools_env,
    parse_boot_sector,
    parse_mdir,
    probe_filesystem,
)

MiB = 1 << 20


def sh(*cmd: str | Path, env: dict[str, str] | None = None) -> bytes:
    """Run a real tool directly (not through the code under test) and return its stdout."""
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, env=env).stdout


def clean_env() -> dict[str, str]:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLSRC="/dev/null", HOME="/dev/null/none")
    return env


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mkfs(img: Path, size_mib: int, bits: int, *extra: str, offset_sectors: int = 0) -> None:
    if not img.exists():
        with open(img, "wb") as f:
            f.truncate(offset_sectors * 512 + size_mib * MiB)
    off = [f"--offset={offset_sectors}"] if offset_sectors else []
    sh("mkfs.fat", "-F", str(bits), *off, *extra, img, str(size_mib * 1024))


def mtype(img: Path, name: str, offset: int = 0) -> bytes:
    spec = f"{img}@@{offset}" if offset else str(img)
    return sh("mtype", "-i", spec, f"::{name}", env=clean_env())


def extract_region(img: Path, offset: int, size: int, dest: Path) -> Path:
    """Copy a partition out of an image (fsck.fat has no offset option)."""
    with open(img, "rb") as src, open(dest, "wb") as out:
        src.seek(offset)
        remaining = size
        while remaining:
            block = src.read(min(remaining, MiB))
            assert block
            out.write(block)
            remaining -= len(block)
    return dest


@pytest.fixture
def host_files(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "host"
    d.mkdir()
    content = {
        "boot.scr": rand(700, 1),
        "BOOT": b"",
        "rootfs_rw.1-of-2.gz": rand(3 * MiB + 17, 2),
        "with space name.txt": b"spaces\n",
        "MixedCase.Bin": rand(5000, 3),
        "data.58-of-58.gz": rand(123, 4),
    }
    out = {}
    for name, data in content.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    return out


@pytest.fixture
def volume(tmp_path: Path, host_files: dict[str, Path]) -> Path:
    """A FAT32 volume built with the real tools only: files, a nested folder with long names, a
    hidden file."""
    img = tmp_path / "vol.img"
    mkfs(img, 40, 32, "-n", "TESTVOL")
    env = clean_env()
    sh("mcopy", "-i", img, *host_files.values(), "::/", env=env)
    sh("mmd", "-i", img, "::/Long Dir Name", "::/Long Dir Name/deeper", env=env)
    sh("mcopy", "-i", img, host_files["boot.scr"], "::/Long Dir Name/deeper/x y.scr", env=env)
    sh("mcopy", "-i", img, host_files["BOOT"], "::/hidden.txt", env=env)
    sh("mattrib", "-i", img, "+h", "::/hidden.txt", env=env)
    return img


# --- boot sector -----------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "size_mib"), [(12, 2), (16, 16), (32, 40)])
def test_boot_sector_type_label_and_id(tmp_path: Path, bits: int, size_mib: int) -> None:
    img = tmp_path / f"f{bits}.img"
    mkfs(img, size_mib, bits, "-n", f"VOL{bits}", "-i", "0badf00d")
    boot = parse_boot_sector(img.read_bytes()[:512])
    assert boot is not None
    assert boot.fs_type == f"FAT{bits}"
    assert boot.label == f"VOL{bits}"
    assert boot.volume_id == 0x0BADF00D
    assert boot.size_bytes == size_mib * MiB
    fat = FatImage(img)
    assert fat.fs_type() == f"FAT{bits}"
    assert fat.label() == f"VOL{bits}"


def test_probe_names_other_content(tmp_path: Path) -> None:
    ext = tmp_path / "ext.img"
    sh("mke2fs", "-q", "-t", "ext4", "-F", ext, "4M")
    assert probe_filesystem(ext.read_bytes()[:2048]) == "ext2/3/4"
    assert probe_filesystem(bytes(2048)) == "empty (zeros)"
    assert probe_filesystem(rand(2048, 9)) == "unknown"
    assert parse_boot_sector(rand(512, 9)) is None


def test_not_fat_is_a_package_error(tmp_path: Path) -> None:
    img = tmp_path / "z.img"
    img.write_bytes(bytes(MiB))
    with pytest.raises(PackageError, match="no FAT filesystem"):
        FatImage(img).fs_type()


# --- listing ---------------------------------------------------------------------------------


def test_walk_lists_everything_with_long_names(volume: Path, host_files: dict[str, Path]) -> None:
    entries = {e.path: e for e in FatImage(volume).walk()}
    expected_files = {n: p.stat().st_size for n, p in host_files.items()}
    expected_files["Long Dir Name/deeper/x y.scr"] = host_files["boot.scr"].stat().st_size
    expected_files["hidden.txt"] = 0
    assert {p: e.size for p, e in entries.items() if not e.is_dir} == expected_files
    assert {p for p, e in entries.items() if e.is_dir} == {"Long Dir Name", "Long Dir Name/deeper"}
    assert entries["Long Dir Name/deeper/x y.scr"].name == "x y.scr"


def test_list_one_folder(volume: Path) -> None:
    fat = FatImage(volume)
    assert [(e.name, e.is_dir) for e in fat.list("/Long Dir Name")] == [("deeper", True)]
    assert [e.path for e in fat.list("Long Dir Name/deeper")] == ["Long Dir Name/deeper/x y.scr"]


def test_walk_of_an_empty_volume(tmp_path: Path) -> None:
    img = tmp_path / "empty.img"
    mkfs(img, 16, 16)
    assert FatImage(img).walk() == []


def test_user_mtools_config_is_ignored(volume: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".mtoolsrc").write_text("this is not mtools syntax = =\n")
    rc = tmp_path / "rc"
    rc.write_text("mtools_lower_case=1\nmtools_no_vfat=1\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MTOOLSRC", str(rc))
    names = {e.path for e in FatImage(volume).walk()}
    assert "BOOT" in names and "rootfs_rw.1-of-2.gz" in names


def test_parse_mdir_wide_sizes_and_numeric_extensions() -> None:
    text = (
        " Volume in drive : is X\n"
        "Directory for ::/\n\n"
        "DATA     123        45 2024-01-02  13:04 \n"
        "BIGFIL~1 IMG  4294967295 2024-01-02   3:04  big file.img\n"
        "sub          <DIR>     2024-01-02   3:04 \n"
        "        3 files          4 294 967 340 bytes\n\n"
        "Directory for ::/sub\n\n"
        ".            <DIR>     2024-01-02   3:04 \n"
        "..           <DIR>     2024-01-02   3:04 \n"
        "        2 files                   0 bytes\n\n"
        "Total files listed:\n"
        "        5 files          4 294 967 340 bytes\n"
    )
    entries = parse_mdir(text)
    assert [(e.path, e.size, e.is_dir) for e in entries] == [
        ("DATA.123", 45, False),
        ("big file.img", 4294967295, False),
        ("sub", 0, True),
    ]


def test_parse_mdir_refuses_lines_it_does_not_understand() -> None:
    text = "Directory for ::/\n\nsomething odd here\nboot     scr        3 2024-01-02   3:04 \n"
    text += "        2 files                   3 bytes\n"
    with pytest.raises(PackageError, match="counts 2 entries, 1 were understood"):
        parse_mdir(text)


# --- reading files ---------------------------------------------------------------------------


def test_open_stream_and_read_to(volume: Path, host_files: dict[str, Path], tmp_path: Path) -> None:
    fat = FatImage(volume)
    for name, src in host_files.items():
        with fat.open_stream(name) as s:
            assert sha(s.read()) == sha(src.read_bytes()), name
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old content that is longer than the file")
    fat.read_to("/Long Dir Name/deeper/x y.scr", dest)
    assert dest.read_bytes() == host_files["boot.scr"].read_bytes()


def test_stream_of_a_missing_file_raises(volume: Path) -> None:
    with pytest.raises(ToolError, match="not found"), FatImage(volume).open_stream("nothere.bin") as s:
        s.read()


def test_stream_closed_early_ends_the_tool(volume: Path) -> None:
    s = FatImage(volume).open_stream("rootfs_rw.1-of-2.gz")
    assert len(s.read(1000)) == 1000
    proc = s.raw._proc  # type: ignore[attr-defined]
    s.close()
    assert proc.poll() is not None


def test_volume_at_an_offset_inside_a_partitioned_image(tmp_path: Path, host_files: dict[str, Path]) -> None:
    img = tmp_path / "card.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["sfdisk", "-q", str(img)], input=b"label: dos\nstart=2048, size=16384, type=83\n"
                   b"start=18432, type=c\n", check=True)
    mkfs(img, 40, 32, "-n", "P2", offset_sectors=18432)
    env = clean_env()
    sh("mcopy", "-i", f"{img}@@{18432 * 512}", host_files["boot.scr"], "::/", env=env)
    fat = FatImage(img, 18432 * 512)
    assert fat.label() == "P2"
    assert [e.path for e in fat.walk()] == ["boot.scr"]
    with fat.open_stream("boot.scr") as s:
        assert s.read() == host_files["boot.scr"].read_bytes()


def test_glob_characters_are_refused(volume: Path) -> None:
    with pytest.raises(PackageError, match="cannot address"):
        FatImage(volume).read_to("a*.scr", Path("/dev/null"))


# --- writing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 32])
def test_make_fat_image_at_offset_is_valid(tmp_path: Path, bits: int) -> None:
    img = tmp_path / "card.img"
    offset = 1 * MiB
    fat = make_fat_image(img, 40 * MiB + 512, "CARD", bits, offset, volume_id=0x12345678)
    assert img.stat().st_size == offset + 40 * MiB  # rounded down to whole KiB
    assert fat.fs_type() == f"FAT{bits}"
    info = sh("minfo", "-i", f"{img}@@{offset}", "::", env=clean_env()).decode()
    assert "hidden sectors: 2048" in info
    assert "serial number: 12345678" in info
    part = extract_region(img, offset, 40 * MiB, tmp_path / "part.img")
    sh("fsck.fat", "-n", part)


def test_make_fat_image_keeps_what_is_before_the_offset(tmp_path: Path) -> None:
    img = tmp_path / "card.img"
    head = rand(MiB, 5)
    img.write_bytes(head)
    make_fat_image(img, 40 * MiB, "CARD", 32, MiB)
    with open(img, "rb") as f:
        assert f.read(MiB) == head


def test_copy_into_nested_long_names_and_overwrite(tmp_path: Path, host_files: dict[str, Path]) -> None:
    img = tmp_path / "out.img"
    fat = make_fat_image(img, 40 * MiB, "OUT", 32)
    files = [(p, n) for n, p in host_files.items()]
    files.append((host_files["MixedCase.Bin"], "sub dir/inner/Renamed Long Name.bin"))
    copy_into(fat, files, timestamp=1_700_000_000)
    newer = tmp_path / "newer"
    newer.write_bytes(b"replacement")
    copy_into(img, [(newer, "boot.scr")])
    for n, p in host_files.items():
        want = b"replacement" if n == "boot.scr" else p.read_bytes()
        assert mtype(img, n) == want, n
    assert mtype(img, "sub dir/inner/Renamed Long Name.bin") == host_files["MixedCase.Bin"].read_bytes()
    listing = sh("mdir", "-a", "-i", img, "::/sub dir/inner", env=clean_env()).decode()
    assert "Renamed Long Name.bin" in listing
    sh("fsck.fat", "-n", img)


def test_copy_into_is_deterministic(tmp_path: Path, host_files: dict[str, Path]) -> None:
    digests = []
    for i in range(2):
        img = tmp_path / f"d{i}.img"
        make_fat_image(img, 40 * MiB, "SAME", 32, volume_id=1)
        copy_into(img, [(p, f"dir/{n}") for n, p in sorted(host_files.items())], timestamp=1_600_000_000)
        os.utime(host_files["boot.scr"], (1, 1))  # source mtimes must not matter with a timestamp
        digests.append(sha(img.read_bytes()))
    assert digests[0] == digests[1]


def test_copy_into_disk_full_is_an_error(tmp_path: Path) -> None:
    img = tmp_path / "small.img"
    make_fat_image(img, 2 * MiB, "SMALL", 12)
    big = tmp_path / "big"
    big.write_bytes(rand(3 * MiB, 6))
    with pytest.raises(ToolError):
        copy_into(img, [(big, "big")])


def test_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="label"):
        make_fat_image(tmp_path / "a.img", 16 * MiB, "FAR TOO LONG LABEL", 16)
    with pytest.raises(BuildError, match="12, 16 or 32"):
        make_fat_image(tmp_path / "a.img", 16 * MiB, "X", 64)
    with pytest.raises(BuildError, match="sector"):
        make_fat_image(tmp_path / "a.img", 16 * MiB, "X", 16, offset=100)
    img = make_fat_image(tmp_path / "b.img", 16 * MiB, "X", 16)
    with pytest.raises(BuildError, match="not a file"):
        copy_into(img, [(tmp_path / "missing", "x")])


def test_env_pins_the_output_format() -> None:
    env = mtools_env({"SOURCE_DATE_EPOCH": "5"})
    assert env["MTOOLS_LOWER_CASE"] == "0"
    assert env["MTOOLSRC"] == os.devnull
    assert env["SOURCE_DATE_EPOCH"] == "5"
    assert not Path(env["HOME"], ".mtoolsrc").exists()


def test_old_mkfs_without_offset_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.fs import fat as fat_module

    native = tmp_path / "native.img"
    make_fat_image(native, 40 * MiB, "CARD", 32, MiB, volume_id=7)
    monkeypatch.setattr(fat_module, "_mkfs_has_offset", lambda: False)  # as dosfstools 4.1
    spliced = tmp_path / "spliced.img"
    before = rand(MiB, 8)  # what precedes the volume must survive
    spliced.write_bytes(before)
    make_fat_image(spliced, 40 * MiB, "CARD", 32, MiB, volume_id=7)
    with open(native, "rb") as a, open(spliced, "rb") as b:
        assert b.read(MiB) == before
        a.seek(MiB)
        assert sha(a.read()) == sha(b.read())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mkfs-")]
