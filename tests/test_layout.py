"""builder.package.layout: partition32G.xml and the 17408-byte GPT, checked against real sgdisk."""

from __future__ import annotations

import dataclasses
import difflib
import re
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from builder.errors import BuildError, PackageError
from builder.package.gpt import Gpt, check_gpt_against_table, decode_gpt, encode_gpt, gpt_from_table
from builder.package.layout import apply_layout
from builder.package.partxml import (
    BASIC_DATA_GUID,
    FIRST_PARTITION_SECTOR,
    GPT_BLOB_SIZE,
    KIB,
    SECTOR,
    PartitionTable,
    format_partition_xml,
    make_table,
    parse_partition_xml,
    rewrite_partition_xml,
)
from builder.run import find_tool, run

VENDOR_REPO = Path("/work/.mirror/sophgo+bootloader-arm64/repo")

# The vendor's whitespace style: a tab, then columns padded with spaces (FORMAT.md section 4).
AIRBOX_XML = (
    '<physical_partition size_in_kb="20971520">\n'
    '\t<partition label="BOOT"       size_in_kb="131072"  readonly="false"  format="1" />\n'
    '\t<partition label="RECOVERY"   size_in_kb="3145728"  readonly="false" format="2" />\n'
    '\t<partition label="MISC"       size_in_kb="10240"  readonly="false"   format="0" />\n'
    '\t<partition label="ROOTFS"     size_in_kb="3145728" readonly="true"   format="2" />\n'
    '\t<partition label="ROOTFS_RW"  size_in_kb="6291456" readonly="false"  format="2" />\n'
    '\t<partition label="OPT"        size_in_kb="2097152" readonly="false"  format="2" />\n'
    '\t<partition label="DATA"       size_in_kb="4194304" readonly="false"  format="2" />\n'
    "</physical_partition>\n"
)
SOPHGO_XML = AIRBOX_XML.replace('"ROOTFS"     size_in_kb="3145728"', '"ROOTFS"     size_in_kb="2621440"')
AIRBOX_VALUES = [
    ("BOOT", 131072, False, 1),
    ("RECOVERY", 3145728, False, 2),
    ("MISC", 10240, False, 0),
    ("ROOTFS", 3145728, True, 2),
    ("ROOTFS_RW", 6291456, False, 2),
    ("OPT", 2097152, False, 2),
    ("DATA", 4194304, False, 2),
]
LINUX_FS_GUID = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")

needs_sgdisk = pytest.mark.skipif(find_tool("sgdisk") is None, reason="sgdisk (gdisk) not installed")


def vendor_xml() -> str | None:
    if not (VENDOR_REPO / "HEAD").exists() and not (VENDOR_REPO / ".git").exists():
        return None
    proc = subprocess.run(
        ["git", "-C", str(VENDOR_REPO), "show", "HEAD:scripts/partition32G.xml"],
        capture_output=True,
        check=False,
    )
    return proc.stdout.decode() if proc.returncode == 0 else None


# ---------------------------------------------------------------------------------------------
# XML


def test_parse_airbox_xml_values_offsets_and_lines() -> None:
    table = parse_partition_xml(AIRBOX_XML, "partition32G.xml")
    assert table.disk_kb == 20971520
    assert table.disk_line == 1
    got = [(p.label, p.size_kb, p.readonly, p.fmt) for p in table.partitions]
    assert got == AIRBOX_VALUES
    # The packer's arithmetic, written out independently: offset += size_in_kb * 1024 / 512.
    offset = 8192
    for i, part in enumerate(table.partitions):
        assert part.index == i
        assert part.line == i + 2
        assert part.offset_sectors == offset
        assert part.size_sectors == AIRBOX_VALUES[i][1] * 1024 // 512
        offset += AIRBOX_VALUES[i][1] * 2
    assert table.end_sector == offset
    assert table.partitions[3].offset_sectors == 0x647000  # the rootfs offset in FORMAT.md section 3


VENDOR_FACTS = Path(__file__).parent / "data" / "vendor"


def test_parse_vendor_default_from_the_vendor_repo() -> None:
    """The vendor's default table, kept as test data (tests/data/vendor/SOURCES.md); checked
    against the vendor's own file too when a mirror of its repository is at hand."""
    text = (VENDOR_FACTS / "partition32G.xml").read_text()
    mirrored = vendor_xml()
    if mirrored is not None:
        assert parse_partition_xml(mirrored, "partition32G.xml") == parse_partition_xml(text, "x.xml")
    assert "\t<partition" in text  # the vendor indents with tabs
    table = parse_partition_xml(text, "partition32G.xml")
    assert table == parse_partition_xml(SOPHGO_XML, "x.xml")
    assert table.get("rootfs").size_kb == 2621440


