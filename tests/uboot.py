"""Real U-Boot 2023.01 under QEMU for the slow test tier (see shared/UBOOT-QEMU.md).

- `ensure_uboot()`: u-boot.bin built from Debian's `u-boot` source package with MMC, GPT,
  unzip and poweroff, cached outside the repo ($AIRBOX_UBOOT_CACHE, else
  ~/.cache/airbox-build-tests) in `uboot-<key>/`, the key hashing the version and options.
  Missing Debian packages and a missing deb-src entry are added only when we are root.
- `make_card_image(folder, dest)`: a TF-card image (MBR, FAT32 partition 1) holding a bundle.
- `make_env_image(dest, variables)`: the pflash environment U-Boot starts with.
- `run_qemu(...)`: one time-bounded QEMU run; returns the console log.

Only the standard library: `scripts/ci-slow-deps` runs `python3 tests/uboot.py build` as root
before any venv exists, to warm the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

UBOOT_VERSION = "2023.01"  # Debian bookworm's u-boot source package
DEFCONFIG = "qemu_arm64_defconfig"
CROSS_COMPILE = "aarch64-linux-gnu-"
ENABLED_OPTIONS: tuple[str, ...] = (
    "CONFIG_MMC",
    "CONFIG_DM_MMC",
    "CONFIG_CMD_MMC",
    "CONFIG_MMC_WRITE",
    "CONFIG_MMC_SDHCI",
    "CONFIG_MMC_SDHCI_ADMA",
    "CONFIG_MMC_PCI",
    "CONFIG_SUPPORT_EMMC_BOOT",
    "CONFIG_CMD_GPT",
    "CONFIG_RANDOM_UUID",
    "CONFIG_CMD_UUID",
    "CONFIG_CMD_UNZIP",
    "CONFIG_CMD_POWEROFF",
    "CONFIG_CMD_PART",
    "CONFIG_CMD_FAT",
    "CONFIG_FS_FAT",
    "CONFIG_CMD_SETEXPR",
)
# As in the verified recipe (shared/UBOOT-QEMU.md): ADMA transfers only.
DISABLED_OPTIONS: tuple[str, ...] = ("CONFIG_MMC_SDHCI_SDMA",)

# Debian packages the tier needs, by the tool that shows each is there.
TOOL_PACKAGES: dict[str, str] = {
    "qemu-system-aarch64": "qemu-system-arm",
    "mkenvimage": "u-boot-tools",
    "sfdisk": "fdisk",
    "sgdisk": "gdisk",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs",
}
BUILD_TOOL_PACKAGES: dict[str, str] = {
    f"{CROSS_COMPILE}gcc": "gcc-aarch64-linux-gnu",
    "gcc": "gcc",
    "make": "make",
    "bc": "bc",
    "bison": "bison",
    "flex": "flex",
    "dpkg-source": "dpkg-dev",
    "xz": "xz-utils",
}
BUILD_HEADERS: dict[str, str] = {"/usr/include/openssl/evp.h": "libssl-dev"}

FLASH_BYTES = 64 << 20  # QEMU virt pflash bank size
ENV_BYTES = 0x40000  # CONFIG_ENV_SIZE of qemu_arm64_defconfig
END_MARKER = "AIRBOX-QEMU-END"
CARD_START_SECTOR = 2048
SECTOR = 512

# RAM under `-m 2G` is 0x40000000..0xC0000000; U-Boot relocates itself near the top.
BOARD_ENV: dict[str, str] = {
    "bootdelay": "-2",
    "preboot": "mmc list",
    "devtype": "mmc",
    "devnum": "1",
    "distro_bootpart": "1",
    "ota_path": "",
    "scriptaddr": "0x40200000",
    "ramdisk_addr_r": "0x44000000",
    "ramdisk_addr_b": "0x48000000",
    "unzip_addr": "0x4c000000",
}

# Commands of the vendor's U-Boot that this one lacks; the scripts go on past them.
VENDOR_ONLY_COMMANDS = ("bm_savelog", "led", "i2c")
PROBLEM_RE = re.compile(r"Error|ERROR|Unknown command|Bad|Failed")


class UBootUnavailable(RuntimeError):
    """The tier cannot run here; the message says what to install or run."""


# ----------------------------------------------------------------------------- tools


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        for d in ("/usr/sbin", "/sbin"):
            if os.access(f"{d}/{name}", os.X_OK):
                return f"{d}/{name}"
    return found


def missing_packages(tools: Mapping[str, str], headers: Mapping[str, str] | None = None) -> list[str]:
    missing = {pkg for tool, pkg in tools.items() if find_tool(tool) is None}
    missing |= {pkg for path, pkg in (headers or {}).items() if not Path(path).exists()}
    return sorted(missing)


def is_root() -> bool:
    return os.geteuid() == 0


def apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}


def install_packages(packages: Sequence[str], log: Log) -> None:
    """apt-get install as root; otherwise say exactly what to run."""
    if not packages:
        return
    if not is_root() or shutil.which("apt-get") is None:
        raise UBootUnavailable(
            f"missing Debian packages: {' '.join(packages)}; "
            f"run `sudo scripts/ci-slow-deps` (or sudo apt-get install -y {' '.join(packages)})"
        )
    log(f"installing {' '.join(packages)}")
    _sh(["apt-get", "update", "-qq"], env=apt_env())
    _sh(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=apt_env())


def _sh(
    cmd: Sequence[str | Path], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    args = [str(c) for c in cmd]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout)[-4000:]
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{out}")
    return proc


class Log:
    def __call__(self, message: str) -> None:
        print(f"uboot: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- deb-src


SOURCES_LIST = Path("/etc/apt/sources.list")
SOURCES_DIR = Path("/etc/apt/sources.list.d")
OUR_SOURCES = SOURCES_DIR / "airbox-build-tests-deb-src.sources"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class AptSource:
    types: frozenset[str]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str = ""


def read_apt_sources(sources_list: Path = SOURCES_LIST, sources_dir: Path = SOURCES_DIR) -> list[AptSource]:
    """Every entry of the one-line (sources.list, *.list) and deb822 (*.sources) formats."""
    found: list[AptSource] = []
    one_line = [sources_list, *sorted(sources_dir.glob("*.list"))] if sources_dir.is_dir() else [sources_list]
    for path in one_line:
        if path.is_file():
            found += _one_line_sources(path.read_text(errors="replace"))
    if sources_dir.is_dir():
        for path in sorted(sources_dir.glob("*.sources")):
            found += _deb822_sources(path.read_text(errors="replace"))
    return found


def _one_line_sources(text: str) -> list[AptSource]:
    out = []
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()  # drop [options]
        if len(words) >= 3 and words[0] in ("deb", "deb-src"):
            out.append(AptSource(frozenset([words[0]]), (words[1],), (words[2],), tuple(words[3:])))
    return out


def _deb822_sources(text: str) -> list[AptSource]:
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "types" not in fields:
            continue
        out.append(
            AptSource(
                frozenset(fields["types"].split()),
                tuple(fields.get("uris", "").split()),
                tuple(fields.get("suites", "").split()),
                tuple(fields.get("components", "").split()),
                fields.get("signed-by", ""),
            )
        )
    return out


def has_deb_src(sources: Sequence[AptSource], suite: str = "bookworm", component: str = "main") -> bool:
    return any(
        "deb-src" in s.types and suite in s.suites and component in s.components for s in sources
    )


def deb_src_stanza(sources: Sequence[AptSource], suite: str = "bookworm") -> str:
    """A deb822 deb-src entry for suite/main, on the mirror the binary entry for suite uses."""
    uri, signed_by = DEFAULT_MIRROR, DEBIAN_KEYRING if Path(DEBIAN_KEYRING).exists() else ""
    for s in sources:
        if "deb" in s.types and suite in s.suites and s.uris:
            uri, signed_by = s.uris[0], s.signed_by or signed_by
            break
    lines = ["Types: deb-src", f"URIs: {uri}", f"Suites: {suite}", "Components: main"]
    if signed_by:
        lines.append(f"Signed-By: {signed_by}")
    return "\n".join(lines) + "\n"


def ensure_deb_src(log: Log, suite: str = "bookworm") -> None:
    sources = read_apt_sources()
    if has_deb_src(sources, suite):
        return
    if not is_root():
        raise UBootUnavailable(
            f"apt has no deb-src entry for {suite} main, needed for `apt-get source u-boot`; "
            "run `sudo scripts/ci-slow-deps`"
        )
    log(f"adding {OUR_SOURCES}")
    OUR_SOURCES.write_text(deb_src_stanza(sources, suite))
    _sh(["apt-get", "update", "-qq"], env=apt_env())


# ----------------------------------------------------------------------------- building U-Boot


def cache_root() -> Path:
    env = os.environ.get("AIRBOX_UBOOT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "airbox-build-tests"


def cache_key() -> str:
    spec = "\n".join([UBOOT_VERSION, DEFCONFIG, *ENABLED_OPTIONS, *(f"-{o}" for o in DISABLED_OPTIONS)])
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def cached_uboot() -> Path:
    return cache_root() / f"uboot-{cache_key()}" / "u-boot.bin"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_uboot(log: Log | None = None) -> Path:
    """The cached u-boot.bin, built first if needed (parallel callers wait for one build)."""
    log = log or Log()
    target = cached_uboot()
    if target.is_file():
        return target
    with _locked(cache_root() / ".lock"):
        if target.is_file():
            return target
        install_packages(missing_packages(BUILD_TOOL_PACKAGES, BUILD_HEADERS), log)
        ensure_deb_src(log)
        build_uboot(target.parent, log)
    return target


def build_uboot(dest: Path, log: Log) -> None:
    """apt-get source u-boot, build qemu_arm64 with our options, keep u-boot.bin in dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=dest.parent) as tmp:
        work = Path(tmp)
        start = time.monotonic()
        log("apt-get source u-boot")
        _sh(["apt-get", "source", "-qq", "--only-source", "u-boot"], cwd=work, env=apt_env())
        src = _source_tree(work)
        dsc = " ".join(sorted(p.name for p in work.glob("*.dsc")))
        fetched = time.monotonic()
        log(f"building {src.name} ({DEFCONFIG} + {len(ENABLED_OPTIONS)} options)")
        jobs = str(os.cpu_count() or 2)
        make = ["make", f"CROSS_COMPILE={CROSS_COMPILE}"]
        _sh([*make, DEFCONFIG], cwd=src)
        with open(src / ".config", "a") as cfg:
            cfg.writelines(f"{o}=y\n" for o in ENABLED_OPTIONS)
            cfg.writelines(f"# {o} is not set\n" for o in DISABLED_OPTIONS)
        _sh([*make, "olddefconfig"], cwd=src)
        _check_config(src / ".config")
        _sh([*make, f"-j{jobs}"], cwd=src)
        built = time.monotonic()
        staging = work / "result"
        staging.mkdir()
        shutil.copy2(src / "u-boot.bin", staging / "u-boot.bin")
        (staging / "BUILD-INFO").write_text(
            f"source: {dsc}\ndefconfig: {DEFCONFIG}\noptions: {' '.join(ENABLED_OPTIONS)}\n"
            f"disabled: {' '.join(DISABLED_OPTIONS)}\n"
            f"fetch_seconds: {fetched - start:.1f}\nbuild_seconds: {built - fetched:.1f}\n"
        )
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(staging, dest)
        log(f"u-boot.bin ready in {dest} (fetch {fetched - start:.0f} s, build {built - fetched:.0f} s)")


