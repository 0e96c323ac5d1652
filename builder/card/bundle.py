"""The bundle as the card sees it: its files and their sums, the checks before a write, what counts
as a bundle's file or as desktop metadata on a card, and how lists of names are shown."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import AirboxError

FAT32_MAX_FILE = (4 << 30) - 1
TRIGGERS = ("boot.scr", "boot.scr.emmc", "boot.scr.sd")  # what makes U-Boot flash from the card
FIRST_SCRIPT = "boot.scr"
MARKERS = ("boot.scr", "boot_emmc.scr")
SUMS = "SHA256SUMS"
MD5_NAME = "md5.txt"
_BLOCK = 4 << 20
_DEFAULT_CLUSTER = 32 << 10  # when the OS does not say: the largest FAT32 cluster, pessimistic

# Desktop metadata: never part of a bundle, never removed, never copied.
_JUNK_DIRS = frozenset(
    {
        "System Volume Information",
        "$RECYCLE.BIN",
        ".Trashes",
        ".Spotlight-V100",
        ".fseventsd",
        ".TemporaryItems",
        "__MACOSX",
    }
)
_JUNK_FILES = frozenset(
    {".DS_Store", "Thumbs.db", "desktop.ini", ".metadata_never_index", ".VolumeIcon.icns"}
)

# Files an AirBox bundle has or had at the top of the card (case-insensitive: FAT may show 8.3 names).
_BUNDLE_FILE = re.compile(
    r"""^(?:
        .+\.\d+-of-\d+\.gz            # chunks
      | [\w.-]+\.(?:scr|cmd)          # U-Boot scripts and their text
      | boot\.scr\.(?:emmc|sd)        # scripts that override boot.scr
      | gpt\.gz | md5\.txt | BOOT | fip\.bin | spi_flash[\w.-]*\.bin
      | partition[\w.-]*\.xml | local_update\.sh
    )$""",
    re.IGNORECASE | re.VERBOSE,
)


class CardError(AirboxError):
    """The card (or the target folder) cannot take the bundle, or did not keep it."""


# --------------------------------------------------------------------------------------------
# The bundle


@dataclass(frozen=True)
class Bundle:
    """The files to put on a card: '/'-paths relative to `card`, with sizes and known digests."""

    card: Path
    sizes: Mapping[str, int]
    sha256: Mapping[str, str]  # from the output folder's SHA256SUMS; empty for a bare card folder
    md5: Mapping[str, str]  # from md5.txt
    sums_file: Path | None

    def order(self) -> list[str]:
        """The copy order: everything sorted, boot.scr last."""
        return sorted(self.sizes, key=lambda n: (n == FIRST_SCRIPT, n))

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def open_bundle(path: Path) -> Bundle:
    """An output folder (`card/` + `SHA256SUMS`) or a card folder (holding boot.scr)."""
    path = Path(path)
    if not path.is_dir():
        raise CardError(
            "not a folder", where=str(path), hint="give the output folder OUTPUT/<name> or its card/ folder"
        )
    sums_file: Path | None = None
    if (path / "card").is_dir():
        card = path / "card"
        if (path / SUMS).is_file():
            sums_file = path / SUMS
    else:
        card = path
    sizes = dict(sorted(list_files(card).items()))
    missing = [m for m in MARKERS if m not in sizes]
    if missing:
        raise CardError(
            f"no bundle here: {' and '.join(missing)} missing",
            where=str(card),
            hint="give the output folder of `airbox-build build` (OUTPUT/<name>) or its card/ folder",
        )
    sha = _read_sums(sums_file, sizes) if sums_file else {}
    md5 = _read_md5(card / MD5_NAME) if MD5_NAME in sizes else {}
    bundle = Bundle(card, sizes, sha, md5, sums_file)
    check_bundle(bundle)
    return bundle


def _read_sums(path: Path, sizes: Mapping[str, int]) -> dict[str, str]:
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        if len(line) > 66 and line[64:66] in ("  ", " *") and line[66:].startswith("card/"):
            sums[line[71:]] = line[:64].lower()
    unlisted = sorted(set(sizes) - set(sums))
    gone = sorted(set(sums) - set(sizes))
    if unlisted or gone:
        detail = []
        if unlisted:
            detail.append(f"not listed: {_preview(unlisted)}")
        if gone:
            detail.append(f"listed but missing: {_preview(gone)}")
        raise CardError(
            f"card/ does not match {SUMS} ({'; '.join(detail)})",
            where=str(path.parent),
            hint="card/ was changed after the build: rebuild it (or, to write it as it is, give the "
            "card/ folder itself)",
        )
    return sums


def _read_md5(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^([0-9a-fA-F]{32}) [ *](.+)$", line)
        if m:
            out[m[2]] = m[1].lower()
    return out


def check_bundle(bundle: Bundle) -> None:
    """What would make the card useless or unwritable, found before the card is touched."""
    for bad in ("boot.scr.emmc", "boot.scr.sd"):
        if bad in bundle.sizes:
            raise CardError(
                "must not be on the card: U-Boot would run it instead of boot.scr",
                where=str(bundle.card / bad),
                hint="rebuild the bundle; airbox-build never puts it there",
            )
    big = [n for n, s in bundle.sizes.items() if s > FAT32_MAX_FILE]
    if big:
        raise CardError(
            f"{_preview(big)}: FAT32 cannot hold a file of 4 GiB or more",
            where=str(bundle.card),
            hint="the chunks must be smaller; rebuild the bundle",
        )


# --------------------------------------------------------------------------------------------
# Listing a card or a folder


def is_junk(rel: str) -> bool:
    """Desktop metadata (macOS, Windows, Android), by '/'-path."""
    parts = rel.split("/")
    return any(p in _JUNK_DIRS for p in parts[:-1]) or parts[-1] in _JUNK_FILES or parts[-1].startswith("._")


def list_files(top: Path) -> dict[str, int]:
    """'/'-path -> size of every regular file below `top`, desktop metadata skipped."""
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        rel_dir = Path(dirpath).relative_to(top).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if d not in _JUNK_DIRS)
        for fn in filenames:
            rel = prefix + fn
            if is_junk(rel):
                continue
            st = os.stat(os.path.join(dirpath, fn))
            if stat.S_ISREG(st.st_mode):
                out[rel] = st.st_size
    return out


def is_bundle_file(rel: str) -> bool:
    """A name an AirBox bundle uses (or used) at the top of the card."""
    return "/" not in rel and bool(_BUNDLE_FILE.match(rel))


MISMATCH_CAUSES = (
    "the card did not keep what was written. Likely causes: a failing card; a faulty card reader or "
    "USB port (try another); a counterfeit card that reports more capacity than it has (writes past "
    "its real size overwrite earlier data: test it with f3 on Linux/macOS or H2testw on Windows). "
    "Do not use this card in the AirBox"
)


def _expected_digests(bundle: Bundle, names: Sequence[str]) -> dict[str, str]:
    """The bundle's sha256 of `names`: from SHA256SUMS, else hashed from the bundle (and md5-checked)."""
    out = {}
    for n in names:
        if n in bundle.sha256:
            out[n] = bundle.sha256[n]
            continue
        sha, md5 = hashlib.sha256(), hashlib.md5()
        with open(bundle.card / n, "rb") as f:
            while block := f.read(_BLOCK):
                sha.update(block)
                md5.update(block)
        _check_source(bundle, n, _Copied(sha.hexdigest(), md5.hexdigest()))
        out[n] = sha.hexdigest()
    return out


