"""The VM's initramfs, made on the host: a static busybox, the kernel's own modules, and an
/init that mounts the box's root exactly as the box's initramfs does (FORMAT.md section 6).

Nothing runs under emulation to make it: modules come from the kernel package, their load
order from each module's own `.modinfo depends=` (what depmod reads too; Debian's package ships
no modules.dep, its postinst makes it). A second, small archive appended per box carries the
check agent (builder.vm.agent); the kernel unpacks concatenated archives in order.
"""

from __future__ import annotations

import gzip
import io
import re
import stat
import tarfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from builder.errors import FetchError

# What the VM needs that Debian's arm64 kernel builds as modules (shared/BOOT-VM.md), by name;
# their dependencies are added from the modules themselves.
VM_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "sdhci_pci",
    "crc32c_generic",
    "ext4",
    "overlay",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
)

INIT = r"""#!/bin/busybox sh
# airbox-build VM initramfs: mount the root as the box's initramfs does, then run its init.
/bin/busybox mkdir -p /proc /sys /dev /run /sbin /usr/bin /usr/sbin /media/root-ro /media/root-rw /newroot
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs -o mode=0755 devtmpfs /dev
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
say() { echo "airbox-vm: $*" > /dev/kmsg 2>/dev/null || echo "airbox-vm: $*"; }
for m in $(cat /etc/modules.order); do insmod "/lib/modules/$m.ko" 2>/dev/null || say "insmod $m failed"; done
ro=""; rw=""; init=/sbin/init
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    airbox.ro=*) ro="${arg#airbox.ro=}" ;;
    airbox.rw=*) rw="${arg#airbox.rw=}" ;;
    init=*) init="${arg#init=}" ;;
  esac
done
n=0
while [ ! -b "$ro" ] || [ ! -b "$rw" ]; do
  n=$((n+1)); [ $n -gt 300 ] && { say "no $ro or $rw after 30 s"; break; }
  sleep 0.1
done
fail() { say "FATAL: $*"; echo "airbox-vm: FATAL: $*"; sleep 2; poweroff -f; }
mount -t ext4 -o ro,noatime "$ro" /media/root-ro || fail "cannot mount ROOTFS ($ro) read-only"
mount -t ext4 -o rw,noatime "$rw" /media/root-rw || fail "cannot mount ROOTFS_RW ($rw)"
mkdir -p /media/root-rw/overlay /media/root-rw/overlay-workdir
mount -t overlay overlay \
  -o lowerdir=/media/root-ro,upperdir=/media/root-rw/overlay,workdir=/media/root-rw/overlay-workdir \
  /newroot || fail "cannot mount the overlay root"
for d in /media/root-ro /media/root-rw; do
  if [ -d "/newroot$d" ]; then mount --move "$d" "/newroot$d"; else say "the image has no $d"; fi
done
if [ -d /airbox-vm ]; then
  mkdir -p /run/airbox-vm && chmod 0700 /run/airbox-vm
  cp -a /airbox-vm/. /run/airbox-vm/
  cp /bin/busybox /run/airbox-vm/busybox
  mkdir -p /run/systemd/system/multi-user.target.wants
  cp /run/airbox-vm/airbox-vm-agent.service /run/systemd/system/
  ln -sf ../airbox-vm-agent.service /run/systemd/system/multi-user.target.wants/airbox-vm-agent.service
else
  say "no /airbox-vm in the initramfs: no check agent"
fi
say "root is the overlay of $ro and $rw; starting $init"
mount --move /run /newroot/run
mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot "$init"
"""


@dataclass(frozen=True)
class KernelFiles:
    """What the VM boots: the kernel image and the base initramfs, both made from packages."""

    kernel: Path
    initrd: Path
    version: str  # the kernel release, e.g. 6.1.0-57-arm64


# ----------------------------------------------------------------------------- cpio (newc)


