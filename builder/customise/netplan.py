"""Render netplan in the vendor's style: 8-space indents and `addresses: [..]` flow lists.

The vendor's `bm_set_ip` edits 01-netcfg.yaml with sed over the range from `<if>:` to the
next `optional` line, replacing its `addresses:` line. So every ethernet gets an
`addresses:` line and, right after it, `optional:`; everything else follows, outside
that range, where the sed cannot touch it (e.g. nameservers' own `addresses`).
"""

from __future__ import annotations

from typing import Any

import yaml

from builder.recipe.network import Interface, Network

INDENT = " " * 8
_FIRST = ("match", "set-name", "macaddress", "dhcp4", "dhcp6", "addresses", "optional")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("\n...").strip()


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()


def _emit(key: str, value: Any, depth: int, out: list[str]) -> None:
    pad = INDENT * depth
    if isinstance(value, dict):
        out.append(f"{pad}{key}:")
        for k, v in value.items():
            _emit(k, v, depth + 1, out)
    elif isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            out.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            out.append(f"{pad}{key}:")
            for item in value:
                out.append(f"{pad}{INDENT}- {_flow(item)}")
    else:
        out.append(f"{pad}{key}: {_scalar(value)}")


def _ordered(iface: Interface) -> dict[str, Any]:
    doc = iface.to_netplan()
    if iface.kind == "ethernet":
        doc.setdefault("addresses", [])
        doc.setdefault("optional", True if iface.optional is None else iface.optional)
    ordered = {k: doc[k] for k in _FIRST if k in doc}
    ordered.update({k: v for k, v in doc.items() if k not in ordered})
    return ordered


def render_netplan(network: Network, recipe_name: str) -> str:
    out = [f"# Written by airbox-build from recipe {recipe_name}", "network:"]
    _emit("version", 2, 1, out)
    _emit("renderer", network.renderer or "networkd", 1, out)
    for section, ifaces in (("ethernets", network.ethernets), ("bonds", network.bonds)):
        if not ifaces:
            continue
        out.append(f"{INDENT}{section}:")
        for iface in ifaces:
            _emit(iface.id, _ordered(iface), 2, out)
    return "\n".join(out) + "\n"
