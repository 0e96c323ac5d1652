"""Recipe sections that write one system file each: hostname, network, apt, pip."""

from __future__ import annotations

import re
import shlex
from urllib.parse import urlsplit

from builder.customise.context import Customiser
from builder.customise.netplan import render_netplan
from builder.customise.templating import render_builtin
from builder.errors import RecipeError

NETPLAN = "/etc/netplan/01-netcfg.yaml"


def hostname(c: Customiser) -> None:
    name = c.recipe.hostname
    if not name:
        return
    where = f"{c.recipe.path.name}: hostname"
    c.write("/etc/hostname", data=f"{name}\n".encode(), origin=where, keep_existing_attrs=True)
    hosts = c.read_text_root("/etc/hosts") or "127.0.0.1\tlocalhost\n"
    lines = hosts.splitlines()
    for i, line in enumerate(lines):
        if line.split()[:1] == ["127.0.1.1"]:
            lines[i] = f"127.0.1.1\t{name}"
            break
    else:
        at = next((i + 1 for i, ln in enumerate(lines) if ln.split()[:1] == ["127.0.0.1"]), 0)
        lines.insert(at, f"127.0.1.1\t{name}")
    c.write("/etc/hosts", data=("\n".join(lines) + "\n").encode(), origin=where, keep_existing_attrs=True)


def network(c: Customiser) -> None:
    net = c.recipe.network
    if net is None:
        return
    text = render_netplan(net, c.recipe.name)
    c.write(NETPLAN, data=text.encode(), mode=0o600, uid=0, gid=0, origin=net.where)


def os_codename(c: Customiser, where: str) -> str:
    text = c.read_text_root("/etc/os-release") or ""
    values = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq:
            try:
                values[key.strip()] = " ".join(shlex.split(value))
            except ValueError:
                values[key.strip()] = value.strip().strip("\"'")
    code = values.get("VERSION_CODENAME") or values.get("UBUNTU_CODENAME")
    if not code or not re.fullmatch(r"[a-z][a-z0-9-]*", code):
        raise RecipeError(
            "the image's /etc/os-release names no VERSION_CODENAME",
            where=where,
            hint="list the suites in the recipe: apt: {suites: [focal, focal-updates, ...]}",
        )
    return code


def apt(c: Customiser) -> None:
    section = c.recipe.apt
    if section is None:
        return
    if section.suites is not None:
        suites = list(section.suites)
    else:
        code = os_codename(c, section.where)
        suites = [code, f"{code}-updates", f"{code}-backports", f"{code}-security"]
    mirror = section.mirror if section.mirror.endswith("/") else section.mirror + "/"
    text = render_builtin(
        "sources.list.j2",
        {"recipe_name": c.recipe.name, "mirror": mirror, "suites": suites, "components": section.components},
    )
    c.write("/etc/apt/sources.list", data=text.encode(), mode=0o644, origin=section.where)


def pip(c: Customiser) -> None:
    section = c.recipe.pip
    if section is None:
        return
    trusted = list(section.trusted_host) or sorted(
        {urlsplit(u).hostname or "" for u in (section.index_url, *section.extra_index_urls)} - {""}
    )
    text = render_builtin(
        "pip.conf.j2",
        {
            "recipe_name": c.recipe.name,
            "index_url": section.index_url,
            "extra_index_urls": list(section.extra_index_urls),
            "trusted_host": trusted,
        },
    )
    c.write("/etc/pip.conf", data=text.encode(), mode=0o644, origin=section.where)
