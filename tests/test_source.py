"""builder.package.source: every form of the vendor package gives the same file set.

The inputs are built with the real tools (tar, zip, xz, gzip, sfdisk, sgdisk, mkfs.fat, mcopy,
mke2fs); only the file contents are synthetic.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from builder.errors import PackageError
from builder.package.source import (
    PackageSource,
    detect_form,
    open_package,
    read_partitions,
)

MiB = 1 << 20
SECTOR = 512


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# A miniature vendor file set: the names and shapes of FORMAT.md section 2.
FILE_SET: dict[str, bytes] = {
    "BOOT": b"",
    "boot.cmd": b"# boot\nsource boot_emmc.scr\n",
    "boot.scr": rand(200, 1),
    "boot_spif.scr": rand(150, 2),
    "boot_emmc.cmd": b"mmc dev 0\n",
    "boot_emmc.scr": rand(180, 3),
    "boot_emmc-gpt.scr": rand(300, 4),
    "boot_emmc-rootfs_rw.scr": rand(400, 5),
    "gpt.gz": rand(90, 6),
    "rootfs_rw.1-of-2.gz": rand(3 * MiB + 123, 7),
    "rootfs_rw.2-of-2.gz": rand(1000, 8),
    "data.1-of-58.gz": rand(77, 9),
    "partition32G.xml": b'<physical_partition size_in_kb="20971520">\n</physical_partition>\n',
    "md5.txt": b"d41d8cd98f00b204e9800998ecf8427e  BOOT\n",
}


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}


EXPECTED = digests(FILE_SET)


def sh(*cmd: str | Path, cwd: Path | None = None, input: bytes | None = None) -> None:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLSRC="/dev/null", HOME="/dev/null/none")
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, cwd=cwd, input=input, env=env)


def write_set(folder: Path, files: dict[str, bytes] = FILE_SET) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def blank(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def fat_volume(img: Path, start_sector: int, size_mib: int, bits: int, files: Path, folder: str = "") -> None:
    """mkfs.fat at a sector offset, then mcopy the set (optionally into a folder), real tools only."""
    sh("mkfs.fat", "-F", str(bits), f"--offset={start_sector}", "-n", "CARD", img, str(size_mib * 1024))
    spec = f"{img}@@{start_sector * SECTOR}"
    target = "::/"
    if folder:
        sh("mmd", "-i", spec, f"::/{folder}")
        target = f"::/{folder}/"
    sh("mcopy", "-i", spec, *sorted(files.iterdir()), target)


def sfdisk(img: Path, script: str) -> None:
    sh("sfdisk", "-q", img, input=script.encode())


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every form of the same file set, built once."""
    t = tmp_path_factory.mktemp("inputs")
    out: dict[str, Path] = {}
    flat = write_set(t / "flat")
    out["dir"] = flat
    write_set(t / "nested" / "sdcard")
    (t / "nested" / "README.txt").write_text("not part of the set\n")
    out["dir/one-subfolder"] = t / "nested"

    # tarballs: top folder sdcard/, none, another name; several compressions
    write_set(t / "tartree" / "sdcard")
    write_set(t / "tartree" / "airbox-2024-06")
    sh("tar", "-czf", t / "sdcard.tgz", "-C", t / "tartree", "sdcard")
    out["tgz/sdcard"] = t / "sdcard.tgz"
    sh("tar", "-czf", t / "flat.tar.gz", "-C", flat, ".")
    out["tgz/none"] = t / "flat.tar.gz"
    xz0 = "--use-compress-program=xz -0"
    sh("tar", "-c", xz0, "-f", t / "other.tar.xz", "-C", t / "tartree", "airbox-2024-06")
    out["txz/other"] = t / "other.tar.xz"
    sh("tar", "-cf", t / "plain.tar", "-C", flat, *sorted(FILE_SET))
    out["tar/none"] = t / "plain.tar"

    # zips: any top folder
    sh("zip", "-q", "-r", t / "sdcard.zip", "sdcard", cwd=t / "tartree")
    out["zip/sdcard"] = t / "sdcard.zip"
    sh("zip", "-q", t / "flat.zip", *sorted(FILE_SET), cwd=flat)
    out["zip/none"] = t / "flat.zip"

    # card images
    img = blank(t / "mbr32.img", 64 * MiB)
    sfdisk(img, "label: dos\nstart=2048, size=98304, type=c\n")
    fat_volume(img, 2048, 48, 32, flat)
    out["img/mbr-fat32"] = img

    img = blank(t / "mbr16.img", 40 * MiB)
    sfdisk(img, "label: dos\nstart=2048, size=65536, type=6\n")
    fat_volume(img, 2048, 32, 16, flat)
    out["img/mbr-fat16"] = img

    img = blank(t / "gpt32.img", 64 * MiB)
    sh("sgdisk", "-n", "1:2048:+48M", "-t", "1:0700", "-c", "1:SDCARD", img)
    fat_volume(img, 2048, 48, 32, flat, folder="sdcard")
    out["img/gpt-fat32-in-folder"] = img

    img = blank(t / "p2.img", 72 * MiB)
    sfdisk(img, "label: dos\nstart=2048, size=16384, type=83\nstart=18432, size=98304, type=c\n")
    sh("mke2fs", "-q", "-t", "ext4", "-E", f"offset={2048 * SECTOR}", img, "8M")
    fat_volume(img, 18432, 48, 32, flat)
    out["img/p2-behind-ext4"] = img

    img = blank(t / "logical.img", 64 * MiB)
    sfdisk(img, "label: dos\nstart=2048, size=8192, type=83\nstart=10240, type=5\nstart=12288, type=c\n")
    fat_volume(img, 12288, 40, 32, flat)
    out["img/mbr-logical"] = img

    img = blank(t / "bare.img", 40 * MiB)
    sh("mkfs.fat", "-F", "32", "-n", "BARE", img)
    sh("mcopy", "-i", img, *sorted(flat.iterdir()), "::/")
    out["img/bare-fat"] = img

    # compressed / zipped images (the source stays beside them, so `-k`)
    sh("xz", "-k", "-T2", "-0", t / "mbr32.img")
    out["img.xz"] = t / "mbr32.img.xz"
    sh("gzip", "-k", "-1", t / "gpt32.img")
    out["img.gz"] = t / "gpt32.img.gz"
    sh("zip", "-q", t / "card.img.zip", "mbr32.img", cwd=t)
    out["img.zip/deflated"] = t / "card.img.zip"
    sh("zip", "-q", "-0", t / "stored.img.zip", "p2.img", cwd=t)
    out["img.zip/stored"] = t / "stored.img.zip"
    return out


