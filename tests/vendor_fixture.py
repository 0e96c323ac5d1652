"""Miniature vendor TF-card packages, built with the real tools, for tests.

This is an independent re-implementation of the vendor packer
(`scripts/bm_make_package.sh` "sdcard" type, `scripts/mk-gpt/mk_gpt.c`, and the
`md5sum * > md5.txt` step of `envsetup.sh`), at miniature scale. It must not
import anything from `builder/`: product code is tested against it.

What is faithful to the vendor, byte for byte where the vendor is deterministic:
- script text (`.cmd`) exactly as the packer's `echo` lines write it, wrapped by
  `mkimage -A arm64 -O linux -T script -C none -a 0 -e 0 -n <basename>`;
- chunking: C sectors per chunk, the last chunk holding the exact remaining bytes;
  each chunk compressed by `gzip FILE` (header carries the chunk's name and mtime);
- the GPT file: protective MBR + header + 128 entries (17408 bytes), mk_gpt rules,
  no backup GPT;
- ext4 images: `mke2fs -t ext4` at full partition size (Ubuntu 20.04's mke2fs.conf,
  so no feature newer than e2fsck 1.45 knows), filled, `e2fsck -f -p`, `resize2fs -M`;
  BOOT is a full-size FAT from plain `mkfs.fat`; MISC is zeros.
- `md5.txt` = `md5sum *` run in the fresh folder: the glob is expanded before the
  shell creates `md5.txt`, so md5.txt does NOT list itself (C-locale order).

What the vendor leaves to chance is pinned so builds are reproducible: `# Created`
date, mkimage timestamps (SOURCE_DATE_EPOCH), chunk mtimes (set before gzip), GUIDs
(seeded), ext4 UUID/hash seed/times, FAT volume id.

Layout of a built package root:
    <root>/sdcard/    the file set (what goes on the card)
    <root>/images/    the uncompressed partition images the chunks were cut from
"""

from __future__ import annotations

import calendar
import hashlib
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

SECTOR = 512
FIRST_PART_SECTOR = 8192  # mk_gpt / bm_make_package BOOT_PART_OFFSET
GPT_FILE_BYTES = 17408  # MBR + header sector + 128 * 128-byte entries
GPT_SECTORS = GPT_FILE_BYTES // SECTOR

FMT_RAW, FMT_FAT, FMT_EXT4 = 0, 1, 2

LOAD = "load ${devtype} ${devnum}:${distro_bootpart}"
SCRIPT_ADDR = "${scriptaddr}"
IN_ADDR = "${ramdisk_addr_r}"
IN_ADDR_B = "${ramdisk_addr_b}"
OUT_ADDR = "${unzip_addr}"
OTA_PATH = "/$ota_path/"

LOAD_FAILED = 'while true; do; echo "ERROR: load package failed"; sleep 0.5; done; fi;'
WRITE_FAILED = 'while true; do; echo "ERROR: eMMC write failed"; sleep 0.5; done; fi;'
REMOVE_MEDIUM = 'echo "Please remove the installation medium, then reboot"; sleep 0.5; done;'

BASIC_DATA_TYPE = uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")

DEFAULT_EPOCH = 1717640430  # 2024-06-06 02:20:30 UTC
LINARO_UID = 1000
ADMIN_UID = 1001
SHADOW_GID = 42


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class PartSpec:
    """One <partition> of partition32G.xml."""

    label: str
    size_kb: int
    readonly: bool = False
    fmt: int = FMT_EXT4

    @property
    def name(self) -> str:
        """The lower-case name the packer uses for files (`rootfs_rw`)."""
        return self.label.lower()

    @property
    def size_sectors(self) -> int:
        return self.size_kb * 1024 // SECTOR


MINI_LAYOUT: tuple[PartSpec, ...] = (
    PartSpec("BOOT", 8 * 1024, False, FMT_FAT),
    PartSpec("RECOVERY", 8 * 1024, False, FMT_EXT4),
    PartSpec("MISC", 1024, False, FMT_RAW),
    PartSpec("ROOTFS", 24 * 1024, True, FMT_EXT4),
    PartSpec("ROOTFS_RW", 12 * 1024, False, FMT_EXT4),
    PartSpec("OPT", 8 * 1024, False, FMT_EXT4),
    PartSpec("DATA", 16 * 1024, False, FMT_EXT4),
)
MINI_DISK_KB = 128 * 1024  # a power of two, as QEMU's emulated eMMC wants
DEFAULT_CHUNK_SECTORS = 2048  # 1 MiB (the vendor uses 200704)


def partition_offsets(layout: Sequence[PartSpec]) -> list[int]:
    """Start sector of each partition: packed from sector 8192 in XML order."""
    offsets, at = [], FIRST_PART_SECTOR
    for p in layout:
        offsets.append(at)
        at += p.size_sectors
    return offsets


def render_xml(layout: Sequence[PartSpec], disk_kb: int) -> str:
    """partition32G.xml in the vendor's style: tab indent, space-aligned attributes."""
    lines = [f'<physical_partition size_in_kb="{disk_kb}">']
    for p in layout:
        label = f'label="{p.label}"'.ljust(18)
        size = f'size_in_kb="{p.size_kb}"'.ljust(20)
        ro = f'readonly="{"true" if p.readonly else "false"}"'.ljust(17)
        lines.append(f'\t<partition {label} {size} {ro} format="{p.fmt}" />')
    lines.append("</physical_partition>")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- GPT (mk_gpt)


def _guid(rng: random.Random) -> uuid.UUID:
    # mk_gpt uses uuid_generate() (random, version 4) and stores it as a GUID.
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def encode_gpt(layout: Sequence[PartSpec], disk_kb: int, seed: int) -> bytes:
    """The 17408-byte gpt file mk_gpt writes: protective MBR, primary header, entries."""
    rng = random.Random(f"gpt:{seed}")
    sectors = disk_kb * 1024 // SECTOR
    entry_sectors = 128 * 128 // SECTOR

    mbr = bytearray(SECTOR)
    # boot_indicator, CHS start (head 0, sector 1, track 0), type 0xEE, CHS end FE FF FF
    chs = bytes([0, 0, 1, 0, 0xEE, 0xFE, 0xFF, 0xFF])
    record = chs + struct.pack("<II", 1, 0xFFFFFFFF if sectors > 0xFFFFFFFF else sectors - 1)
    mbr[446 : 446 + 16] = record
    mbr[510:512] = b"\x55\xaa"

    entries = bytearray(128 * 128)
    lba = FIRST_PART_SECTOR
    disk_guid = _guid(rng)
    for i, p in enumerate(layout):
        end = lba + (p.size_kb * 1024 + SECTOR - 1) // SECTOR - 1
        name = p.label.encode()[:36]
        name16 = b"".join(struct.pack("<H", c) for c in name)
        entry = (
            BASIC_DATA_TYPE.bytes_le
            + _guid(rng).bytes_le
            + struct.pack("<QQQ", lba, end, (1 << 60) if p.readonly else 0)
            + name16
        )
        entries[i * 128 : i * 128 + len(entry)] = entry
        lba = end + 1
    entries_crc = zlib.crc32(entries)

    def header(crc: int) -> bytes:
        return struct.pack(
            "<8sIIIIQQQQ16sQIII",
            b"EFI PART",
            0x00010000,
            92,
            crc,
            0,
            1,
            sectors - 1,
            2 + entry_sectors,
            sectors - (entry_sectors + 2),
            disk_guid.bytes_le,
            2,
            128,
            128,
            entries_crc,
        )

    hdr = header(zlib.crc32(header(0)))
    return bytes(mbr) + hdr.ljust(SECTOR, b"\0") + bytes(entries)


# ----------------------------------------------------------------------------- file trees


@dataclass(frozen=True)
class Node:
    """One entry of a partition tree. Build them with the *_node helpers."""

    kind: str  # file | dir | symlink | hardlink | whiteout
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""  # symlink target, or the tree path a hardlink points to
    xattrs: tuple[tuple[str, str], ...] = ()


