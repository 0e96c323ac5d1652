"""builder.fs.ext4 against real ext4 images made by mke2fs, read back with debugfs and e2fsck.

Images use Ubuntu 20.04's mke2fs.conf (what the vendor's mkfs.ext4 used), so they carry no
feature newer than e2fsprogs 1.45 (no orphan_file, no metadata_csum_seed). Results are checked
twice: through the API and independently with `debugfs -R stat/cat` and `e2fsck -fn`.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from builder.errors import BuildError
from builder.fs import ext4
from builder.fs.ext4 import EditBatch, Ext4Image, FileType
from builder.fs.ext4.debugfs import _run_debugfs

EPOCH = 1_700_000_000

UBUNTU_2004_MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t\tinode_size = 256
\t}
"""

NEW_FEATURES = {"orphan_file", "metadata_csum_seed", "orphan_present"}


# ----------------------------------------------------------------------------- helpers


def tool_env(tmp: Path) -> dict[str, str]:
    conf = tmp / "mke2fs.conf"
    if not conf.exists():
        conf.write_text(UBUNTU_2004_MKE2FS_CONF)
    env = dict(os.environ, MKE2FS_CONFIG=str(conf), LC_ALL="C", E2FSPROGS_FAKE_TIME=str(EPOCH - 1000))
    env.pop("SOURCE_DATE_EPOCH", None)
    return env


def sh(args: list[str | Path], tmp: Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([str(a) for a in args], capture_output=True, env=tool_env(tmp), check=False)
    assert proc.returncode in ok, (args, proc.stdout.decode(), proc.stderr.decode())
    return proc


def make_image(
    tmp: Path,
    name: str = "fs.img",
    size_mb: int = 64,
    *,
    tree: Path | None = None,
    opts: tuple[str, ...] = (),
) -> Path:
    image = tmp / name
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    args: list[str | Path] = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "rootfs", *opts]
    args += [
        "-U",
        "11111111-2222-3333-4444-555555555555",
        "-E",
        "hash_seed=66666666-7777-8888-9999-000000000000",
    ]
    if tree is not None:
        args += ["-d", tree]
    sh([*args, image], tmp)
    return image


def make_shrunk_image(tmp: Path, name: str = "shrunk.img") -> Path:
    """The vendor's sequence: mkfs at full size, fill, e2fsck -f -p, resize2fs -M."""
    tree = tmp / f"{name}.tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("airbox\n")
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "tool").write_bytes(os.urandom(300_000))
    image = make_image(tmp, name, 64, tree=tree)
    sh(["e2fsck", "-f", "-p", image], tmp)
    sh(["resize2fs", "-M", image], tmp)
    return image