def test_attribute_order_quotes_comments_and_multiline_tags_are_accepted() -> None:
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\r\n'
        "<!-- layout -->\r\n"
        "<physical_partition size_in_kb='1048576'>\r\n"
        '\t<partition format="2" readonly=\'true\' size_in_kb="65536" label="ROOTFS"/>\r\n'
        '\t<partition\r\n\t\tlabel="DATA"\r\n\t\tsize_in_kb="1024"\r\n'
        '\t\treadonly="false" format="0" sparse="true"></partition>\r\n'
        "</physical_partition>\r\n"
    )
    table = parse_partition_xml(text, "p.xml")
    assert [(p.label, p.size_kb, p.readonly, p.fmt, p.line) for p in table.partitions] == [
        ("ROOTFS", 65536, True, 2, 4),
        ("DATA", 1024, False, 0, 5),
    ]
    assert table.partitions[1].extra_attributes == (("sparse", "true"),)
    assert table.partitions[1].offset_sectors == 8192 + 65536 * 2


def _set_line(text: str, line: int, old: str, new: str) -> str:
    lines = text.split("\n")
    assert old in lines[line - 1], (old, lines[line - 1])
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    return "\n".join(lines)


XML_ERRORS = [
    # (name, mutate(text), line, words that must be in the message)
    ("unclosed tag", lambda t: _set_line(t, 8, " />", " >"), 9, ["malformed", "mismatched tag"]),
    ("tag left open", lambda t: _set_line(t, 4, " />", " >"), 5, ["<partition> inside <partition>"]),
    ("bad syntax", lambda t: _set_line(t, 5, 'readonly="true"', "readonly=true"), 5, ["malformed"]),
    ("missing label", lambda t: _set_line(t, 3, 'label="RECOVERY"', ""), 3, ["label", "missing"]),
    ("missing size", lambda t: _set_line(t, 4, 'size_in_kb="10240"', ""), 4, ["size_in_kb", "missing"]),
    ("missing readonly", lambda t: _set_line(t, 6, 'readonly="false"', ""), 6, ["readonly", "missing"]),
    ("missing format", lambda t: _set_line(t, 8, 'format="2"', ""), 8, ["format", "missing"]),
    ("missing disk size", lambda t: _set_line(t, 1, 'size_in_kb="20971520"', ""), 1, ["size_in_kb"]),
    ("size with unit", lambda t: _set_line(t, 5, '"3145728"', '"3G"'), 5, ["size_in_kb", "'3G'"]),
    ("negative size", lambda t: _set_line(t, 2, '"131072"', '"-131072"'), 2, ["size_in_kb"]),
    ("size with space", lambda t: _set_line(t, 2, '"131072"', '" 131072"'), 2, ["size_in_kb"]),
    ("unicode digits", lambda t: _set_line(t, 2, '"131072"', '"١٣١٠٧٢"'), 2, ["size_in_kb"]),
    ("zero size", lambda t: _set_line(t, 4, '"10240"', '"0"'), 4, ["size_in_kb", "0"]),
    ("disk not a number", lambda t: _set_line(t, 1, '"20971520"', '"20G"'), 1, ["size_in_kb", "20G"]),
    ("unknown format", lambda t: _set_line(t, 7, 'format="2"', 'format="3"'), 7, ["format", "3"]),
    ("format not a number", lambda t: _set_line(t, 7, 'format="2"', 'format="ext4"'), 7, ["format"]),
    ("readonly yes", lambda t: _set_line(t, 5, 'readonly="true"', 'readonly="yes"'), 5, ["readonly", "yes"]),
    ("readonly TRUE", lambda t: _set_line(t, 5, 'readonly="true"', 'readonly="TRUE"'), 5, ["readonly"]),
    ("duplicate label", lambda t: _set_line(t, 7, '"OPT"', '"BOOT"'), 7, ["BOOT", "line 2"]),
    ("duplicate in case", lambda t: _set_line(t, 8, '"DATA"', '"misc"'), 8, ["misc", "MISC", "line 4"]),
    ("label with space", lambda t: _set_line(t, 8, '"DATA"', '"MY DATA"'), 8, ["label", "MY DATA"]),
    ("label too long", lambda t: _set_line(t, 8, '"DATA"', '"' + "D" * 37 + '"'), 8, ["label"]),
    ("exceeds disk", lambda t: _set_line(t, 8, '"4194304"', '"6194304"'), 8, ["DATA", "20971520", "short"]),
    ("wrong root", lambda t: t.replace("physical_partition", "disk"), 1, ["<disk>"]),
    (
        "unknown element",
        lambda t: _set_line(t, 3, "\t<partition", '\t<part label="X"/><partition'),
        3,
        ["<part>"],
    ),
    ("nested element", lambda t: _set_line(t, 3, " />", "><x/></partition>"), 3, ["<x>"]),
    ("stray text", lambda t: _set_line(t, 3, "\t<partition", "hello <partition"), 3, ["hello"]),
    ("no partitions", lambda t: "\n".join(t.split("\n")[:1] + t.split("\n")[8:]), 1, ["no <partition>"]),
]


