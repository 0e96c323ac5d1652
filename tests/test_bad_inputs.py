"""A corpus of bad inputs, each run end to end through the real CLI (`build`, `verify`, `inspect`).

Every case must end with exit code 1 and a one-screen message on stderr that says WHAT is wrong
(a regex), WHERE (the file, and its line, key, partition or chunk) and WHAT TO DO (a `hint:` line),
with no traceback, no output bundle and no temp folder left behind (TMPDIR is private per case).

The single checks behind these messages are unit-tested elsewhere (test_verify, test_recipe,
test_extract, test_customise, test_layout, test_scripts, test_uimage); this file proves that each
one reaches the user whole, through the command line.
"""

from __future__ import annotations

import gzip
import io
import math
import re
import shutil
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import vendor_fixture as vf
import yaml
from buildhelp import cli, flip_middle_byte, mkimage_script, refresh_md5
from httpserver import LocalHTTPServer

SCREEN_LINES = 15  # what "one screen" means here: lines on stderr ...
SCREEN_ROWS = 20  # ... and rows once wrapped at 100 columns
HASH = "$6$saltsalt$" + "b" * 86


# ---------------------------------------------------------------------------------------------
# The environment a case builds its inputs in


@dataclass
class Env:
    tmp: Path
    base: vf.MiniPackage  # the session's package: read only
    server: LocalHTTPServer
    _pkg: Path | None = field(default=None, repr=False)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def pkg(self) -> Path:
        """A private copy of the vendor package folder, to damage."""
        if self._pkg is None:
            self._pkg = self.base.copy_to(self.tmp / "vendor").dir
        return self._pkg

    def recipe(self, base: Path | dict | None = None, *, text: str | None = None, **sections: object) -> Path:
        folder = self.tmp / "recipe"
        folder.mkdir(exist_ok=True)
        path = folder / "bad.yaml"
        if text is not None:
            path.write_text(text)
            return path
        base = self.base.dir if base is None else base
        doc = {"name": "bad", "base": {"path": str(base)} if isinstance(base, Path) else base, **sections}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def build(self, recipe: Path, *extra: str | Path) -> list[str | Path]:
        return ["build", recipe, "-o", self.out, "--cache-dir", self.tmp / "cache", *extra]

    def build_pkg(self, **sections: object) -> list[str | Path]:
        """`build` of a minimal recipe on the (damaged) package copy."""
        return self.build(self.recipe(self.pkg, **sections))


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Env], list[str | Path]]  # sets up the inputs, returns the CLI arguments
    what: str  # regex: what is wrong
    where: str  # regex: the file (and line, key, partition or chunk)
    hint: str = r"\w"  # regex the hint must match
    slow: bool = False  # in the slow tier (another command on the same damage, or a big file)


CASES: list[Case] = []


def case(what: str, where: str, hint: str = r"\w", id: str | None = None):  # type: ignore[no-untyped-def]
    def register(fn: Callable[[Env], list[str | Path]]) -> Callable[[Env], list[str | Path]]:
        CASES.append(Case(id or fn.__name__, fn, what, where, hint))
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# Package damage (the package copy in Env.pkg)


def rewrite_script(pkg: Path, name: str, fn: Callable[[str], str]) -> None:
    cmd = pkg / f"{name}.cmd"
    mkimage_script(fn(cmd.read_text()), pkg / f"{name}.scr", name)
    refresh_md5(pkg)


def truncate_chunk(pkg: Path) -> None:
    chunk = pkg / "rootfs.2-of-6.gz"
    chunk.write_bytes(chunk.read_bytes()[:-100])
    refresh_md5(pkg)


def corrupt_chunk(pkg: Path) -> None:
    flip_middle_byte(pkg / "opt.2-of-5.gz")
    refresh_md5(pkg)


def flip_script_byte(pkg: Path, name: str, offset: int) -> None:
    scr = pkg / name
    raw = bytearray(scr.read_bytes())
    raw[offset] ^= 0xFF
    scr.write_bytes(bytes(raw))
    refresh_md5(pkg)