def dbg(image: Path, request: str) -> str:
    """debugfs -R, independent of the module under test."""
    proc = subprocess.run(
        ["debugfs", "-R", request, str(image)],
        capture_output=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def dq(path: str) -> str:
    """A debugfs word: quoted, inner quotes doubled (libss rules)."""
    return '"' + path.replace('"', '""') + '"'


def dbg_cat(image: Path, path: str) -> bytes:
    proc = subprocess.run(["debugfs", "-R", f"cat {dq(path)}", str(image)], capture_output=True, check=True)
    return proc.stdout


def dbg_stat(image: Path, path: str) -> dict[str, object]:
    text = dbg(image, f"stat {dq(path)}")
    m = re.search(r"Type: (.+?)\s+Mode:\s+(\d+)", text)
    assert m, text
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", text)
    assert owner
    times = {k: v for k, v in re.findall(r"^\s*(\w+):\s+0x([0-9a-f:]+) --", text, re.M)}
    return {
        "type": m[1],
        "mode": int(m[2], 8),
        "uid": int(owner[1]),
        "gid": int(owner[2]),
        "times": times,
        "text": text,
    }


def fsck_clean(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def host_file(tmp: Path, name: str, data: bytes, mode: int = 0o644) -> Path:
    p = tmp / "host" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    p.chmod(mode)
    return p


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path)


# ----------------------------------------------------------------------------- version and info


def test_version_is_read_from_debugfs_and_supported() -> None:
    version = ext4.e2fsprogs_version()
    out = subprocess.run(["debugfs", "-V"], capture_output=True, check=False)
    text = (out.stdout + out.stderr).decode()
    assert f"{version[0]}.{version[1]}" in text
    assert ext4.require_e2fsprogs() >= (1, 45, 0)


def test_info_reports_geometry_and_keeps_old_feature_set(tmp_path: Path, image: Path) -> None:
    info = Ext4Image(image).info()
    assert info.block_size == 4096
    assert info.block_count * 4096 == 64 << 20
    assert info.label == "rootfs"
    assert info.uuid == "11111111-2222-3333-4444-555555555555"
    assert {"extent", "metadata_csum", "64bit", "has_journal"} <= info.features
    assert not info.features & NEW_FEATURES
    assert 0 < info.free_blocks < info.block_count
    assert info.free_inodes == info.inode_count - 11
    assert info.inode_size == 256
    dumpe2fs = sh(["dumpe2fs", "-h", image], tmp_path).stdout.decode()
    assert f"Free blocks:              {info.free_blocks}" in dumpe2fs


# ----------------------------------------------------------------------------- writing and reading back


def test_write_files_dirs_symlinks_modes_owners_xattrs(tmp_path: Path, image: Path) -> None:
    img = Ext4Image(image, epoch=EPOCH)
    secret = host_file(tmp_path, "secret", b"s3cr3t\n", 0o644)
    tool = host_file(tmp_path, "tool", os.urandom(50_000), 0o755)
    long_target = "/opt/" + "x" * 100
    features_before = img.info().features
    with img.edit() as b:
        b.write("/etc/ssh/secret key", secret, mode=0o600, uid=1000, gid=1000)
        b.write("/usr/bin/su-tool", tool, mode=0o4755)
        b.mkdir("/home/linaro", mode=0o700, uid=1000, gid=1000)
        b.write_text('/home/linaro/say "hi".txt', "hello\n", mode=0o640, uid=1000, gid=1000)
        b.symlink("/etc/fast-link", "ssh/secret key")
        b.symlink("/etc/slow-link", long_target, uid=1000, gid=1000)
        b.set_xattr("/home/linaro", "trusted.overlay.opaque", "y")
        b.set_xattr("/usr/bin/su-tool", "security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00")
        b.whiteout("/etc/removed.conf")
    fsck_clean(image)
    assert img.info().features == Ext4Image(image).info().features == features_before

    # independently, with debugfs
    assert dbg_cat(image, "/etc/ssh/secret key") == b"s3cr3t\n"
    assert dbg_cat(image, "/usr/bin/su-tool") == tool.read_bytes()
    st = dbg_stat(image, "/etc/ssh/secret key")
    assert (st["type"], st["mode"], st["uid"], st["gid"]) == ("regular", 0o600, 1000, 1000)
    st = dbg_stat(image, "/usr/bin/su-tool")
    assert (st["mode"], st["uid"]) == (0o4755, 0)
    assert "security.capability (8)" in str(st["text"])
    st = dbg_stat(image, "/home/linaro")
    assert (st["type"], st["mode"], st["uid"], st["gid"]) == ("directory", 0o700, 1000, 1000)
    assert 'trusted.overlay.opaque (1) = "y"' in str(st["text"])
    assert dbg_cat(image, '/home/linaro/say "hi".txt') == b"hello\n"
    st = dbg_stat(image, "/etc/ssh")
    assert (st["mode"], st["uid"]) == (0o755, 0)  # a parent made on the way: 0755 root:root
    assert 'Fast link dest: "ssh/secret key"' in str(dbg_stat(image, "/etc/fast-link")["text"])
    assert dbg_cat(image, "/etc/slow-link") == long_target.encode()
    assert "Device major/minor number: 00:00" in str(dbg_stat(image, "/etc/removed.conf")["text"])

    # and through the API
    assert img.read_file("/etc/ssh/secret key") == b"s3cr3t\n"
    assert img.read_file("/etc/fast-link") == b"s3cr3t\n"  # symlinks followed
    s = img.stat("/usr/bin/su-tool")
    assert s is not None and s.type is FileType.FILE and s.mode == 0o4755 and s.size == 50_000
    link = img.stat("/etc/slow-link")
    assert link is not None and link.type is FileType.SYMLINK and link.uid == 1000
    assert img.readlink("/etc/slow-link") == long_target
    assert img.readlink("/etc/fast-link") == "ssh/secret key"
    wh = img.stat("/etc/removed.conf")
    assert wh is not None and wh.is_whiteout and wh.mode == 0
    assert img.get_xattrs("/home/linaro") == {"trusted.overlay.opaque": b"y"}
    assert img.get_xattr("/home/linaro", "trusted.overlay.opaque") == b"y"
    assert img.get_xattr("/etc", "trusted.overlay.opaque") is None
    assert img.exists("/etc/ssh/secret key") and not img.exists("/etc/ssh/nope")
    assert img.stat("/nope/deeper") is None
    assert img.listdir("/etc") == ["fast-link", "removed.conf", "slow-link", "ssh"]
    assert img.listdir("/home/linaro") == ['say "hi".txt']


def test_every_new_inode_and_changed_dir_carries_the_epoch(tmp_path: Path, image: Path) -> None:
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.write_text("/a/b/file", "x")
        b.symlink("/a/link", "b/file")
        b.mknod("/a/fifo", "fifo", mode=0o600)
        b.mknod("/a/null", "char", 1, 3, mode=0o666)
    want = f"{EPOCH:08x}"
    for path in ("/a", "/a/b", "/a/b/file", "/a/link", "/a/fifo", "/a/null"):
        times = dbg_stat(image, path)["times"]
        assert set(times) == {"atime", "mtime", "ctime", "crtime"}, path
        assert all(v == f"{want}:00000000" for v in times.values()), (path, times)
    root = dbg_stat(image, "/")["times"]
    assert root["mtime"].startswith(want) and root["ctime"].startswith(want)
    null = img.stat("/a/null")
    assert null is not None and null.rdev == (1, 3) and null.mode == 0o666
    fifo = img.stat("/a/fifo")
    assert fifo is not None and fifo.type is FileType.FIFO
    dump = subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, check=True, env={**os.environ, "TZ": "UTC"}
    ).stdout.decode()
    assert re.search(rf"Last write time:\s+{time.asctime(time.gmtime(EPOCH))}", dump)  # superblock too
    fsck_clean(image)


