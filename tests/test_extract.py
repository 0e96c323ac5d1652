"""Safe extraction: real archives (made by GNU tar and Info-ZIP, or crafted with tarfile/zipfile
when a tool would refuse to make them), unpacked and read back from the host folder."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from builder.customise.extract import ExtractedEntry, detect_format, extract_archive, unpacked_size
from builder.errors import BuildError

WHERE = "test.yaml:3 apps.demo.source"


# ---------------------------------------------------------------------------- helpers


def make_tree(root: Path) -> Path:
    """pkg-1.0/ with nested folders, exec and plain files, a relative symlink inside."""
    top = root / "pkg-1.0"
    (top / "bin").mkdir(parents=True)
    (top / "lib" / "deep" / "er").mkdir(parents=True)
    (top / "bin" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (top / "bin" / "run.sh").chmod(0o755)
    (top / "README").write_text("read me\n")
    (top / "README").chmod(0o644)
    (top / "lib" / "deep" / "er" / "data.bin").write_bytes(os.urandom(70_000))
    (top / "lib" / "deep" / "er" / "data.bin").chmod(0o640)
    (top / "lib" / "deep").chmod(0o750)
    (top / "lib" / "current").symlink_to("deep/er")
    (top / "link-to-readme").symlink_to("README")
    return top


def tar_with_cli(src_parent: Path, out: Path, flag: str) -> Path:
    subprocess.run(["tar", f"-c{flag}f", str(out), "-C", str(src_parent), "pkg-1.0"], check=True)
    return out


def zip_with_cli(src_parent: Path, out: Path) -> Path:
    subprocess.run(["zip", "-qry", str(out), "pkg-1.0"], cwd=src_parent, check=True)
    return out


def crafted_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def info(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.linkname = link
    return ti


def crafted_zip(path: Path, members: list[tuple[str, int, bytes]]) -> Path:
    """Members as (name, unix st_mode with type bits, content)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, mode, data in members:
            zi = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            zi.create_system = 3
            zi.external_attr = (mode & 0xFFFF) << 16
            zf.writestr(zi, data)
    return path


def by_path(entries: list[ExtractedEntry]) -> dict[str, ExtractedEntry]:
    return {e.path: e for e in entries}


def assert_nothing_outside(tmp_path: Path, dest: Path) -> None:
    """No stray file appeared next to the destination (where ../ attacks would land)."""
    allowed = {dest.name, "archives", "src"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in allowed) == []


def refused(archive: Path, dest: Path, *fragments: str, strip: int = 0) -> BuildError:
    with pytest.raises(BuildError) as caught:
        extract_archive(archive, dest, strip_components=strip, where=WHERE)
    text = str(caught.value)
    assert archive.name in text
    assert WHERE in text
    assert caught.value.hint
    for fragment in fragments:
        assert fragment in text, text
    return caught.value


@pytest.fixture
def archives(tmp_path: Path) -> Path:
    d = tmp_path / "archives"
    d.mkdir()
    return d


# ---------------------------------------------------------------------------- good archives


@pytest.mark.parametrize(("flag", "suffix", "fmt"), [("z", "tar.gz", "tar.gz"), ("J", "tar.xz", "tar.xz"),
                                                     ("j", "tar.bz2", "tar.bz2"), ("", "tar", "tar"),
                                                     ("zip", "zip", "zip")])  # fmt: skip