def shift_write(pkg: Path, name: str, k: int, delta: int) -> None:
    def fn(text: str) -> str:
        m = list(re.finditer(r"mmc write \$\{unzip_addr\} (0x[0-9a-f]+)", text))[k]
        return text[: m.start(1)] + f"0x{int(m.group(1), 16) + delta:08x}" + text[m.end(1) :]

    rewrite_script(pkg, name, fn)


def write_past_partition(pkg: Path) -> None:
    def fn(text: str) -> str:
        last = list(re.finditer(r"mmc write \$\{unzip_addr\} 0x[0-9a-f]+ (0x[0-9a-f]+)", text))[-1]
        return text[: last.start(1)] + "0x00010000" + text[last.end(1) :]

    rewrite_script(pkg, "boot_emmc-data", fn)


def edit_xml(pkg: Path, old: str, new: str) -> None:
    xml = pkg / "partition32G.xml"
    text = xml.read_text()
    assert old in text
    xml.write_text(text.replace(old, new, 1))
    refresh_md5(pkg)


def edit_gpt(pkg: Path, fn: Callable[[bytearray], None]) -> None:
    gz = pkg / "gpt.gz"
    blob = bytearray(gzip.decompress(gz.read_bytes()))
    fn(blob)
    gz.write_bytes(gzip.compress(bytes(blob), mtime=0))
    refresh_md5(pkg)


def gpt_bad_header_crc(blob: bytearray) -> None:
    blob[512 + 16] ^= 1  # the stored header CRC32


def gpt_wrong_entry_count(blob: bytearray) -> None:
    header = 512
    struct.pack_into("<I", blob, header + 80, 64)  # 64 entries instead of mk_gpt's 128
    struct.pack_into("<I", blob, header + 16, 0)
    struct.pack_into("<I", blob, header + 16, zlib.crc32(bytes(blob[header : header + 92])))


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def damaged(
    what: str,
    where: str,
    damage: Callable[[Path], None],
    commands: tuple[str, ...],
    hint: str = r"\w",
    slow: bool = False,
) -> None:
    """Register one case per command for a package damaged by `damage` (the first one in the
    default tier, the others in the slow tier)."""
    name = damage.__name__
    for k, command in enumerate(commands):

        def make(env: Env, command: str = command) -> list[str | Path]:
            damage(env.pkg)
            return env.build_pkg() if command == "build" else [command, env.pkg]

        CASES.append(Case(f"{name}-{command}", make, what, where, hint, slow=slow or k > 0))


def missing_chunk(pkg: Path) -> None:
    (pkg / "opt.3-of-5.gz").unlink()
    refresh_md5(pkg)


def missing_emmc_script(pkg: Path) -> None:
    (pkg / "boot_emmc.scr").unlink()
    refresh_md5(pkg)


def file_of_4gib(pkg: Path) -> None:
    sparse_file(pkg / "big.bin", 4 << 30)  # costs no disk (and md5.txt does not list it: no hashing)


def boot_scr_emmc(pkg: Path) -> None:
    shutil.copyfile(pkg / "boot.scr", pkg / "boot.scr.emmc")
    refresh_md5(pkg)


def name_not_on_fat(pkg: Path) -> None:
    (pkg / "notes:v2.txt").write_text("x")
    refresh_md5(pkg)


def stale_md5(pkg: Path) -> None:
    fip = pkg / "fip.bin"
    fip.write_bytes(fip.read_bytes() + b"x")


def script_data_crc(pkg: Path) -> None:
    flip_script_byte(pkg, "boot_emmc-data.scr", 80)


def script_header_crc(pkg: Path) -> None:
    flip_script_byte(pkg, "boot_emmc-misc.scr", 40)  # inside the image name


def script_bad_magic(pkg: Path) -> None:
    flip_script_byte(pkg, "boot_emmc.scr", 0)


def overlapping_writes(pkg: Path) -> None:
    shift_write(pkg, "boot_emmc-rootfs", 1, -8)