@pytest.mark.parametrize(
    ("mutate", "line", "words"), [e[1:] for e in XML_ERRORS], ids=[e[0] for e in XML_ERRORS]
)
def test_xml_errors_name_file_line_and_attribute(mutate, line: int, words: list[str]) -> None:
    text = mutate(AIRBOX_XML)
    with pytest.raises(PackageError) as info:
        parse_partition_xml(text, "pkg/partition32G.xml")
    err = info.value
    assert err.where == f"pkg/partition32G.xml:{line}"
    for word in words:
        assert word in err.message, (word, err.message)


def test_xml_error_line_of_attribute_on_its_own_line() -> None:
    text = AIRBOX_XML.replace('size_in_kb="10240"  readonly="false"', 'size_in_kb="10240"\n readonly="maybe"')
    with pytest.raises(PackageError) as info:
        parse_partition_xml(text, "p.xml")
    assert info.value.where == "p.xml:5"


def test_layout_that_exactly_fits_is_accepted_and_one_kib_less_is_not() -> None:
    # Last partition must end on or before sector disk_sectors - 34 (backup GPT after it).
    needed_sectors = 8192 + sum(v[1] for v in AIRBOX_VALUES) * 2 + 33
    needed_kb = -(-needed_sectors // 2)
    text = AIRBOX_XML.replace('"20971520"', f'"{needed_kb}"')
    table = parse_partition_xml(text, "p.xml")
    assert table.partitions[-1].end_sector <= table.disk_sectors - 34
    with pytest.raises(PackageError) as info:
        parse_partition_xml(AIRBOX_XML.replace('"20971520"', f'"{needed_kb - 1}"'), "p.xml")
    assert "DATA" in info.value.message
    assert f"{needed_sectors * 512} bytes" in info.value.message


def test_rewrite_changes_only_the_named_sizes() -> None:
    new = rewrite_partition_xml(AIRBOX_XML, {"rootfs": 4194304, "DATA": 1048576}, "p.xml")
    old_lines = AIRBOX_XML.splitlines(keepends=True)
    new_lines = new.splitlines(keepends=True)
    assert len(old_lines) == len(new_lines)
    changed = [i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b]
    assert changed == [4, 7]
    diff = list(difflib.unified_diff(old_lines, new_lines, n=0))[2:]
    assert [d for d in diff if not d.startswith("@@")] == [
        "-" + old_lines[4],
        "+" + old_lines[4].replace('size_in_kb="3145728"', 'size_in_kb="4194304"'),
        "-" + old_lines[7],
        "+" + old_lines[7].replace('size_in_kb="4194304"', 'size_in_kb="1048576"'),
    ]
    table = parse_partition_xml(new, "p.xml")
    assert table.get("ROOTFS").size_kb == 4194304
    assert table.get("DATA").size_kb == 1048576
    assert table.get("OPT").size_kb == 2097152


def test_rewrite_keeps_comments_crlf_quotes_and_odd_layout() -> None:
    text = (
        "<!-- vendor \u00e9dition -->\r\n<physical_partition size_in_kb='1048576'>\r\n"
        '  <!-- size_in_kb="1" in a comment must not move -->\r\n'
        "  <partition format='2' size_in_kb = '65536' label='A' readonly='false'/>\r\n"
        '  <partition label="B"\r\n     size_in_kb="1024" readonly="true" format="0"/>\r\n'
        "</physical_partition>"
    )
    new = rewrite_partition_xml(text, {"B": 2048, "a": 100}, "p.xml")
    assert new == text.replace("'65536'", "'100'").replace('"1024"', '"2048"')


def test_rewrite_refuses_unknown_labels_and_overflow() -> None:
    with pytest.raises(BuildError) as info:
        rewrite_partition_xml(AIRBOX_XML, {"ROOTF": 1}, "p.xml")
    assert "ROOTF" in info.value.message
    assert "did you mean 'ROOTFS'" in (info.value.hint or "")
    with pytest.raises(BuildError) as info:
        rewrite_partition_xml(AIRBOX_XML, {"DATA": 8388608}, "p.xml")
    assert "DATA" in info.value.message
    with pytest.raises(BuildError):
        rewrite_partition_xml(AIRBOX_XML, {"DATA": 0}, "p.xml")


def test_format_partition_xml_is_parsed_back_and_greppable_per_line() -> None:
    table = parse_partition_xml(AIRBOX_XML, "p.xml")
    text = format_partition_xml(table)
    assert parse_partition_xml(text, "q.xml") == table
    # The vendor shell greps one partition per line: label=, size_in_kb=, readonly=, format=.
    lines = [ln for ln in text.splitlines() if "<partition " in ln]
    assert [re.search(r'label="([^"]+)"', ln).group(1) for ln in lines] == list(table.labels)


# ---------------------------------------------------------------------------------------------
# GPT against sgdisk


def _sparse_disk(path: Path, disk_bytes: int, blob: bytes) -> Path:
    with path.open("wb") as f:
        f.truncate(disk_bytes)
        f.write(blob)
    return path


def _sgdisk(*args: str | Path) -> tuple[str, str]:
    proc = run(["sgdisk", *args])
    return proc.stdout.decode(), proc.stderr.decode()


PRINT_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+\S+ \S+\s+([0-9A-F]{4})\s+(.*)$", re.M)


def _check_disk_with_sgdisk(disk: Path, table: PartitionTable, gpt: Gpt) -> None:
    out, _ = _sgdisk("-p", disk)
    assert f"Disk identifier (GUID): {str(gpt.disk_guid).upper()}" in out
    assert f"{table.disk_sectors} sectors" in out
    assert f"last usable sector is {table.disk_sectors - 34}" in out
    rows = PRINT_ROW.findall(out)
    assert [(int(n), int(s), int(e), code, name) for n, s, e, code, name in rows] == [
        (p.index + 1, p.offset_sectors, p.offset_sectors + p.size_kb * 2 - 1, "0700", p.label)
        for p in table.partitions
    ]
    for part, entry in zip(table.partitions, gpt.entries, strict=True):
        info, _ = _sgdisk("-i", str(part.index + 1), disk)
        assert f"Partition GUID code: {str(BASIC_DATA_GUID).upper()}" in info
        assert f"Partition unique GUID: {str(entry.unique_guid).upper()}" in info
        assert f"First sector: {part.offset_sectors} " in info
        assert f"Last sector: {part.offset_sectors + part.size_sectors - 1} " in info
        flags = "1000000000000000" if part.readonly else "0000000000000000"
        assert f"Attribute flags: {flags}" in info
        assert f"Partition name: '{part.label}'" in info
        shown, _ = _sgdisk("-A", f"{part.index + 1}:show", disk)
        assert (f"{part.index + 1}:60:1 (read-only)" in shown) == part.readonly


@needs_sgdisk
@pytest.mark.parametrize("xml", [AIRBOX_XML, SOPHGO_XML], ids=["airbox", "sophgo"])
def test_encoded_vendor_gpt_is_read_by_sgdisk(tmp_path: Path, xml: str) -> None:
    table = parse_partition_xml(xml, "partition32G.xml")
    gpt = gpt_from_table(table)
    blob = encode_gpt(gpt)
    assert len(blob) == GPT_BLOB_SIZE == 0x4400
    disk = _sparse_disk(tmp_path / "emmc.img", table.disk_bytes, blob)

    # No backup GPT (mk_gpt does not write one): the primary is good, only the backup is bad.
    out, err = _sgdisk("-v", disk)
    assert "Main header: OK" in err
    assert "Main partition table: OK" in err
    assert "Backup header: ERROR" in err
    assert "CRC for the backup partition table is invalid" in out
    assert "Identified 1 problems" in out
    _check_disk_with_sgdisk(disk, table, gpt)

    # What the first boot does: sgdisk -e. Then the disk verifies clean and the primary GPT
    # sgdisk writes back is byte-identical to ours (MBR included).
    _sgdisk("-e", disk)
    out, err = _sgdisk("-v", disk)
    assert "No problems found" in out
    assert "ERROR" not in err
    with disk.open("rb") as f:
        assert f.read(GPT_BLOB_SIZE) == blob
    _check_disk_with_sgdisk(disk, table, gpt)


@needs_sgdisk
def test_lower_case_label_stays_lower_case_like_mk_gpt(tmp_path: Path) -> None:
    table = make_table(65536, [("boot", 1024, False, 1), ("Data", 2048, True, 2)])
    gpt = gpt_from_table(table)
    disk = _sparse_disk(tmp_path / "d.img", table.disk_bytes, encode_gpt(gpt))
    out, _ = _sgdisk("-p", disk)
    assert [row[4] for row in PRINT_ROW.findall(out)] == ["boot", "Data"]


@needs_sgdisk
def test_decode_gpt_written_by_sgdisk(tmp_path: Path) -> None:
    disk = tmp_path / "s.img"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    disk_guid = uuid.UUID("12345678-9abc-4def-8123-456789abcdef")
    part_guid = uuid.UUID("aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee")
    _sgdisk("-o", "-U", str(disk_guid), disk)
    _sgdisk("-n", "1:2048:+1M", "-c", "1:MISC", "-t", "1:0700", "-u", f"1:{part_guid}", disk)
    _sgdisk("-A", "1:set:60", "-A", "1:set:2", disk)
    _sgdisk("-n", "3:0:+2M", "-c", "3:Día µ rootfs", "-t", "3:8300", disk)
    blob = disk.read_bytes()[:GPT_BLOB_SIZE]

    gpt = decode_gpt(blob, "s.img")
    assert gpt.disk_guid == disk_guid
    assert (gpt.my_lba, gpt.alternate_lba) == (1, (64 << 20) // 512 - 1)
    assert (gpt.first_usable_lba, gpt.last_usable_lba) == (34, (64 << 20) // 512 - 34)
    assert [e.slot for e in gpt.entries] == [0, 2]
    first, third = gpt.entries
    assert (first.type_guid, first.unique_guid) == (BASIC_DATA_GUID, part_guid)
    assert (first.first_lba, first.last_lba) == (2048, 4095)
    assert first.attributes == (1 << 60) | (1 << 2)
    assert first.readonly
    assert first.name == "MISC"
    assert third.type_guid == LINUX_FS_GUID
    assert (third.first_lba, third.last_lba, third.attributes) == (4096, 8191, 0)
    assert third.name == "Día µ rootfs"
    info, _ = _sgdisk("-i", "3", disk)
    assert f"Partition unique GUID: {str(third.unique_guid).upper()}" in info
    # sgdisk's own protective MBR differs from mk_gpt's (CHS fields) and still round-trips.
    assert encode_gpt(gpt) == blob


# ---------------------------------------------------------------------------------------------
# GPT codec


def _airbox_blob() -> bytes:
    return encode_gpt(gpt_from_table(parse_partition_xml(AIRBOX_XML, "p.xml")))


def _fix_crcs(blob: bytearray) -> bytearray:
    blob[600:604] = struct.pack("<I", zlib.crc32(bytes(blob[1024:])))
    header_size = min(max(struct.unpack_from("<I", blob, 524)[0], 92), 512)
    blob[528:532] = b"\0\0\0\0"
    blob[528:532] = struct.pack("<I", zlib.crc32(bytes(blob[512 : 512 + header_size])))
    return blob


def test_mk_gpt_byte_layout() -> None:
    table = parse_partition_xml(AIRBOX_XML, "p.xml")
    blob = _airbox_blob()
    sectors = 20971520 * 2
    # Protective MBR exactly as mk_gpt fills it; everything else zero.
    mbr = bytearray(512)
    mbr[446:462] = bytes([0, 0, 1, 0, 0xEE, 0xFE, 0xFF, 0xFF]) + struct.pack("<II", 1, sectors - 1)
    mbr[510:512] = b"\x55\xaa"
    assert blob[:512] == bytes(mbr)
    header = blob[512:1024]
    assert header[:8] == b"EFI PART"
    assert struct.unpack_from("<IIIIQQQQ", header, 8)[:2] == (0x00010000, 92)
    assert struct.unpack_from("<QQQQ", header, 24) == (1, sectors - 1, 34, sectors - 34)
    assert struct.unpack_from("<QIII", header, 72)[:3] == (2, 128, 128)
    assert header[92:] == bytes(420)  # sizeof(struct gpt_header_t) is 512: the rest is zero
    zeroed = header[:16] + bytes(4) + header[20:92]
    assert struct.unpack_from("<I", header, 16)[0] == zlib.crc32(zeroed)
    assert struct.unpack_from("<I", header, 88)[0] == zlib.crc32(blob[1024:])
    rootfs = blob[1024 + 3 * 128 : 1024 + 4 * 128]
    assert rootfs[:16] == bytes.fromhex("a2a0d0ebe5b9334487c068b6b72699c7")
    part = table.get("ROOTFS")
    assert struct.unpack_from("<QQQ", rootfs, 32) == (part.offset_sectors, part.end_sector, 1 << 60)
    assert rootfs[56:] == "ROOTFS".encode("utf-16-le").ljust(72, b"\0")
    assert blob[1024 + 7 * 128 :] == bytes(121 * 128)


def test_mbr_size_saturates_for_disks_over_2tib() -> None:
    table = make_table(4 << 30, [("BIG", 1024, False, 0)])  # 4 TiB
    blob = encode_gpt(gpt_from_table(table))
    assert struct.unpack_from("<I", blob, 446 + 12)[0] == 0xFFFFFFFF
    assert decode_gpt(blob, "x").alternate_lba == (4 << 40) // 512 - 1


def test_round_trip_is_byte_identical_and_keeps_foreign_bytes() -> None:
    blob = bytearray(_airbox_blob())
    assert encode_gpt(decode_gpt(bytes(blob), "x")) == bytes(blob)
    blob[0:440] = bytes(range(256)) + bytes(range(184))  # boot code
    blob[512 + 100] = 0x5A  # reserved bytes after the 92-byte header (not in the CRC)
    blob[1024 + 3 * 128 + 56 + 20] = 0x41  # a byte after the NUL of "ROOTFS"
    blob[1024 + 100 * 128 + 40] = 7  # junk in an unused slot
    blob = _fix_crcs(blob)
    gpt = decode_gpt(bytes(blob), "x")
    assert gpt.entries[3].name == "ROOTFS"
    assert encode_gpt(gpt) == bytes(blob)
    # A header that declares itself 96 bytes long: its CRC covers bytes 92..95 too.
    blob[524:528] = struct.pack("<I", 96)
    blob[512 + 93] = 0x77
    blob = _fix_crcs(blob)
    gpt = decode_gpt(bytes(blob), "x")
    assert gpt.header_size == 96
    assert encode_gpt(gpt) == bytes(blob)
    blob[512 + 94] = 1  # now inside the CRC
    with pytest.raises(PackageError, match="header CRC32"):
        decode_gpt(bytes(blob), "x")


CORRUPTIONS = [
    ("length", lambda b: b[:-1], None, "17407 bytes"),
    ("mbr signature", lambda b: b[:510] + b"\0\0" + b[512:], None, "55aa"),
    ("mbr type", lambda b: b[:450] + b"\x83" + b[451:], None, "0x83"),
    ("gpt signature", lambda b: b[:512] + b"EFI PARX" + b[520:], None, "signature"),
    ("header crc", lambda b: b[:560] + b"\x01" + b[561:], None, "header CRC32"),
    ("crc field", lambda b: b[:528] + bytes([b[528] ^ 1]) + b[529:], None, "header CRC32"),
    ("entries crc", lambda b: b[: 1024 + 40] + b"\x09" + b[1024 + 41 :], None, "entry array CRC32"),
    ("revision", lambda b: b[:520] + struct.pack("<I", 0x20000) + b[524:], "fix", "revision"),
    ("header size", lambda b: b[:524] + struct.pack("<I", 91) + b[528:], "fix", "header size"),
    ("my lba", lambda b: b[:536] + struct.pack("<Q", 2) + b[544:], "fix", "my LBA"),
    ("entries lba", lambda b: b[:584] + struct.pack("<Q", 3) + b[592:], "fix", "entry LBA"),
    ("entry count", lambda b: b[:592] + struct.pack("<I", 64) + b[596:], "fix", "number of partition"),
    ("entry size", lambda b: b[:596] + struct.pack("<I", 256) + b[600:], "fix", "size of a partition"),
    ("usable", lambda b: b[:560] + struct.pack("<Q", 10) + b[568:], "fix", "usable"),
    ("bad utf-16", lambda b: b[: 1024 + 56] + b"\x00\xd8\x41\x00" + b[1024 + 60 :], "fix", "UTF-16"),
]


@pytest.mark.parametrize(
    ("mutate", "fix", "words"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS]
)
def test_corrupt_gpt_is_a_package_error(mutate, fix: str | None, words: str) -> None:
    blob = mutate(_airbox_blob())
    if fix:
        blob = bytes(_fix_crcs(bytearray(blob)))
    with pytest.raises(PackageError) as info:
        decode_gpt(blob, "pkg/gpt.gz")
    assert info.value.where == "pkg/gpt.gz"
    assert words in info.value.message, info.value.message


def test_gpt_from_table_reuses_template_guids_and_is_deterministic() -> None:
    table = parse_partition_xml(AIRBOX_XML, "p.xml")
    assert gpt_from_table(table) == gpt_from_table(table)
    plain = gpt_from_table(table)
    template = dataclasses.replace(
        plain,
        disk_guid=uuid.uuid4(),
        entries=tuple(dataclasses.replace(e, unique_guid=uuid.uuid4()) for e in plain.entries),
    )
    bigger = apply_layout(table, {"ROOTFS": 4 << 30}).table
    last = dataclasses.replace(bigger.partitions[-1], label="USERDATA")
    renamed = dataclasses.replace(bigger, partitions=(*bigger.partitions[:-1], last))
    new = gpt_from_table(renamed, template)
    assert new.disk_guid == template.disk_guid
    assert [e.unique_guid for e in new.entries[:-1]] == [e.unique_guid for e in template.entries[:-1]]
    assert new.entries[-1].unique_guid not in {e.unique_guid for e in template.entries}
    assert new.entries[-1].unique_guid == gpt_from_table(renamed, template).entries[-1].unique_guid
    assert new.entries[3].last_lba == new.entries[3].first_lba + (4 << 30) // 512 - 1
    assert check_gpt_against_table(new, renamed) == []
    assert encode_gpt(new) == encode_gpt(gpt_from_table(renamed, template))


def test_check_gpt_against_table_names_each_difference() -> None:
    table = parse_partition_xml(AIRBOX_XML, "p.xml")
    gpt = gpt_from_table(table)
    assert check_gpt_against_table(gpt, table) == []
    entries = list(gpt.entries)
    entries[0] = dataclasses.replace(entries[0], name="boot")
    entries[1] = dataclasses.replace(entries[1], first_lba=entries[1].first_lba + 8)
    entries[2] = dataclasses.replace(entries[2], last_lba=entries[2].last_lba - 1)
    entries[3] = dataclasses.replace(entries[3], attributes=0)
    entries[4] = dataclasses.replace(entries[4], type_guid=LINUX_FS_GUID)
    del entries[6]
    problems = check_gpt_against_table(dataclasses.replace(gpt, entries=tuple(entries)), table)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "count: the GPT has 6 partitions, the XML 7" in text
    assert "partition 1 (BOOT): GPT name is 'boot'" in text and "only in case" in text
    assert "partition 2 (RECOVERY): starts at sector" in text
    assert "partition 3 (MISC): ends at sector" in text
    assert "partition 4 (ROOTFS): read-only flag" in text
    assert "partition 5 (ROOTFS_RW): type GUID" in text
    assert "partition 7 (DATA): missing from the GPT" in text
    other_disk = parse_partition_xml(AIRBOX_XML.replace("20971520", "31116288"), "p.xml")
    assert any("disk size" in p for p in check_gpt_against_table(gpt, other_disk))


# ---------------------------------------------------------------------------------------------
# apply_layout


def test_apply_layout_resizes_moves_and_rounds_up_to_kib() -> None:
    table = parse_partition_xml(AIRBOX_XML, "p.xml")
    change = apply_layout(table, {"rootfs": 3 * 2**30 + 1, "misc": 10240 * KIB})
    assert change.resized == ("ROOTFS",)
    assert change.moved == ("ROOTFS_RW", "OPT", "DATA")
    rootfs = change.table.get("ROOTFS")
    assert rootfs.size_kb == 3145729  # one byte more rounds up to a whole KiB
    assert change.table.get("ROOTFS_RW").offset_sectors == rootfs.offset_sectors + 3145729 * 2
    assert change.table.get("BOOT") == table.get("BOOT")
    assert change.sizes_kb["ROOTFS"] == 3145729
    text = rewrite_partition_xml(AIRBOX_XML, change.sizes_kb, "p.xml")
    assert parse_partition_xml(text, "p.xml") == change.table


def test_apply_layout_errors_carry_the_numbers() -> None:
    table = parse_partition_xml(AIRBOX_XML, "p.xml")
    with pytest.raises(BuildError) as info:
        apply_layout(table, {"ROOTFS_WR": 1 << 30})
    assert "did you mean 'ROOTFS_RW'" in (info.value.hint or "")
    free_kb = (table.disk_sectors - 33 - table.end_sector) * SECTOR // KIB
    with pytest.raises(BuildError) as info:
        apply_layout(table, {"OPT": (2097152 + free_kb + 1) * KIB})
    msg = info.value.message
    assert "partition 7 (DATA" in msg  # OPT grew, DATA is pushed past the end
    needed = (table.end_sector + (free_kb + 1) * 2 + 33) * SECTOR
    assert f"the disk has {table.disk_bytes} bytes" in msg
    assert f"needs {needed} bytes" in msg
    assert f"short by {needed - table.disk_bytes} bytes" in msg
    assert apply_layout(table, {"OPT": (2097152 + free_kb) * KIB}).moved == ("DATA",)
    with pytest.raises(BuildError) as info:
        apply_layout(table, {"ROOTFS": 2 << 30}, min_bytes={"ROOTFS": (2 << 30) + 5})
    assert "ROOTFS" in info.value.message and "short by 5 bytes" in info.value.message
    with pytest.raises(BuildError) as info:
        apply_layout(table, {}, min_bytes={"MISC": 20 << 20})
    assert "current size 10485760 bytes" in info.value.message
    with pytest.raises(BuildError):
        apply_layout(table, {"MISC": 0})
    unchanged = apply_layout(table, {"DATA": 4194304 * KIB})
    assert (unchanged.resized, unchanged.moved, unchanged.table) == ((), (), table)


# ---------------------------------------------------------------------------------------------
# Properties

LABEL = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,35}", fullmatch=True)


@st.composite
def tables(draw) -> PartitionTable:
    labels = draw(st.lists(LABEL, min_size=1, max_size=12, unique_by=str.lower))
    specs = [
        (label, draw(st.integers(1, 1 << 24)), draw(st.booleans()), draw(st.sampled_from([0, 1, 2])))
        for label in labels
    ]
    end = FIRST_PARTITION_SECTOR + sum(s[1] for s in specs) * 2
    disk_kb = -(-(end + 33) // 2) + draw(st.integers(0, 1 << 26))
    return make_table(disk_kb, specs)


@settings(max_examples=150, deadline=None)
@given(tables())
def test_property_xml_format_parse_round_trip(table: PartitionTable) -> None:
    text = format_partition_xml(table)
    assert parse_partition_xml(text, "gen.xml") == table


@settings(max_examples=150, deadline=None)
@given(tables(), st.booleans())
def test_property_gpt_encode_decode_round_trip(table: PartitionTable, with_template: bool) -> None:
    template = gpt_from_table(table) if with_template else None
    gpt = gpt_from_table(table, template)
    blob = encode_gpt(gpt)
    assert len(blob) == GPT_BLOB_SIZE
    decoded = decode_gpt(blob, "gen")
    assert decoded == gpt
    assert encode_gpt(decoded) == blob
    assert check_gpt_against_table(decoded, table) == []


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=GPT_BLOB_SIZE + 8),
        st.binary(min_size=GPT_BLOB_SIZE, max_size=GPT_BLOB_SIZE),
    )
)
def test_property_random_bytes_only_raise_package_error(blob: bytes) -> None:
    with pytest.raises(PackageError):
        decode_gpt(blob, "fuzz")