def test_good_archive_round_trip(tmp_path: Path, archives: Path, flag: str, suffix: str, fmt: str) -> None:
    src = tmp_path / "src"
    top = make_tree(src)
    archive = archives / f"good.{suffix}"
    if flag == "zip":
        zip_with_cli(src, archive)
    else:
        tar_with_cli(src, archive, flag)
    assert detect_format(archive) == fmt
    # A misleading name changes nothing: the format comes from the bytes.
    renamed = archives / "download.bin"
    shutil.copyfile(archive, renamed)

    dest = tmp_path / "dest"
    entries = extract_archive(renamed, dest, strip_components=1, where=WHERE)

    got = by_path(entries)
    assert [e.path for e in entries] == sorted(got)
    assert not (dest / "pkg-1.0").exists()
    for rel in ("bin/run.sh", "README", "lib/deep/er/data.bin"):
        assert (dest / rel).read_bytes() == (top / rel).read_bytes()
        mode = stat.S_IMODE((top / rel).stat().st_mode)
        assert stat.S_IMODE((dest / rel).stat().st_mode) == mode
        assert got[rel] == ExtractedEntry(rel, "file", mode, size=(top / rel).stat().st_size)
    assert os.readlink(dest / "lib" / "current") == "deep/er"
    assert got["lib/current"].kind == "symlink" and got["lib/current"].target == "deep/er"
    assert (dest / "link-to-readme").read_text() == "read me\n"
    assert stat.S_IMODE((dest / "lib" / "deep").stat().st_mode) == 0o750
    assert got["lib/deep"].kind == "dir" and got["lib/deep"].mode == 0o750
    assert {e.kind for e in entries} == {"file", "dir", "symlink"}
    assert_nothing_outside(tmp_path, dest)


def test_without_strip_keeps_the_top_folder(tmp_path: Path, archives: Path) -> None:
    make_tree(tmp_path / "src")
    archive = tar_with_cli(tmp_path / "src", archives / "a.tgz", "z")
    entries = extract_archive(archive, tmp_path / "dest", where=WHERE)
    assert "pkg-1.0/bin/run.sh" in by_path(entries)
    assert (tmp_path / "dest" / "pkg-1.0" / "bin" / "run.sh").exists()


def test_strip_skips_members_with_too_few_components(tmp_path: Path, archives: Path) -> None:
    archive = crafted_tar(
        archives / "s.tgz",
        [(info("top-level-file"), b"x"), (info("a/b/c.txt"), b"c"), (info("a/d.txt"), b"d")],
    )
    entries = extract_archive(archive, tmp_path / "dest", strip_components=2, where=WHERE)
    assert [e.path for e in entries] == ["c.txt"]
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["c.txt"]


def test_implicit_parents_and_read_only_folders(tmp_path: Path, archives: Path) -> None:
    archive = crafted_tar(
        archives / "ro.tgz",
        [
            (info("ro", tarfile.DIRTYPE, mode=0o555), None),
            (info("ro/inside.txt", mode=0o444), b"frozen"),
            (info("x/y/z.txt"), b"z"),
        ],
    )
    dest = tmp_path / "dest"
    got = by_path(extract_archive(archive, dest, where=WHERE))
    assert (dest / "ro" / "inside.txt").read_text() == "frozen"
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    assert stat.S_IMODE((dest / "ro" / "inside.txt").stat().st_mode) == 0o444
    assert got["x"].implicit and got["x/y"].implicit and got["x"].mode == 0o755
    assert not got["ro"].implicit
    (dest / "ro").chmod(0o755)  # let pytest clean up


def test_special_bits_are_dropped(tmp_path: Path, archives: Path) -> None:
    archive = crafted_tar(
        archives / "suid.tgz",
        [(info("sbin/tool", mode=0o4755), b"\x7fELF"), (info("shared", tarfile.DIRTYPE, mode=0o1777), None)],
    )
    dest = tmp_path / "dest"
    got = by_path(extract_archive(archive, dest, where=WHERE))
    assert got["sbin/tool"].mode == 0o755 and got["sbin/tool"].dropped_bits == stat.S_ISUID
    assert stat.S_IMODE((dest / "sbin" / "tool").stat().st_mode) == 0o755
    assert got["shared"].mode == 0o777 and got["shared"].dropped_bits == stat.S_ISVTX


