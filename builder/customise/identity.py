"""`identity:` — no two boxes from one bundle share SSH host keys or a machine-id.

The vendor's keys and machine-id are removed from ROOTFS and from ROOTFS_RW's overlay upper layer
(a factory boot leaves copies there). `regenerate` installs a oneshot unit ordered before the
image's sshd that runs `ssh-keygen -A` (it makes only the keys that are missing, so the second
boot keeps the first boot's keys, which live in the overlay's upper layer); `per-device` writes
keys the build made for this device; machine-id becomes empty, systemd's first-boot rule.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from pathlib import Path

from builder.customise.context import OVERLAY_UPPER, ROOTFS, ROOTFS_RW, Customiser
from builder.customise.services import find_unit, install_section, wanted_links
from builder.errors import RecipeError
from builder.fs.ext4 import FileType
from builder.recipe.system import Identity

SSH_DIR = "/etc/ssh"
HOST_KEY = re.compile(r"ssh_host_[a-z0-9]+_key(\.pub)?")
KEYGEN_UNIT = "airbox-ssh-host-keys.service"
MACHINE_ID = "/etc/machine-id"
DBUS_MACHINE_ID = "/var/lib/dbus/machine-id"
SSH_UNITS = ("ssh.service", "sshd.service", "ssh.socket")


def keygen_unit(keygen: str, before: list[str]) -> str:
    units = " ".join(before)
    return (
        "# Written by airbox-build (identity.ssh_host_keys: regenerate): the bundle carries no host\n"
        "# keys, so each box makes its own on its first boot, before sshd starts. ssh-keygen -A makes\n"
        "# only the keys that are missing: later boots keep the first boot's keys.\n"
        "[Unit]\n"
        "Description=Create this box's SSH host keys\n"
        f"Before={units}\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={keygen} -A\n"
        "ExecStartPost=/bin/sync\n"
        "RemainAfterExit=yes\n"
        "\n"
        "[Install]\n"
        f"WantedBy=multi-user.target {units}\n"
    )


def vendor_host_keys(c: Customiser) -> list[str]:
    """Device paths of the host keys the box would see: in ROOTFS and the overlay upper layer."""
    found: set[str] = set()
    st = c.stat(ROOTFS, SSH_DIR)
    if st is not None and st.is_dir:
        found |= {n for n in c.image(ROOTFS).listdir(SSH_DIR) if HOST_KEY.fullmatch(n)}
    if c.has_partition(ROOTFS_RW) and c.partition(ROOTFS_RW).chunks:
        upper = OVERLAY_UPPER + SSH_DIR
        ust = c.stat(ROOTFS_RW, upper)
        if ust is not None and ust.is_dir:
            found |= {
                e.name
                for e in c.image(ROOTFS_RW).scandir(upper)
                if HOST_KEY.fullmatch(e.name)
                and e.type is not FileType.CHAR  # a whiteout hides, holds nothing
            }
    return [posixpath.join(SSH_DIR, n) for n in sorted(found)]


def keep_warnings(ident: Identity) -> list[str]:
    """The build's warnings for an explicit opt-out (said before any work)."""
    out: list[str] = []
    if not ident.explicit:
        return out
    if ident.ssh_host_keys == "keep":
        out.append(
            "identity.ssh_host_keys: keep — every box flashed from this bundle has the vendor image's SSH "
            f"host keys: one box's private key impersonates them all ({ident.where})"
        )
    if ident.machine_id == "keep":
        out.append(
            "identity.machine_id: keep — every box shares the vendor's machine-id (and the DHCP DUID "
            f"systemd-networkd derives from it) ({ident.where})"
        )
    return out


def identity(c: Customiser) -> None:
    ident = c.recipe.identity
    if ident.ssh_host_keys != "keep":
        _host_keys(c)
    if ident.machine_id == "reset":
        _machine_id(c)


def _host_keys(c: Customiser) -> None:
    ident = c.recipe.identity
    removed = vendor_host_keys(c)
    for path in removed:
        c.remove(path, origin=ident.where)
    if ident.ssh_host_keys == "per-device":
        if c.host_keys is not None:
            _write_device_keys(c, c.host_keys, ident.where)
        return
    if not removed and not ident.explicit:
        return  # the image carries no keys: whatever makes them on the box stays as it is
    _install_keygen(c, ident.where)


def _write_device_keys(c: Customiser, keys: Mapping[str, Path], where: str) -> None:
    for private in sorted(keys.values()):
        name = posixpath.join(SSH_DIR, private.name)
        c.write(name, src=private, mode=0o600, uid=0, gid=0, origin=where)
        c.write(name + ".pub", src=private.with_name(private.name + ".pub"), mode=0o644, origin=where)


def _install_keygen(c: Customiser, where: str) -> None:
    keygen = next(
        (p for p in ("/usr/bin/ssh-keygen", "/bin/ssh-keygen") if c.root_file_exists(p)), None
    )
    if keygen is None:
        raise RecipeError(
            "identity.ssh_host_keys: regenerate needs ssh-keygen on the box, and the image has none "
            "in /usr/bin",
            where=where,
            hint="use `ssh_host_keys: per-device` (keys made at build time) or install openssh-client",
        )
    before = [unit for unit in SSH_UNITS if find_unit(c, unit) is not None]
    if not before:
        c.reporter.warn(
            "identity: the image has no ssh.service, sshd.service or ssh.socket: host keys are removed "
            "and made on first boot, but no SSH server will use them"
        )
        before = ["ssh.service"]
    text = keygen_unit(keygen, before)
    path = posixpath.join("/etc/systemd/system", KEYGEN_UNIT)
    c.write(path, data=text.encode(), mode=0o644, origin=where)
    for link, target in wanted_links(KEYGEN_UNIT, path, install_section(text, path)):
        c.symlink(link, target, uid=0, gid=0, origin=where)


def _machine_id(c: Customiser) -> None:
    where = c.recipe.identity.where
    current = c.read_text_root(MACHINE_ID)
    upper_copy = False
    if c.has_partition(ROOTFS_RW) and c.partition(ROOTFS_RW).chunks:
        ust = c.stat(ROOTFS_RW, OVERLAY_UPPER + MACHINE_ID)
        upper_copy = ust is not None and not ust.is_whiteout
    if current is not None and current.strip() == "" and not upper_copy:
        return  # already systemd's first-boot state
    if current is None and not upper_copy:
        return  # no machine-id at all: systemd makes one (a missing file is also a first boot)
    c.write(MACHINE_ID, data=b"", mode=0o444, uid=0, gid=0, origin=where)
    dbus = c.stat(ROOTFS, DBUS_MACHINE_ID)
    if dbus is not None and dbus.type is FileType.FILE:
        # a copy of the vendor's id: make it follow /etc/machine-id, as Ubuntu's dbus does (the
        # symlink replaces the file; an upper-layer copy is dropped as a shadow of it)
        c.symlink(DBUS_MACHINE_ID, MACHINE_ID, uid=0, gid=0, origin=where)
    elif c.has_partition(ROOTFS_RW) and c.partition(ROOTFS_RW).chunks:
        ust = c.stat(ROOTFS_RW, OVERLAY_UPPER + DBUS_MACHINE_ID)
        if ust is not None and ust.type is FileType.FILE:
            c.remove(DBUS_MACHINE_ID, origin=where)
