"""systemd units enabled or disabled by symlink, as `systemctl enable` would; nothing runs."""

from __future__ import annotations

import configparser
import posixpath

from builder.customise.context import OVERLAY_UPPER, ROOTFS_RW, Customiser
from builder.errors import RecipeError
from builder.fs.ext4 import FileType

UNIT_DIRS = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
ETC = "/etc/systemd/system"


def find_unit(c: Customiser, unit: str) -> tuple[str, str] | None:
    """(path, text) of a unit file in the image, following symlinks."""
    for d in UNIT_DIRS:
        text = c.read_text_root(posixpath.join(d, unit))
        if text is not None:
            return posixpath.join(d, unit), text
    return None


def install_section(text: str, where: str) -> dict[str, list[str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text)
    except configparser.Error as e:
        raise RecipeError(f"cannot parse the unit file: {e}", where=where) from None
    if not parser.has_section("Install"):
        return {}
    return {k: v.split() for k, v in parser.items("Install")}


def wanted_links(unit: str, unit_path: str, install: dict[str, list[str]]) -> list[tuple[str, str]]:
    """The symlinks `systemctl enable` makes: (link path, target)."""
    target = unit_path
    links = []
    for key, suffix in (("WantedBy", ".wants"), ("RequiredBy", ".requires")):
        for t in install.get(key, []):
            links.append((f"{ETC}/{t}{suffix}/{unit}", target))
    for alias in install.get("Alias", []):
        links.append((f"{ETC}/{alias}", target))
    return links


def services(c: Customiser) -> None:
    sv = c.recipe.services
    for unit in sv.enable:
        found = find_unit(c, unit)
        if found is None:
            raise RecipeError(
                f"cannot enable {unit}: no unit file in {', '.join(UNIT_DIRS)} of the image",
                where=sv.where,
                hint="add the unit with `files:` or an overlay, or check its name",
            )
        path, text = found
        links = wanted_links(unit, path, install_section(text, f"{path} in the image"))
        if not links:
            raise RecipeError(
                f"cannot enable {unit}: its [Install] section names no WantedBy/RequiredBy/Alias",
                where=sv.where,
            )
        for link, target in links:
            c.symlink(link, target, uid=0, gid=0, origin=sv.where)
    if sv.disable:
        _disable(c, set(sv.disable), sv.where)


def _disable(c: Customiser, units: set[str], where: str) -> None:
    """Remove every enablement symlink of the units, in ROOTFS and in the overlay's upper layer."""
    found: set[str] = set()
    trees = [("ROOTFS", ETC, "")]
    if c.has_partition(ROOTFS_RW) and c.partition(ROOTFS_RW).chunks:
        trees.append((ROOTFS_RW, OVERLAY_UPPER + ETC, OVERLAY_UPPER))
    removed: set[str] = set()
    for label, top, prefix in trees:
        img = c.image(label)
        if img.stat(top) is None:
            continue
        for dirpath, dirs, files in img.walk(top):
            for entry in [*dirs, *files]:
                if entry.name in units and entry.type == FileType.SYMLINK:
                    device = posixpath.join(dirpath, entry.name)[len(prefix) :]
                    if device not in removed:
                        c.remove(device, origin=where)
                        removed.add(device)
                    found.add(entry.name)
    for unit in sorted(units - found):
        c.reporter.warn(f"{where}: {unit} is not enabled in the image; nothing to disable")