FORMS = {
    "dir": "dir",
    "dir/one-subfolder": "dir",
    "tgz/sdcard": "tar",
    "tgz/none": "tar",
    "txz/other": "tar",
    "tar/none": "tar",
    "zip/sdcard": "zip",
    "zip/none": "zip",
    "img/mbr-fat32": "img",
    "img/mbr-fat16": "img",
    "img/gpt-fat32-in-folder": "img",
    "img/p2-behind-ext4": "img",
    "img/mbr-logical": "img",
    "img/bare-fat": "img",
    "img.xz": "img.xz",
    "img.gz": "img.gz",
    "img.zip/deflated": "img.zip",
    "img.zip/stored": "img.zip",
}


def sha_stream(src: PackageSource, name: str) -> str:
    h = hashlib.sha256()
    with src.open(name) as f:
        while block := f.read(256 * 1024):
            h.update(block)
    return h.hexdigest()


def sha_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(FORMS))
def test_every_form_gives_the_same_file_set(case: str, inputs: dict[str, Path], tmp_path: Path) -> None:
    with open_package(inputs[case], tmp_path / "work") as src:
        assert src.form == FORMS[case]
        assert src.origin == inputs[case]
        assert src.names() == sorted(FILE_SET)
        assert src.subfolders == ()
        assert {n: src.size(n) for n in src.names()} == {n: len(d) for n, d in FILE_SET.items()}
        assert {n: sha_stream(src, n) for n in src.names()} == EXPECTED
        out = tmp_path / "out"
        out.mkdir()
        for n in src.names():
            src.copy_to(n, out / n)
        assert {n: sha_file(out / n) for n in src.names()} == EXPECTED
        assert {n: sha_file(src.local_path(n)) for n in src.names()} == EXPECTED
        assert sorted(p.name for p in out.iterdir()) == sorted(FILE_SET)  # no temporary leftovers