def xml_missing_attribute(pkg: Path) -> None:
    edit_xml(pkg, 'size_in_kb="1024"', "")


def xml_duplicate_label(pkg: Path) -> None:
    edit_xml(pkg, 'label="OPT"', 'label="DATA"')


def xml_disagrees_with_gpt(pkg: Path) -> None:
    edit_xml(pkg, 'label="MISC"       size_in_kb="1024"', 'label="MISC"       size_in_kb="2048"')


def gpt_header_crc(pkg: Path) -> None:
    edit_gpt(pkg, gpt_bad_header_crc)


def gpt_entry_count(pkg: Path) -> None:
    edit_gpt(pkg, gpt_wrong_entry_count)


REDO = r"download (it|the package) again|copy it again|regenerate|rebuild|verify"

damaged(
    r"gzip trailer says 0 bytes.*truncated|truncated: its gzip stream ends early",
    r"rootfs\.2-of-6\.gz",
    truncate_chunk,
    ("build",),
    REDO,
)
damaged(r"truncated gzip stream", r"FAIL rootfs\.2-of-6\.gz", truncate_chunk, ("verify",))
damaged(r"cannot decompress", r"FAIL opt\.2-of-5\.gz", corrupt_chunk, ("verify",))
damaged(r"data CRC mismatch", r"boot_emmc-data\.scr", script_data_crc, ("build", "verify", "inspect"))
damaged(r"header CRC", r"boot_emmc-misc\.scr", script_header_crc, ("build", "verify"))
damaged(r"bad uImage magic", r"boot_emmc\.scr", script_bad_magic, ("build", "inspect"))
damaged(
    r"overlap with the previous chunk",
    r"boot_emmc-rootfs\.scr:\d+.*rootfs\.2-of-6\.gz",
    overlapping_writes,
    ("build", "verify"),
)
damaged(
    r"past the end of partition DATA",
    r"boot_emmc-data\.scr:\d+.*data\.5-of-5\.gz",
    write_past_partition,
    ("build", "verify"),
    REDO,
)
damaged(
    r"attribute size_in_kb is missing", r"partition32G\.xml:\d+", xml_missing_attribute, ("build", "inspect")
)
damaged(r"duplicates label='DATA'", r"partition32G\.xml:\d+", xml_duplicate_label, ("build", "inspect"))
damaged(
    r"disagrees with partition32G\.xml.*MISC",
    r"gpt\.gz",
    xml_disagrees_with_gpt,
    ("build", "inspect"),
    r"regenerate gpt\.gz",
)
damaged(r"header CRC32 .* corrupt", r"gpt\.gz", gpt_header_crc, ("build", "inspect"), REDO)
damaged(
    r"number of partition entries is 64, expected 128",
    r"gpt\.gz",
    gpt_entry_count,
    ("build", "inspect"),
    r"mk_gpt",
)
damaged(
    r"loads opt\.3-of-5\.gz, which is not in the package",
    r"boot_emmc-opt\.scr:\d+",
    missing_chunk,
    ("build", "verify"),
    REDO,
)
damaged(
    r"no folder holds both boot\.scr and boot_emmc\.scr",
    r"vendor/sdcard",
    missing_emmc_script,
    ("build", "inspect"),
)
damaged(r"does not match md5\.txt", r"FAIL fip\.bin", stale_md5, ("verify",))
damaged(
    r"FAT32 cannot hold a file of 4 GiB|cannot hold a file of 4 GiB",
    r"big\.bin",
    file_of_4gib,
    ("build", "verify"),
)
damaged(r"before boot\.scr", r"boot\.scr\.emmc", boot_scr_emmc, ("build", "verify"))
damaged(r"not valid on a FAT32 card", r"notes:v2\.txt", name_not_on_fat, ("build", "verify"))


@case(r"opt\.2-of-5\.gz is truncated|cannot decompress|damaged", r"opt\.2-of-5\.gz", REDO)
def corrupt_chunk_in_an_edited_partition(env: Env) -> list[str | Path]:
    corrupt_chunk(env.pkg)  # the build decompresses OPT to edit it
    return env.build_pkg(files=[{"path": "/opt/notes.txt", "content": "x\n"}])


