"""Property tests: random input only ever gives our own errors (never a traceback), and what we
generate parses back to exactly what was generated.

Already elsewhere (not repeated here): the script parser on random text (test_scripts), the
uImage codec on random bytes and its round trip (test_uimage), the GPT codec on random and
mutated blobs and its round trip, the partition XML round trip (test_layout), the recipe loader
on random documents, mutated recipes and random YAML text (test_recipe).
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import vendor_fixture as vf
import yaml
from buildhelp import cli
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_scripts import vendor_script

from builder.errors import AirboxError, PackageError
from builder.package.flashplan import read_flash_plan
from builder.package.scripts import NewChunk, parse_script, regenerate
from builder.package.uimage import decode_script, encode_script
from builder.recipe import load_recipe
from builder.redact import redact_text
from builder.units import parse_size

SECTOR = 512
CHUNK = 2048  # sectors


# ---------------------------------------------------------------------------------------------
# Script chunk blocks: regenerate() then parse gives exactly the new chunks, vendor lines kept


@st.composite
def new_chunk_lists(draw: st.DrawFn) -> tuple[int, list[NewChunk]]:
    offset = draw(st.integers(1, 1 << 24))
    count = draw(st.integers(1, 8))
    last = draw(st.integers(1, CHUNK * SECTOR))
    sizes = [CHUNK * SECTOR] * (count - 1) + [last]
    label = draw(st.sampled_from(["rootfs", "rootfs_rw", "opt", "data", "recovery"]))
    chunks = [
        NewChunk(f"{label}.{k}-of-{count}.gz", n, offset + (k - 1) * CHUNK, -(-n // SECTOR))
        for k, n in enumerate(sizes, start=1)
    ]
    return offset, chunks


EXTRA = st.sampled_from(["", "echo progress\n", "bm_savelog mmc 0:1 3.log\n", "# vendor comment\n"])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(1, CHUNK * SECTOR), min_size=1, max_size=6),
    st.integers(1, 1 << 20),
    EXTRA,
    new_chunk_lists(),
)
def test_regenerated_chunk_blocks_parse_back_exactly(
    old_sizes: list[int], old_offset: int, extra: str, new: tuple[int, list[NewChunk]]
) -> None:
    old_sizes = [CHUNK * SECTOR] * (len(old_sizes) - 1) + [old_sizes[-1]]
    vendor = parse_script(vendor_script(3, "rootfs", old_sizes, old_offset, CHUNK, extra), "v.scr")
    _offset, chunks = new
    text = regenerate(vendor, chunks)
    again = parse_script(text, "v.scr")
    got = [NewChunk(c.file, c.unzip_bytes or 0, c.offset_sectors, c.count_sectors) for c in again.chunks]
    assert got == chunks
    # every line before the first and after the last block is the vendor's, byte for byte
    head = vendor.lines[: vendor.chunks[0].first_line - 1]
    assert again.lines[: len(head)] == head
    tail = vendor.lines[vendor.chunks[-1].end_line - 1 :]
    assert tail == () or again.lines[-len(tail) :] == tail
    # and regenerating the same chunks is the identity
    same = [NewChunk(c.file, c.unzip_bytes or 0, c.offset_sectors, c.count_sectors) for c in vendor.chunks]
    assert regenerate(vendor, same) == "\n".join(vendor.lines) + ("\n" if vendor.trailing_newline else "")


# ---------------------------------------------------------------------------------------------
# uImage: blobs with valid CRCs but any header field changed decode or raise PackageError


def _fix_uimage_crcs(blob: bytearray) -> bytearray:
    if len(blob) >= 64:
        data = bytes(blob[64:])
        struct.pack_into(">I", blob, 24, zlib.crc32(data))
        struct.pack_into(">I", blob, 4, 0)
        struct.pack_into(">I", blob, 4, zlib.crc32(bytes(blob[:64])))
    return blob


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=200),
    st.lists(st.tuples(st.integers(0, 63 + 200), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_uimage_with_valid_crcs_decodes_or_raises_package_error(
    text: bytes, changes: list[tuple[int, int]]
) -> None:
    blob = bytearray(encode_script(text, "boot", 1_700_000_000))
    for offset, value in changes:
        if offset < len(blob) and offset not in range(4, 8) and offset not in range(24, 28):
            blob[offset] = value
    blob = _fix_uimage_crcs(blob)
    try:
        image = decode_script(bytes(blob), "fuzz.scr")
    except PackageError as e:
        assert e.where == "fuzz.scr"
        return
    assert isinstance(image.text, bytes) and isinstance(image.name, str)


# ---------------------------------------------------------------------------------------------
# The flash plan: a real package whose partition script is mangled gives a plan or our error


class MemoryFiles:
    """A FileSet over bytes in memory."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self.files = dict(files)
        self.form = "dir"

    def names(self) -> list[str]:
        return sorted(self.files)

    def size(self, name: str) -> int:
        return len(self.files[name])

    def open(self, name: str) -> BinaryIO:
        return io.BytesIO(self.files[name])


