"""`timezone`, `locale`, `ntp`: checked against what the image can provide, then set as the
box's own tools would (timedatectl, update-locale, a timesyncd drop-in)."""

from __future__ import annotations

import difflib
import posixpath
import struct

from builder.customise.context import ROOTFS, Customiser
from builder.customise.services import find_unit
from builder.errors import RecipeError
from builder.fs.ext4 import FileType

ZONEINFO = "/usr/share/zoneinfo"
LOCALE_DIR = "/usr/lib/locale"
LOCALE_ARCHIVE = f"{LOCALE_DIR}/locale-archive"
ARCHIVE_MAGIC = 0xDE020109  # glibc locale/locarchive.h AR_MAGIC
TIMESYNCD_DROP_IN = "/etc/systemd/timesyncd.conf.d/50-airbox-build.conf"
BUILTIN_LOCALES = {"C", "POSIX"}


def timezone(c: Customiser) -> None:
    tz = c.recipe.timezone
    if tz is None:
        return
    target = posixpath.join(ZONEINFO, tz.value)
    st = c.image(ROOTFS).resolve(target)
    if st is None or st.type is not FileType.FILE:
        raise RecipeError(
            f"time zone {tz.value} is not in the image's {ZONEINFO}",
            where=tz.where,
            hint=_zone_hint(c, tz.value),
        )
    c.symlink("/etc/localtime", target, uid=0, gid=0, origin=tz.where)
    c.write("/etc/timezone", data=f"{tz.value}\n".encode(), origin=tz.where, keep_existing_attrs=True)


def _zone_hint(c: Customiser, zone: str) -> str:
    area = posixpath.dirname(zone)
    folder = posixpath.join(ZONEINFO, area) if area else ZONEINFO
    st = c.image(ROOTFS).resolve(folder)
    names = c.image(ROOTFS).listdir(folder) if st is not None and st.is_dir else []
    close = difflib.get_close_matches(posixpath.basename(zone), names, n=3)
    if close:
        return "did you mean " + ", ".join(posixpath.join(area, n) for n in close) + "?"
    return "names are Area/City as in tzdata, e.g. Asia/Shanghai (install tzdata on the box if it lacks it)"


def normalise_locale(name: str) -> str:
    """glibc's normalised name: en_US.UTF-8 -> en_US.utf8 (codeset lower-cased, '-' dropped)."""
    lang, dot, rest = name.partition(".")
    if not dot:
        return name
    codeset, at, modifier = rest.partition("@")
    norm = "".join(ch for ch in codeset.lower() if ch.isalnum())
    return f"{lang}.{norm}{at}{modifier}"


def archive_locales(data: bytes) -> set[str]:
    """The locale names in a glibc locale-archive (its header's string table)."""
    if len(data) < 32:
        return set()
    for order in ("<", ">"):
        magic, _serial, _nh_off, _nh_used, _nh_size, str_off, str_used, _str_size = struct.unpack(
            order + "8I", data[:32]
        )
        if magic == ARCHIVE_MAGIC:
            table = data[str_off : str_off + str_used]
            return {s.decode("utf-8", "replace") for s in table.split(b"\0") if s}
    return set()


def available_locales(c: Customiser) -> set[str]:
    img = c.image(ROOTFS)
    found = set(BUILTIN_LOCALES)
    st = img.resolve(LOCALE_DIR)
    if st is not None and st.is_dir:
        found |= {e.name for e in img.scandir(LOCALE_DIR) if e.type is FileType.DIR}
    ast = img.resolve(LOCALE_ARCHIVE)
    if ast is not None and ast.type is FileType.FILE:
        found |= archive_locales(img.read_file(LOCALE_ARCHIVE, max_bytes=max(ast.size, 1)))
    return found


def locale(c: Customiser) -> None:
    loc = c.recipe.locale
    if loc is None:
        return
    have = available_locales(c)
    if loc.value not in have and normalise_locale(loc.value) not in have:
        listed = sorted(have - BUILTIN_LOCALES)
        raise RecipeError(
            f"locale {loc.value} is not in the image: neither {LOCALE_DIR}/{normalise_locale(loc.value)} "
            f"nor an entry of {LOCALE_ARCHIVE}",
            where=loc.where,
            hint=f"the image has: {', '.join(listed) or 'only C/POSIX'}; pick one, or generate it "
            "on a box (locale-gen) and build from that image",
        )
    c.write(
        "/etc/default/locale",
        data=f"LANG={loc.value}\n".encode(),
        mode=0o644,
        origin=loc.where,
        keep_existing_attrs=True,
    )


def ntp(c: Customiser) -> None:
    conf = c.recipe.ntp
    if conf is None:
        return
    if find_unit(c, "systemd-timesyncd.service") is None:
        raise RecipeError(
            "`ntp` writes a systemd-timesyncd drop-in, and the image has no systemd-timesyncd.service",
            where=conf.where,
            hint="install systemd-timesyncd in the image, or configure the box's NTP client with `files:`",
        )
    c.mkdir(posixpath.dirname(TIMESYNCD_DROP_IN), mode=0o755, uid=0, gid=0, origin=conf.where)
    text = f"# Written by airbox-build for {c.recipe.name}\n[Time]\nNTP={' '.join(conf.servers)}\n"
    c.write(TIMESYNCD_DROP_IN, data=text.encode(), mode=0o644, origin=conf.where)