class CpioWriter:
    """A `newc` cpio archive, as the kernel's initramfs unpacker reads it; fixed times, root owner."""

    def __init__(self, out: io.BufferedIOBase | io.BytesIO) -> None:
        self.out = out
        self.ino = 1
        self.pos = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name_b = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name_b), 0]
        head = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self.ino += 1
        self._put(head + name_b)
        self._pad()
        self._put(data)
        self._pad()

    def _put(self, b: bytes) -> None:
        self.out.write(b)
        self.pos += len(b)

    def _pad(self) -> None:
        self._put(b"\0" * (-self.pos % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


# ----------------------------------------------------------------------------- modules


def _norm(name: str) -> str:
    return name.replace("-", "_")


def module_order(
    read_module: Callable[[str], bytes | None], builtin: Iterable[str], wanted: Iterable[str]
) -> list[str]:
    """Modules to load, dependencies first; `read_module` gives a module's .ko bytes (None: absent)."""
    builtin_set = {_norm(b) for b in builtin}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _norm(name)
        if name in seen or name in builtin_set:
            return
        data = read_module(name)
        if data is None:
            raise FetchError(
                f"kernel module {name} (needed by {' <- '.join(chain) or 'the VM'}) is neither in the "
                "kernel package nor built in",
                hint="use Debian's linux-image-arm64, or give a kernel with it built in (--kernel/--initrd)",
            )
        seen.add(name)
        m = re.search(rb"(?:^|\0)depends=([^\0]*)", data)
        for dep in m[1].decode().split(",") if m else []:
            if dep:
                visit(dep, (*chain, name))
        order.append(name)

    for w in wanted:
        visit(w, ())
    return order


def build_base_initrd(
    kernel_deb: tarfile.TarFile, busybox_deb: tarfile.TarFile, dest_dir: Path
) -> KernelFiles:
    """Unpack vmlinuz from the kernel package and write the base initramfs beside it."""
    vmlinuz: tarfile.TarInfo | None = None
    kos: dict[str, tarfile.TarInfo] = {}
    builtin: tarfile.TarInfo | None = None
    version = ""
    for m in kernel_deb.getmembers():
        name = m.name.lstrip("./")
        if re.fullmatch(r"boot/vmlinuz-.*", name) and m.isfile():
            vmlinuz, version = m, name.split("vmlinuz-", 1)[1]
        elif name.startswith("lib/modules/") and name.endswith(".ko") and m.isfile():
            kos[_norm(name.rsplit("/", 1)[1][:-3])] = m
        elif name.endswith("/modules.builtin"):
            builtin = m
    if vmlinuz is None:
        raise FetchError("the kernel package holds no boot/vmlinuz-*", hint="pass --kernel/--initrd")
    needed: dict[str, bytes] = {}  # only the modules the VM loads are read out of the package

    def read_module(name: str) -> bytes | None:
        if name not in kos:
            return None
        if name not in needed:
            f = kernel_deb.extractfile(kos[name])
            assert f is not None
            needed[name] = f.read()
        return needed[name]

    builtin_names: list[str] = []
    if builtin is not None:
        f = kernel_deb.extractfile(builtin)
        assert f is not None
        builtin_names = [ln.rsplit("/", 1)[-1].removesuffix(".ko") for ln in f.read().decode().split()]
    order = module_order(read_module, builtin_names, VM_MODULES)

    bb = next((m for m in busybox_deb.getmembers() if m.name.lstrip("./") == "bin/busybox"), None)
    if bb is None:
        raise FetchError("the busybox-static package holds no bin/busybox")
    bbf = busybox_deb.extractfile(bb)
    kf = kernel_deb.extractfile(vmlinuz)
    assert bbf is not None and kf is not None

    dest_dir.mkdir(parents=True, exist_ok=True)
    kernel_path = dest_dir / "vmlinuz"
    tmp = kernel_path.with_suffix(".tmp")
    tmp.write_bytes(kf.read())
    tmp.replace(kernel_path)

    raw = io.BytesIO()
    w = CpioWriter(raw)
    for d in ("bin", "etc", "lib", "lib/modules"):
        w.dir(d)
    w.file("bin/busybox", bbf.read(), 0o755)
    w.file("init", INIT.encode(), 0o755)
    w.file("etc/modules.order", ("\n".join(order) + "\n").encode())
    for name in order:
        w.file(f"lib/modules/{name}.ko", needed[name])
    w.close()
    initrd = dest_dir / "initrd.base"
    tmp = initrd.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(raw.getvalue(), 6, mtime=0))
    tmp.replace(initrd)
    (dest_dir / "version").write_text(version + "\n")
    return KernelFiles(kernel_path, initrd, version)


def extra_archive(files: Mapping[str, tuple[bytes, int]]) -> bytes:
    """An uncompressed cpio of `airbox-vm/<name>` files, appended to the base initramfs."""
    raw = io.BytesIO()
    w = CpioWriter(raw)
    w.dir("airbox-vm", 0o700)
    for name, (data, mode) in sorted(files.items()):
        w.file(f"airbox-vm/{name}", data, mode)
    w.close()
    return raw.getvalue()
