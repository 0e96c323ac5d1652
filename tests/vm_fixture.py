"""A miniature vendor package whose ROOTFS is a real arm64 Debian 12 userland, for the VM tier.

Laid out like the box (FORMAT.md): `linaro`/`admin` with their public passwords, the vendor's
netplan file and `fstab.emmc.ro`, ROOTFS_RW holding a factory boot's state in `overlay/` (SSH host
keys, machine-id), OPT and DATA, and a vendor-like unit that needs `/dev/bm-sophon0` and so fails
in any VM. The userland comes from `mmdebstrap` (arm64, under qemu-user via binfmt_misc) and is
cached by what makes it (package list, options); the package made from it is cached by that and
by this file's and the packer's source. Both take minutes cold and nothing warm.

`python -m tests.vm_fixture build` warms both caches (scripts/ci-vm-deps runs it as root).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

try:
    import vendor_fixture as vf  # pytest puts tests/ on sys.path
except ImportError:  # python -m tests.vm_fixture
    from tests import vendor_fixture as vf  # type: ignore[no-redef]

SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv",
    "systemd-resolved",
    "dbus",
    "openssh-server",
    "netplan.io",
    "iproute2",
    "python3",
    "sudo",
    "udev",
    "kmod",
    "tzdata",
    "systemd-timesyncd",  # the box's NTP client (Ubuntu 20.04 has it in systemd itself)
)
MMDEBSTRAP_ARGS = (
    "--architectures=arm64",
    "--variant=apt",
    "--include=" + ",".join(PACKAGES),
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    # the vendor's first two accounts, with the passwords its docs print (FORMAT.md section 6)
    '--customize-hook=chroot "$1" useradd -m -s /bin/bash -G sudo linaro',
    '--customize-hook=chroot "$1" useradd -m -s /bin/bash -G sudo admin',
    '--customize-hook=printf "linaro:linaro\\nadmin:admin\\n" | chroot "$1" chpasswd',
)
# Host packages the tier needs, by the tool that shows each is there.
TOOL_PACKAGES = {
    "mmdebstrap": "mmdebstrap",
    "qemu-aarch64-static": "qemu-user-static",
    "update-binfmts": "binfmt-support",
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-img": "qemu-utils",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "gpgv": "gpgv",
}

MIB = 1024
LAYOUT = (
    vf.PartSpec("BOOT", 8 * MIB, False, vf.FMT_FAT),
    vf.PartSpec("RECOVERY", 8 * MIB, False, vf.FMT_EXT4),
    vf.PartSpec("MISC", 1 * MIB, False, vf.FMT_RAW),
    vf.PartSpec("ROOTFS", 640 * MIB, True, vf.FMT_EXT4),
    vf.PartSpec("ROOTFS_RW", 64 * MIB, False, vf.FMT_EXT4),
    vf.PartSpec("OPT", 16 * MIB, False, vf.FMT_EXT4),
    vf.PartSpec("DATA", 192 * MIB, False, vf.FMT_EXT4),  # room for a bundle pushed to /data/ota
)
DISK_KB = 1024 * MIB
CHUNK_SECTORS = 131072  # 64 MiB
VENDOR_MACHINE_ID = "6c1c6d1b8f0e4d0c9a7d2f3e4b5a6978\n"

BM_SOPHON_UNIT = """\
[Unit]
Description=Sophon TPU runtime setup (vendor)
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'test -e /dev/bm-sophon0 || { echo "no /dev/bm-sophon0: no TPU driver"; exit 1; }'