_VALID = _airbox_blob()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, GPT_BLOB_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_property_mutated_blobs_with_valid_crcs_decode_exactly_or_raise_package_error(
    changes: list[tuple[int, int]],
) -> None:
    blob = bytearray(_VALID)
    for offset, value in changes:
        # Aim half of the changes at the header and the used entries, where the checks are.
        blob[offset if offset % 2 else 512 + offset % 1400] = value
    blob = bytes(_fix_crcs(blob))
    assume(blob != _VALID)
    try:
        gpt = decode_gpt(blob, "fuzz")
    except PackageError:
        return
    assert encode_gpt(gpt) == blob


# ---------------------------------------------------------------------------------------------
# Against the independent re-implementation of the vendor packer in tests/vendor_fixture.py


def test_fixture_gpt_agrees_byte_for_byte() -> None:
    import vendor_fixture as vf

    table = parse_partition_xml(vf.render_xml(vf.MINI_LAYOUT, vf.MINI_DISK_KB), "mini.xml")
    blob = vf.encode_gpt(vf.MINI_LAYOUT, vf.MINI_DISK_KB, seed=7)
    gpt = decode_gpt(blob, "gpt")
    assert check_gpt_against_table(gpt, table) == []
    assert [e.name for e in gpt.entries] == [p.label for p in vf.MINI_LAYOUT]
    # Same table + the fixture's GUIDs as template: exactly the fixture's bytes.
    assert encode_gpt(gpt_from_table(table, gpt)) == blob
