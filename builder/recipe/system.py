"""Recipe sections about the box's identity and system settings: identity, ssh, timezone, locale, ntp."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from builder.recipe import schema
from builder.recipe.nodes import KeyPath, Node, _type_error, entry_where, err, expect_bool, expect_str, fields

# the accounts whose passwords the vendor's docs print (FORMAT.md section 6): name -> password
VENDOR_PASSWORDS = {"linaro": "linaro", "admin": "admin"}
_ZONE = re.compile(schema.ZONE_PATTERN)
_LOCALE = re.compile(schema.LOCALE_PATTERN)
_HOST = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


@dataclass(frozen=True)
class Identity:
    """What makes each box its own: SSH host keys and machine-id (secure by default)."""

    ssh_host_keys: str = schema.default(
        schema.IDENTITY_KEYS, "ssh_host_keys"
    )  # regenerate | per-device | keep
    machine_id: str = schema.default(schema.IDENTITY_KEYS, "machine_id")  # reset | keep
    where: str = "identity (default)"
    explicit: bool = False  # written in the recipe, not the default


@dataclass(frozen=True)
class SshConfig:
    password_authentication: bool | None
    permit_root_login: str | None  # sshd's word: no | yes | prohibit-password | forced-commands-only
    where: str


@dataclass(frozen=True)
class Setting:
    """A one-value system setting (timezone, locale) with where the recipe says it."""

    value: str
    where: str


@dataclass(frozen=True)
class Ntp:
    servers: tuple[str, ...]
    where: str


def parse_identity(node: Node) -> Identity:
    path: KeyPath = ("identity",)
    if isinstance(node.value, str):
        if node.value != "keep":
            raise err(
                node,
                path,
                f"identity: {node.value!r} is not understood",
                "write `identity: keep`, or a mapping {ssh_host_keys: ..., machine_id: ...}",
            )
        return Identity("keep", "keep", entry_where(node, path), explicit=True)
    given = fields(node, path, schema.IDENTITY_KEYS)
    keys = _choice(given, path, "ssh_host_keys", schema.SSH_HOST_KEYS, Identity.ssh_host_keys)
    mid = _choice(given, path, "machine_id", schema.MACHINE_ID, Identity.machine_id)
    return Identity(keys, mid, entry_where(node, path), explicit=True)


def _choice(given: dict[str, Node], path: KeyPath, key: str, options: tuple[str, ...], default: str) -> str:
    if key not in given:
        return default
    value = expect_str(given[key], (*path, key))
    if value not in options:
        raise err(given[key], (*path, key), f"{value!r} is not one of: {', '.join(options)}")
    return value


def parse_ssh(node: Node) -> SshConfig:
    path: KeyPath = ("ssh",)
    given = fields(node, path, schema.SSH)
    if not given:
        raise err(node, path, "`ssh` sets nothing", "set password_authentication and/or permit_root_login")
    password = (
        expect_bool(given["password_authentication"], (*path, "password_authentication"))
        if "password_authentication" in given
        else None
    )
    root = None
    if "permit_root_login" in given:
        value = given["permit_root_login"]
        if isinstance(value.value, bool):
            root = "yes" if value.value else "no"
        else:
            root = expect_str(value, (*path, "permit_root_login"))
            words = schema.PERMIT_ROOT_LOGIN
            if root not in words:
                raise err(
                    value,
                    (*path, "permit_root_login"),
                    f"{root!r} is not one of: true, false, {', '.join(words)}",
                )
    return SshConfig(password, root, entry_where(node, path))


def parse_timezone(node: Node) -> Setting:
    path: KeyPath = ("timezone",)
    zone = expect_str(node, path)
    if not _ZONE.fullmatch(zone) or ".." in zone.split("/"):
        raise err(node, path, f"{zone!r} is not a time zone name", "e.g. Asia/Shanghai, Europe/Berlin, UTC")
    return Setting(zone, entry_where(node, path))


def parse_locale(node: Node) -> Setting:
    path: KeyPath = ("locale",)
    name = expect_str(node, path)
    if not _LOCALE.fullmatch(name):
        raise err(node, path, f"{name!r} is not a locale name", "e.g. en_US.UTF-8, zh_CN.UTF-8, C.UTF-8")
    return Setting(name, entry_where(node, path))


def parse_ntp(node: Node) -> Ntp:
    path: KeyPath = ("ntp",)
    if not node.is_list:
        raise _type_error(node, path, "a list of NTP servers", "e.g. ntp: [ntp.aliyun.com, 203.107.6.88]")
    servers = []
    for i, item in enumerate(node.value):
        text = expect_str(item, (*path, i))
        try:
            ipaddress.ip_address(text)
        except ValueError:
            if not _HOST.fullmatch(text):
                raise err(item, (*path, i), f"{text!r} is not a host name or IP address") from None
        if text in servers:
            raise err(item, (*path, i), f"{text} is listed twice")
        servers.append(text)
    if not servers:
        raise err(node, path, "must list at least one server", "or leave `ntp` out to keep the image's")
    return Ntp(tuple(servers), entry_where(node, path))
