"""Files, overlays and removals."""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path
from typing import Any

from builder.customise.context import Customiser
from builder.customise.templating import render_file, render_string
from builder.errors import RecipeError


def template_vars(c: Customiser) -> dict[str, Any]:
    r = c.recipe
    return {
        "recipe": {"name": r.name, "description": r.description, "hostname": r.hostname, "path": str(r.path)},
        "vars": dict(r.vars),
    }


def files(c: Customiser) -> None:
    variables = template_vars(c)
    for f in c.recipe.files:
        uid, gid = c.owner(f.owner, f.where)
        if f.content is not None:
            data = render_string(f.content, variables, f"{f.where}.content").encode()
            c.write(f.path, data=data, mode=f.mode, uid=uid, gid=gid, origin=f.where, layer=f.layer)
        elif f.template is not None:
            data = render_file(f.template, variables).encode()
            c.write(f.path, data=data, mode=f.mode, uid=uid, gid=gid, origin=f.where, layer=f.layer)
        elif f.source is not None:
            _check_regular(f.source, f.where)
            c.write(f.path, src=f.source, mode=f.mode, uid=uid, gid=gid, origin=f.where, layer=f.layer)
        elif f.input is not None:
            src = c.fetched.get(f.input)
            if src is None:
                raise RecipeError(f"input for {f.path} was not fetched", where=f.where)
            c.write(f.path, src=src, mode=f.mode, uid=uid, gid=gid, origin=f.where, layer=f.layer)


def _check_regular(path: Path, where: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise RecipeError(f"cannot read {path}: {e.strerror}", where=where) from None
    if not stat.S_ISREG(st.st_mode):
        raise RecipeError(f"{path} is not a regular file", where=where)


def overlays(c: Customiser) -> None:
    variables = template_vars(c)
    for ov in c.recipe.overlays:
        root = ov.path
        if not root.is_dir():
            raise RecipeError(f"overlay folder {root} does not exist", where=ov.where)
        uid, gid = c.owner(ov.owner, ov.where)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            here = Path(dirpath)
            rel_dir = here.relative_to(root).as_posix()
            device_dir = "/" if rel_dir == "." else "/" + rel_dir
            for name in list(dirnames):
                p = here / name
                if p.is_symlink():  # never descend through a link: lay it down as a link
                    dirnames.remove(name)
                    _overlay_link(c, p, posixpath.join(device_dir, name), uid, gid, ov.where)
                    continue
                mode = _overlay_mode(p.lstat().st_mode)
                if device_dir == "/" and name in ("boot", "recovery"):
                    raise RecipeError(
                        f"overlay {root} has a {name}/ folder; writing under /{name} is not supported",
                        where=ov.where,
                    )
                c.mkdir(
                    posixpath.join(device_dir, name), mode=mode, uid=uid, gid=gid, origin=f"{ov.where} {p}"
                )
            for name in sorted(filenames):
                p = here / name
                device = posixpath.join(device_dir, name)
                origin = f"{ov.where} {p}"
                st = p.lstat()
                if stat.S_ISLNK(st.st_mode):
                    _overlay_link(c, p, device, uid, gid, ov.where)
                elif not stat.S_ISREG(st.st_mode):
                    raise RecipeError(f"{p} is not a regular file, folder or symlink", where=ov.where)
                elif name.endswith(".j2"):
                    data = render_file(p, variables).encode()
                    c.write(
                        device[: -len(".j2")],
                        data=data,
                        mode=_overlay_mode(st.st_mode),
                        uid=uid,
                        gid=gid,
                        origin=origin,
                    )
                else:
                    c.write(device, src=p, mode=_overlay_mode(st.st_mode), uid=uid, gid=gid, origin=origin)


def _overlay_mode(st_mode: int) -> int:
    """The host mode without group/other write: a checkout made with umask 002 (0664/0775)
    gives the same image as one made with umask 022, and no /etc file becomes group-writable."""
    return stat.S_IMODE(st_mode) & ~0o022


def _overlay_link(c: Customiser, link: Path, device: str, uid: int, gid: int, where: str) -> None:
    """Lay a symlink down as a symlink; a relative one must not climb above the device's root."""
    target = os.readlink(link)
    if not target.startswith("/"):
        stack = [p for p in posixpath.dirname(device).split("/") if p]
        for part in target.split("/"):
            if part == "..":
                if not stack:
                    raise RecipeError(
                        f"symlink {link} -> {target} points out of the overlay (above the device's root)",
                        where=where,
                        hint="use an absolute device path as the target, or a link inside the tree",
                    )
                stack.pop()
            elif part not in ("", "."):
                stack.append(part)
    c.symlink(device, target, uid=uid, gid=gid, origin=f"{where} {link}")


def remove(c: Customiser) -> None:
    for r in c.recipe.remove:
        if not c.remove(r.path, origin=r.where):
            c.reporter.warn(f"{r.where}: {r.path} is not in the image; nothing to remove")