def test_hardlink_inside_becomes_a_copy(tmp_path: Path, archives: Path) -> None:
    archive = crafted_tar(
        archives / "hl.tgz",
        [
            (info("a/orig.txt"), b"same bytes"),
            (info("b/alias.txt", tarfile.LNKTYPE, link="a/orig.txt"), None),
        ],
    )
    dest = tmp_path / "dest"
    got = by_path(extract_archive(archive, dest, where=WHERE))
    assert (dest / "b" / "alias.txt").read_bytes() == b"same bytes"
    assert got["b/alias.txt"].kind == "file" and got["b/alias.txt"].size == 10
    assert os.stat(dest / "b" / "alias.txt").st_ino != os.stat(dest / "a" / "orig.txt").st_ino


def test_zip_without_unix_modes_gets_defaults(tmp_path: Path, archives: Path) -> None:
    archive = archives / "win.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in (("dir/", b""), ("dir/file.txt", b"hello")):
            zi = zipfile.ZipInfo(name)
            zi.create_system = 0  # MS-DOS: no Unix modes
            zf.writestr(zi, data)
    got = by_path(extract_archive(archive, tmp_path / "dest", where=WHERE))
    assert got["dir"].mode == 0o755 and got["dir/file.txt"].mode == 0o644


def test_links_inside_are_fine_even_through_other_links(tmp_path: Path, archives: Path) -> None:
    archive = crafted_tar(
        archives / "links.tgz",
        [
            (info("real/deep", tarfile.DIRTYPE, mode=0o755), None),
            (info("real/deep/f"), b"f"),
            (info("l1", tarfile.SYMTYPE, link="real/deep"), None),
            (info("l2", tarfile.SYMTYPE, link="l1/.."), None),  # = real, inside
            (info("real/up", tarfile.SYMTYPE, link="../l1/f"), None),
        ],
    )
    dest = tmp_path / "dest"
    extract_archive(archive, dest, where=WHERE)
    assert (dest / "real" / "up").read_text() == "f"
    assert (dest / "l2" / "deep" / "f").read_text() == "f"


# ---------------------------------------------------------------------------- refused: tar


@pytest.mark.parametrize(
    ("members", "fragments"),
    [
        ([(info("../x"), b"evil")], ["'../x'", "'..'"]),
        ([(info("ok/../../x"), b"evil")], ["'..'"]),
        ([(info("/etc/passwd"), b"root::0:0")], ["'/etc/passwd'", "absolute"]),
        ([(info("etc", tarfile.SYMTYPE, link="/etc"), None)], ["'etc'", "absolute path '/etc'"]),
        ([(info("a", tarfile.SYMTYPE, link="../../"), None), (info("a/evil"), b"x")], ["'a'", "outside"]),
        ([(info("sub/a", tarfile.SYMTYPE, link="../.."), None)], ["'sub/a'", "outside"]),
        (
            [(info("in", tarfile.DIRTYPE), None), (info("a", tarfile.SYMTYPE, link="in"), None),
             (info("a/evil"), b"x")],
            ["'a/evil'", "through the symlink a"],
        ),
        ([(info("passwd", tarfile.LNKTYPE, link="../../etc/passwd"), None)], ["hard link", "'..'"]),
        ([(info("passwd", tarfile.LNKTYPE, link="/etc/passwd"), None)], ["absolute"]),
        ([(info("passwd", tarfile.LNKTYPE, link="not/in"), None)], ["hard link", "not a file extracted"]),
        (
            [(info("d", tarfile.DIRTYPE), None), (info("h", tarfile.LNKTYPE, link="d"), None)],
            ["hard link"],
        ),
        ([(info("dev/tty", tarfile.CHRTYPE), None)], ["character device"]),
        ([(info("dev/sda", tarfile.BLKTYPE), None)], ["block device"]),
        ([(info("pipe", tarfile.FIFOTYPE), None)], ["FIFO"]),
        ([(info("f"), b"one"), (info("f"), b"two")], ["'f'", "twice"]),
        ([(info("f"), b"one"), (info("f", tarfile.DIRTYPE), None)], ["folder", "file"]),
        ([(info("f"), b"one"), (info("f/g"), b"two")], ["inside f"]),
        # A later link changes what an earlier target means: checked again at the end.
        ([(info("a", tarfile.SYMTYPE, link="d/.."), None), (info("d", tarfile.SYMTYPE, link="."), None)],
         ["'a'", "outside"]),
        (
            [(info("l1", tarfile.SYMTYPE, link="sub"), None), (info("sub", tarfile.DIRTYPE), None),
             (info("l2", tarfile.SYMTYPE, link="l1/../.."), None)],
            ["'l2'", "outside"],
        ),
        ([(info("loop", tarfile.SYMTYPE, link="loop/x"), None)], ["outside"]),
        ([(info("bad\nname"), b"x")], ["control character"]),
        ([(info("win\\path"), b"x")], ["backslash"]),
        ([(info("x" * 256), b"x")], ["longer than 255"]),
    ],
)  # fmt: skip
def test_unsafe_tar_is_refused(
    tmp_path: Path, archives: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], fragments: list[str]
) -> None:
    archive = crafted_tar(archives / "evil.tar.gz", members)
    dest = tmp_path / "dest"
    refused(archive, dest, *fragments)
    assert_nothing_outside(tmp_path, dest)
    assert not Path("/etc/evil").exists()