@pytest.fixture(scope="module")
def package_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    pkg = vf.build_package(tmp_path_factory.mktemp("fuzz-vendor"))
    return {p.name: p.read_bytes() for p in pkg.dir.iterdir() if p.is_file()}


LINE_EDITS = st.sampled_from(["delete", "duplicate", "swap", "number", "word"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(["boot_emmc-rootfs", "boot_emmc-data", "boot_emmc", "boot_emmc-gpt", "boot"]),
    st.lists(st.tuples(LINE_EDITS, st.integers(0, 400), st.integers(0, 1 << 32)), min_size=1, max_size=4),
)
def test_mangled_scripts_give_a_plan_or_a_package_error(
    package_bytes: dict[str, bytes], script: str, edits: list[tuple[str, int, int]]
) -> None:
    lines = package_bytes[f"{script}.cmd"].decode().split("\n")
    for kind, at, number in edits:
        i = at % len(lines)
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = (i + 1) % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "number":
            lines[i] = re.sub(r"0x[0-9a-f]+", f"0x{number:08x}", lines[i], count=1)
        else:
            lines[i] = re.sub(r"\S+", str(number), lines[i], count=1)
        if not lines:
            lines = [""]
    files = dict(package_bytes)
    files[f"{script}.scr"] = encode_script("\n".join(lines).encode(), script, 1_700_000_000)
    try:
        plan = read_flash_plan(MemoryFiles(files))
    except AirboxError as e:
        assert e.message and e.hint, (e.message, e.where)
        return
    assert plan.partitions


# ---------------------------------------------------------------------------------------------
# Recipes: a random valid recipe, written as YAML, loads back to exactly its values

NAME = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,15}", fullmatch=True)
WORD = st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)
HOST_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
TEXT = st.text(st.characters(whitelist_categories=("L", "N", "P", "Zs"), max_codepoint=0x2FFF), max_size=40)
MODE = st.integers(0, 0o7777).map(lambda m: f"{m:04o}")
UNIT = st.sampled_from(
    ["ssh.service", "apt-daily.timer", "resize-helper.service", "bmrt_setup.service", "x.socket"]
)
SSH_KEY = st.from_regex(r"ssh-ed25519 AAAA[A-Za-z0-9+/]{20,40} [a-z]{1,8}@[a-z]{1,8}", fullmatch=True)
CRYPT = st.from_regex(r"\$6\$[A-Za-z0-9./]{1,16}\$[A-Za-z0-9./]{86}", fullmatch=True)
SIZE = st.one_of(
    st.integers(1, 1 << 40),
    st.builds(lambda n, u: f"{n}{u}", st.integers(1, 4096), st.sampled_from(["KiB", "MiB", "GiB"])),
)