@case(r"opt\.2-of-5\.gz is damaged: its md5 is not the one md5\.txt gives", r"opt\.2-of-5\.gz", REDO)
def corrupt_chunk_in_an_untouched_partition(env: Env) -> list[str | Path]:
    """Damaged after the vendor wrote md5.txt (in transit), in a partition the recipe leaves
    alone: its gzip frame and size trailer are intact, so only its md5 tells."""
    flip_middle_byte(env.pkg / "opt.2-of-5.gz")  # md5.txt left as the vendor wrote it
    return env.build_pkg(files=[{"path": "/data/notes.txt", "content": "x\n"}])


# ---------------------------------------------------------------------------------------------
# Vendor packages as tarballs: members that must never be extracted


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], top: Path | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        if top is not None:
            tar.add(top, arcname="sdcard")
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return gzip.compress(raw.getvalue(), mtime=0)


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


EVIL_MEMBERS = {
    "dotdot": ([(member("sdcard/../../evil"), b"x")], r"unsafe member path 'sdcard/\.\./\.\./evil'"),
    "absolute": ([(member("/tmp/evil"), b"x")], r"unsafe member path '/tmp/evil'"),
    "link-out": (
        [(member("sdcard/evil", tarfile.SYMTYPE, "/etc/passwd"), None)],
        r"symbolic link to /etc/passwd",
    ),
    "device": ([(member("sdcard/tty", tarfile.CHRTYPE), None)], r"sdcard/tty \(device"),
}


for _name, (_members, _what) in EVIL_MEMBERS.items():
    for _command in ("build", "inspect"):
        _slow = (_name, _command) not in (("dotdot", "build"), ("device", "inspect"))

        def _make(env: Env, members=_members, command=_command) -> list[str | Path]:  # type: ignore[no-untyped-def]
            tgz = env.tmp / "sdcard.tgz"
            tgz.write_bytes(tar_bytes(members, top=env.base.dir))
            return env.build(env.recipe(tgz)) if command == "build" else ["inspect", tgz]

        CASES.append(Case(f"package-tgz-{_name}-{_command}", _make, _what, r"sdcard\.tgz", slow=_slow))


@case(r"truncated|damaged|unexpected end|cannot read", r"sdcard\.tgz", REDO)
def package_tgz_truncated(env: Env) -> list[str | Path]:
    tgz = env.tmp / "sdcard.tgz"
    tgz.write_bytes(tar_bytes([], top=env.base.dir)[:-3000])
    return env.build(env.recipe(tgz))


# ---------------------------------------------------------------------------------------------
# App sources: tarballs unpacked into the image


def app_tarball_case(
    name: str, members: list[tuple[tarfile.TarInfo, bytes | None]], what: str, slow: bool = True
) -> None:
    def make(env: Env) -> list[str | Path]:
        (env.tmp / "recipe").mkdir(exist_ok=True)
        (env.tmp / "recipe" / "src.tar.gz").write_bytes(tar_bytes([(member("top/ok"), b"ok\n"), *members]))
        app = {
            "path": "/data/demo",
            "owner": "linaro",
            "source": {"path": "src.tar.gz", "strip_components": 1},
        }
        return env.build(env.recipe(apps={"demo": app}))

    where = r"bad\.yaml:\d+ apps\.demo\.source.*src\.tar\.gz"
    CASES.append(Case(f"app-source-{name}", make, what, where, slow=slow))


app_tarball_case(
    "dotdot",
    [(member("top/../../evil"), b"x")],
    r"member 'top/\.\./\.\./evil' has a '\.\.' component",
    slow=False,
)
app_tarball_case("absolute", [(member("/etc/passwd"), b"x")], r"member '/etc/passwd' has an absolute path")
app_tarball_case(
    "link-out", [(member("top/link", tarfile.SYMTYPE, "../../../etc"), None)], r"resolves outside"
)
app_tarball_case(
    "device",
    [(member("top/tty", tarfile.CHRTYPE), None)],
    r"member 'top/tty' is a character device",
    slow=False,
)
app_tarball_case("fifo", [(member("top/pipe", tarfile.FIFOTYPE), None)], r"member 'top/pipe' is a FIFO|fifo")