def iter_preview(items: Sequence[str], n: int = 6) -> Iterator[str]:
    yield from items[:n]
    if len(items) > n:
        yield f"... ({len(items)} in all)"


def _preview(items: Sequence[str]) -> str:
    return ", ".join(iter_preview(list(items)))


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    if n < 1024:
        return f"{n} bytes"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


@dataclass
class _Copied:
    sha256: str
    md5: str


def _check_source(bundle: Bundle, name: str, copied: _Copied) -> None:
    """The bytes read from the bundle are the ones the build recorded (SHA256SUMS, md5.txt)."""
    want = bundle.sha256.get(name)
    if want is not None and want != copied.sha256:
        raise CardError(
            f"{name} does not match {SUMS} (sha256 {copied.sha256}, recorded {want})",
            where=str(bundle.card),
            hint="the output folder is damaged or was edited: rebuild it. The card has no boot.scr "
            "now, so the AirBox ignores it",
        )
    want_md5 = bundle.md5.get(name)
    if want_md5 is not None and name != MD5_NAME and want_md5 != copied.md5:
        raise CardError(
            f"{name} does not match md5.txt (md5 {copied.md5}, listed {want_md5})",
            where=str(bundle.card),
            hint="the bundle is damaged or was edited: rebuild it",
        )
