"""The VM kernel's supply chain against a miniature Debian archive on 127.0.0.1: a signed
InRelease (a throwaway GPG key), Packages.xz, and .deb files made here; then the initramfs,
read back with the real `cpio`. The real archive is used by the VM tier (tests/test_vm.py)."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from httpserver import LocalHTTPServer

from builder.errors import FetchError
from builder.fetch import FetchOptions
from builder.vm.debian import Archive, compare_versions, host_archives
from builder.vm.initramfs import VM_MODULES
from builder.vm.kernel import vm_kernel

KVER = "6.1.0-99-arm64"


def _tar_xz(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:xz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith("busybox") else 0o644
            t.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _deb(files: dict[str, bytes]) -> bytes:
    """A .deb as dpkg-deb lays it out: an ar archive of debian-binary, control and data."""
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", _tar_xz({"./control": b"Package: x\n"})),
        ("data.tar.xz", _tar_xz(files)),
    ]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        if len(data) % 2:
            out += b"\n"
    return out


def _ko(name: str, depends: str) -> bytes:
    return (
        b"\x7fELF fake module\0name=" + name.encode() + b"\0depends=" + depends.encode() + b"\0vermagic=6.1\0"
    )


DEPS = {
    "virtio_pci": "virtio_pci_modern_dev",
    "virtio_net": "net_failover",
    "net_failover": "failover",
    "sdhci_pci": "sdhci,cqhci",
    "ext4": "jbd2,mbcache,crc16",
    "vfat": "fat",
}


def _kernel_deb(version: str) -> bytes:
    files = {f"./boot/vmlinuz-{KVER}": b"KERNEL " + version.encode()}
    names = set(VM_MODULES) | {d for v in DEPS.values() for d in v.split(",")}
    for n in sorted(names):
        files[f"./lib/modules/{KVER}/kernel/x/{n.replace('_', '-') if n == 'sdhci_pci' else n}.ko"] = _ko(
            n, DEPS.get(n, "")
        )
    files[f"./lib/modules/{KVER}/modules.builtin"] = b"kernel/drivers/mmc/core/mmc_block.ko\n"
    return _deb(files)


def _stanza(name: str, version: str, filename: str, data: bytes, depends: str = "") -> str:
    s = f"Package: {name}\nVersion: {version}\nArchitecture: arm64\n"
    if depends:
        s += f"Depends: {depends}\n"
    return s + f"Filename: {filename}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"


def stop_gpg_agent(homedir: Path) -> None:
    """gpg starts an agent for a home folder and leaves it running: end it (the run leaves nothing)."""
    subprocess.run(["gpgconf", "--homedir", str(homedir), "--kill", "all"], capture_output=True, check=False)


class MiniArchive:
    """Two suites (an older kernel in `stable`, a newer one in `stable-security`)."""

    def __init__(self, root: Path, server: LocalHTTPServer) -> None:
        self.server = server
        self.gnupg = root / "gnupg"
        self.gnupg.mkdir(mode=0o700)
        self._gpg("--quick-gen-key", "--passphrase", "", "archive@test", "ed25519", "sign", "never")
        self.keyring = root / "keyring.gpg"
        self.keyring.write_bytes(self._gpg("--export").stdout)
        self.debs: dict[str, bytes] = {}
        self.publish("stable", "6.1.90-1")
        self.publish("stable-security", "6.1.100-2")

    def close(self) -> None:
        stop_gpg_agent(self.gnupg)

    def _gpg(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["gpg", "--batch", "--homedir", str(self.gnupg), "--pinentry-mode", "loopback", *args],
            input=stdin,
            capture_output=True,
            check=True,
        )

    def publish(self, suite: str, kversion: str, *, tamper: bool = False) -> None:
        kdeb = _kernel_deb(kversion)
        bdeb = _deb({"./bin/busybox": b"BUSYBOX"})
        kname = f"pool/main/l/linux/linux-image-{KVER}_{kversion}_arm64.deb"
        bname = "pool/main/b/busybox/busybox-static_1.35.0-4_arm64.deb"
        meta = _deb({})
        mname = f"pool/main/l/linux-signed/linux-image-arm64_{kversion}_arm64.deb"
        for name, data in ((kname, kdeb), (bname, bdeb), (mname, meta)):
            self.server.add(f"/debian/{name}", data)
            self.debs[name] = data
        packages = "\n".join(
            [
                _stanza("linux-image-arm64", kversion, mname, meta, f"linux-image-{KVER} (= {kversion})"),
                _stanza(f"linux-image-{KVER}", kversion, kname, kdeb, "kmod, linux-base"),
                _stanza("busybox-static", "1:1.35.0-4", bname, bdeb),
            ]
        )
        xz = lzma.compress(packages.encode())
        listed = xz if not tamper else xz + b"x"
        self.server.add(f"/debian/dists/{suite}/main/binary-arm64/Packages.xz", xz)
        release = (
            f"Suite: {suite}\nSHA256:\n {hashlib.sha256(listed).hexdigest()} {len(listed)} "
            "main/binary-arm64/Packages.xz\n"
        )
        signed = self._gpg("--clearsign", stdin=release.encode()).stdout
        self.server.add(f"/debian/dists/{suite}/InRelease", signed)

    def archives(self) -> list[Archive]:
        base = self.server.url("/debian")
        return [Archive(base, "stable"), Archive(base, "stable-security")]


@pytest.fixture
def archive(tmp_path: Path):  # type: ignore[no-untyped-def]
    if any(shutil.which(t) is None for t in ("gpg", "gpgv", "cpio")):
        pytest.skip("needs gpg, gpgv and cpio (Debian packages gnupg, gpgv, cpio)")
    with LocalHTTPServer() as server:
        mini = MiniArchive(tmp_path, server)
        try:
            yield mini
        finally:
            mini.close()


def test_newest_kernel_resolved_verified_and_cached(archive: MiniArchive, tmp_path: Path) -> None:
    opts = FetchOptions(cache_dir=tmp_path / "cache", progress=False)
    files, desc = vm_kernel(opts, archives=archive.archives(), keyring=archive.keyring)
    assert "6.1.100-2 (stable-security)" in desc
    assert files.kernel.read_bytes() == b"KERNEL 6.1.100-2"
    assert files.version == KVER
    listing = (
        subprocess.run(
            ["cpio", "-it"],
            input=__import__("gzip").decompress(files.initrd.read_bytes()),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split()
    )
    assert {"init", "bin/busybox", "etc/modules.order"} <= set(listing)
    order = [n for n in listing if n.startswith("lib/modules/")]
    names = [n.rsplit("/", 1)[1][:-3] for n in order]
    # dependencies first, from each module's own depends=; mmc_block is built in and not needed
    assert names.index("jbd2") < names.index("ext4") and names.index("fat") < names.index("vfat")
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")
    # a second run: the same files from the cache, no package downloaded again
    gets = len(archive.server.requests())
    again, _ = vm_kernel(opts, archives=archive.archives(), keyring=archive.keyring)
    assert again == files
    new = [r.path for r in archive.server.requests()[gets:]]
    assert all(p.endswith("InRelease") for p in new), new
    # offline: the last verified InRelease and the cache answer
    off, _ = vm_kernel(
        FetchOptions(cache_dir=tmp_path / "cache", offline=True, progress=False),
        archives=archive.archives(),
        keyring=archive.keyring,
    )
    assert off == files


def test_unsigned_or_tampered_index_refused(archive: MiniArchive, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--homedir",
            str(other),
            "--pinentry-mode",
            "loopback",
            "--quick-gen-key",
            "--passphrase",
            "",
            "other@test",
            "ed25519",
            "sign",
            "never",
        ],
        check=True,
        capture_output=True,
    )
    wrong = tmp_path / "wrong.gpg"
    wrong.write_bytes(
        subprocess.run(
            ["gpg", "--batch", "--homedir", str(other), "--export"], capture_output=True, check=True
        ).stdout
    )
    stop_gpg_agent(other)
    opts = FetchOptions(cache_dir=tmp_path / "cache", progress=False, retries=0)
    with pytest.raises(FetchError, match="not signed by a key in"):
        vm_kernel(opts, archives=archive.archives(), keyring=wrong)
    archive.publish("stable-security", "6.1.100-2", tamper=True)
    with pytest.raises(FetchError):
        vm_kernel(opts, archives=archive.archives(), keyring=archive.keyring)


def test_offline_without_a_first_resolution_says_what_to_do(archive: MiniArchive, tmp_path: Path) -> None:
    opts = FetchOptions(cache_dir=tmp_path / "cache", offline=True, progress=False)
    with pytest.raises(FetchError, match="never resolved on this machine") as e:
        vm_kernel(opts, archives=archive.archives(), keyring=archive.keyring)
    assert "--kernel" in (e.value.hint or "")


def test_mirror_rewrites_the_archive(archive: MiniArchive, tmp_path: Path) -> None:
    gone = [Archive("http://debian.invalid/debian", a.suite) for a in archive.archives()]
    opts = FetchOptions(
        cache_dir=tmp_path / "cache",
        progress=False,
        mirrors=(("http://debian.invalid/debian", archive.server.url("/debian")),),
    )
    files, _ = vm_kernel(opts, archives=gone, keyring=archive.keyring)
    assert files.kernel.read_bytes() == b"KERNEL 6.1.100-2"


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ("6.1.100-2", "6.1.90-1", 1),
        ("1:1.0", "2.0", 1),
        ("1.0~rc1", "1.0", -1),
        ("6.1.0-57", "6.1.0-57", 0),
        ("2.0-1", "2.0-1+deb12u1", -1),
        ("1.0a", "1.0", 1),
        ("1.0", "1.0+b1", -1),
    ],
)
def test_debian_version_order(a: str, b: str, want: int) -> None:
    assert compare_versions(a, b) == want
    assert compare_versions(b, a) == -want


def test_host_sources_both_formats(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://ubuntu.example/ubuntu\nSuites: focal\nComponents: main\n"
    )
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://sec.example/debian-security bookworm-security main\n"
    )
    got = host_archives((d, tmp_path / "sources.list"))
    assert [(a.uri, a.suite) for a in got] == [
        ("http://deb.example/debian", "bookworm"),
        ("http://deb.example/debian", "bookworm-updates"),
        ("http://sec.example/debian-security", "bookworm-security"),
    ]
    assert os.path.exists(tmp_path / "sources.list")