def test_form_comes_from_the_bytes_not_the_name(inputs: dict[str, Path], tmp_path: Path) -> None:
    disguised = {
        "a.img": inputs["tgz/sdcard"],
        "b.tgz": inputs["zip/sdcard"],
        "c.zip": inputs["img/mbr-fat32"],
        "d.tar": inputs["img.xz"],
    }
    for new, real in disguised.items():
        shutil.copyfile(real, tmp_path / new)
    assert detect_form(tmp_path / "a.img") == "tar"
    assert detect_form(tmp_path / "b.tgz") == "zip"
    assert detect_form(tmp_path / "c.zip") == "img"
    assert detect_form(tmp_path / "d.tar") == "img.xz"
    with open_package(tmp_path / "c.zip", tmp_path / "work") as src:
        assert src.form == "img" and src.names() == sorted(FILE_SET)


def test_image_is_read_in_place(inputs: dict[str, Path], tmp_path: Path) -> None:
    work = tmp_path / "work"
    with open_package(inputs["img/p2-behind-ext4"], work) as src:
        assert src.fat.path == inputs["img/p2-behind-ext4"]  # type: ignore[attr-defined]
        assert src.fat.offset == 18432 * SECTOR  # type: ignore[attr-defined]
        assert "partition 2" in src.location
        src.names()
    with open_package(inputs["img.zip/stored"], work) as src:
        # a stored member is read inside the zip, at its data offset: nothing decompressed
        assert src.fat.path == inputs["img.zip/stored"]  # type: ignore[attr-defined]
    assert not any(work.rglob("*.img"))


def test_gpt_partition_found_in_a_folder(inputs: dict[str, Path], tmp_path: Path) -> None:
    with open_package(inputs["img/gpt-fat32-in-folder"], tmp_path / "w") as src:
        assert "GPT" in src.location and "folder /sdcard" in src.location
    parts = read_partitions(inputs["img/gpt-fat32-in-folder"])
    assert [(p.number, p.start, p.size, p.scheme) for p in parts] == [(1, MiB, 48 * MiB, "gpt")]
    assert "SDCARD" in parts[0].kind