# ---------------------------------------------------------------------------------------------
# Recipes


def text_recipe(env: Env, body: str) -> list[str | Path]:
    return env.build(env.recipe(text=f"name: bad\nbase: {{path: {env.base.dir}}}\n{body}"))


@case(r"YAML syntax error", r"bad\.yaml:4:\d+", r"indentation|quot")
def yaml_syntax_error(env: Env) -> list[str | Path]:
    return text_recipe(env, "hostname: [a, b\n")


@case(r"is given twice \(first at line 3\)", r"bad\.yaml:4:\d+: hostname")
def yaml_duplicate_key(env: Env) -> list[str | Path]:
    return text_recipe(env, "hostname: a\nhostname: b\n")


@case(r"unknown key `hostnme` \(did you mean `hostname`\?\)", r"bad\.yaml:3:1: hostnme", r"known keys")
def unknown_key(env: Env) -> list[str | Path]:
    return text_recipe(env, "hostnme: box\n")


@case(
    r"unknown key `adresses` \(did you mean `addresses`\?\)", r"bad\.yaml:\d+:\d+: network\.ethernets\.eth0"
)
def unknown_nested_key(env: Env) -> list[str | Path]:
    return text_recipe(env, "network:\n  ethernets:\n    eth0: {adresses: [10.0.0.2/24]}\n")


@case(r"expected a string, found a list", r"bad\.yaml:3:\d+: hostname", r"one value")
def wrong_type(env: Env) -> list[str | Path]:
    return text_recipe(env, "hostname: [a, b]\n")


@case(r"mode must be a quoted string", r"bad\.yaml:\d+:\d+: files\[0\]\.mode", r'"0644"')
def unquoted_mode(env: Env) -> list[str | Path]:
    return text_recipe(env, "files:\n  - {path: /etc/x, content: a, mode: 0644}\n")


@case(
    r"not a valid address in CIDR form",
    r"bad\.yaml:\d+:\d+: network\.ethernets\.eth1\.addresses\[0\]",
    r"/24",
)
def invalid_cidr(env: Env) -> list[str | Path]:
    return env.build(env.recipe(network={"ethernets": {"eth1": {"addresses": ["192.168.150.300/24"]}}}))


@case(r"not in .*subnet|outside|subnet", r"bad\.yaml:\d+:\d+: network\.ethernets\.eth1")
def gateway_outside_subnet(env: Env) -> list[str | Path]:
    eth1 = {"addresses": ["10.0.0.2/24"], "gateway4": "10.0.1.1"}
    return env.build(env.recipe(network={"ethernets": {"eth1": eth1}}))


@case(r"user 'nobody2' does not exist in the image's /etc/passwd", r"bad\.yaml:\d+ users\.nobody2", r"nobody")
def unknown_user(env: Env) -> list[str | Path]:
    return env.build(env.recipe(users={"nobody2": {"password_hash": HASH}}))


@case(r"group 'nogroup2' does not exist", r"bad\.yaml:\d+ files\[0\]", r"did you mean 'nogroup'")
def unknown_group(env: Env) -> list[str | Path]:
    return env.build(env.recipe(files=[{"path": "/etc/x", "content": "a", "owner": "linaro:nogroup2"}]))


@case(r"unknown template variable.*nope", r"bad\.yaml:\d+ files\[0\]\.content \(template line 2\)", r"vars\.")
def unknown_template_variable(env: Env) -> list[str | Path]:
    return env.build(env.recipe(files=[{"path": "/etc/x", "content": "a\n{{ vars.nope }}\n"}]))