def _source_tree(work: Path) -> Path:
    trees = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("u-boot-")]
    if len(trees) != 1:
        raise RuntimeError(f"apt-get source u-boot left {sorted(p.name for p in work.iterdir())}")
    src = trees[0]
    if not src.name.startswith(f"u-boot-{UBOOT_VERSION}"):
        raise UBootUnavailable(
            f"apt-get source u-boot gave {src.name}, not U-Boot {UBOOT_VERSION} "
            "(the tier is verified on Debian bookworm's package)"
        )
    return src


def _check_config(config: Path) -> None:
    text = config.read_text()
    lost = [o for o in ENABLED_OPTIONS if f"\n{o}=y\n" not in text]
    lost += [o for o in DISABLED_OPTIONS if f"\n{o}=y\n" in text]
    if lost:
        raise RuntimeError(f"olddefconfig did not keep {', '.join(lost)} as asked (Kconfig dependencies?)")


# ----------------------------------------------------------------------------- images


def power_of_two_at_least(n: int, minimum: int = 1 << 20) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


def make_sparse(dest: Path, size: int) -> Path:
    with open(dest, "wb") as f:
        f.truncate(size)
    return dest


def make_card_image(folder: Path, dest: Path) -> Path:
    """MBR with one FAT32 partition at 1 MiB holding `folder`'s files; a power-of-two size."""
    files = sorted(folder.iterdir())
    payload = sum(((p.stat().st_size + 4095) // 4096) * 4096 for p in folder.rglob("*") if p.is_file())
    need = CARD_START_SECTOR * SECTOR + payload + payload // 8 + (8 << 20)
    size = power_of_two_at_least(need, 64 << 20)  # FAT32 wants >= 65525 clusters
    make_sparse(dest, size)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}
    table = f"label: dos\nstart={CARD_START_SECTOR}, type=c\n"
    proc = subprocess.run(
        [_tool("sfdisk"), "-q", str(dest)], input=table, text=True, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sfdisk {dest}: {proc.stderr}")
    part_kb = (size // SECTOR - CARD_START_SECTOR) // 2
    geometry = ["-h", str(CARD_START_SECTOR), f"--offset={CARD_START_SECTOR}"]
    _sh([_tool("mkfs.fat"), "-F", "32", "-n", "AIRBOX", *geometry, dest, str(part_kb)], env=env)
    _sh([_tool("mcopy"), "-s", "-m", "-i", f"{dest}@@{CARD_START_SECTOR * SECTOR}", *files, "::/"], env=env)
    return dest


def make_env_image(dest: Path, variables: Mapping[str, str]) -> Path:
    """mkenvimage of name=value lines, padded to the pflash bank size."""
    text = "".join(f"{k}={v}\n" for k, v in variables.items())
    with tempfile.NamedTemporaryFile("w", suffix=".env", delete=False, dir=dest.parent) as f:
        f.write(text)
    try:
        _sh([_tool("mkenvimage"), "-s", hex(ENV_BYTES), "-o", dest, f.name])
    finally:
        os.unlink(f.name)
    with open(dest, "r+b") as img:
        img.truncate(FLASH_BYTES)
    return dest


def flash_env(entry_script: str = "boot_emmc.scr", **more: str) -> dict[str, str]:
    """The environment: board variables, update_all=1, and a bootcmd that runs `entry_script`."""
    env = dict(BOARD_ENV)
    env["update_all"] = "1"
    env["bootcmd"] = (
        f"load mmc 1:1 ${{scriptaddr}} /{entry_script}; source ${{scriptaddr}}; "
        f"echo {END_MARKER}; poweroff"
    )
    env.update(more)
    return env


def _tool(name: str) -> str:
    found = find_tool(name)
    if found is None:
        pkg = TOOL_PACKAGES.get(name, name)
        raise UBootUnavailable(f"{name} not found: install the Debian package {pkg}")
    return found


# ----------------------------------------------------------------------------- QEMU


@dataclass(frozen=True)
class QemuRun:
    returncode: int
    log: str
    seconds: float
    timed_out: bool

    @property
    def finished(self) -> bool:
        """Exited by `poweroff` after the entry script returned (the marker on its own line)."""
        return self.returncode == 0 and re.search(rf"^{END_MARKER}\s*$", self.log, re.M) is not None


def qemu_command(uboot: Path, env_image: Path, emmc: Path, card: Path) -> list[str]:
    sdhci = "sdhci-pci,id={},capareg=0x157834b4"
    return [
        _tool("qemu-system-aarch64"),
        *("-M", "virt", "-cpu", "cortex-a57", "-m", "2G", "-nographic", "-nic", "none"),
        *("-monitor", "none", "-serial", "stdio", "-bios", str(uboot)),
        *("-drive", f"if=pflash,unit=1,format=raw,file={env_image}"),
        *("-drive", f"if=none,id=emmc,format=raw,file={emmc},cache=unsafe"),
        *("-drive", f"if=none,id=sd,format=raw,file={card},cache=unsafe"),
        *("-device", sdhci.format("s0"), "-device", "sd-card,drive=emmc,bus=pcie.0/s0/sd-bus"),
        *("-device", sdhci.format("s1"), "-device", "sd-card,drive=sd,bus=pcie.0/s1/sd-bus"),
    ]


def run_qemu(uboot: Path, env_image: Path, emmc: Path, card: Path, *, timeout: float, log: Path) -> QemuRun:
    """Boot U-Boot under `timeout`; the console goes to `log` as it comes (for post-mortems)."""
    for image in (emmc, card):
        size = image.stat().st_size
        if size & (size - 1):
            raise ValueError(f"{image}: {size} bytes; QEMU's SD card model wants a power of two")
    cmd = ["timeout", "-k", "10", str(int(timeout)), *qemu_command(uboot, env_image, emmc, card)]
    start = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    seconds = time.monotonic() - start
    text = log.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
    return QemuRun(proc.returncode, text, seconds, proc.returncode in (124, 137))


def log_problems(log: str, allowed_commands: Sequence[str] = VENDOR_ONLY_COMMANDS) -> list[str]:
    """Lines that look like a failure, less `Unknown command '<vendor-only>'`."""
    allowed = re.compile(r"Unknown command '({})'".format("|".join(map(re.escape, allowed_commands))))
    problems = []
    for line in log.splitlines():
        if PROBLEM_RE.search(line) and not allowed.search(line):
            problems.append(line)
    return problems


# ----------------------------------------------------------------------------- command line


def _main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        try:
            path = ensure_uboot()
        except UBootUnavailable as e:
            print(f"uboot: {e}", file=sys.stderr)
            return 1
        print(path)
        return 0
    if argv[:1] == ["path"]:
        print(cached_uboot())
        return 0
    print("usage: python3 tests/uboot.py build|path", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
