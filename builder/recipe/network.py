"""The `network:` section: netplan's common keys, checked for meaning, not only for form.

Checks: addresses are CIDR with a prefix length (and not a subnet's network or broadcast
address); a gateway (gateway4/6, a route's via) lies in a static subnet of its own interface,
unless it is IPv6 link-local, the route is on-link, or the interface has no static address of
that family but uses DHCP for it (then the subnet is unknown); no address is used twice;
interface names are valid Linux names; bond members are declared under ethernets and belong
to one bond only; nameservers are IP addresses.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from builder.recipe import schema
from builder.recipe.nodes import (
    KeyPath,
    Mark,
    Node,
    entry_where,
    err,
    expect_bool,
    expect_int,
    expect_list,
    expect_map,
    expect_str,
    expect_str_list,
    fields,
    key_mark,
)

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAC = re.compile(schema.MAC_PATTERN)
_DOMAIN = re.compile(
    r"([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?"
)


@dataclass(frozen=True)
class Nameservers:
    addresses: tuple[str, ...] = ()
    search: tuple[str, ...] = ()


@dataclass(frozen=True)
class Route:
    to: str  # "default" or a network in CIDR form
    via: str | None = None
    from_: str | None = None
    on_link: bool | None = None
    metric: int | None = None
    table: int | None = None
    scope: str | None = None
    type: str | None = None

    def to_netplan(self) -> dict[str, Any]:
        pairs = (
            ("to", self.to),
            ("via", self.via),
            ("from", self.from_),
            ("on-link", self.on_link),
            ("metric", self.metric),
            ("table", self.table),
            ("scope", self.scope),
            ("type", self.type),
        )
        return {key: value for key, value in pairs if value is not None}


@dataclass(frozen=True)
class Match:
    name: str | None = None
    macaddress: str | None = None
    driver: str | None = None


@dataclass(frozen=True)
class Interface:
    """An entry of ethernets (kind "ethernet") or bonds (kind "bond"), keyed by its netplan id."""

    id: str
    kind: str
    dhcp4: bool | None = None
    dhcp6: bool | None = None
    addresses: tuple[str, ...] = ()  # canonical CIDR, e.g. 192.168.150.1/24
    gateway4: str | None = None
    gateway6: str | None = None
    nameservers: Nameservers | None = None
    optional: bool | None = None
    mtu: int | None = None
    macaddress: str | None = None
    match: Match | None = None
    set_name: str | None = None
    routes: tuple[Route, ...] = ()
    interfaces: tuple[str, ...] = ()  # bonds: member ids
    parameters: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # bonds
    where: str = ""

    @property
    def name(self) -> str:
        """The kernel name the interface ends up with."""
        return self.set_name or self.id

    def to_netplan(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.match is not None:
            out["match"] = {
                k: v
                for k, v in (
                    ("name", self.match.name),
                    ("macaddress", self.match.macaddress),
                    ("driver", self.match.driver),
                )
                if v is not None
            }
        scalars = (
            ("set-name", self.set_name),
            ("macaddress", self.macaddress),
            ("mtu", self.mtu),
            ("dhcp4", self.dhcp4),
            ("dhcp6", self.dhcp6),
        )
        out.update((key, value) for key, value in scalars if value is not None)
        if self.interfaces:
            out["interfaces"] = list(self.interfaces)
        if self.addresses:
            out["addresses"] = list(self.addresses)
        for key, value in (("gateway4", self.gateway4), ("gateway6", self.gateway6)):
            if value is not None:
                out[key] = value
        if self.nameservers is not None:
            servers: dict[str, Any] = {"addresses": list(self.nameservers.addresses)}
            if self.nameservers.search:
                servers["search"] = list(self.nameservers.search)
            out["nameservers"] = servers
        if self.routes:
            out["routes"] = [route.to_netplan() for route in self.routes]
        if self.parameters:
            out["parameters"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.parameters.items()
            }
        if self.optional is not None:
            out["optional"] = self.optional
        return out


@dataclass(frozen=True)
class Network:
    ethernets: tuple[Interface, ...]
    bonds: tuple[Interface, ...]
    renderer: str | None
    where: str

    def to_netplan(self) -> dict[str, Any]:
        """The netplan document (``{"network": {"version": 2, ...}}``) to dump as YAML."""
        network: dict[str, Any] = {"version": 2}
        if self.renderer:
            network["renderer"] = self.renderer
        if self.ethernets:
            network["ethernets"] = {i.id: i.to_netplan() for i in self.ethernets}
        if self.bonds:
            network["bonds"] = {i.id: i.to_netplan() for i in self.bonds}
        return {"network": network}


def parse_network(node: Node, path: KeyPath) -> Network:
    given = fields(node, path, schema.NETWORK)
    if "version" in given and given["version"].value != 2:
        raise err(given["version"], (*path, "version"), "only netplan version 2 exists", "write version: 2")
    renderer = None
    if "renderer" in given:
        renderer = expect_str(given["renderer"], (*path, "renderer"))
        if renderer not in ("networkd", "NetworkManager"):
            raise err(
                given["renderer"],
                (*path, "renderer"),
                f"renderer must be networkd or NetworkManager, found {renderer!r}",
            )
    groups: dict[str, list[Interface]] = {"ethernets": [], "bonds": []}
    for group, kind in (("ethernets", "ethernet"), ("bonds", "bond")):
        if group in given:
            group_node = given[group]
            for ident, item in expect_map(group_node, (*path, group)).items():
                groups[group].append(_interface(ident, item, (*path, group, ident), group_node, kind))
    if not groups["ethernets"] and not groups["bonds"]:
        raise err(
            node,
            path,
            "declares no interface: the box would have no network",
            "declare ethernets (e.g. eth0: {dhcp4: true}), or remove `network:` to keep the image's netplan",
        )
    _check_bonds(given, path, groups["ethernets"], groups["bonds"])
    _check_unique_addresses(given, path, groups)
    return Network(tuple(groups["ethernets"]), tuple(groups["bonds"]), renderer, entry_where(node, path))


def _interface_name(text: str, at: Node | Mark, path: KeyPath, what: str) -> None:
    bad = (
        not 1 <= len(text) <= 15
        or text in (".", "..")
        or any(c in "/:" or c.isspace() or not c.isprintable() for c in text)
    )
    if bad:
        raise err(
            at,
            path,
            f"`{text}` is not a valid {what}",
            "Linux interface names have 1-15 characters, without '/', ':' or spaces, and are not '.' or '..'",
        )


def _interface(ident: str, node: Node, path: KeyPath, group: Node, kind: str) -> Interface:
    given = fields(node, path, schema.ETHERNET if kind == "ethernet" else schema.BOND)
    match = _match(given["match"], (*path, "match")) if "match" in given else None
    if match is None:
        _interface_name(ident, key_mark(group, ident), path, "interface name")
    elif not ident.strip() or "/" in ident:
        raise err(key_mark(group, ident), path, f"`{ident}` is not a valid netplan id")
    set_name = None
    if "set-name" in given:
        if match is None:
            raise err(
                key_mark(node, "set-name"),
                (*path, "set-name"),
                "`set-name` needs a `match`",
                "add match: {macaddress: ...}",
            )
        set_name = expect_str(given["set-name"], (*path, "set-name"))
        _interface_name(set_name, given["set-name"], (*path, "set-name"), "interface name")
    flags: dict[str, bool] = {
        key: expect_bool(given[key], (*path, key)) for key in ("dhcp4", "dhcp6", "optional") if key in given
    }
    addresses: list[IPInterface] = []
    if "addresses" in given:
        for i, item in enumerate(expect_list(given["addresses"], (*path, "addresses"))):
            address = _address(item, (*path, "addresses", i))
            if any(address.ip == a.ip for a in addresses):
                raise err(item, (*path, "addresses", i), f"{address.ip} is listed twice")
            addresses.append(address)
    gateways: dict[str, str] = {}
    for key, version in (("gateway4", 4), ("gateway6", 6)):
        if key in given:
            gateway = _ip(given[key], (*path, key), version)
            _check_gateway(
                gateway, given[key], (*path, key), ident, addresses, flags.get(f"dhcp{version}", False)
            )
            gateways[key] = str(gateway)
    routes: tuple[Route, ...] = ()
    if "routes" in given:
        routes = tuple(
            _route(item, (*path, "routes", i), ident, addresses, flags)
            for i, item in enumerate(expect_list(given["routes"], (*path, "routes")))
        )
    members: tuple[str, ...] = ()
    parameters: Mapping[str, Any] = MappingProxyType({})
    if kind == "bond":
        if "interfaces" not in given:
            raise err(node, (*path, "interfaces"), "a bond needs `interfaces`: the ethernets it bonds")
        members = tuple(text for text, _, _ in expect_str_list(given["interfaces"], (*path, "interfaces")))
        if not members:
            raise err(
                given["interfaces"], (*path, "interfaces"), "a bond needs at least one member interface"
            )
        if "parameters" in given:
            parameters = _bond_parameters(given["parameters"], (*path, "parameters"), members)
    return Interface(
        id=ident,
        kind=kind,
        dhcp4=flags.get("dhcp4"),
        dhcp6=flags.get("dhcp6"),
        addresses=tuple(str(a) for a in addresses),
        gateway4=gateways.get("gateway4"),
        gateway6=gateways.get("gateway6"),
        nameservers=_nameservers(given["nameservers"], (*path, "nameservers"))
        if "nameservers" in given
        else None,
        optional=flags.get("optional"),
        mtu=expect_int(given["mtu"], (*path, "mtu"), low=68, high=65535) if "mtu" in given else None,
        macaddress=_mac(given["macaddress"], (*path, "macaddress")) if "macaddress" in given else None,
        match=match,
        set_name=set_name,
        routes=routes,
        interfaces=members,
        parameters=parameters,
        where=entry_where(node, path),
    )


def _text(node: Node, path: KeyPath, expected: str) -> str:
    # YAML 1.1 reads 11:22:33:44:55:66 as a base-60 integer: take the text as written.
    if isinstance(node.value, int) and not isinstance(node.value, bool) and node.raw and not node.quoted:
        return node.raw
    if not isinstance(node.value, str):
        return expect_str(node, path)  # raises the type error
    return node.value


def _mac(node: Node, path: KeyPath) -> str:
    text = _text(node, path, "a MAC address")
    if not _MAC.fullmatch(text):
        raise err(node, path, f"{text!r} is not a MAC address", "write six hex pairs: 00:11:22:33:44:55")
    return text.lower()


def _match(node: Node, path: KeyPath) -> Match:
    given = fields(node, path, schema.MATCH)
    if not given:
        raise err(node, path, "`match` needs name, macaddress or driver")
    return Match(
        name=expect_str(given["name"], (*path, "name")) if "name" in given else None,
        macaddress=_mac(given["macaddress"], (*path, "macaddress")) if "macaddress" in given else None,
        driver=expect_str(given["driver"], (*path, "driver")) if "driver" in given else None,
    )


def _address(node: Node, path: KeyPath) -> IPInterface:
    text = expect_str(node, path).strip()
    if "/" not in text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise err(
                node, path, f"{text!r} is not an IP address with a prefix length", "e.g. 192.168.150.1/24"
            ) from None
        raise err(node, path, f"{text} needs a prefix length", f"e.g. {text}/24")
    try:
        address = ipaddress.ip_interface(text)
    except ValueError as exc:
        raise err(
            node, path, f"{text!r} is not a valid address in CIDR form ({exc})", "e.g. 192.168.150.1/24"
        ) from None
    network = address.network
    if address.version == 4 and network.prefixlen < 31:
        for special, what in ((network.network_address, "network"), (network.broadcast_address, "broadcast")):
            if address.ip == special:
                raise err(
                    node,
                    path,
                    f"{address.ip} is the {what} address of {network}, not a host address",
                    f"use a host address such as {network.network_address + 1}/{network.prefixlen}",
                )
    return address


def _ip(node: Node, path: KeyPath, version: int | None = None) -> IPAddress:
    text = expect_str(node, path).strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        hint = "write the address without a prefix length" if "/" in text else None
        raise err(node, path, f"{text!r} is not an IP address", hint) from None
    if version is not None and address.version != version:
        raise err(node, path, f"{text} is not an IPv{version} address")
    return address


def _check_gateway(
    gateway: IPAddress, node: Node, path: KeyPath, ident: str, addresses: list[IPInterface], dhcp: bool
) -> None:
    if gateway.version == 6 and gateway.is_link_local:
        return
    same_family = [a for a in addresses if a.version == gateway.version]
    if any(gateway == a.ip for a in same_family):
        raise err(node, path, f"the gateway {gateway} is an address of {ident} itself")
    if any(gateway in a.network for a in same_family):
        return
    if not same_family:
        if dhcp:
            return
        raise err(
            node,
            path,
            f"{ident} has no static IPv{gateway.version} address, so {gateway} cannot be reached",
            f"add an address in the gateway's subnet to {ident}, or enable dhcp{gateway.version}",
        )
    subnets = ", ".join(str(a.network) for a in same_family)
    raise err(
        node,
        path,
        f"the gateway {gateway} is outside the subnets of {ident} ({subnets})",
        "fix the gateway or the prefix length of the address",
    )


def _route(
    node: Node, path: KeyPath, ident: str, addresses: list[IPInterface], flags: Mapping[str, bool]
) -> Route:
    given = fields(node, path, schema.ROUTE)
    to_text = expect_str(given["to"], (*path, "to")).strip()
    version = None
    if to_text != "default":
        try:
            network = ipaddress.ip_network(to_text, strict=False)
        except ValueError:
            raise err(
                given["to"],
                (*path, "to"),
                f"{to_text!r} is not a network in CIDR form or `default`",
                "e.g. 0.0.0.0/0 or 10.0.0.0/8",
            ) from None
        to_text, version = str(network), network.version
    on_link = expect_bool(given["on-link"], (*path, "on-link")) if "on-link" in given else None
    via = None
    if "via" in given:
        gateway = _ip(given["via"], (*path, "via"), version)
        if not on_link:
            dhcp = flags.get(f"dhcp{gateway.version}", False)
            _check_gateway(gateway, given["via"], (*path, "via"), ident, addresses, dhcp)
        via = str(gateway)
    scope = type_ = None
    if "scope" in given:
        scope = expect_str(given["scope"], (*path, "scope"))
        if scope not in ("global", "link", "host"):
            raise err(
                given["scope"], (*path, "scope"), f"scope must be global, link or host, found {scope!r}"
            )
    if "type" in given:
        type_ = expect_str(given["type"], (*path, "type"))
        if type_ not in ("unicast", "unreachable", "blackhole", "prohibit"):
            raise err(
                given["type"],
                (*path, "type"),
                f"type must be unicast, unreachable, blackhole or prohibit, found {type_!r}",
            )
    return Route(
        to=to_text,
        via=via,
        from_=str(_ip(given["from"], (*path, "from"))) if "from" in given else None,
        on_link=on_link,
        metric=expect_int(given["metric"], (*path, "metric"), low=0) if "metric" in given else None,
        table=expect_int(given["table"], (*path, "table"), low=0) if "table" in given else None,
        scope=scope,
        type=type_,
    )


def _nameservers(node: Node, path: KeyPath) -> Nameservers:
    if node.is_list:
        return Nameservers(tuple(str(_ip(item, (*path, i))) for i, item in enumerate(node.value)))
    if not node.is_map:
        raise err(
            node,
            path,
            "expected a list of IP addresses or {addresses: [...], search: [...]}",
            "e.g. nameservers: [223.5.5.5, 119.29.29.29]",
        )
    given = fields(node, path, schema.NAMESERVERS_KEYS)
    addresses: tuple[str, ...] = ()
    if "addresses" in given:
        items = expect_list(given["addresses"], (*path, "addresses"))
        addresses = tuple(str(_ip(item, (*path, "addresses", i))) for i, item in enumerate(items))
    search: list[str] = []
    if "search" in given:
        for text, item, item_path in expect_str_list(given["search"], (*path, "search")):
            if len(text) > 253 or not _DOMAIN.fullmatch(text):
                raise err(item, item_path, f"{text!r} is not a domain name", "e.g. lab.example.net")
            search.append(text)
    return Nameservers(addresses, tuple(search))


def _bond_parameters(node: Node, path: KeyPath, members: tuple[str, ...]) -> Mapping[str, Any]:
    given = fields(node, path, schema.BOND_PARAMETERS)
    out: dict[str, Any] = {}
    for key, value in given.items():
        key_path = (*path, key)
        if key in schema.BOND_CHOICES:
            text = expect_str(value, key_path)
            if text not in schema.BOND_CHOICES[key]:
                raise err(
                    value,
                    key_path,
                    f"{text!r} is not a {key}",
                    f"one of: {', '.join(schema.BOND_CHOICES[key])}",
                )
            out[key] = text
        elif key in schema.BOND_NUMBERS:
            out[key] = expect_int(value, key_path, low=0)
        elif key in schema.BOND_DURATIONS:
            out[key] = _duration(value, key_path)
        elif key == "all-slaves-active":
            out[key] = expect_bool(value, key_path)
        elif key == "arp-ip-targets":
            items = expect_list(value, key_path)
            out[key] = tuple(str(_ip(item, (*key_path, i), 4)) for i, item in enumerate(items))
        else:  # primary
            primary = expect_str(value, key_path)
            if primary not in members:
                raise err(
                    value,
                    key_path,
                    f"the primary {primary} is not a member of the bond ({', '.join(members)})",
                )
            out[key] = primary
    return MappingProxyType(out)


def _duration(node: Node, path: KeyPath) -> int | str:
    if isinstance(node.value, str) and re.fullmatch(r"[0-9]+(ms|s)?", node.value.strip()):
        return node.value.strip()
    return expect_int(node, path, low=0)


def _check_bonds(
    given: Mapping[str, Node], path: KeyPath, ethernets: list[Interface], bonds: list[Interface]
) -> None:
    declared = {e.id for e in ethernets}
    owner: dict[str, str] = {}
    for bond in bonds:
        bond_node = given["bonds"].value[bond.id]
        if bond.id in declared:
            raise err(
                key_mark(given["bonds"], bond.id),
                (*path, "bonds", bond.id),
                f"`{bond.id}` is declared both as an ethernet and as a bond",
            )
        for i, member in enumerate(bond.interfaces):
            member_path = (*path, "bonds", bond.id, "interfaces", i)
            member_node = bond_node.value["interfaces"].value[i]
            if member not in declared:
                raise err(
                    member_node,
                    member_path,
                    f"the bond member {member} is not declared under network.ethernets",
                    f"add it: ethernets: {{{member}: {{}}}}",
                )
            if member in owner:
                raise err(
                    member_node, member_path, f"{member} is already a member of the bond {owner[member]}"
                )
            owner[member] = bond.id


def _check_unique_addresses(
    given: Mapping[str, Node], path: KeyPath, groups: Mapping[str, list[Interface]]
) -> None:
    seen: dict[Any, tuple[str, int]] = {}
    for group, interfaces in groups.items():
        for interface in interfaces:
            items = given[group].value[interface.id].value.get("addresses")
            for i, text in enumerate(interface.addresses):
                ip = ipaddress.ip_interface(text).ip
                item = items.value[i]
                if ip in seen:
                    other, line = seen[ip]
                    raise err(
                        item,
                        (*path, group, interface.id, "addresses", i),
                        f"{ip} is already an address of {other} (line {line})",
                        "every address must be unique across interfaces",
                    )
                seen[ip] = (interface.id, item.mark.line)
