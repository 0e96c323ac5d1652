"""`devices:` — a fleet from one recipe: each device a fragment deep-merged over the recipe.

The list is inline or a CSV file (columns: name, hostname, then vars.<key>). Every device becomes
a complete recipe of its own; names, hostnames and static addresses must not repeat.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from builder.errors import RecipeError
from builder.recipe import schema
from builder.recipe.nodes import (
    KeyPath,
    Mark,
    Node,
    _shown,
    _type_error,
    entry_where,
    err,
    expect_str,
    unknown_key,
)
from builder.recipe.values import _NAME, local_path

if TYPE_CHECKING:
    from builder.recipe.model import Recipe

_VAR = re.compile(r"vars\.([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Device:
    name: str
    recipe: Recipe  # the recipe with this device's fragment merged over it
    where: str  # file:line of the entry


def parse_devices(
    node: Node,
    recipe: Recipe,
    merged: Callable[[Node, str], Recipe],
) -> tuple[Device, ...]:
    path: KeyPath = ("devices",)
    if isinstance(node.value, str):
        fragments = _read_csv(local_path(node, path, kind="file", check=True), node)
    elif node.is_list:
        fragments = [(item, (*path, i)) for i, item in enumerate(node.value)]
    else:
        raise _type_error(node, path, "a list of devices or the path of a CSV file")
    if not fragments:
        raise err(node, path, "lists no device", "leave `devices` out to build one bundle")
    devices: list[Device] = []
    seen: dict[str, dict[str, str]] = {"name": {}, "hostname": {}, "address": {}}  # value -> where
    for item, item_path in fragments:
        if not item.is_map:
            raise _type_error(item, item_path, "a mapping with at least `name`")
        for key in item.value:
            if key not in schema.keys_of(schema.DEVICE).names:
                raise unknown_key(item, item_path, key, schema.keys_of(schema.DEVICE).names)
        if "name" not in item.value or item.value["name"].value is None:
            raise err(item, (*item_path, "name"), "every device needs a `name`", "e.g. name: site-a")
        name_node = item.value["name"]
        name = expect_str(name_node, (*item_path, "name"))
        if not _NAME.fullmatch(name) or name.startswith(".") or name == "_shared":
            raise err(
                name_node, (*item_path, "name"), f"`{name}` is not a valid device name", "use a-z, 0-9, . _ -"
            )
        fragment = Node(
            {k: v for k, v in item.value.items() if k != "name"},
            item.mark,
            key_marks={k: m for k, m in item.key_marks.items() if k != "name"},
        )
        where = entry_where(item, item_path)
        device = Device(name, merged(fragment, name), where)
        _unique(seen["name"], name, "name", where, name_node)
        if device.recipe.hostname:
            at = item.value.get("hostname", item)
            _unique(seen["hostname"], device.recipe.hostname, "hostname", where, at)
        for address in static_addresses(device.recipe):
            at = item.value.get("network", item)
            _unique(seen["address"], address, "static address", where, at)
        devices.append(device)
    return tuple(devices)


def _unique(seen: dict[str, str], value: str, what: str, where: str, at: Node) -> None:
    if value in seen:
        raise RecipeError(
            f"{what} {value} is used by two devices: {seen[value]} and this one",
            where=f"{at.mark}: devices ({where})",
            hint="every device needs its own; change one of the two entries",
        )
    seen[value] = where


def static_addresses(recipe: Recipe) -> list[str]:
    """The IP addresses (no prefix) the recipe gives its interfaces and bonds."""
    if recipe.network is None:
        return []
    out = []
    for ifc in (*recipe.network.ethernets, *recipe.network.bonds):
        out += [a.split("/")[0] for a in ifc.addresses]
    return out


def _read_csv(file: Path, node: Node) -> list[tuple[Node, KeyPath]]:
    shown = _shown(file)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise err(node, ("devices",), f"cannot read {shown}: {e}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise err(
            node,
            ("devices",),
            f"{shown} is empty",
            "its first line names the columns: name,hostname,vars.site",
        )
    header = [h.strip() for h in rows[0]]
    head_mark = Mark(file, shown, 1, 1)
    if "name" not in header:
        raise RecipeError(
            f"{shown} has no `name` column", where=f"{head_mark}", hint="first line: name,hostname,vars.site"
        )
    for col in header:
        if col not in ("name", "hostname") and not _VAR.fullmatch(col):
            raise RecipeError(
                f"unknown column `{col}` in {shown}",
                where=str(head_mark),
                hint="columns are name, hostname and vars.<key> (e.g. vars.site)",
            )
    if len(set(header)) != len(header):
        raise RecipeError(f"{shown} names a column twice", where=str(head_mark))
    out: list[tuple[Node, KeyPath]] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        mark = Mark(file, shown, line, 1)
        if len(row) != len(header):
            raise RecipeError(
                f"line {line} of {shown} has {len(row)} fields, the header {len(header)}", where=str(mark)
            )
        values: dict[str, Node] = {}
        var_nodes: dict[str, Node] = {}
        for col, cell in zip(header, row, strict=True):
            cell = cell.strip()
            if not cell:
                continue
            m = _VAR.fullmatch(col)
            if m:
                var_nodes[m[1]] = Node(cell, mark, raw=cell, quoted=True)
            else:
                values[col] = Node(cell, mark, raw=cell, quoted=True)
        if var_nodes:
            values["vars"] = Node(var_nodes, mark, key_marks={k: mark for k in var_nodes})
        out.append((Node(values, mark, key_marks={k: mark for k in values}), ("devices", line - 2)))
    return out


def device_by_name(recipe: Recipe, name: str) -> Recipe:
    for d in recipe.devices:
        if d.name == name:
            return d.recipe
    known = ", ".join(d.name for d in recipe.devices) or "none: the recipe has no `devices`"
    raise RecipeError(f"no device {name!r} in {recipe.path.name}", hint=f"devices: {known}")