[Install]
WantedBy=multi-user.target
"""


def cache_root() -> Path:
    env = os.environ.get("AIRBOX_VM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "airbox-build-tests"


def missing_tools() -> list[str]:
    """`tool (package)` for each host tool the VM tier lacks; binfmt_misc for arm64 included."""
    out = [f"{t} (package {p})" for t, p in TOOL_PACKAGES.items() if _which(t) is None]
    status = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not status.exists() or "enabled" not in status.read_text():
        out.append(
            "binfmt_misc for arm64 (as root: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
            "update-binfmts --enable qemu-aarch64)"
        )
    return out


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (str(Path(d) / tool) for d in ("/usr/sbin", "/sbin") if (Path(d) / tool).exists()), None
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def userland_key() -> str:
    return hashlib.sha256("\n".join((SUITE, *MMDEBSTRAP_ARGS)).encode()).hexdigest()[:16]


def ensure_userland() -> Path:
    """The mmdebstrap tarball (built once, ~3 min)."""
    dest = cache_root() / f"vm-userland-{userland_key()}.tar"
    with _locked(dest.with_suffix(".lock")):
        if dest.exists():
            return dest
        tmp = dest.with_suffix(".part.tar")
        proc = subprocess.run(
            ["mmdebstrap", *MMDEBSTRAP_ARGS, SUITE, str(tmp)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise vf.FixtureError(f"mmdebstrap failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        tmp.replace(dest)
    return dest


def package_key(userland: Path) -> str:
    h = hashlib.sha256(userland.name.encode())
    for src in (Path(__file__), Path(vf.__file__)):
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def ensure_vm_package() -> Path:
    """The cached vendor package folder (…/sdcard) built from the real userland."""
    userland = ensure_userland()
    root = cache_root() / f"vm-package-{package_key(userland)}"
    with _locked(root.with_suffix(".lock")):
        if (root / "sdcard" / "md5.txt").exists():
            return root / "sdcard"
        tmp = root.with_name(root.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _build(userland, tmp)
        shutil.rmtree(tmp / "staging")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root / "sdcard"


def _write(root: Path, path: str, data: str | bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    dest = root / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chown(dest, uid, gid)
    dest.chmod(mode)


def _customise_rootfs(rootfs: Path, rw: Path) -> None:
    """The box's files on a Debian userland; the factory boot's state moves to the upper layer."""
    _write(rootfs, "/etc/hostname", "bm1684\n")
    _write(rootfs, "/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tbm1684\n")
    _write(rootfs, "/etc/netplan/01-netcfg.yaml", vf.NETPLAN, 0o600)
    _write(rootfs, "/etc/fstab.emmc.ro", vf.FSTAB_EMMC_RO)
    _write(rootfs, "/etc/fstab", vf.FSTAB_EMMC_RO)  # the box rewrites it from fstab.emmc.ro every boot
    for d in ("/media/root-ro", "/media/root-rw", "/data", "/boot"):
        (rootfs / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    _write(rootfs, "/etc/systemd/system/bm-sophon.service", BM_SOPHON_UNIT)
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "bm-sophon.service").symlink_to("/etc/systemd/system/bm-sophon.service")
    upper = rw / "overlay"
    (upper / "etc/ssh").mkdir(parents=True)
    for key in sorted((rootfs / "etc/ssh").glob("ssh_host_*")):
        shutil.move(str(key), upper / "etc/ssh" / key.name)
    _write(rootfs, "/etc/machine-id", "")
    _write(upper, "/etc/machine-id", VENDOR_MACHINE_ID, 0o444)
    (rw / "overlay-workdir").mkdir()


# KiB left free after resize2fs -M, as the vendor's multi-GB images have (vendor_fixture.slack_kb):
# the overlay needs room in ROOTFS_RW for its work folder, or the box's root mounts read-only
SLACK_KB = {"ROOTFS_RW": 16 * MIB, "OPT": 4 * MIB, "DATA": 8 * MIB}


def _ext4(src: Path, image: Path, size_kb: int, work: Path, opts: vf.PackageOptions, slack_kb: int) -> None:
    """mkfs.ext4 at full size from a folder (owners kept: we are root), e2fsck, resize2fs -M."""
    conf = work / "mke2fs.conf"
    conf.write_text(vf.MKE2FS_CONF)
    env = vf.tool_env(opts, MKE2FS_CONFIG=str(conf))
    with open(image, "wb") as f:
        f.truncate(size_kb * 1024)
    vf.sh(["mke2fs", "-q", "-F", "-t", "ext4", "-T", "default", "-d", src, image], env)
    vf.sh(["e2fsck", "-f", "-p", image], env)
    vf.sh(["resize2fs", "-M", image], env)
    if slack_kb:
        grown = image.stat().st_size + slack_kb * 1024
        with open(image, "r+b") as f:
            f.truncate(grown)
        vf.sh(["resize2fs", image, f"{grown // 1024}K"], env)


def _build(userland: Path, root: Path) -> None:
    if os.geteuid() != 0:
        raise vf.FixtureError("the VM fixture unpacks a userland with its owners: run it as root")
    staging = root / "staging"
    rootfs, rw, opt, data = (staging / n for n in ("rootfs", "rootfs_rw", "opt", "data"))
    for d in (rootfs, rw, opt, data):
        d.mkdir(parents=True)
    with tarfile.open(userland) as t:
        t.extractall(rootfs, numeric_owner=True, filter="fully_trusted")
    _customise_rootfs(rootfs, rw)
    _write(opt, "/sophon/libsophon-current/bin/bm-smi", "#!/bin/sh\necho 'bm-smi: no TPU'\nexit 1\n", 0o755)
    _write(data, "/README.txt", "User data partition (mounted at /data).\n")
    opts = vf.PackageOptions(layout=LAYOUT, disk_kb=DISK_KB, chunk_sectors=CHUNK_SECTORS, hostname="bm1684")
    images = {}
    for label, src in (("ROOTFS", rootfs), ("ROOTFS_RW", rw), ("OPT", opt), ("DATA", data)):
        spec = next(p for p in LAYOUT if p.label == label)
        img = staging / f"{label.lower()}.img"
        _ext4(src, img, spec.size_kb, staging, opts, SLACK_KB.get(label, 0))
        images[label] = img
    pkg_root = root
    vf.build_package(pkg_root, vf.replace(opts, prebuilt_images=images))
    shutil.rmtree(pkg_root / "images")


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        missing = missing_tools()
        if missing:
            sys.exit("the VM tier needs: " + "; ".join(missing))
        print(ensure_vm_package())
    else:
        sys.exit("usage: python -m tests.vm_fixture build")