def file_node(data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Node:
    return Node("file", data.encode() if isinstance(data, str) else data, mode, uid, gid)


def dir_node(mode: int = 0o755, uid: int = 0, gid: int = 0, xattrs: Mapping[str, str] | None = None) -> Node:
    return Node("dir", b"", mode, uid, gid, xattrs=tuple(sorted((xattrs or {}).items())))


def symlink_node(target: str, uid: int = 0, gid: int = 0) -> Node:
    return Node("symlink", b"", 0o777, uid, gid, target=target)


def hardlink_node(existing_path: str) -> Node:
    return Node("hardlink", target=existing_path)


def whiteout_node() -> Node:
    """An overlayfs whiteout: a character device 0:0 with mode 0000."""
    return Node("whiteout", mode=0)


Tree = dict[str, Node]
TreeInput = Mapping[str, "bytes | str | Node"]

OPAQUE_XATTR = ("trusted.overlay.opaque", "y")


def _norm(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/" + "/".join(parts)


def merge_tree(base: Tree, extra: TreeInput | None) -> Tree:
    """base + extra (extra wins); every parent directory made explicit (root 0755)."""
    tree = dict(base)
    for path, value in (extra or {}).items():
        tree[_norm(path)] = value if isinstance(value, Node) else file_node(value)
    for path in list(tree):
        parent = path.rsplit("/", 1)[0]
        while parent and parent not in tree:
            tree[parent] = dir_node()
            parent = parent.rsplit("/", 1)[0]
    tree.setdefault("/", dir_node())
    return tree


def _blob(tag: str, size: int) -> bytes:
    """Deterministic binary-looking bytes (half random, half structure) of a given size."""
    rng = random.Random(tag)
    head = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + struct.pack("<HHI", 3, 0xB7, 1)
    body = bytearray(rng.randbytes(size // 2))
    pattern = bytes((i * 7) & 0xFF for i in range(256))
    body += (pattern * (size // 512 + 1))[: size - len(body)]
    return (head + bytes(body))[:size]


PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
bin:x:2:2:bin:/bin:/usr/sbin/nologin
sys:x:3:3:sys:/dev:/usr/sbin/nologin
sync:x:4:65534:sync:/bin:/bin/sync
man:x:6:12:man:/var/cache/man:/usr/sbin/nologin
mail:x:8:8:mail:/var/mail:/usr/sbin/nologin
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
systemd-network:x:100:102:systemd Network Management,,,:/run/systemd:/usr/sbin/nologin
systemd-resolve:x:101:103:systemd Resolver,,,:/run/systemd:/usr/sbin/nologin
systemd-timesync:x:102:104:systemd Time Synchronization,,,:/run/systemd:/usr/sbin/nologin
messagebus:x:103:106::/nonexistent:/usr/sbin/nologin
syslog:x:104:110::/home/syslog:/usr/sbin/nologin
_apt:x:105:65534::/nonexistent:/usr/sbin/nologin
sshd:x:106:65534::/run/sshd:/usr/sbin/nologin
linaro:x:1000:1000:linaro,,,:/home/linaro:/bin/bash
admin:x:1001:1001:,,,:/home/admin:/bin/bash
"""

GROUP = """\
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:syslog,linaro
tty:x:5:
disk:x:6:
mail:x:8:
man:x:12:
dialout:x:20:linaro
sudo:x:27:linaro,admin
audio:x:29:linaro
www-data:x:33:
shadow:x:42:
video:x:44:linaro
plugdev:x:46:linaro
staff:x:50:
users:x:100:
nogroup:x:65534:
systemd-journal:x:101:
systemd-network:x:102:
systemd-resolve:x:103:
systemd-timesync:x:104:
messagebus:x:106:
syslog:x:110:
netdev:x:111:linaro
linaro:x:1000:
admin:x:1001:
"""

SHADOW = """\
root:*:18900:0:99999:7:::
daemon:*:18900:0:99999:7:::
bin:*:18900:0:99999:7:::
sys:*:18900:0:99999:7:::
sync:*:18900:0:99999:7:::
man:*:18900:0:99999:7:::
mail:*:18900:0:99999:7:::
www-data:*:18900:0:99999:7:::
nobody:*:18900:0:99999:7:::
systemd-network:*:18900:0:99999:7:::
systemd-resolve:*:18900:0:99999:7:::
systemd-timesync:*:18900:0:99999:7:::
messagebus:*:18900:0:99999:7:::
syslog:*:18900:0:99999:7:::
_apt:*:18900:0:99999:7:::
sshd:*:18900:0:99999:7:::
linaro:$6$fixture1$nXH/.X5Ja4Lim3dkB2MmUhFZ9dDHlodCMn0w0rw7aXcDCr/BbChU9dy2rgtr./zkI5uYKk7VymOorHwLtYSE0.:18900:0:99999:7:::
admin:$6$fixture2$rtjkayXSL.nnb1.F.j0g6h0IpKS0jc6uHcwyWyBq/udBlv7bvGbn9RSyyuee2DDmlmpWvAtczUmpH2aodsOqN0:18900:0:99999:7:::
"""

OS_RELEASE = """\
NAME="Ubuntu"
VERSION="20.04.6 LTS (Focal Fossa)"
ID=ubuntu
ID_LIKE=debian
PRETTY_NAME="Ubuntu 20.04.6 LTS"
VERSION_ID="20.04"
HOME_URL="https://www.ubuntu.com/"
SUPPORT_URL="https://help.ubuntu.com/"
BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"
PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"
VERSION_CODENAME=focal
UBUNTU_CODENAME=focal
"""

HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\t{hostname}

# The following lines are desirable for IPv6 capable hosts
::1     ip6-localhost ip6-loopback
fe00::0 ip6-localnet
ff00::0 ip6-mcastprefix
ff02::1 ip6-allnodes
ff02::2 ip6-allrouters
"""

FSTAB_EMMC_RO = """\
# <file system>\t<mount pt>\t<type>\t<options>\t\t\t<dump>\t<pass>
/dev/root\t/\t\text4\trw,noauto\t\t\t0\t1
proc\t\t/proc\t\tproc\tdefaults\t\t\t0\t0
devpts\t\t/dev/pts\tdevpts\tdefaults,gid=5,mode=620\t\t0\t0
tmpfs\t\t/tmp\t\ttmpfs\tmode=1777\t\t\t0\t0
sysfs\t\t/sys\t\tsysfs\tdefaults\t\t\t0\t0
/dev/mmcblk0p4\t/media/root-ro\text4\tro,noatime\t\t\t0\t0
/dev/mmcblk0p5\t/media/root-rw\text4\tdefaults,noatime\t\t0\t2
/dev/mmcblk0p6\t/opt\t\text4\tdefaults,noatime\t\t0\t2
/dev/mmcblk0p7\t/data\t\text4\tdefaults,noatime\t\t0\t2
/dev/mmcblk0p1\t/boot\t\tvfat\tdefaults\t\t\t0\t0
"""

NETPLAN = """\
network:
        version: 2
        renderer: networkd
        ethernets:
                eth0:
                        dhcp4: yes
                        addresses: []
                        optional: yes
                        dhcp-identifier: mac
                eth1:
                        dhcp4: no
                        addresses: [192.168.150.1/24]
                        optional: yes
                enp3s0:
                        dhcp4: yes
                        optional: yes
                enp4s0:
                        dhcp4: yes
                        optional: yes
                enp5s0:
                        dhcp4: yes
                        optional: yes
                enp6s0:
                        dhcp4: yes
                        optional: yes
                enp7s0:
                        dhcp4: yes
                        optional: yes
"""

SOURCES_LIST = """\
# See http://help.ubuntu.com/community/UpgradeNotes for how to upgrade to
# newer versions of the distribution.
deb http://ports.ubuntu.com/ubuntu-ports/ focal main restricted
# deb-src http://ports.ubuntu.com/ubuntu-ports/ focal main restricted
deb http://ports.ubuntu.com/ubuntu-ports/ focal-updates main restricted
deb http://ports.ubuntu.com/ubuntu-ports/ focal universe
deb http://ports.ubuntu.com/ubuntu-ports/ focal-updates universe
deb http://ports.ubuntu.com/ubuntu-ports/ focal multiverse
deb http://ports.ubuntu.com/ubuntu-ports/ focal-updates multiverse
deb http://ports.ubuntu.com/ubuntu-ports/ focal-backports main restricted universe multiverse
deb http://ports.ubuntu.com/ubuntu-ports/ focal-security main restricted
deb http://ports.ubuntu.com/ubuntu-ports/ focal-security universe
deb http://ports.ubuntu.com/ubuntu-ports/ focal-security multiverse
"""


def _unit(description: str, exec_start: str, *, after: str = "", kind: str = "oneshot") -> str:
    after_line = f"After={after}\n" if after else ""
    return (
        f"[Unit]\nDescription={description}\n{after_line}\n"
        f"[Service]\nType={kind}\nExecStart={exec_start}\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )


SYSTEMD_UNITS: dict[str, str] = {
    "bmrt_setup.service": _unit(
        "Sophon runtime setup", "/usr/sbin/bmrt_setup.sh", after="bmrt_loadko.service"
    ),
    "bmrt_loadko.service": _unit("Load Sophon TPU kernel modules", "/usr/sbin/bmrt_loadko.sh"),
    "resize-helper.service": _unit("Grow the data partition on first boot", "/usr/sbin/resize-helper"),
    "apt-daily.service": "[Unit]\nDescription=Daily apt download activities\n\n"
    "[Service]\nType=oneshot\nExecStart=/usr/lib/apt/apt.systemd.daily update\n",
    "apt-daily.timer": "[Unit]\nDescription=Daily apt download activities\n\n"
    "[Timer]\nOnCalendar=*-*-* 6,18:00\nRandomizedDelaySec=12h\nPersistent=true\n\n"
    "[Install]\nWantedBy=timers.target\n",
}
# Ubuntu 20.04 (openssh-server 1:8.2p1-4ubuntu0.x) debian/systemd/ssh.service: sshd -t runs first
# and fails when no host key exists, so keys must be made before it starts.
SSH_SERVICE = """\
[Unit]
Description=OpenBSD Secure Shell server
Documentation=man:sshd(8) man:sshd_config(5)
After=network.target auditd.service
ConditionPathExists=!/etc/ssh/sshd_not_to_be_run

[Service]
EnvironmentFile=-/etc/default/ssh
ExecStartPre=/usr/sbin/sshd -t
ExecStart=/usr/sbin/sshd -D $SSHD_OPTS
ExecReload=/usr/sbin/sshd -t
ExecReload=/bin/kill -HUP $MAINPID
KillMode=process
Restart=on-failure
RestartPreventExitStatus=255
Type=notify
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755

[Install]
WantedBy=multi-user.target
Alias=sshd.service
"""
SYSTEMD_UNITS["ssh.service"] = SSH_SERVICE
SYSTEMD_UNITS["systemd-timesyncd.service"] = _unit(
    "Network Time Synchronization", "/lib/systemd/systemd-timesyncd", kind="notify"
).replace("WantedBy=multi-user.target", "WantedBy=sysinit.target")
# Ubuntu 20.04's sshd_config (abridged): the drop-in folder is included before any setting
SSHD_CONFIG = """\
#\t$OpenBSD: sshd_config,v 1.103 2018/04/09 20:41:22 tj Exp $

Include /etc/ssh/sshd_config.d/*.conf

#Port 22
#PermitRootLogin prohibit-password
#PasswordAuthentication yes
ChallengeResponseAuthentication no
UsePAM yes
X11Forwarding yes
PrintMotd no
AcceptEnv LANG LC_*
Subsystem\tsftp\t/usr/lib/openssh/sftp-server
"""
# Ubuntu 20.04's /etc/login.defs (the lines adduser/useradd read)
LOGIN_DEFS = """\
MAIL_DIR        /var/mail
PASS_MAX_DAYS\t99999
PASS_MIN_DAYS\t0
PASS_WARN_AGE\t7
UID_MIN\t\t\t 1000
UID_MAX\t\t\t60000
SYS_UID_MIN\t\t  100
SYS_UID_MAX\t\t  999
GID_MIN\t\t\t 1000
GID_MAX\t\t\t60000
UMASK\t\t022
USERGROUPS_ENAB yes
ENCRYPT_METHOD SHA512
"""
SKEL = {
    ".bashrc": "# ~/.bashrc: executed by bash(1) for non-login shells.\nHISTSIZE=1000\n",
    ".profile": '# ~/.profile: executed by the command interpreter for login shells.\n. "$HOME/.bashrc"\n',
    ".bash_logout": "# ~/.bash_logout: executed by bash(1) when login shell exits.\n",
}
LOCALES = ("C.UTF-8",)  # folders in /usr/lib/locale
ARCHIVE_LOCALES = ("en_US.utf8", "zh_CN.utf8")  # names in /usr/lib/locale/locale-archive
ZONES = ("Asia/Shanghai", "Asia/Singapore", "Europe/Berlin", "UTC", "Etc/UTC")
# what a factory-fresh vendor image carries that must not be shared (PackageOptions.vendor_identity)
VENDOR_MACHINE_ID = "0123456789abcdef0123456789abcdef\n"
VENDOR_KEY_TYPES = ("rsa", "ecdsa", "ed25519")


def locale_archive(names: Sequence[str]) -> bytes:
    """A glibc locale-archive header with its string table (glibc locale/locarchive.h layout)."""
    table = b"".join(n.encode() + b"\0" for n in names)
    head = 4 * 8
    fields = (0xDE020109, 1, head, 0, 0, head, len(table), len(table))
    return struct.pack("<8I", *fields) + table + bytes(64)


def vendor_host_key(kind: str, public: bool) -> str:
    if public:
        return f"ssh-{kind} AAAAvendor{kind}fixturekey root@bm1684\n"
    armour = "OPENSSH PRIVATE KEY-----\n"
    return f"-----BEGIN {armour}vendor-{kind}-fixture-private-key\n-----END {armour}"


def vendor_identity_files() -> dict[str, Node]:
    """Host keys and machine-id as the vendor's image has them (device paths)."""
    t: dict[str, Node] = {}
    for kind in VENDOR_KEY_TYPES:
        t[f"/etc/ssh/ssh_host_{kind}_key"] = file_node(vendor_host_key(kind, False), 0o600)
        t[f"/etc/ssh/ssh_host_{kind}_key.pub"] = file_node(vendor_host_key(kind, True))
    t["/etc/machine-id"] = file_node(VENDOR_MACHINE_ID, 0o444)
    t["/var/lib/dbus/machine-id"] = file_node(VENDOR_MACHINE_ID, 0o444)
    return t


ENABLED_UNITS = {
    "multi-user.target.wants": (
        "bmrt_setup.service",
        "bmrt_loadko.service",
        "resize-helper.service",
        "ssh.service",
    ),
    "timers.target.wants": ("apt-daily.timer",),
}

BM_SET_IP = """\
#!/bin/bash
# bm_set_ip <interface> <ip> <netmask> <gateway> <dns>  (fixture stand-in)
# Edits /etc/netplan/01-netcfg.yaml line by line, as the vendor tool does.
file=/etc/netplan/01-netcfg.yaml
[ $# -lt 2 ] && { echo "usage: bm_set_ip <if> <ip> [mask gw dns]"; exit 1; }
sed -i "/$1:/,/optional/ s|addresses: .*|addresses: [$2/24]|" "$file"
netplan apply
"""

BMRT_SETUP = """\
#!/bin/bash
# Sophon runtime setup (fixture stand-in)
chown -R linaro:linaro /data
"""

LANDSCAPE_WRAPPER = """\
#!/bin/sh
# don't try refresh this more than once per minute (fixture stand-in)
cat /var/lib/landscape/landscape-sysinfo.cache 2>/dev/null
"""

MOTD_HEADER = """\
#!/bin/sh
printf "Welcome to %s (%s %s %s)\\n" "$DISTRIB_DESCRIPTION" "$(uname -o)" "$(uname -r)" "$(uname -m)"
"""


def rootfs_tree(hostname: str = "bm1684", merged_usr: bool = False) -> Tree:
    """A realistic miniature Ubuntu 20.04 root for the ROOTFS partition."""
    lib = "/usr/lib" if merged_usr else "/lib"
    t: Tree = {}
    mountpoints = "/boot /data /opt /dev /proc /sys /run /mnt /media/root-ro /media/root-rw /srv"
    system = "/bin /sbin /var/log /var/lib/apt /var/cache /usr/bin /usr/sbin /usr/local/bin /usr/share/doc"
    etc_dirs = "/etc/apt/sources.list.d /etc/profile.d /etc/ssh"
    for d in [*f"{mountpoints} {system} {etc_dirs}".split(), f"{lib}/modules/5.4.217-bm1684/kernel/drivers"]:
        t[d] = dir_node()
    if merged_usr:
        for name in ("bin", "sbin", "lib"):
            t.pop(f"/{name}", None)
            t[f"/{name}"] = symlink_node(f"usr/{name}")
    t["/root"] = dir_node(0o700)
    t["/tmp"] = dir_node(0o1777)
    t["/var/tmp"] = dir_node(0o1777)

    etc = {
        "passwd": file_node(PASSWD),
        "group": file_node(GROUP),
        "shadow": file_node(SHADOW, 0o640, 0, SHADOW_GID),
        "gshadow": file_node(
            "".join(f"{ln.split(':')[0]}:*::{ln.split(':')[3]}\n" for ln in GROUP.splitlines()),
            0o640,
            0,
            SHADOW_GID,
        ),
        "hostname": file_node(f"{hostname}\n"),
        "hosts": file_node(HOSTS.format(hostname=hostname)),
        "fstab": file_node("# UNCONFIGURED FSTAB FOR BASE SYSTEM\n"),
        "fstab.emmc.ro": file_node(FSTAB_EMMC_RO),
        "netplan/01-netcfg.yaml": file_node(NETPLAN),
        "apt/sources.list": file_node(SOURCES_LIST),
        "sudoers": file_node(
            "Defaults\tenv_reset\nroot\tALL=(ALL:ALL) ALL\n%sudo\tALL=(ALL:ALL) ALL\n", 0o440
        ),
        "profile.d/bm_env.sh": file_node("export PATH=$PATH:/opt/sophon/libsophon-current/bin\n"),
        "ssh/sshd_config": file_node(SSHD_CONFIG),
        "login.defs": file_node(LOGIN_DEFS),
        "timezone": file_node("Asia/Shanghai\n"),
        "default/locale": file_node("LANG=C.UTF-8\n"),
        "update-motd.d/00-header": file_node(MOTD_HEADER, 0o755),
        "update-motd.d/50-landscape-sysinfo": symlink_node("/usr/share/landscape/landscape-sysinfo.wrapper"),
        "resolv.conf": symlink_node("../run/systemd/resolve/stub-resolv.conf"),
        "os-release": symlink_node("../usr/lib/os-release"),
        "localtime": symlink_node("/usr/share/zoneinfo/Asia/Shanghai"),
    }
    for name, node in etc.items():
        t[f"/etc/{name}"] = node
    t["/usr/lib/os-release"] = file_node(OS_RELEASE)
    t["/usr/share/landscape/landscape-sysinfo.wrapper"] = file_node(LANDSCAPE_WRAPPER, 0o755)
    for zone in ZONES:
        t[f"/usr/share/zoneinfo/{zone}"] = file_node(_blob(f"tz {zone}", 561))
    for name, text in SKEL.items():
        t[f"/etc/skel/{name}"] = file_node(text)
    t["/etc/ssh/sshd_config.d"] = dir_node()
    for name in LOCALES:
        t[f"/usr/lib/locale/{name}/LC_CTYPE"] = file_node(_blob(f"locale {name}", 300))
    t["/usr/lib/locale/locale-archive"] = file_node(locale_archive(ARCHIVE_LOCALES))
    t["/usr/bin/ssh-keygen"] = file_node(_blob("ssh-keygen", 4000), 0o755)
    bindir = "/usr/bin" if merged_usr else "/bin"
    t[f"{bindir}/bash"] = file_node(_blob("bash", 6000), 0o755)
    t[f"{bindir}/sh"] = symlink_node("dash")
    t[f"{bindir}/dash"] = file_node(_blob("dash", 3000), 0o755)
    t["/var/lib/dbus"] = dir_node()

    for unit, text in SYSTEMD_UNITS.items():
        t[f"{lib}/systemd/system/{unit}"] = file_node(text)
    for wants, units in ENABLED_UNITS.items():
        for unit in units:
            t[f"/etc/systemd/system/{wants}/{unit}"] = symlink_node(f"/lib/systemd/system/{unit}")

    t["/usr/sbin/bm_set_ip"] = file_node(BM_SET_IP, 0o755)
    t["/usr/sbin/bmrt_setup.sh"] = file_node(BMRT_SETUP, 0o755)
    t["/usr/sbin/bmrt_loadko.sh"] = file_node(
        "#!/bin/bash\ninsmod /lib/modules/$(uname -r)/bmtpu.ko\n", 0o755
    )
    t["/usr/sbin/resize-helper"] = file_node("#!/bin/bash\nsgdisk -e /dev/mmcblk0\n", 0o755)
    t["/usr/bin/sudo"] = file_node(_blob("sudo", 12_000), 0o4755)
    t["/usr/bin/python3.8"] = file_node(_blob("python3.8", 300_000), 0o755)
    t["/usr/bin/python3"] = symlink_node("python3.8")
    t["/usr/bin/perl5.30.0"] = file_node(_blob("perl", 20_000), 0o755)
    t["/usr/bin/perl"] = hardlink_node("/usr/bin/perl5.30.0")
    t["/usr/lib/aarch64-linux-gnu/libc-2.31.so"] = file_node(_blob("libc", 150_000), 0o755)
    t["/usr/lib/aarch64-linux-gnu/libc.so.6"] = symlink_node("libc-2.31.so")
    t[f"{lib}/modules/5.4.217-bm1684/kernel/drivers/bmtpu.ko"] = file_node(_blob("bmtpu", 40_000))

    t["/home/linaro"] = dir_node(0o755, LINARO_UID, LINARO_UID)
    t["/home/linaro/.bashrc"] = file_node(
        "# ~/.bashrc\nexport HISTSIZE=1000\n", 0o644, LINARO_UID, LINARO_UID
    )
    t["/home/linaro/.profile"] = file_node("# ~/.profile\n. ~/.bashrc\n", 0o644, LINARO_UID, LINARO_UID)
    t["/home/admin"] = dir_node(0o755, ADMIN_UID, ADMIN_UID)
    t["/home/admin/.bashrc"] = file_node("# ~/.bashrc\n", 0o644, ADMIN_UID, ADMIN_UID)
    return t


def rootfs_rw_tree() -> Tree:
    return {"/overlay": dir_node(), "/overlay-workdir": dir_node(), "/overlay-workdir/work": dir_node(0o700)}


def opt_tree() -> Tree:
    lib = "/sophon/libsophon-0.5.1/lib"
    cv = "/sophon/sophon-opencv_1.8.0/opencv-python"
    return {
        f"{lib}/libbmlib.so.0": file_node(_blob("libbmlib", 60_000), 0o755),
        f"{lib}/libbmrt.so.1.0": file_node(_blob("libbmrt", 90_000), 0o755),
        "/sophon/libsophon-0.5.1/bin/bm-smi": file_node(_blob("bm-smi", 8_000), 0o755),
        "/sophon/libsophon-current": symlink_node("libsophon-0.5.1"),
        f"{cv}/cv2/__init__.py": file_node("from .cv2 import *\n"),
        f"{cv}/cv2/cv2.so": file_node(_blob("cv2", 50_000), 0o755),
        "/sophon/sophon-opencv-latest": symlink_node("sophon-opencv_1.8.0"),
    }


def data_tree() -> Tree:
    return {
        "/README.txt": file_node("User data partition (mounted at /data).\n"),
        "/ota": dir_node(0o755, LINARO_UID, LINARO_UID),
        "/ota/version.txt": file_node("v1.0.0\n", 0o644, LINARO_UID, LINARO_UID),
    }


def recovery_tree() -> Tree:
    return {"/recovery.itb": file_node(_blob("recovery", 30_000)), "/version": file_node("recovery 1.0\n")}


def boot_tree() -> Tree:
    return {
        "/Image": file_node(_blob("Image", 200_000)),
        "/bm1684x_sm7m_v1.2_rb.dtb": file_node(_blob("dtb", 9_000)),
        "/emmcboot.itb": file_node(_blob("emmcboot", 40_000)),
        "/overlays/README": file_node("device tree overlays\n"),
    }


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ExtraLines:
    """Vendor lines a per-partition script may carry beyond the public generator's."""

    after_header: tuple[str, ...] = ()  # after the skip line and its blank line
    between_chunks: tuple[str, ...] = ()  # after every chunk block but the last
    at_end: tuple[str, ...] = ()  # after the last chunk block


@dataclass(frozen=True)
class PackageOptions:
    """Everything a variant can change; build_package(root, **fields) overrides the defaults."""

    layout: tuple[PartSpec, ...] = MINI_LAYOUT
    disk_kb: int = MINI_DISK_KB
    chunk_sectors: int = DEFAULT_CHUNK_SECTORS
    # "radxa" (AirBox: fan block in boot.cmd, fip*.bin) or "sophgo" (public generator)
    flavour: str = "radxa"
    epoch: int = DEFAULT_EPOCH  # mkimage time, chunk mtimes, file times
    created: str | None = None  # the "# Created" date; default: `date` output for epoch in CST
    seed: int = 1684  # GUIDs, UUIDs
    hostname: str = "bm1684"
    merged_usr: bool = False
    post_scr: bool = False  # boot.cmd tries post.scr after "all done" (FORMAT.md 1.6)
    extra_lines: Mapping[str, ExtraLines] = field(default_factory=dict)  # by label (any case)
    local_update: bool = False
    spi_flash: bool = True
    skip_images: frozenset[str] = frozenset()  # labels whose image is missing ("Skipping partition")
    extra_files: Mapping[str, TreeInput] = field(default_factory=dict)  # label -> {path: bytes|Node}
    raw_images: Mapping[str, bytes] = field(default_factory=dict)  # label -> bytes, for format 0
    rw_overlay_files: Mapping[str, bytes | str] = field(default_factory=dict)  # device path -> content
    rw_whiteouts: tuple[str, ...] = ()  # device paths hidden by a whiteout in ROOTFS_RW
    rw_opaque_dirs: tuple[str, ...] = ()  # device dirs made opaque in ROOTFS_RW
    # label -> KiB of free space left after resize2fs -M (on multi-GB flex_bg file systems the
    # vendor's resize2fs -M leaves hundreds of MB free; the miniature ones come out full)
    slack_kb: Mapping[str, int] = field(default_factory=dict)
    # label -> a partition image made elsewhere (tests/vm_fixture.py: a real arm64 userland), used as is
    prebuilt_images: Mapping[str, Path] = field(default_factory=dict)
    # host keys and a machine-id in ROOTFS, and a factory boot's copies in ROOTFS_RW's upper layer
    vendor_identity: bool = False
    # ext4 made with the usage type mke2fs picks from the partition's size, as the vendor's plain
    # `mkfs.ext4` does: under 512 MiB "small" (1 KiB blocks, 128-byte inodes in 1.45), under 3 MiB
    # "floppy". Off: every image "default" (4 KiB blocks), which the miniature's sizes would not get.
    size_types: bool = False


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class BuiltPartition:
    index: int
    label: str  # as in the XML
    fmt: int
    readonly: bool
    offset_sectors: int
    size_sectors: int  # the partition's size (XML), not the image's
    image: Path | None  # the uncompressed image the chunks were cut from; None when skipped
    chunk_files: tuple[str, ...]  # "<name>.<k>-of-<M>.gz", in order
    chunk_bytes: tuple[int, ...]  # uncompressed bytes of each chunk

    @property
    def name(self) -> str:
        return self.label.lower()

    @property
    def script(self) -> str:
        return f"boot_emmc-{self.name}.cmd"

    @property
    def image_bytes(self) -> int:
        return sum(self.chunk_bytes)


@dataclass(frozen=True)
class MiniPackage:
    dir: Path  # the file set
    xml: Path  # dir / partition32G.xml
    partitions: tuple[BuiltPartition, ...]
    chunk_sectors: int
    gpt_bytes: bytes
    disk_kb: int
    options: PackageOptions

    @property
    def root(self) -> Path:
        return self.dir.parent

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def xml_text(self) -> str:
        return self.xml.read_text()

    def partition(self, label: str) -> BuiltPartition:
        for p in self.partitions:
            if p.label.lower() == label.lower():
                return p
        raise KeyError(label)

    def file_names(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir())

    def copy_to(self, root: Path) -> MiniPackage:
        """A fresh, independent copy under root (root/sdcard, root/images)."""
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.dir, root / self.dir.name, copy_function=shutil.copy2)
        if self.images_dir.exists():
            shutil.copytree(self.images_dir, root / "images", copy_function=shutil.copy2)
        return rebase(self, root)


def rebase(pkg: MiniPackage, root: Path) -> MiniPackage:
    parts = tuple(
        replace(p, image=None if p.image is None else root / "images" / p.image.name) for p in pkg.partitions
    )
    new_dir = root / pkg.dir.name
    return replace(pkg, dir=new_dir, xml=new_dir / pkg.xml.name, partitions=parts)


# ----------------------------------------------------------------------------- tools


class FixtureError(RuntimeError):
    pass


def tool_env(opts: PackageOptions, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GZIP", "XZ_OPT", "ZIPOPT", "TAR_OPTIONS")}
    env.update(
        LC_ALL="C",
        TZ="UTC",
        SOURCE_DATE_EPOCH=str(opts.epoch),
        E2FSPROGS_FAKE_TIME=str(opts.epoch),
        E2FSCK_TIME=str(opts.epoch),
        MTOOLS_SKIP_CHECK="1",
        PATH=env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin",
    )
    env.update(more)
    return env


def sh(
    cmd: Sequence[str | Path],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    *,
    stdin: bytes | None = None,
    stdout: IO[bytes] | int = subprocess.PIPE,
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; fail with its stderr (the fixture must not depend on builder.run)."""
    args = [str(c) for c in cmd]
    proc = subprocess.run(
        args, input=stdin, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, check=False
    )
    if proc.returncode != 0:
        raise FixtureError(
            f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    return proc


# ----------------------------------------------------------------------------- partition images

# Ubuntu 20.04's /etc/mke2fs.conf (e2fsprogs 1.45.5), the [defaults] and ext4 parts the
# vendor's `mkfs.ext4` used: no orphan_file / metadata_csum_seed that 1.47 can add.
MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text3 = {
\t\tfeatures = has_journal
\t}
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t\tinode_size = 256
\t}
\tsmall = {
\t\tblocksize = 1024
\t\tinode_size = 128
\t\tinode_ratio = 4096
\t}
\tfloppy = {
\t\tblocksize = 1024
\t\tinode_size = 128
\t\tinode_ratio = 8192
\t}
"""


def _stage_tree(tree: Tree, stage: Path) -> None:
    """Write the regular parts of a tree (dirs, files, symlinks, hardlinks) to a folder."""
    stage.mkdir(parents=True)
    hardlinks = []
    for path in sorted(tree):
        node, dest = tree[path], stage / path.lstrip("/")
        if path == "/":
            continue
        if node.kind == "dir":
            dest.mkdir(exist_ok=True)
        elif node.kind == "file":
            dest.write_bytes(node.data)
        elif node.kind == "symlink":
            dest.symlink_to(node.target)
        elif node.kind == "hardlink":
            hardlinks.append((dest, stage / _norm(node.target).lstrip("/")))
    for dest, src in hardlinks:
        os.link(src, dest)


def _quote(path: str) -> str:
    return f'"{path}"' if " " in path else path


def _debugfs_script(tree: Tree, epoch: int) -> str:
    """Owners, modes, times, whiteouts and xattrs: what a rootless mke2fs -d cannot set."""
    type_bits = {"dir": 0o040000, "file": 0o100000, "symlink": 0o120000, "whiteout": 0o020000}
    lines = []
    for path in sorted(tree):
        node = tree[path]
        if node.kind == "hardlink":
            continue
        q = _quote(path)
        if node.kind == "whiteout":
            parent, name = path.rsplit("/", 1)
            lines += [f"cd {_quote(parent or '/')}", f"mknod {_quote(name)} c 0 0", "cd /"]
        lines.append(f"sif {q} mode 0{type_bits[node.kind] | node.mode:o}")
        lines += [f"sif {q} uid {node.uid}", f"sif {q} gid {node.gid}"]
        lines += [f"sif {q} {t} @{epoch}" for t in ("atime", "mtime", "ctime", "crtime")]
        lines += [f"ea_set {q} {name} {value}" for name, value in node.xattrs]
    return "\n".join(lines) + "\n"


def _usage_type(size_bytes: int) -> str:
    """What mke2fs picks without -T (misc/mke2fs.c: under 3 MiB floppy, under 512 MiB small)."""
    return "floppy" if size_bytes < 3 << 20 else "small" if size_bytes < 512 << 20 else "default"


def make_ext4(
    image: Path,
    size_bytes: int,
    tree: Tree,
    *,
    fs_uuid: uuid.UUID,
    hash_seed: uuid.UUID,
    opts: PackageOptions,
    work: Path,
) -> None:
    """mkfs.ext4 at full size, fill, e2fsck -f -p, resize2fs -M (the vendor's sequence)."""
    stage = work / f"stage-{image.stem}"
    _stage_tree(tree, stage)
    conf = work / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    env = tool_env(opts, MKE2FS_CONFIG=str(conf))
    with open(image, "wb") as f:
        f.truncate(size_bytes)
    sh(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-T",
            _usage_type(size_bytes) if opts.size_types else "default",
            "-U",
            str(fs_uuid),
            "-E",
            f"hash_seed={hash_seed},root_owner=0:0,no_copy_xattrs",
            "-d",
            stage,
            image,
        ],
        env,
    )
    script = work / f"debugfs-{image.stem}.cmd"
    script.write_text(_debugfs_script(tree, opts.epoch))
    out = sh(["debugfs", "-w", "-f", script, image], env)
    errors = [ln for ln in out.stderr.decode().splitlines() if not ln.startswith("debugfs ")]
    if errors:
        raise FixtureError(f"debugfs on {image.name}: {errors[:5]}")
    sh(["e2fsck", "-f", "-p", image], env)
    sh(["resize2fs", "-M", image], env)
    slack = {k.upper(): v for k, v in opts.slack_kb.items()}.get(image.stem.upper(), 0)
    if slack:
        head = sh(["dumpe2fs", "-h", image], env).stdout
        blocks = int(re.search(rb"Block count:\s+(\d+)", head)[1])  # type: ignore[index]
        block_size = int(re.search(rb"Block size:\s+(\d+)", head)[1])  # type: ignore[index]
        grown = blocks + slack * 1024 // block_size
        with open(image, "r+b") as f:
            f.truncate(grown * block_size)
        sh(["resize2fs", image, str(grown)], env)
    shutil.rmtree(stage)


def make_fat(image: Path, size_bytes: int, tree: Tree, *, volume_id: int, opts: PackageOptions) -> None:
    """Plain `mkfs.fat` at the full partition size, then the files by mtools."""
    env = tool_env(opts)
    with open(image, "wb") as f:
        f.truncate(size_bytes)
    sh(["mkfs.fat", "-i", f"{volume_id:08x}", image], env)
    for path in sorted(tree):
        node = tree[path]
        if path == "/":
            continue
        if node.kind == "dir":
            sh(["mmd", "-i", image, f"::{path}"], env)
        elif node.kind == "file":
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / path.rsplit("/", 1)[1]
                src.write_bytes(node.data)
                os.utime(src, (opts.epoch, opts.epoch))
                sh(["mcopy", "-m", "-i", image, src, f"::{path}"], env)
        else:
            raise FixtureError(f"FAT partition cannot hold a {node.kind} ({path})")


def make_raw(image: Path, size_bytes: int, data: bytes | None) -> None:
    """MISC: zeros of the partition size, or the vendor's <label>.img copied as is."""
    if data is not None:
        image.write_bytes(data)
        return
    with open(image, "wb") as f:
        f.truncate(size_bytes)


def partition_tree(spec: PartSpec, opts: PackageOptions) -> Tree:
    defaults = {
        "BOOT": boot_tree,
        "RECOVERY": recovery_tree,
        "ROOTFS": lambda: rootfs_tree(opts.hostname, opts.merged_usr),
        "ROOTFS_RW": rootfs_rw_tree,
        "OPT": opt_tree,
        "DATA": data_tree,
    }
    base = defaults.get(spec.label.upper(), dict)()
    extra = {k.upper(): v for k, v in opts.extra_files.items()}.get(spec.label.upper())
    tree = merge_tree(base, extra)
    if spec.label.upper() == "ROOTFS" and opts.vendor_identity:
        tree = merge_tree(tree, vendor_identity_files())
    if spec.label.upper() == "ROOTFS_RW":
        tree = merge_tree(tree, _shadow_entries(opts))
        if opts.vendor_identity:
            tree = merge_tree(tree, {"/overlay/etc/ssh": dir_node(), "/overlay/var/lib/dbus": dir_node()})
            upper = {p: n for p, n in vendor_identity_files().items() if "ed25519" in p or "machine-id" in p}
            tree = merge_tree(tree, {"/overlay" + p: n for p, n in upper.items()})
    return tree


def _shadow_entries(opts: PackageOptions) -> dict[str, Node]:
    shadows: dict[str, Node] = {}
    for path, data in opts.rw_overlay_files.items():
        shadows["/overlay" + _norm(path)] = file_node(data)
    for path in opts.rw_whiteouts:
        shadows["/overlay" + _norm(path)] = whiteout_node()
    for path in opts.rw_opaque_dirs:
        shadows["/overlay" + _norm(path)] = dir_node(xattrs=dict([OPAQUE_XATTR]))
    return shadows


def build_image(spec: PartSpec, index: int, opts: PackageOptions, images: Path, work: Path) -> Path:
    image = images / f"{spec.name}.img"
    size = spec.size_kb * 1024
    prebuilt = {k.upper(): v for k, v in opts.prebuilt_images.items()}.get(spec.label.upper())
    if prebuilt is not None:
        sh(["cp", "--sparse=always", prebuilt, image])
        return image
    rng = random.Random(f"fs:{opts.seed}:{index}:{spec.label}")
    if spec.fmt == FMT_EXT4:
        make_ext4(
            image,
            size,
            partition_tree(spec, opts),
            fs_uuid=_guid(rng),
            hash_seed=_guid(rng),
            opts=opts,
            work=work,
        )
    elif spec.fmt == FMT_FAT:
        make_fat(image, size, partition_tree(spec, opts), volume_id=rng.getrandbits(32), opts=opts)
    else:
        raw = {k.upper(): v for k, v in opts.raw_images.items()}.get(spec.label.upper())
        make_raw(image, size, raw)
    return image


# ----------------------------------------------------------------------------- scripts (the echo lines)


def created_line_date(epoch: int) -> str:
    """What `date` prints in the C locale on a CST (UTC+8) build host."""
    t = time.gmtime(epoch + 8 * 3600)
    return time.strftime("%a %b ", t) + f"{t.tm_mday:2d}" + time.strftime(" %H:%M:%S CST %Y", t)


def top_script(opts: PackageOptions) -> list[str]:
    created = opts.created if opts.created is not None else created_line_date(opts.epoch)
    lines = [
        "# Bitmain sdcard recovery U-Boot script",
        f"# Created {created}",
        "",
        "# disable MCU watchdog",
        "i2c dev 1; i2c mw 0x69 1 0",
        "",
    ]
    if opts.flavour == "radxa":
        lines += ["# open fan", "mw.l 0x50029004 0xfa0 1", "mw.l 0x50029000 0x400 1", ""]
    lines += [
        "set update_all 1",
        "led status off",
        "led error on",
        "",
        "if test -n $load_partition; then setenv distro_bootpart $load_partition; setenv reset_after 1; fi;",
        "",
        "echo update SPI flash",
        f"{LOAD} {SCRIPT_ADDR} {OTA_PATH}boot_spif.scr",
        f"source {SCRIPT_ADDR}",
        "",
        "echo update eMMC",
        f"{LOAD} {SCRIPT_ADDR} {OTA_PATH}boot_emmc.scr",
        f"source {SCRIPT_ADDR}",
        "",
        "echo all done",
        "",
    ]
    if opts.post_scr:
        lines += [
            f"{LOAD} {SCRIPT_ADDR} {OTA_PATH}post.scr",
            f"if test $? -eq 0; then source {SCRIPT_ADDR}; fi;",
            "",
        ]
    lines += [
        "led status on",
        "led error off",
        "set light 1",
        "",
        'if test "$reset_after" = "1"; then reset; fi;',
        "",
        "while true; do;",
        'if test $light = "0"; then led status off; set light 1; else led status on; set light 0; fi;',
        REMOVE_MEDIUM,
    ]
    return lines


def spif_script(opts: PackageOptions) -> list[str]:
    if not opts.spi_flash:
        return []
    return [
        "# SPI flash image",
        "",
        f"{LOAD} {IN_ADDR} {OTA_PATH}spi_flash.bin",
        "if test $? -eq 0; then",
        "sf probe",
        "if test $? -ne 0; then",
        "led status off",
        "led error off",
        'while true; do; echo "ERROR: SPI flash not exist"; sleep 0.5; done; fi;',
        "print chip_type",
        f'if test "$chip_type" = "bm1684"; then sf update {IN_ADDR_B} 0x0 0x200000; '
        f"else sf update {IN_ADDR} 0x0 0x200000; fi",
        "else",
        "echo skip SPI flash update.",
        "fi",
        "",
        "echo SPI flash update done",
        'if test "$update_all" != "1" -a "$reset_after" = "1"; then reset; fi;',
        'if test "$update_all" != "1"; then while true; do; '
        'echo "Please remove the installation medium, then reboot"; sleep 0.5; done; fi;',
    ]


def emmc_header() -> list[str]:
    return [
        "# eMMC image",
        "",
        "mmc dev 0",
        "if test $? -ne 0; then",
        "led status off",
        "led error off",
        'while true; do; echo "ERROR: eMMC not exist"; sleep 0.5; done; fi;',
        "",
    ]


def emmc_entry(description: str, name: str) -> list[str]:
    """The lines create_partition_script adds to boot_emmc.cmd."""
    return [
        f"# {description}",
        f"{LOAD} {SCRIPT_ADDR} {OTA_PATH}boot_emmc-{name}.scr",
        f"source {SCRIPT_ADDR}",
        "",
    ]


def emmc_done() -> list[str]:
    return [
        "echo eMMC update done",
        "bm_savelog mmc 0:1 end.log",
        'if test "$update_all" != "1" -a "$reset_after" = "1"; then reset; fi;',
        'if test "$update_all" != "1"; then while true; do; '
        'echo "Please remove the installation medium, then reboot"; sleep 0.5; done; fi;',
    ]


def gpt_script_header() -> list[str]:
    """Header of boot_emmc-gpt.cmd: "mmc gpt file" has no partition number, so the skip line differs."""
    return [
        "# mmc gpt file",
        "",
        'if test -n $load_partition; then echo "skip empty part_num partition ";  exit; fi;',
        "",
    ]


def partition_script_header(index: int, name: str) -> list[str]:
    lines = [f"# Partition {index} ({name})"]
    if index > 2:
        lines.append(f"bm_savelog mmc 0:1 {index}.log")
    lines += [
        "",
        f"if test -n $load_partition; then if test $load_partition -eq {index + 1}; then "
        'echo "skip partition $load_partition";  exit; fi; fi;',
        "",
    ]
    return lines


def chunk_block(gz_name: str, nbytes: int, disk_offset: int) -> list[str]:
    """compress_and_update_partition_script: load / unzip / mmc write, each with its error block."""
    sectors = (nbytes + SECTOR - 1) // SECTOR
    err = ["if test $? -ne 0; then", "led status off", "led error off"]
    return [
        f"{LOAD} {IN_ADDR} {OTA_PATH}{gz_name}",
        *err,
        LOAD_FAILED,
        "echo",
        "",
        f"unzip {IN_ADDR} {OUT_ADDR} 0x{nbytes:08x}",
        *err,
        LOAD_FAILED,
        "echo",
        "",
        f"mmc write {OUT_ADDR} 0x{disk_offset:08x} 0x{sectors:08x}",
        *err,
        WRITE_FAILED,
        "echo",
        "",
    ]


def write_script(folder: Path, base: str, lines: Sequence[str], opts: PackageOptions) -> None:
    """X.cmd exactly as `echo` lines append it, and X.scr from mkimage."""
    cmd = folder / f"{base}.cmd"
    cmd.write_text("".join(line + "\n" for line in lines))
    sh(
        [
            "mkimage",
            "-A",
            "arm64",
            "-O",
            "linux",
            "-T",
            "script",
            "-C",
            "none",
            "-a",
            "0",
            "-e",
            "0",
            "-n",
            base,
            "-d",
            cmd,
            folder / f"{base}.scr",
        ],
        tool_env(opts),
    )


# ----------------------------------------------------------------------------- chunks


def split_image(image: Path, folder: Path, name: str, chunk_sectors: int) -> list[tuple[str, int, int]]:
    """Cut image into <name>.<k>-of-<M> files; returns (file, bytes, sector offset in image)."""
    total = image.stat().st_size
    sectors = (total + SECTOR - 1) // SECTOR
    count = (sectors + chunk_sectors - 1) // chunk_sectors
    chunk_bytes = chunk_sectors * SECTOR
    out = []
    with open(image, "rb") as src:
        for k in range(1, count + 1):
            start = (k - 1) * chunk_bytes
            nbytes = min(chunk_bytes, total - start)
            fname = f"{name}.{k}-of-{count}"
            with open(folder / fname, "wb") as dst:
                left = nbytes
                while left:
                    buf = src.read(min(left, 1 << 20))
                    dst.write(buf)
                    left -= len(buf)
            out.append((fname, nbytes, (k - 1) * chunk_sectors))
    return out


def gzip_files(folder: Path, names: Sequence[str], opts: PackageOptions) -> None:
    """`gzip FILE` as the vendor runs it: the header keeps FILE's name and mtime."""
    for n in names:
        os.utime(folder / n, (opts.epoch, opts.epoch))
    sh(["gzip", *names], tool_env(opts), cwd=folder)


# ----------------------------------------------------------------------------- the packer


LOCAL_UPDATE_SH = """\
#!/bin/bash
# On-device OTA helper (fixture stand-in): check the package, then flag recovery.
[ $# -lt 1 ] && { echo "need md5 file"; exit 1; }
cd "$(dirname "$0")" || exit 1
if ! md5sum -c "$1"; then
    echo "update failed"
    exit 1
fi
echo "update success"
"""


def _validate(opts: PackageOptions) -> None:
    labels = [p.label.upper() for p in opts.layout]
    if len(set(labels)) != len(labels):
        raise FixtureError(f"duplicate labels in layout: {labels}")
    end = FIRST_PART_SECTOR + sum(p.size_sectors for p in opts.layout)
    if end > opts.disk_kb * 2 - GPT_SECTORS:
        raise FixtureError(f"layout needs {end} sectors, disk has {opts.disk_kb * 2}")
    if opts.chunk_sectors <= 0:
        raise FixtureError("chunk_sectors must be positive")
    if opts.flavour not in ("radxa", "sophgo"):
        raise FixtureError(f"unknown flavour {opts.flavour!r}")


def _copy_bootloader_files(folder: Path, opts: PackageOptions) -> None:
    """fip.bin, spi_flash*.bin (small stand-ins) and the empty BOOT marker."""
    (folder / "fip.bin").write_bytes(_blob("fip", 4096))
    if opts.spi_flash:
        for name in ("spi_flash.bin", "spi_flash_bm1684.bin", "spi_flash_bm1684x.bin"):
            (folder / name).write_bytes(_blob(name, 8192))
    (folder / "BOOT").write_bytes(b"")


def _package_partition(
    spec: PartSpec, index: int, offset: int, image: Path | None, folder: Path, opts: PackageOptions
) -> BuiltPartition:
    if image is None:  # the packer prints "Skipping partition N" and writes nothing
        return BuiltPartition(
            index, spec.label, spec.fmt, spec.readonly, offset, spec.size_sectors, None, (), ()
        )
    chunks = split_image(image, folder, spec.name, opts.chunk_sectors)
    gzip_files(folder, [c[0] for c in chunks], opts)
    extra = {k.upper(): v for k, v in opts.extra_lines.items()}.get(spec.label.upper(), ExtraLines())
    lines = partition_script_header(index, spec.name) + list(extra.after_header)
    for i, (fname, nbytes, rel) in enumerate(chunks):
        lines += chunk_block(f"{fname}.gz", nbytes, offset + rel)
        lines += list(extra.between_chunks) if i < len(chunks) - 1 else list(extra.at_end)
    write_script(folder, f"boot_emmc-{spec.name}", lines, opts)
    return BuiltPartition(
        index,
        spec.label,
        spec.fmt,
        spec.readonly,
        offset,
        spec.size_sectors,
        image,
        tuple(f"{c[0]}.gz" for c in chunks),
        tuple(c[1] for c in chunks),
    )


def build_package(root: Path, options: PackageOptions | None = None, **overrides: object) -> MiniPackage:
    """Build a miniature vendor package under root (root/sdcard + root/images)."""
    opts = replace(options or PackageOptions(), **overrides)  # type: ignore[arg-type]
    _validate(opts)
    folder, images, work = root / "sdcard", root / "images", root / "work"
    for d in (folder, images, work):
        if d.exists():
            raise FixtureError(f"{d} already exists")
        d.mkdir(parents=True)

    xml_text = render_xml(opts.layout, opts.disk_kb)
    (folder / "partition32G.xml").write_text(xml_text)
    write_script(folder, "boot", top_script(opts), opts)
    _copy_bootloader_files(folder, opts)
    write_script(folder, "boot_spif", spif_script(opts), opts)

    emmc = emmc_header() + emmc_entry("mmc gpt file", "gpt")
    gpt = encode_gpt(opts.layout, opts.disk_kb, opts.seed)
    (folder / "gpt").write_bytes(gpt)
    gzip_files(folder, ["gpt"], opts)
    write_script(folder, "boot_emmc-gpt", gpt_script_header() + chunk_block("gpt.gz", len(gpt), 0), opts)

    skip = {s.upper() for s in opts.skip_images}
    built = []
    for index, (spec, offset) in enumerate(zip(opts.layout, partition_offsets(opts.layout), strict=True)):
        image = None if spec.label.upper() in skip else build_image(spec, index, opts, images, work)
        part = _package_partition(spec, index, offset, image, folder, opts)
        if image is not None:
            emmc += emmc_entry(f"Partition {index} ({spec.name})", spec.name)
        built.append(part)
    write_script(folder, "boot_emmc", emmc + emmc_done(), opts)

    if opts.local_update:
        (folder / "local_update.sh").write_text(LOCAL_UPDATE_SH)
        (folder / "local_update.sh").chmod(0o755)
    _pin_mtimes(folder, opts.epoch)
    write_md5(folder, opts)
    shutil.rmtree(work)
    return MiniPackage(
        folder, folder / "partition32G.xml", tuple(built), opts.chunk_sectors, gpt, opts.disk_kb, opts
    )


def _pin_mtimes(folder: Path, epoch: int) -> None:
    for p in folder.iterdir():
        os.utime(p, (epoch, epoch))


def write_md5(folder: Path, opts: PackageOptions) -> None:
    """`md5sum * > md5.txt` in a fresh folder: the glob does not see md5.txt yet."""
    names = sorted(p.name for p in folder.iterdir() if p.name != "md5.txt")
    out = sh(["md5sum", "--", *names], tool_env(opts), cwd=folder)
    (folder / "md5.txt").write_bytes(out.stdout)
    os.utime(folder / "md5.txt", (opts.epoch, opts.epoch))


# ----------------------------------------------------------------------------- forms


def _stage_with_top(pkg: MiniPackage, top: str, tmp: Path) -> Path:
    """tmp/<top>/ holding hard links (or copies) of the file set; returns tmp/<first part of top>."""
    dest = tmp / top
    dest.mkdir(parents=True)
    for p in sorted(pkg.dir.iterdir()):
        try:
            os.link(p, dest / p.name)
        except OSError:
            shutil.copy2(p, dest / p.name)
    for d in [dest, *dest.relative_to(tmp).parents]:
        os.utime(tmp / d, (pkg.options.epoch, pkg.options.epoch))
    return tmp / Path(top).parts[0]


def make_tgz(pkg: MiniPackage, dest: Path, top: str | None = "sdcard") -> Path:
    """The file set as a gzip'd tarball, under top/ (None: at the archive root)."""
    env = tool_env(pkg.options)
    common = [
        "--sort=name",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        f"--mtime=@{pkg.options.epoch}",
        "--format=gnu",
    ]
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, open(dest, "wb") as out:
        if top:
            first = _stage_with_top(pkg, top, Path(tmp))
            tar = subprocess.Popen(
                ["tar", *common, "-C", tmp, "-cf", "-", first.name], env=env, stdout=subprocess.PIPE
            )
        else:
            tar = subprocess.Popen(
                ["tar", *common, "-C", pkg.dir, "-cf", "-", *pkg.file_names()],
                env=env,
                stdout=subprocess.PIPE,
            )
        gz = subprocess.run(["gzip", "-n", "-c"], stdin=tar.stdout, stdout=out, env=env, check=False)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or gz.returncode != 0:
            raise FixtureError(f"tar | gzip failed for {dest}")
    return dest


def make_zip(pkg: MiniPackage, dest: Path, top: str | None = None) -> Path:
    """The file set as a .zip, under top/ or at the root (None)."""
    env = tool_env(pkg.options, TZ="UTC")
    if top:
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            first = _stage_with_top(pkg, top, Path(tmp))
            sh(["zip", "-X", "-q", "-r", dest.resolve(), first.name], env, cwd=Path(tmp))
    else:
        sh(["zip", "-X", "-q", dest.resolve(), *pkg.file_names()], env, cwd=pkg.dir)
    return dest


CARD_START_SECTOR = 2048  # partition 1 at 1 MiB


def card_size_for(pkg: MiniPackage) -> int:
    """Smallest power of two (>= 64 MiB, enough for FAT32) holding the file set, in bytes."""
    payload = sum(((p.stat().st_size + 4095) // 4096) * 4096 for p in pkg.dir.iterdir())
    need = CARD_START_SECTOR * SECTOR + payload + payload // 8 + (4 << 20)
    size = 64 << 20
    while size < need:
        size *= 2
    return size


def make_card_image(
    pkg: MiniPackage, dest: Path, *, label: str = "dos", fat: int = 32, size_bytes: int | None = None
) -> Path:
    """A whole TF-card image: partition 1 at 1 MiB, FAT32/16 (VFAT long names), the file set at its root."""
    if label not in ("dos", "gpt") or fat not in (16, 32):
        raise FixtureError(f"unsupported card layout {label}/FAT{fat}")
    env = tool_env(pkg.options)
    size = size_bytes or card_size_for(pkg)
    rng = random.Random(f"card:{pkg.options.seed}:{label}:{fat}")
    with open(dest, "wb") as f:
        f.truncate(size)
    start = CARD_START_SECTOR
    if label == "dos":
        ptype = "c" if fat == 32 else "e"  # W95 FAT32 (LBA) / W95 FAT16 (LBA)
        table = f"label: dos\nlabel-id: 0x{rng.getrandbits(32):08x}\nstart={start}, type={ptype}\n"
        sh(["sfdisk", "-q", dest], env, stdin=table.encode())
        part_sectors = size // SECTOR - start
    else:
        part_sectors = size // SECTOR - start - 34  # room for the backup GPT
        new_part = ["-n", f"1:{start}:+{part_sectors}", "-t", "1:0700", "-c", "1:SDCARD"]
        sh(["sgdisk", "-o", "-U", _guid(rng), *new_part, "-u", f"1:{_guid(rng)}", dest], env)
    volume_id = f"{rng.getrandbits(32):08x}"
    geometry = ["-h", str(start), f"--offset={start}"]
    sh(["mkfs.fat", "-F", str(fat), "-i", volume_id, *geometry, dest, str(part_sectors // 2)], env)
    target = f"{dest}@@{start * SECTOR}"
    # the label by mlabel, not mkfs.fat -n: mkfs.fat stamps the label entry with the current time
    sh(["mlabel", "-i", target, "::SDCARD"], env)
    sh(["mcopy", "-m", "-i", target, *[pkg.dir / n for n in pkg.file_names()], "::/"], env)
    return dest


def make_img_zip(pkg: MiniPackage, dest: Path, **card: object) -> Path:
    """A card image inside a .zip (stored name: dest's name without .zip)."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        img = Path(tmp) / dest.name.removesuffix(".zip")
        make_card_image(pkg, img, **card)  # type: ignore[arg-type]
        os.utime(img, (pkg.options.epoch, pkg.options.epoch))
        sh(["zip", "-X", "-q", "-j", dest.resolve(), img], tool_env(pkg.options))
    return dest


def make_img_xz(pkg: MiniPackage, dest: Path, level: int = 6, **card: object) -> Path:
    """A card image compressed by xz."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        img = Path(tmp) / dest.name.removesuffix(".xz")
        make_card_image(pkg, img, **card)  # type: ignore[arg-type]
        with open(dest, "wb") as out:
            sh(["xz", f"-{level}", "-T1", "-c", img], tool_env(pkg.options), stdout=out)
    return dest


FORMS = ("dir", "tgz", "tar.gz", "zip", "img", "img.zip", "img.xz")


def make_form(pkg: MiniPackage, form: str, dest_dir: Path, stem: str = "sdcard", **kw: object) -> Path:
    """One input form of the package in dest_dir; "dir" returns the file-set folder itself."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{stem}.{form}"
    if form == "dir":
        return pkg.dir
    if form in ("tgz", "tar.gz"):
        return make_tgz(pkg, dest, **kw)  # type: ignore[arg-type]
    if form == "zip":
        return make_zip(pkg, dest, **kw)  # type: ignore[arg-type]
    if form == "img":
        return make_card_image(pkg, dest, **kw)  # type: ignore[arg-type]
    if form == "img.zip":
        return make_img_zip(pkg, dest, **kw)
    if form == "img.xz":
        return make_img_xz(pkg, dest, **kw)  # type: ignore[arg-type]
    raise FixtureError(f"unknown form {form!r}; one of {FORMS}")


def epoch_of(date: str) -> int:
    """UTC 'YYYY-MM-DD HH:MM:SS' to epoch seconds (for tests choosing another epoch)."""
    return calendar.timegm(time.strptime(date, "%Y-%m-%d %H:%M:%S"))


def _main(argv: list[str]) -> int:
    """`python -m tests.vendor_fixture DIR [FORM]`: write the miniature package (and a form of it)."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m tests.vendor_fixture DIR [FORM]   (FORM: dir tgz zip img img.zip img.xz)")
        return 0 if argv else 2
    root = Path(argv[0])
    stamp = root / "FIXTURE-SHA256"  # the fixture's own source: a changed fixture makes it anew
    version = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    if (root / "sdcard" / "boot.scr").exists() and stamp.is_file() and stamp.read_text().strip() == version:
        print(root / "sdcard")
        return 0
    if root.exists():
        shutil.rmtree(root)
    pkg = build_package(root)
    stamp.write_text(version + "\n")
    if len(argv) > 1:
        print(make_form(pkg, argv[1], root))
    else:
        print(pkg.dir)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