def test_replace_existing_file_and_symlink(tmp_path: Path, image: Path) -> None:
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.write_text("/etc/hostname", "old\n")
        b.symlink("/etc/resolv.conf", "../run/resolv.conf")
        b.set_xattr("/etc/hostname", "user.note", "keep?")
    before = img.stat("/etc/hostname")
    with img.edit() as b:
        b.write_text("/etc/hostname", "new\n", mode=0o600)
        b.write_text("/etc/resolv.conf", "nameserver 1.1.1.1\n")  # the symlink itself is replaced
    after = img.stat("/etc/hostname")
    assert before is not None and after is not None
    assert dbg_cat(image, "/etc/hostname") == b"new\n"
    assert after.mode == 0o600 and after.xattr_names == ()
    resolv = img.stat("/etc/resolv.conf")
    assert resolv is not None and resolv.type is FileType.FILE
    assert not img.exists("/run/resolv.conf")
    fsck_clean(image)


def test_rewriting_a_file_keeps_its_mode_and_owner_unless_given(image: Path) -> None:
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.write_text("/etc/shadow", "root:*:19000::::::\n", mode=0o640, uid=0, gid=42)
        b.write_text("/etc/big-ids", "x", mode=0o600, uid=70000, gid=70001)
        b.symlink("/etc/was-link", "shadow")
    with img.edit() as b:
        b.write_text("/etc/shadow", "root:$6$x:19000::::::\n")
        b.write_text("/etc/was-link", "now a file\n")
        b.write_text("/etc/new", "n\n")
        b.write_text("/etc/big-ids", "y", gid=5)
    shadow = img.stat("/etc/shadow")
    assert shadow is not None and (shadow.mode, shadow.uid, shadow.gid) == (0o640, 0, 42)
    assert img.read_text("/etc/shadow").startswith("root:$6$")
    for path in ("/etc/was-link", "/etc/new"):
        st = img.stat(path)
        assert st is not None and (st.type, st.mode, st.uid, st.gid) == (FileType.FILE, 0o644, 0, 0)
    big = img.stat("/etc/big-ids")
    assert big is not None and big.mode == 0o600 and big.gid == 5
    if ext4.e2fsprogs_version() >= (1, 46):  # 1.45's `ls -p` shows 16-bit ids
        assert big.uid == 70000
    fsck_clean(image)


def test_writing_over_a_directory_or_through_a_file_is_refused(tmp_path: Path, image: Path) -> None:
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.write_text("/etc/passwd", "root:x:0:0::/root:/bin/sh\n")
        b.mkdir("/opt/app")
    snapshot = sha256(image)
    b = img.edit().write_text("/etc/passwd/oops", "x")
    with pytest.raises(BuildError) as err:
        b.apply()
    assert "/etc/passwd/oops" in str(err.value) and "not a directory" in str(err.value)
    with pytest.raises(BuildError, match="/opt/app is a directory"):
        img.edit().write_text("/opt/app", "x").apply()
    with pytest.raises(BuildError, match="/etc/passwd"):
        img.edit().mkdir("/etc/passwd").apply()
    assert sha256(image) == snapshot  # refused before debugfs ran


def test_debugfs_failure_is_an_error_naming_the_path(tmp_path: Path, image: Path) -> None:
    """debugfs exits 0 when a command fails: the error must still surface, tied to the path."""
    img = Ext4Image(image, epoch=EPOCH)
    b = img.edit()
    b.write_text("/etc/ok-before", "1")
    b.set_xattr("/etc/ok-before", "user.big", os.urandom(5000))  # bigger than a block
    b.write_text("/etc/ok-after", "2")
    with pytest.raises(BuildError) as err:
        b.apply()
    text = str(err.value)
    assert "/etc/ok-before" in text and "Insufficient space" in text and "ea_set" in text
    assert "/etc/ok-after:" not in text
    assert err.value.where and "/etc/ok-before" in err.value.where