@case(r"unknown template variable.*missing", r"app\.env\.j2 \(template line 2\)", r"vars\.")
def unknown_template_variable_in_file(env: Env) -> list[str | Path]:
    (env.tmp / "recipe").mkdir(exist_ok=True)
    (env.tmp / "recipe" / "app.env.j2").write_text("A=1\nB={{ vars.missing }}\n")
    return env.build(env.recipe(files=[{"path": "/etc/x", "template": "app.env.j2"}]))


@case(r"plaintext password", r"bad\.yaml:\d+:\d+: users\.linaro\.password", r"openssl passwd -6")
def plaintext_password(env: Env) -> list[str | Path]:
    return env.build(env.recipe(users={"linaro": {"password": "linaro"}}))


@case(r"does not look like a crypt\(3\) hash", r"bad\.yaml:\d+:\d+: users\.linaro\.password_hash", r"openssl")
def password_hash_not_a_hash(env: Env) -> list[str | Path]:
    return env.build(env.recipe(users={"linaro": {"password_hash": "hunter2"}}))


@case(r"over plain http:// without a checksum is unsafe", r"bad\.yaml:\d+:\d+: files\[0\]", r"sha256")
def plain_http_without_checksum(env: Env) -> list[str | Path]:
    return env.build(env.recipe(files=[{"path": "/etc/x", "url": env.server.url("/motd")}]))


@case(
    r"refusing to download http://127\.0\.0\.1:\d+/motd over plain http",
    r"bad\.yaml:\d+ files\[0\]",
    r"sha256",
)
def https_rewritten_to_plain_http_by_a_mirror(env: Env) -> list[str | Path]:
    files = [{"path": "/etc/x", "url": "https://downloads.invalid/motd"}]
    return env.build(env.recipe(files=files, mirrors={"https://downloads.invalid/": env.server.base_url}))


@case(r"HTTP 404", r"bad\.yaml:\d+ files\[0\]", r"check the URL")
def url_not_found(env: Env) -> list[str | Path]:
    files = [{"path": "/etc/x", "url": env.server.url("/nothing-here"), "sha256": "0" * 64}]
    return env.build(env.recipe(files=files))


@case(
    r"checksum mismatch for .*sdcard\.tgz: sha256: expected 0{64}, got [0-9a-f]{64}",
    r"bad\.yaml:\d+ base",
    r"not the one the recipe pins",
)
def base_checksum_mismatch(env: Env) -> list[str | Path]:
    tgz = env.tmp / "sdcard.tgz"
    tgz.write_bytes(tar_bytes([], top=env.base.dir))
    return env.build(env.recipe({"path": str(tgz), "sha256": "0" * 64}))


@case(r"nothere\.txt does not exist", r"bad\.yaml:\d+:\d+: files\[0\]\.source", r"relative to the file")
def missing_source_file(env: Env) -> list[str | Path]:
    return env.build(env.recipe(files=[{"path": "/etc/x", "source": "nothere.txt"}]))


@case(r"/nowhere/sdcard does not exist", r"bad\.yaml:\d+:\d+: base\.path", r"relative to the file")
def missing_base(env: Env) -> list[str | Path]:
    return env.build(env.recipe(Path("/nowhere/sdcard")))


@case(r"cannot read the recipe", r"nothere\.yaml", r"check the path")
def missing_recipe(env: Env) -> list[str | Path]:
    return env.build(env.tmp / "nothere.yaml")


@case(r"writing under /boot is not supported", r"bad\.yaml:\d+ files\[0\]", r"vendor made them")
def write_under_boot(env: Env) -> list[str | Path]:
    return env.build(env.recipe(files=[{"path": "/boot/x", "content": "a"}]))


@case(r"no unit file|nosuch\.service", r"bad\.yaml:\d+ services", r"\w")
def unknown_service(env: Env) -> list[str | Path]:
    return env.build(env.recipe(services={"enable": ["nosuch.service"]}))


@case(r"past the last usable sector.*short by", r"partition32G\.xml:\d+: partition 7 \(DATA")
def layout_past_the_disk(env: Env) -> list[str | Path]:
    return env.build(env.recipe(layout={"DATA": "1GiB"}))


