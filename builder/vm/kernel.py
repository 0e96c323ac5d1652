"""The VM's kernel and base initramfs: Debian's `linux-image-arm64` and `busybox-static`, resolved
from the archive's signed index (builder.vm.debian), turned into vmlinuz + initramfs on the host,
and cached by the two packages' sha256 (CACHE/vm/<key>/)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path

from builder.fetch import FetchOptions
from builder.vm.debian import Archive, DebianIndex, deb_data, depends_names, host_archives
from builder.vm.initramfs import INIT, VM_MODULES, KernelFiles, build_base_initrd

KERNEL_META = "linux-image-arm64"
BUSYBOX = "busybox-static"
ARCH = "arm64"
LAYOUT_VERSION = "1"  # bump when what build_base_initrd writes changes


def _key(kernel_sha: str, busybox_sha: str) -> str:
    h = hashlib.sha256(f"{kernel_sha} {busybox_sha} {LAYOUT_VERSION} {' '.join(VM_MODULES)}".encode())
    h.update(INIT.encode())
    return h.hexdigest()[:20]


def vm_kernel(
    opts: FetchOptions,
    *,
    archives: Sequence[Archive] | None = None,
    keyring: Path | None = None,
    on_info: object = None,
) -> tuple[KernelFiles, str]:
    """(kernel files, a one-line description). Offline, the last resolution is used."""
    index = DebianIndex(list(archives) if archives else host_archives(), ARCH, opts, keyring=keyring)
    meta = index.newest_many([KERNEL_META, BUSYBOX])
    image_name = next(
        (d for d in depends_names(meta[KERNEL_META].depends) if d.startswith("linux-image-")), None
    )
    kernel_pkg = index.newest_many([image_name])[image_name] if image_name else meta[KERNEL_META]
    busybox_pkg = meta[BUSYBOX]
    dest = opts.cache_dir / "vm" / _key(kernel_pkg.sha256, busybox_pkg.sha256)
    desc = (
        f"{kernel_pkg.name} {kernel_pkg.version} ({kernel_pkg.archive.suite}), "
        f"{BUSYBOX} {busybox_pkg.version}"
    )
    done = dest / "version"
    if done.exists():
        return KernelFiles(dest / "vmlinuz", dest / "initrd.base", done.read_text().strip()), desc
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return KernelFiles(dest / "vmlinuz", dest / "initrd.base", done.read_text().strip()), desc
        kdeb = index.fetch_deb(kernel_pkg)
        bdeb = index.fetch_deb(busybox_pkg)
        tmp = dest.with_name(dest.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        with deb_data(kdeb) as kt, deb_data(bdeb) as bt:
            files = build_base_initrd(kt, bt, tmp)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(dest)
        tmp.rename(dest)
    return KernelFiles(dest / "vmlinuz", dest / "initrd.base", files.version), desc