@st.composite
def device_paths(draw: st.DrawFn, top: str) -> str:
    parts = draw(st.lists(WORD, min_size=1, max_size=3))
    return "/" + "/".join([top, *parts])


@st.composite
def recipes(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": draw(NAME), "base": {"path": "."}}
    if draw(st.booleans()):
        doc["description"] = draw(TEXT)
    if draw(st.booleans()):
        doc["hostname"] = ".".join(draw(st.lists(HOST_LABEL, min_size=1, max_size=3)))
    if draw(st.booleans()):
        doc["vars"] = draw(
            st.dictionaries(WORD, st.one_of(TEXT, st.integers(-1000, 1000), st.booleans()), max_size=4)
        )
    if draw(st.booleans()):
        doc["apt"] = {
            "mirror": f"https://{draw(HOST_LABEL)}.example/ubuntu-ports/",
            "suites": draw(
                st.lists(
                    st.sampled_from(["focal", "focal-updates", "focal-security"]), min_size=1, max_size=3
                )
            ),
        }
    if draw(st.booleans()):
        doc["pip"] = {"index_url": f"https://{draw(HOST_LABEL)}.example/simple"}
    if draw(st.booleans()):
        doc["users"] = {
            user: {"ssh_authorized_keys": draw(st.lists(SSH_KEY, max_size=2)), "password_hash": draw(CRYPT)}
            for user in draw(st.lists(st.sampled_from(["linaro", "admin", "root"]), unique=True, max_size=2))
        }
    paths = draw(st.lists(st.one_of(device_paths("etc"), device_paths("data")), unique=True, max_size=5))
    written, removed = paths[: len(paths) // 2 + 1], paths[len(paths) // 2 + 1 :]
    if written and draw(st.booleans()):
        doc["files"] = [
            {
                "path": p,
                "content": draw(TEXT),
                "mode": draw(MODE),
                "owner": draw(st.sampled_from(["root:root", "linaro", "linaro:linaro"])),
                "layer": "overlay" if p.startswith("/etc") and draw(st.booleans()) else "base",
            }
            for p in written
        ]
    if removed:
        doc["remove"] = removed
    units = draw(st.lists(UNIT, unique=True, max_size=4))
    if units:
        doc["services"] = {"enable": units[: len(units) // 2], "disable": units[len(units) // 2 :]}
    if draw(st.booleans()):
        doc["layout"] = draw(st.dictionaries(st.sampled_from(["DATA", "OPT", "ROOTFS_RW"]), SIZE, min_size=1))
    if draw(st.booleans()):
        doc["mirrors"] = {
            f"https://{draw(HOST_LABEL)}.example/": f"https://mirror.{draw(HOST_LABEL)}.example/x/"
        }
    if draw(st.booleans()):
        doc["output"] = {
            "image": draw(st.booleans()),
            "zip": draw(st.booleans()),
            "shrink": draw(st.booleans()),
            "volume_label": draw(st.from_regex(r"[A-Z0-9_-]{1,11}", fullmatch=True)),
        }
    if draw(st.booleans()):
        third = draw(st.integers(0, 255))
        doc["network"] = {
            "ethernets": {
                "eth0": {"dhcp4": True},
                "eth1": {"addresses": [f"10.{third}.0.2/24"], "optional": draw(st.booleans())},
            }
        }
    return doc


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipes())
def test_random_valid_recipe_loads_back_to_its_values(tmp_path: Path, doc: dict[str, Any]) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    r = load_recipe(path)
    assert r.name == doc["name"] and r.base.path == tmp_path
    assert r.description == doc.get("description", "")
    assert r.hostname == doc.get("hostname")
    assert dict(r.vars) == doc.get("vars", {})
    if "apt" in doc:
        assert r.apt is not None and r.apt.mirror == doc["apt"]["mirror"]
        assert r.apt.suites == tuple(doc["apt"]["suites"])
    if "pip" in doc:
        assert r.pip is not None and r.pip.index_url == doc["pip"]["index_url"]
    users = {u.name: u for u in r.users}
    assert set(users) == set(doc.get("users", {}))
    for name, spec in doc.get("users", {}).items():
        assert users[name].ssh_authorized_keys == tuple(spec["ssh_authorized_keys"])
        assert users[name].password_hash == spec["password_hash"]
    files = doc.get("files", [])
    assert [f.path for f in r.files] == [f["path"] for f in files]
    for got, want in zip(r.files, files, strict=True):
        assert got.content == want["content"] and got.mode == int(want["mode"], 8)
        assert str(got.owner) == want["owner"] and got.layer == want["layer"]
    assert [x.path for x in r.remove] == doc.get("remove", [])
    services = doc.get("services", {})
    assert r.services.enable == tuple(services.get("enable", ()))
    assert r.services.disable == tuple(services.get("disable", ()))
    assert dict(r.layout) == {k: parse_size(v) for k, v in doc.get("layout", {}).items()}
    assert r.mirrors == tuple(doc.get("mirrors", {}).items())
    out = doc.get("output", {})
    assert (r.output.image, r.output.zip, r.output.shrink) == (
        out.get("image", False),
        out.get("zip", False),
        out.get("shrink", True),
    )
    assert r.output.volume_label == out.get("volume_label", "AIRBOX")
    if "network" in doc:
        assert r.network is not None
        eths = {i.id: i for i in r.network.ethernets}
        assert eths["eth0"].dhcp4 is True
        assert eths["eth1"].addresses == tuple(doc["network"]["ethernets"]["eth1"]["addresses"])
        assert eths["eth1"].optional == doc["network"]["ethernets"]["eth1"]["optional"]


# ---------------------------------------------------------------------------------------------
# The CLI on random recipe text: exit 1 with our one-screen error, never a traceback

YAMLISH = st.lists(
    st.sampled_from(
        [*"ab: -[]{},&*!|>'\"#%@`\n\t\\0189.<~?", "é", "name: ", "base: ", "path: /nowhere", "\n  "]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(YAMLISH)
def test_cli_on_random_recipe_text_exits_1_with_our_error(tmp_path: Path, text: str) -> None:
    recipe = tmp_path / "fuzz.yaml"
    recipe.write_text(text, encoding="utf-8")
    res = cli("build", recipe, "-o", tmp_path / "out")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    lines = res.stderr.splitlines()
    assert lines and lines[0].startswith("error: ") and "fuzz.yaml" in lines[0] and len(lines) <= 15


# ---------------------------------------------------------------------------------------------
# Redaction: a secret embedded anywhere a credential goes never survives

SECRET = st.from_regex(r"[A-Za-z0-9_~-]{6,24}", fullmatch=True)
PLACES = st.sampled_from(
    [
        "https://{s}@host.example/pkg.tgz",
        "https://user:{s}@host.example:8443/a/b?c=1",
        "http://127.0.0.1:8000/x?token={s}",
        "https://h/x?a=b&access_token={s}&c=d",
        "GET /x?X-Amz-Signature={s} HTTP/1.1",
        "https://blob.example/c?sv=2022&sig={s}",
        "linaro:$6$salty$ab{s}cd:19000:0:99999:7:::",
        "Authorization: Bearer {s}",
    ]
)


@settings(max_examples=150, deadline=None)
@given(PLACES, SECRET, TEXT, TEXT)
def test_redaction_never_lets_a_secret_through(place: str, secret: str, before: str, after: str) -> None:
    if "$6$" in place:  # a crypt hash is made of [A-Za-z0-9./] only
        secret = re.sub(r"[^A-Za-z0-9./]", "x", secret)
    assume(secret not in before + after)
    shown = redact_text(f"{before} {place.format(s=secret)} {after}")
    assert secret not in shown