def test_refusal_names_the_member_after_strip(tmp_path: Path, archives: Path) -> None:
    archive = crafted_tar(archives / "e.tgz", [(info("top/link", tarfile.SYMTYPE, link="../../x"), None)])
    refused(archive, tmp_path / "dest", "'top/link'", "outside", strip=1)


def test_symlink_already_in_destination_is_not_written_through(tmp_path: Path, archives: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (dest / "models").symlink_to(outside)
    archive = crafted_tar(archives / "m.tgz", [(info("models/basic/x.bmodel"), b"model")])
    refused(archive, dest, "through the symlink models")
    assert list(outside.iterdir()) == []
    outside.rmdir()


def test_link_through_an_earlier_steps_symlink_is_resolved(tmp_path: Path, archives: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "here").symlink_to(".")
    archive = crafted_tar(archives / "m.tgz", [(info("up", tarfile.SYMTYPE, link="here/.."), None)])
    refused(archive, dest, "'up'", "outside")


def test_second_input_cannot_replace_files_unless_overwrite(tmp_path: Path, archives: Path) -> None:
    dest = tmp_path / "dest"
    first = crafted_tar(archives / "1.tgz", [(info("models/README"), b"first"), (info("keep"), b"k")])
    second = crafted_tar(archives / "2.tgz", [(info("models/README"), b"second"), (info("models/m"), b"m")])
    extract_archive(first, dest, where=WHERE)
    refused(second, dest, "would replace the file models/README")
    assert (dest / "models" / "README").read_text() == "first"
    got = by_path(extract_archive(second, dest, where=WHERE, overwrite=True))
    assert (dest / "models" / "README").read_text() == "second"
    assert "models" not in got  # the folder was already there, not made by this extraction
    assert sorted(got) == ["models/README", "models/m"]


# ---------------------------------------------------------------------------- refused: zip


@pytest.mark.parametrize(
    ("members", "fragments"),
    [
        ([("../evil.txt", stat.S_IFREG | 0o644, b"x")], ["'../evil.txt'", "'..'"]),
        ([("/abs.txt", stat.S_IFREG | 0o644, b"x")], ["absolute"]),
        ([("C:/windows.txt", stat.S_IFREG | 0o644, b"x")], ["absolute"]),
        ([("etc", stat.S_IFLNK | 0o777, b"/etc")], ["'etc'", "absolute path '/etc'"]),
        ([("up", stat.S_IFLNK | 0o777, b"../../..")], ["'up'", "outside"]),
        ([("d", stat.S_IFLNK | 0o777, b"."), ("d/x", stat.S_IFREG | 0o644, b"x")], ["through the symlink d"]),
        ([("fifo", stat.S_IFIFO | 0o644, b"")], ["FIFO"]),
        ([("sock", stat.S_IFSOCK | 0o644, b"")], ["socket"]),
        ([("tty", stat.S_IFCHR | 0o644, b"")], ["character device"]),
        ([("a.txt", stat.S_IFREG | 0o644, b"1"), ("a.txt", stat.S_IFREG | 0o644, b"2")], ["twice"]),
    ],
)
def test_unsafe_zip_is_refused(
    tmp_path: Path, archives: Path, members: list[tuple[str, int, bytes]], fragments: list[str]
) -> None:
    archive = archives / "evil.zip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name we want
        crafted_zip(archive, members)
    dest = tmp_path / "dest"
    refused(archive, dest, *fragments)
    assert_nothing_outside(tmp_path, dest)


# ---------------------------------------------------------------------------- not archives


def test_not_an_archive(tmp_path: Path, archives: Path) -> None:
    model = archives / "canny.bmodel"
    model.write_bytes(b"\x00" * 1000)
    assert detect_format(model) is None
    err = refused(model, tmp_path / "dest", "not an archive")
    assert err.hint is not None and "dest:" in err.hint


def test_truncated_archive(tmp_path: Path, archives: Path) -> None:
    make_tree(tmp_path / "src")
    whole = tar_with_cli(tmp_path / "src", archives / "whole.tgz", "z")
    cut = archives / "cut.tgz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    refused(cut, tmp_path / "dest", "cannot read", "tar.gz")


def test_gzip_that_is_not_a_tarball(tmp_path: Path, archives: Path) -> None:
    plain = archives / "notes.txt"
    plain.write_text("just text\n" * 100)
    subprocess.run(["gzip", "-k", str(plain)], check=True)
    refused(archives / "notes.txt.gz", tmp_path / "dest", "cannot read")


@pytest.mark.parametrize(("flag", "suffix"), [("z", "tgz"), ("J", "txz"), ("zip", "zip")])
def test_unpacked_size_matches_what_is_written(
    tmp_path: Path, archives: Path, flag: str, suffix: str
) -> None:
    make_tree(tmp_path / "src")
    archive = archives / f"a.{suffix}"
    if flag == "zip":
        zip_with_cli(tmp_path / "src", archive)
    else:
        tar_with_cli(tmp_path / "src", archive, flag)
    size, members = unpacked_size(archive, strip_components=1)
    entries = extract_archive(archive, tmp_path / "dest", strip_components=1, where=WHERE)
    assert members == len([e for e in entries if not e.implicit])
    written = sum(-(-e.size // 4096) * 4096 if e.kind == "file" else 4096 for e in entries)
    assert size >= written and size - written <= 4096 * len(entries)


def test_github_style_tarball_from_git_archive(tmp_path: Path, archives: Path) -> None:
    """`git archive` writes a pax global header (the commit id) and a top folder, as GitHub does."""
    repo = tmp_path / "src" / "repo"
    top = make_tree(repo)
    git = ["git", "-C", str(top), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(top)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    archive = archives / "ee2a9cb5.tar.gz"
    subprocess.run(
        [*git, "archive", "--format=tar.gz", "--prefix=SD-lcm-tpu-ee2a9cb5/", "-o", str(archive), "HEAD"],
        check=True,
    )
    dest = tmp_path / "dest"
    got = by_path(extract_archive(archive, dest, strip_components=1, where=WHERE))
    assert "pax_global_header" not in got and not (dest / "pax_global_header").exists()
    # git (and GitHub) archive with tar.umask 0002: 0775/0664, kept as they are.
    with tarfile.open(archive) as tar:
        modes = {m.name.split("/", 1)[1]: m.mode for m in tar if "/" in m.name and m.isreg()}
    assert modes["bin/run.sh"] == 0o775 and modes["README"] == 0o664
    for rel, mode in modes.items():
        assert stat.S_IMODE((dest / rel).stat().st_mode) == mode == got[rel].mode
    assert os.readlink(dest / "lib" / "current") == "deep/er"
    assert (dest / "lib" / "deep" / "er" / "data.bin").read_bytes() == (
        top / "lib/deep/er/data.bin"
    ).read_bytes()