@case(
    r"partition DATA: the recipe adds about 4\.0 GiB.*short by",
    r"partition DATA",
    r"layout: \{DATA: \d+GiB\}",
)
def file_source_over_4gib(env: Env) -> list[str | Path]:
    sparse_file(env.tmp / "big.bin", (4 << 30) + 5)
    return env.build(env.recipe(files=[{"path": "/data/big.bin", "source": str(env.tmp / "big.bin")}]))


# ---------------------------------------------------------------------------------------------
# The test


@pytest.fixture(scope="module")
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer() as srv:
        srv.add("/motd", b"hello\n")
        yield srv


def screen_rows(text: str) -> int:
    return sum(max(1, math.ceil(len(line) / 100)) for line in text.splitlines())


def test_corpus_covers_every_kind_of_bad_input() -> None:
    ids = {c.id for c in CASES}
    assert len(ids) == len(CASES), "duplicate case ids"
    for needed in (
        "truncate_chunk-build",
        "corrupt_chunk-verify",
        "corrupt_chunk_in_an_untouched_partition",
        "script_data_crc-build",
        "script_bad_magic-inspect",
        "overlapping_writes-build",
        "write_past_partition-build",
        "xml_missing_attribute-inspect",
        "xml_duplicate_label-build",
        "xml_disagrees_with_gpt-build",
        "gpt_header_crc-inspect",
        "gpt_entry_count-build",
        "missing_chunk-build",
        "package-tgz-dotdot-build",
        "package-tgz-absolute-build",
        "package-tgz-link-out-build",
        "app-source-device",
        "file_of_4gib-verify",
        "yaml_syntax_error",
        "unknown_key",
        "wrong_type",
        "invalid_cidr",
        "unknown_user",
        "unknown_template_variable",
        "plaintext_password",
        "plain_http_without_checksum",
    ):
        assert needed in ids


@pytest.mark.parametrize(
    "bad", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
)
def test_bad_input_gives_one_screen_error(
    bad: Case, vendor_package_session: vf.MiniPackage, server: LocalHTTPServer, tmp_path: Path
) -> None:
    env = Env(tmp_path / "case", vendor_package_session, server)
    env.tmp.mkdir()
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    args = bad.make(env)
    res = cli(*args, env={"TMPDIR": str(private_tmp)})
    shown = res.stderr
    assert res.returncode == 1, shown
    assert "Traceback" not in shown
    lines = shown.splitlines()
    assert len(lines) <= SCREEN_LINES and screen_rows(shown) <= SCREEN_ROWS, shown
    problems = "\n".join(ln for ln in lines if ln.startswith(("error: ", "FAIL ")))
    assert problems, shown
    assert re.search(bad.what, problems), f"WHAT {bad.what!r} not in:\n{shown}"
    assert re.search(bad.where, problems), f"WHERE {bad.where!r} not in:\n{shown}"
    hints = [ln[len("hint: ") :] for ln in lines if ln.startswith("hint: ")]
    assert hints and len(hints[-1]) > 15, f"no hint:\n{shown}"
    assert re.search(bad.hint, hints[-1]), f"HINT {bad.hint!r} not in:\n{shown}"
    # nothing left behind: no bundle, no temp folder beside it, nothing in TMPDIR
    assert not env.out.exists() or sorted(p.name for p in env.out.iterdir()) == [], list(env.out.iterdir())
    assert sorted(p.name for p in private_tmp.iterdir()) == []


def test_json_error_event_carries_what_where_and_hint(
    vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"name: bad\nbase: {{path: {vendor_package_session.dir}}}\nhostnme: box\n")
    res = cli("--json", "build", recipe, "-o", tmp_path / "out")
    assert res.returncode == 1
    import json

    last = json.loads(res.stdout.splitlines()[-1])
    assert last["event"] == "error" and "did you mean `hostname`" in last["message"]
    assert last["where"].endswith("bad.yaml:3:1: hostnme")
    assert "known keys" in last["hint"]