def test_marker_ties_each_error_to_its_command(image: Path) -> None:
    results = _run_debugfs(
        image, [b"stat <2>", b'cd "/no such dir"', b"stat <11>"], write=False, epoch=None
    )
    assert [bool(r.err) for r in results] == [False, True, False]
    assert b"File not found" in results[1].err[0]
    assert b"Type: directory" in b"\n".join(results[2].out)


def test_debugfs_open_failure_is_reported(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(BuildError, match="not a readable ext2/3/4 image"):
        Ext4Image(junk).info()
    with pytest.raises(BuildError, match="could not open"):
        _run_debugfs(junk, [b"stat <2>"], write=False, epoch=None)


@pytest.mark.parametrize("bad", ["/etc/new\nline", "/etc/cr\rname", "relative/path", "/etc/../passwd"])
def test_inexpressible_names_are_refused_naming_the_path(image: Path, bad: str) -> None:
    with pytest.raises(BuildError) as err:
        Ext4Image(image, epoch=EPOCH).edit().write_text(bad, "x")
    assert repr(bad)[1:-1] in str(err.value) or bad in str(err.value)


def test_epoch_is_required_and_must_be_usable(image: Path) -> None:
    with pytest.raises(BuildError, match="epoch"):
        Ext4Image(image).edit().write_text("/x", "y").apply()
    with pytest.raises(BuildError, match="epoch"):
        Ext4Image(image, epoch=0).edit().write_text("/x", "y").apply()


# ----------------------------------------------------------------------------- directories


def test_mkdir_sets_existing_makedirs_keeps_existing(image: Path) -> None:
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.mkdir("/srv/data", 0o750, 1000, 1000)
    with img.edit() as b:
        b.makedirs("/srv/data", 0o700, 0, 0)  # exists: untouched
        b.makedirs("/srv/data/a/b", 0o700, 1001, 1001)
    st = img.stat("/srv/data")
    assert st is not None and (st.mode, st.uid, st.gid) == (0o750, 1000, 1000)
    a, leaf = img.stat("/srv/data/a"), img.stat("/srv/data/a/b")
    assert a is not None and (a.mode, a.uid) == (0o755, 0)
    assert leaf is not None and (leaf.mode, leaf.uid, leaf.gid) == (0o700, 1001, 1001)
    with img.edit() as b:
        b.mkdir("/srv/data", 0o755, 0, 0)  # mkdir: make it match
        b.chown("/srv/data/a/b", 70000, 70001)
        b.chmod("/srv/data/a", 0o1777)
    st = img.stat("/srv/data")
    assert st is not None and (st.mode, st.uid, st.gid) == (0o755, 0, 0)
    leaf = img.stat("/srv/data/a/b")
    assert leaf is not None and (leaf.uid, leaf.gid) == (70000, 70001)
    a = img.stat("/srv/data/a")
    assert a is not None and a.mode == 0o1777
    fsck_clean(image)


def test_symlinked_parents_are_followed_inside_the_image(image: Path) -> None:
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.mkdir("/usr/lib")
        b.symlink("/lib", "usr/lib")
        b.symlink("/abs", "/usr")
    with img.edit() as b:
        b.write_text("/lib/systemd/system/app.service", "[Unit]\n")
        b.write_text("/abs/lib/systemd/system/other.service", "[Unit]\n")
        b.makedirs("/lib")  # a symlink to a directory counts as one
    assert img.listdir("/usr/lib/systemd/system") == ["app.service", "other.service"]
    lib = img.stat("/lib")
    assert lib is not None and lib.type is FileType.SYMLINK
    assert img.read_file("/lib/systemd/system/app.service") == b"[Unit]\n"
    with img.edit() as b:
        b.symlink("/dangling", "/nowhere")
    with pytest.raises(BuildError, match="leads to no directory"):
        img.edit().write_text("/dangling/file", "x").apply()
    fsck_clean(image)


def test_remove_files_and_trees(tmp_path: Path, image: Path) -> None:
    img = Ext4Image(image, epoch=EPOCH)
    free0 = img.info()
    with img.edit() as b:
        for i in range(20):
            b.write_bytes(f"/opt/app/sub{i % 3}/deep/f{i}", os.urandom(10_000))
        b.symlink("/opt/app/link", "sub0")
        b.whiteout("/opt/app/wh")
        b.set_xattr("/opt/app/sub1", "trusted.overlay.opaque", "y")
        b.write_text("/etc/keep", "k")
        b.write_text("/etc/drop", "d")
    with img.edit() as b:
        b.remove("/opt", recursive=True)
        b.remove("/etc/drop")
        b.remove("/etc/never-was", missing_ok=True)
    assert img.listdir("/") == ["etc", "lost+found"]
    assert img.listdir("/etc") == ["keep"]
    info = img.info()
    assert info.free_inodes == free0.free_inodes - 2  # /etc and /etc/keep remain
    fsck_clean(image)
    with pytest.raises(BuildError, match="recursive=True"):
        img.edit().remove("/etc").apply()
    with pytest.raises(BuildError, match="does not exist"):
        img.edit().remove("/etc/nope").apply()


def test_remove_frees_external_xattr_blocks(tmp_path: Path) -> None:
    """128-byte inodes keep xattrs in a block that rm/rmdir alone would leak."""
    image = make_image(tmp_path, "small-inodes.img", 32, opts=("-I", "128", "-O", "^metadata_csum"))
    img = Ext4Image(image, epoch=EPOCH)
    free0 = img.info().free_blocks
    with img.edit() as b:
        b.write_text("/d/f", "x")
        b.set_xattr("/d/f", "user.a", "1")
        b.set_xattr("/d", "trusted.overlay.opaque", "y")
        b.write_text("/g", "y")
        b.set_xattr("/g", "user.b", "2")
    assert img.stat("/d/f").xattr_block  # type: ignore[union-attr]
    with img.edit() as b:
        b.remove("/d", recursive=True)
        b.write_text("/g", "replaced")
    fsck_clean(image)
    assert img.info().free_blocks == free0 - 1  # only /g's data block remains
    # the same inside one batch: made, given xattrs and removed again
    with img.edit() as b:
        b.write_text("/h", "x")
        b.set_xattr("/h", "user.c", "3")
        b.remove("/h")
    fsck_clean(image)


def test_shared_xattr_block_is_released_properly(tmp_path: Path) -> None:
    """An xattr block shared by two inodes (as the kernel makes them): refcount down, then freed."""
    image = make_image(tmp_path, "shared.img", 32, opts=("-I", "128", "-O", "^metadata_csum"))
    img = Ext4Image(image, epoch=EPOCH)
    free0 = img.info().free_blocks
    with img.edit() as b:
        b.write_text("/f", "x")
        b.write_text("/g", "y")
        b.set_xattr("/f", "user.shared", "1")
    block = img.stat("/f").xattr_block  # type: ignore[union-attr]
    # Share it the way the kernel's mbcache would: refcount 2 (no checksum on this fs), /g -> it.
    sh(["debugfs", "-w", "-R", f"zap_block -o 4 -l 1 -p 2 {block}", image], tmp_path)
    sh(["debugfs", "-w", "-R", f"sif /g file_acl {block}", image], tmp_path)
    g_blocks = int(re.search(r"Blockcount: (\d+)", dbg(image, "stat /g"))[1])  # type: ignore[index]
    per_block = img.info().block_size // 512
    sh(["debugfs", "-w", "-R", f"sif /g blocks {g_blocks + per_block}", image], tmp_path)
    fsck_clean(image)
    assert img.get_xattrs("/g") == {"user.shared": b"1"}
    with img.edit() as b:
        b.remove("/f")
    fsck_clean(image)
    assert img.get_xattrs("/g") == {"user.shared": b"1"}
    assert "0200 0000" not in dbg(image, f"bd {block}").splitlines()[0]  # refcount back to 1
    with img.edit() as b:
        b.remove("/g")
    fsck_clean(image)
    assert img.info().free_blocks == free0


def test_xattrs_set_then_removed_with_their_inode_leave_nothing(tmp_path: Path) -> None:
    image = make_image(tmp_path, "xr.img", 32)
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.write_text("/keep", "k")
        b.write_text("/old", "o")
    free0 = img.info().free_blocks
    big = os.urandom(600)  # too big for the inode: goes to a block
    with img.edit() as b:
        b.set_xattr("/old", "user.big", big)
        b.set_xattr("/keep", "user.big", big)
        b.remove("/old")
        b.write_text("/tmp/new", "n")
        b.set_xattr("/tmp/new", "user.big", big)
        b.remove("/tmp", recursive=True)
    fsck_clean(image)
    assert img.get_xattrs("/keep") == {"user.big": big}
    # /old's data block came free, /keep's new xattr block took one; nothing else is left behind
    assert img.info().free_blocks == free0


ODD_NAMES = ["-dash", "<12>", "tab\tname", "back\\slash", "ünïcødé ✓", "#hash", "!bang", "@@airbox:0", "a  b"]


def test_odd_names_round_trip(tmp_path: Path, image: Path) -> None:
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        for i, name in enumerate(ODD_NAMES):
            b.write_text(f"/odd/{name}", f"{i}\n")
            b.mkdir(f"/odd/dir {name}", 0o750)
            b.symlink(f"/odd/dir {name}/link", f"../{name}")
    assert sorted(img.listdir("/odd"), key=os.fsencode) == sorted(
        ODD_NAMES + [f"dir {n}" for n in ODD_NAMES], key=os.fsencode
    )
    for i, name in enumerate(ODD_NAMES):
        assert dbg_cat(image, f"/odd/{name}") == f"{i}\n".encode()
        assert img.read_file(f"/odd/dir {name}/link") == f"{i}\n".encode()
    fsck_clean(image)
    with img.edit() as b:
        for name in ODD_NAMES:
            b.remove(f"/odd/dir {name}", recursive=True)
            b.write_text(f"/odd/{name}", "replaced")
    assert sorted(img.listdir("/odd"), key=os.fsencode) == sorted(ODD_NAMES, key=os.fsencode)
    fsck_clean(image)


def test_hard_links_removed_one_by_one(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_text("shared\n")
    os.link(tree / "a", tree / "b")
    (tree / "c").write_text("third\n")
    os.link(tree / "c", tree / "d")
    image = make_image(tmp_path, "links.img", 32, tree=tree, opts=("-I", "128", "-O", "^metadata_csum"))
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.set_xattr("/c", "user.x", "1")  # external block on a 2-link inode
        b.remove("/a")
    assert img.read_file("/b") == b"shared\n"
    st = img.stat("/b")
    assert st is not None and st.links == 1
    with img.edit() as b:
        b.remove("/c")
        b.remove("/d")
    fsck_clean(image)
    assert img.listdir("/") == ["b", "lost+found"]


def test_remove_then_recreate_in_one_batch(tmp_path: Path, image: Path) -> None:
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.write_text("/opt/app/v1/main.py", "print(1)\n")
        b.write_text("/opt/app/v1/lib.py", "x = 1\n")
    with img.edit() as b:
        b.write_text("/opt/app/v1/extra.py", "made then removed\n")
        b.remove("/opt/app", recursive=True)
        b.write_text("/opt/app/v2/main.py", "print(2)\n")
    assert [w[0] for w in img.walk("/opt")] == ["/opt", "/opt/app", "/opt/app/v2"]
    assert img.read_file("/opt/app/v2/main.py") == b"print(2)\n"
    fsck_clean(image)


# ----------------------------------------------------------------------------- trees, speed


def test_copy_tree_merges_and_keeps_existing_dirs(tmp_path: Path, image: Path) -> None:
    src = tmp_path / "overlay"
    (src / "etc" / "app").mkdir(parents=True)
    (src / "etc" / "app" / "conf file.yaml").write_text("a: 1\n")
    (src / "etc" / "app" / "run.sh").write_text("#!/bin/sh\n")
    (src / "etc" / "app" / "run.sh").chmod(0o750)
    (src / "etc" / "app").chmod(0o710)
    (src / "etc" / "app" / "current").symlink_to("conf file.yaml")
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.mkdir("/etc", 0o755)
        b.write_text("/etc/app/old", "old")
    with img.edit() as b:
        b.copy_tree(src, "/", uid=1000, gid=1000)
    etc, app = img.stat("/etc"), img.stat("/etc/app")
    assert etc is not None and (etc.mode, etc.uid) == (0o755, 0)  # existed: kept
    assert app is not None and app.uid == 0  # existed too
    run_sh = img.stat("/etc/app/run.sh")
    assert run_sh is not None and (run_sh.mode, run_sh.uid, run_sh.gid) == (0o750, 1000, 1000)
    assert img.readlink("/etc/app/current") == "conf file.yaml"
    assert img.read_file("/etc/app/current") == b"a: 1\n"
    assert sorted(img.listdir("/etc/app")) == ["conf file.yaml", "current", "old", "run.sh"]
    with img.edit() as b:
        b.copy_tree(src / "etc", "/new/etc", uid=5, gid=6)
    new_app = img.stat("/new/etc/app")
    assert new_app is not None and (new_app.mode, new_app.uid, new_app.gid) == (0o710, 5, 6)
    fsck_clean(image)


def test_three_thousand_files_in_one_batch_quickly(tmp_path: Path) -> None:
    image = make_image(tmp_path, "big.img", 128)
    src = tmp_path / "pytree"
    for i in range(3000):
        d = src / f"pkg{i // 100}" / ("sub" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i}.py").write_text(f"X = {i}\n" * 5)
    img = Ext4Image(image, epoch=EPOCH)
    start = time.monotonic()
    b = img.edit().copy_tree(src, "/usr/lib/python3/dist-packages", uid=0, gid=0)
    summary = b.apply()
    elapsed = time.monotonic() - start
    assert summary.created >= 3000 and summary.debugfs_runs == 2
    assert elapsed < 10, f"3000 files took {elapsed:.1f} s"
    assert img.read_file("/usr/lib/python3/dist-packages/pkg29/sub/mod2999.py") == b"X = 2999\n" * 5
    assert len(img.listdir("/usr/lib/python3/dist-packages/pkg7/sub")) == 50
    fsck_clean(image)


def test_walk_and_read_to_stream_large_files(tmp_path: Path, image: Path) -> None:
    data = os.urandom(3 << 20)
    big = host_file(tmp_path, "model.bmodel", data)
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.write("/data/models/model.bmodel", big)
        b.symlink("/data/latest", "models/model.bmodel")
    out = tmp_path / "out" / "model.bmodel"
    st = img.read_to("/data/latest", out)
    assert st.size == len(data) and out.read_bytes() == data
    with pytest.raises(BuildError, match="read_to"):
        img.read_file("/data/models/model.bmodel", max_bytes=1 << 20)
    walked = {d: ([e.name for e in dirs], [e.name for e in files]) for d, dirs, files in img.walk("/data")}
    assert walked == {"/data": (["models"], ["latest"]), "/data/models": ([], ["model.bmodel"])}
    with pytest.raises(BuildError, match="is a dir"):
        img.read_file("/data")


# ----------------------------------------------------------------------------- determinism


def _reference_batch(b: EditBatch, host: Path) -> None:
    b.copy_tree(host, "/opt/app", uid=1000, gid=1000)
    b.write_text("/etc/netplan/90-airbox.yaml", "network:\n  version: 2\n", mode=0o600)
    b.mkdir("/home/linaro", 0o700, 1000, 1000)
    b.set_xattr("/opt/app", "trusted.overlay.opaque", "y")
    b.remove("/etc/hostname")
    b.whiteout("/etc/motd")


def test_same_batch_gives_identical_images_whatever_the_clock_tz_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make_shrunk_image(tmp_path)
    host = tmp_path / "app"
    (host / "lib").mkdir(parents=True)
    for i in range(30):
        (host / "lib" / f"m{i}.py").write_text(f"V = {i}\n")
    (host / "main.py").write_text("print('hi')\n")
    copies = [tmp_path / "one.img", tmp_path / "two.img"]
    features = Ext4Image(base).info().features
    for n, copy in enumerate(copies):
        ext4.copy_sparse(base, copy)
        if n:
            time.sleep(1.1)
            monkeypatch.setenv("TZ", "Asia/Tokyo")
            monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567890")
            os.umask(0o077)
        try:
            img = Ext4Image(copy, epoch=EPOCH)
            img.grow_to(48 << 20)
            with img.edit() as b:
                _reference_batch(b, host)
            img.shrink_to_min()
            img.check()
        finally:
            os.umask(0o022)
        assert img.info().features == features
    assert sha256(copies[0]) == sha256(copies[1])
    assert dbg_cat(copies[0], "/opt/app/main.py") == b"print('hi')\n"


# ----------------------------------------------------------------------------- grow, shrink, space


def test_grow_then_shrink_keeps_features_and_sparseness(tmp_path: Path) -> None:
    image = make_shrunk_image(tmp_path)
    img = Ext4Image(image, epoch=EPOCH)
    before = img.info()
    assert before.free_blocks < 300  # shrunk: almost full
    grown = img.grow_to(40 << 20, limit=64 << 20)
    assert grown.block_count * 4096 == 40 << 20 == image.stat().st_size
    assert image.stat().st_blocks * 512 < 20 << 20  # the new space is a hole
    assert grown.features == before.features and not grown.features & NEW_FEATURES
    fsck_clean(image)
    with img.edit() as b:
        b.write_bytes("/data/blob", os.urandom(8 << 20))
    shrunk = img.shrink_to_min()
    assert shrunk.block_count < grown.block_count
    assert image.stat().st_size == shrunk.block_count * 4096
    assert shrunk.features == before.features
    assert len(img.read_file("/data/blob", max_bytes=16 << 20)) == 8 << 20
    assert img.read_file("/etc/hostname") == b"airbox\n"
    fsck_clean(image)
    with pytest.raises(BuildError, match="more than the partition"):
        img.grow_to(80 << 20, limit=64 << 20)
    assert img.grow_by(0).block_count == shrunk.block_count


def test_ensure_room_grows_only_as_needed_and_within_the_limit(tmp_path: Path) -> None:
    image = make_shrunk_image(tmp_path)
    img = Ext4Image(image, epoch=EPOCH)
    blob = host_file(tmp_path, "blob", os.urandom(6 << 20))
    b = img.edit().write("/opt/blob", blob)
    need = b.estimate()
    assert need.bytes >= 6 << 20 and need.inodes >= 2
    with pytest.raises(BuildError, match="grow the image first"):
        img.edit().write("/opt/blob", blob).apply()
    with pytest.raises(BuildError, match="do not fit"):
        img.ensure_room(need, limit=img.info().size_bytes + (1 << 20))
    before = img.info()
    info = img.ensure_room(need, limit=64 << 20, headroom=1 << 20)
    assert info.free_bytes >= need.bytes + (1 << 20)
    assert info.size_bytes <= before.size_bytes + need.bytes + (3 << 20)  # not a whole 128 MiB group
    assert img.ensure_room(need, limit=64 << 20) == info  # already enough: no change
    b.apply()
    fsck_clean(image)
    assert img.bytes_needed_for([6 << 20, 100], dirs=2, symlinks=1) >= (6 << 20) + 3 * 4096


def test_ensure_room_buys_inodes_with_whole_groups(tmp_path: Path) -> None:
    image = make_image(tmp_path, "few-inodes.img", 32, opts=("-N", "64"))
    img = Ext4Image(image, epoch=EPOCH)
    before = img.info()
    assert before.free_inodes < 100
    b = img.edit()
    for i in range(100):
        b.write_text(f"/many/f{i}", str(i))
    snapshot = sha256(image)
    with pytest.raises(BuildError, match="inodes"):
        b.apply()
    assert sha256(image) == snapshot  # refused while planning: untouched, the batch can retry
    info = img.ensure_room(b.estimate(), limit=512 << 20)
    assert info.free_inodes >= 101 and info.block_count > before.block_count
    assert info.features == before.features
    b.apply()
    assert len(img.listdir("/many")) == 100
    fsck_clean(image)


def test_check_reports_a_damaged_image(tmp_path: Path, image: Path) -> None:
    img = Ext4Image(image, epoch=EPOCH)
    with img.edit() as b:
        b.write_text("/etc/victim", "x")
    img.check()
    sh(["debugfs", "-w", "-R", "clri /etc/victim", image], tmp_path)
    with pytest.raises(BuildError, match="e2fsck found problems"):
        img.check()


def test_copy_sparse_keeps_holes_and_bytes(tmp_path: Path) -> None:
    src = tmp_path / "sparse.bin"
    with open(src, "wb") as f:
        f.truncate(32 << 20)
        f.seek(5 << 20)
        f.write(b"data" * 1000)
        f.seek((32 << 20) - 10)
        f.write(b"end-bytes!")
    dst = tmp_path / "copy.bin"
    ext4.copy_sparse(src, dst)
    assert dst.stat().st_size == src.stat().st_size
    assert sha256(dst) == sha256(src)
    assert dst.stat().st_blocks * 512 < 1 << 20


def test_preen_stamps_the_epoch_as_check_time(tmp_path: Path) -> None:
    image = make_shrunk_image(tmp_path)
    img = Ext4Image(image, epoch=EPOCH)
    assert img.preen() == 0
    fsck_clean(image)
    dump = subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, check=True, env={**os.environ, "TZ": "UTC"}
    ).stdout.decode()
    stamp = time.asctime(time.gmtime(EPOCH))
    assert re.search(rf"Last checked:\s+{stamp}", dump), dump
    assert re.search(rf"Last write time:\s+{stamp}", dump), dump
    assert "Filesystem state:         clean" in dump


# ----------------------------------------------------------------------------- editing in place with undo


def test_undo_files_put_every_byte_back_after_several_sessions(image: Path, tmp_path: Path) -> None:
    """Two debugfs sessions (files, an xattr, removals), the lifetime-writes counter set: e2undo,
    newest first, gives the image back byte for byte; in between, the edits are really there."""
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    undo = tmp_path / "undo"
    undo.mkdir()
    img = Ext4Image(image, epoch=EPOCH, undo_dir=undo)
    kib = img.lifetime_writes()
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 << 20))
    with img.edit(epoch=EPOCH) as b:
        b.write("/opt/big.bin", src).mkdir("/srv/a/b").set_xattr("/srv/a", "user.note", b"kept")
    with img.edit(epoch=EPOCH) as b:
        b.remove("/opt/big.bin").write_bytes("/etc/motd", b"hello\n")
    img.set_lifetime_writes(kib)
    assert img.lifetime_writes() == kib
    img.check()  # the checksum was updated with the counter
    assert dbg_cat(image, "/etc/motd") == b"hello\n"
    assert len(img.undo_files) == 2
    img.undo(image.stat().st_size)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    assert list(undo.iterdir()) == []


def test_resize_is_refused_on_an_image_edited_in_place(image: Path, tmp_path: Path) -> None:
    """resize2fs -z leaves an invalid resize inode (e2fsprogs 1.47): never run with undo files."""
    img = Ext4Image(image, epoch=EPOCH, undo_dir=tmp_path)
    with pytest.raises(BuildError, match="edited in place"):
        img.grow_to(96 << 20)