def test_mbr_logical_partitions_are_searched(inputs: dict[str, Path]) -> None:
    parts = read_partitions(inputs["img/mbr-logical"])
    assert [(p.number, p.start // SECTOR) for p in parts] == [(1, 2048), (5, 12288)]


@pytest.mark.parametrize("case", ["img.xz", "img.zip/deflated"])
def test_decompressed_image_is_sparse_and_reused(case: str, inputs: dict[str, Path], tmp_path: Path) -> None:
    work = tmp_path / "work"
    with open_package(inputs[case], work) as src:
        disk = src.fat.path  # type: ignore[attr-defined]
        assert disk.is_relative_to(work)
        st = disk.stat()
        assert st.st_size == inputs["img/mbr-fat32"].stat().st_size
        assert sha_file(disk) == sha_file(inputs["img/mbr-fat32"])
        assert st.st_blocks * 512 < st.st_size // 4, "the empty area must be holes"
        first_inode = st.st_ino
    with open_package(inputs[case], work) as again:
        assert again.fat.path.stat().st_ino == first_inode  # type: ignore[attr-defined]
        assert sha_stream(again, "rootfs_rw.1-of-2.gz") == EXPECTED["rootfs_rw.1-of-2.gz"]


def test_tarball_extracted_once_and_reused(inputs: dict[str, Path], tmp_path: Path) -> None:
    work = tmp_path / "work"
    with open_package(inputs["tgz/sdcard"], work) as src:
        path = src.local_path("rootfs_rw.1-of-2.gz")
        assert path.is_relative_to(work)
        inode = path.stat().st_ino
        assert src.location == "folder sdcard/"
    assert not list(work.rglob("*.partial-*"))
    with open_package(inputs["tgz/sdcard"], work) as src:
        assert src.local_path("rootfs_rw.1-of-2.gz").stat().st_ino == inode


def test_folder_is_used_in_place_and_copies_link_or_copy(inputs: dict[str, Path], tmp_path: Path) -> None:
    with open_package(inputs["dir"], tmp_path / "w") as src:
        assert src.local_path("boot.scr") == inputs["dir"] / "boot.scr"
        linked = tmp_path / "linked"
        src.copy_to("boot.scr", linked)
        copied = tmp_path / "copied"
        src.copy_to("boot.scr", copied, link=False)
        assert copied.stat().st_ino != (inputs["dir"] / "boot.scr").stat().st_ino
        assert linked.read_bytes() == copied.read_bytes() == FILE_SET["boot.scr"]


def test_subfolders_are_listed_and_reported(tmp_path: Path) -> None:
    files = dict(FILE_SET, **{"extra/notes.txt": b"n", "extra/deep/x.bin": b"xx"})
    write_set(tmp_path / "pkg", files)
    sh("tar", "-czf", tmp_path / "pkg.tgz", "-C", tmp_path, "pkg")
    for path in (tmp_path / "pkg", tmp_path / "pkg.tgz"):
        with open_package(path, tmp_path / "w") as src:
            assert src.names() == sorted(files)
            assert src.subfolders == ("extra", "extra/deep")
            assert sha_stream(src, "extra/deep/x.bin") == hashlib.sha256(b"xx").hexdigest()


def test_desktop_metadata_is_ignored(tmp_path: Path) -> None:
    junk = {"._boot.scr": b"\0\5\26\7", ".DS_Store": b"ds", "__MACOSX/._gpt.gz": b"x", "Thumbs.db": b"t"}
    write_set(tmp_path / "pkg", dict(FILE_SET, **junk))
    sh("zip", "-q", "-r", tmp_path / "mac.zip", ".", cwd=tmp_path / "pkg")
    for path in (tmp_path / "pkg", tmp_path / "mac.zip"):
        with open_package(path, tmp_path / "w") as src:
            assert src.names() == sorted(FILE_SET)
            assert src.ignored == tuple(sorted(junk))
            assert src.subfolders == ()


def test_missing_member_is_a_package_error(inputs: dict[str, Path], tmp_path: Path) -> None:
    with open_package(inputs["zip/none"], tmp_path / "w") as src:
        assert "boot.scr" in src and "post.scr" not in src
        with pytest.raises(PackageError, match=r"no file 'post\.scr'"):
            src.open("post.scr")


# --- errors ----------------------------------------------------------------------------------


def test_no_boot_scr(tmp_path: Path) -> None:
    files = {n: d for n, d in FILE_SET.items() if n != "boot.scr"}
    write_set(tmp_path / "pkg", files)
    with pytest.raises(PackageError) as err:
        open_package(tmp_path / "pkg", tmp_path / "w")
    msg = str(err.value)
    assert "boot.scr in no folder" in msg and "boot_emmc.scr in the top folder" in msg
    assert "hint:" in msg


def test_names_are_case_sensitive(tmp_path: Path) -> None:
    files = {("BOOT.SCR" if n == "boot.scr" else n): d for n, d in FILE_SET.items()}
    write_set(tmp_path / "pkg", files)
    with pytest.raises(PackageError, match="case-sensitive"):
        open_package(tmp_path / "pkg", tmp_path / "w")


def test_two_candidate_folders(tmp_path: Path) -> None:
    write_set(tmp_path / "pkg" / "a")
    write_set(tmp_path / "pkg" / "b")
    with pytest.raises(PackageError, match=r"2 folders each hold a file set.*a/, b/"):
        open_package(tmp_path / "pkg", tmp_path / "w")
    sh("tar", "-czf", tmp_path / "two.tgz", "-C", tmp_path / "pkg", "a", "b")
    with pytest.raises(PackageError, match="2 folders"):
        open_package(tmp_path / "two.tgz", tmp_path / "w")
    assert not list((tmp_path / "w").rglob("tree")), "a refused tarball must not stay cached as good"


def test_truncated_tgz(inputs: dict[str, Path], tmp_path: Path) -> None:
    data = inputs["tgz/sdcard"].read_bytes()
    bad = tmp_path / "cut.tgz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match="tarball is truncated or damaged"):
        open_package(bad, tmp_path / "w")
    assert not list((tmp_path / "w").rglob("tree*")), "no partial extraction left behind"


def test_truncated_zip(inputs: dict[str, Path], tmp_path: Path) -> None:
    data = inputs["zip/sdcard"].read_bytes()
    bad = tmp_path / "cut.zip"
    bad.write_bytes(data[: len(data) - 2000])
    with pytest.raises(PackageError, match="zip archive is truncated or damaged"):
        open_package(bad, tmp_path / "w")


def test_corrupt_zip_member_is_reported_when_read(inputs: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(inputs["zip/none"].read_bytes())
    at = data.find(FILE_SET["rootfs_rw.1-of-2.gz"][1000:1016])  # random data is stored as is
    assert at > 0
    data[at] ^= 0xFF
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    with open_package(bad, tmp_path / "w") as src:
        with pytest.raises(PackageError, match=r"rootfs_rw\.1-of-2\.gz"):
            sha_stream(src, "rootfs_rw.1-of-2.gz")
        assert sha_stream(src, "boot.scr") == EXPECTED["boot.scr"]


def test_truncated_xz(inputs: dict[str, Path], tmp_path: Path) -> None:
    data = inputs["img.xz"].read_bytes()
    bad = tmp_path / "cut.img.xz"
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(PackageError, match="truncated or damaged"):
        open_package(bad, tmp_path / "w")
    assert not list((tmp_path / "w").rglob("*.img*")), "no partial image left behind"


def test_garbage_and_empty_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(rand(100_000, 42))
    with pytest.raises(PackageError) as err:
        open_package(junk, tmp_path / "w")
    assert "supported forms" in str(err.value) and ".img.xz" in str(err.value)
    empty = tmp_path / "empty.tgz"
    empty.write_bytes(b"")
    with pytest.raises(PackageError, match="empty file"):
        open_package(empty, tmp_path / "w")
    with pytest.raises(PackageError, match="does not exist"):
        open_package(tmp_path / "nothere.img", tmp_path / "w")


def test_zstd_gets_a_specific_hint(tmp_path: Path) -> None:
    f = tmp_path / "pkg.tar.zst"
    f.write_bytes(b"\x28\xb5\x2f\xfd" + rand(600, 1))
    with pytest.raises(PackageError, match="zstd -d"):
        open_package(f, tmp_path / "w")


def test_zip_without_a_file_set(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("hello")
    sh("zip", "-q", "-r", tmp_path / "stuff.zip", "stuff", cwd=tmp_path)
    with pytest.raises(PackageError, match=r"no folder holds both.*top level: stuff/"):
        open_package(tmp_path / "stuff.zip", tmp_path / "w")


def test_image_without_fat_partition(tmp_path: Path) -> None:
    img = blank(tmp_path / "linux.img", 16 * MiB)
    sfdisk(img, "label: dos\nstart=2048, type=83\n")
    sh("mke2fs", "-q", "-t", "ext4", "-E", f"offset={2048 * SECTOR}", img, "8M")
    with pytest.raises(PackageError, match=r"no FAT partition.*partition 1 .*ext2/3/4"):
        open_package(img, tmp_path / "w")


def test_fat_partition_without_file_set(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "kernel.img").write_bytes(b"k")
    img = blank(tmp_path / "boot.img", 48 * MiB)
    sfdisk(img, "label: dos\nstart=2048, type=c\n")
    fat_volume(img, 2048, 40, 32, other)
    with pytest.raises(PackageError, match=r"no FAT partition holds.*partition 1.*kernel.img"):
        open_package(img, tmp_path / "w")


def test_two_fat_partitions_with_file_sets(tmp_path: Path, inputs: dict[str, Path]) -> None:
    img = blank(tmp_path / "two.img", 96 * MiB)
    sfdisk(img, "label: dos\nstart=2048, size=81920, type=c\nstart=86016, size=81920, type=c\n")
    fat_volume(img, 2048, 40, 32, inputs["dir"])
    fat_volume(img, 86016, 40, 32, inputs["dir"])
    with pytest.raises(PackageError, match=r"several FAT partitions.*partition 1.*partition 2"):
        open_package(img, tmp_path / "w")


def test_truncated_image(inputs: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.img"
    with open(inputs["img/mbr-fat32"], "rb") as f:
        cut.write_bytes(f.read(20 * MiB))
    with pytest.raises(PackageError, match="truncated"):
        open_package(cut, tmp_path / "w")


def test_damaged_gpt(inputs: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.img"
    shutil.copyfile(inputs["img/gpt-fat32-in-folder"], bad)
    with open(bad, "r+b") as f:
        f.seek(2 * SECTOR + 40)  # inside partition entry 1 (first LBA)
        f.write(b"\x07")
    with pytest.raises(PackageError, match="GPT partition entries checksum"):
        open_package(bad, tmp_path / "w")


def test_unsafe_and_linked_tar_members(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(PackageError, match="unsafe member path"):
        open_package(evil, tmp_path / "w")
    assert not (tmp_path / "escape.txt").exists()

    pkg = write_set(tmp_path / "pkg")
    os.symlink("boot.scr", pkg / "alias.scr")
    sh("tar", "-czf", tmp_path / "linked.tgz", "-C", pkg, ".")
    with pytest.raises(PackageError, match=r"alias.scr \(symbolic link to boot.scr\)"):
        open_package(tmp_path / "linked.tgz", tmp_path / "w")
