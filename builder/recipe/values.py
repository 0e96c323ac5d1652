"""Value forms of a recipe: URLs, checksums, paths, owners, modes, unit names and inputs."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from builder.inputs import InputSpec
from builder.recipe import schema
from builder.recipe.nodes import (
    KeyPath,
    Mark,
    Node,
    _type_error,
    entry_where,
    err,
    exactly_one,
    expect_int,
    expect_str,
    expect_str_list,
)

# ---------------------------------------------------------------------------------------------
# Value forms: URLs, checksums, paths, owners, modes, names.
# ---------------------------------------------------------------------------------------------

_NAME = re.compile(schema.NAME_PATTERN)
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_SUITE = re.compile(schema.SUITE_PATTERN)
_FAT_LABEL = re.compile(schema.FAT_LABEL_PATTERN)
_LABEL = re.compile(schema.LABEL_PATTERN)
_ENV_NAME = re.compile(schema.ENV_NAME_PATTERN)
_SSH_KEY = re.compile(
    r"(^|\s)(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)\s+[A-Za-z0-9+/]+={0,3}(\s|$)"
)
_CRYPT = re.compile(r"!?\$(1|2a|2b|2x|2y|5|6|7|y|gy|sha1|md5)\$[A-Za-z0-9./=,+$-]*\$[A-Za-z0-9./=+-]+|[!*]")
_PLAINTEXT_HINT = (
    "plaintext passwords are refused; make a hash with `openssl passwd -6` or `mkpasswd -m sha-512`"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEX = re.compile(r"[0-9a-fA-F]+")
_ACCOUNT = re.compile(schema.ACCOUNT_PATTERN)
_UNIT = re.compile(schema.UNIT_PATTERN)


def check_url(text: str, at: Node | Mark, path: KeyPath, schemes: tuple[str, ...] = ("http", "https")) -> str:
    """A URL with one of ``schemes`` and, for http(s), a host."""
    if _CONTROL.search(text) or any(c.isspace() for c in text):
        raise err(
            at, path, f"a URL cannot contain spaces or control characters: {text!r}", "percent-encode them"
        )
    try:
        parts = urllib.parse.urlsplit(text)
        host = parts.hostname
        _ = parts.port
    except ValueError as exc:
        raise err(at, path, f"{text!r} is not a valid URL ({exc})") from None
    if parts.scheme not in schemes:
        found = f"`{parts.scheme}:`" if parts.scheme else "none"
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise err(at, path, f"the URL scheme must be one of {allowed}; found {found} in {text!r}")
    if parts.scheme in ("http", "https") and not host:
        raise err(at, path, f"the URL {text!r} has no host")
    if parts.scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path.startswith("/")):
        raise err(
            at,
            path,
            f"a file: URL needs an absolute path: {text!r}",
            "write file:///abs/path, or use `path:`",
        )
    return text


def expect_url(node: Node, path: KeyPath, schemes: tuple[str, ...] = ("http", "https")) -> str:
    return check_url(expect_str(node, path), node, path, schemes)


def _checksum(node: Node, path: KeyPath, algorithm: str, digits: int) -> str:
    # An all-digit md5 is read by YAML as an integer: take the text as written.
    text = node.raw if isinstance(node.value, int) and not node.quoted and node.raw else node.value
    if not isinstance(text, str):
        raise _type_error(node, path, f"a string of {digits} hex digits")
    text = text.strip()
    if len(text) != digits or not _HEX.fullmatch(text):
        raise err(
            node,
            path,
            f"{algorithm} must be {digits} hex digits, found {len(text)} characters: {text[:80]!r}",
            f"copy the first field of `{algorithm}sum FILE`",
        )
    return text.lower()


def device_path(node: Node, path: KeyPath, *, allow_root: bool = False, directory: bool = False) -> str:
    """An absolute path on the device, normalised (``//`` and ``.`` removed); ``..`` refused."""
    text = expect_str(node, path)
    if not text.isprintable():
        raise err(node, path, f"a device path cannot contain control or invisible characters: {text!r}")
    if not text.startswith("/"):
        raise err(node, path, f"must be an absolute path on the device, found {text!r}", f"write /{text}")
    components = [c for c in text.split("/") if c not in ("", ".")]
    if ".." in components:
        raise err(node, path, f"must not contain `..`: {text!r}", "write the path without `..`")
    if text.endswith("/") and not directory and components:
        raise err(node, path, f"a file path cannot end with `/`: {text!r}")
    if not components and not allow_root:
        raise err(node, path, "the root directory `/` is not allowed here")
    return "/" + "/".join(components)


def inner_path(node: Node, path: KeyPath, *, allow_top: bool = False) -> str:
    """A relative path that stays inside its folder (an app's), normalised; ``.`` when allowed."""
    text = expect_str(node, path)
    if not text.isprintable():
        raise err(node, path, f"a path cannot contain control or invisible characters: {text!r}")
    if text.startswith("/"):
        raise err(
            node, path, f"must be relative to the app folder, found {text!r}", f"write {text.lstrip('/')}"
        )
    components = [c for c in text.split("/") if c not in ("", ".")]
    if ".." in components:
        raise err(node, path, f"must stay inside the app folder; `..` is not allowed: {text!r}")
    if not components and not allow_top:
        raise err(node, path, f"must name something inside the app folder, found {text!r}")
    return "/".join(components) or "."


def local_path(node: Node, path: KeyPath, *, kind: str, check: bool) -> Path:
    """A path on this machine, relative to the file that declares it; kind is file, dir or any."""
    text = expect_str(node, path)
    if "\0" in text:
        raise err(node, path, "a path cannot contain a NUL character")
    resolved = Path(os.path.normpath(os.path.join(node.mark.file.parent, os.path.expanduser(text))))
    if check:
        hint = f"paths are relative to the file that declares them ({node.mark.shown})"
        if not os.path.exists(resolved):
            raise err(node, path, f"{text} does not exist (looked for {resolved})", hint)
        if kind == "file" and not os.path.isfile(resolved):
            raise err(node, path, f"{text} is not a file ({resolved})", hint)
        if kind == "dir" and not os.path.isdir(resolved):
            raise err(node, path, f"{text} is not a directory ({resolved})", hint)
    return resolved


@dataclass(frozen=True)
class Owner:
    """``user`` or ``user:group``, resolved later in the image's passwd/group."""

    user: str
    group: str | None = None  # None: the user's primary group

    def __str__(self) -> str:
        return f"{self.user}:{self.group}" if self.group else self.user


def parse_owner(node: Node, path: KeyPath) -> Owner:
    text = expect_str(node, path)
    user, colon, group = text.partition(":")
    for name in (user, group) if colon else (user,):
        if not _ACCOUNT.fullmatch(name):
            raise err(
                node,
                path,
                f"`{text}` is not `user` or `user:group` with valid names",
                "e.g. root:root or linaro",
            )
    return Owner(user, group if colon else None)


def parse_mode(node: Node, path: KeyPath) -> int:
    value = node.value
    if isinstance(value, int) and not isinstance(value, bool):
        raw = node.raw or str(value)
        digits = raw if re.fullmatch(schema.MODE_PATTERN, raw) else f"{value:04o}"
        raise err(
            node,
            path,
            f"mode must be a quoted string of octal digits, found the unquoted number {raw}",
            f'quote it: mode: "{digits.zfill(4)}" (YAML reads 0644 as 420 and 644 as 644)',
        )
    text = expect_str(node, path)
    if not re.fullmatch(schema.MODE_PATTERN, text):
        raise err(node, path, f'mode must be 3 or 4 octal digits such as "0644", found {text!r}')
    return int(text, 8)


def unit_name(node: Node, path: KeyPath) -> str:
    text = expect_str(node, path)
    if len(text) > 255 or not _UNIT.fullmatch(text):
        hint = f"did you mean `{text}.service`?" if "." not in text else "e.g. ssh.service or apt-daily.timer"
        raise err(node, path, f"`{text}` is not a systemd unit name", hint)
    return text


def freeze(node: Node) -> Any:
    """A plain, read-only Python value: mappings become MappingProxyType, lists tuples."""
    if node.is_map:
        return MappingProxyType({key: freeze(value) for key, value in node.value.items()})
    if node.is_list:
        return tuple(freeze(item) for item in node.value)
    return node.value


# ---------------------------------------------------------------------------------------------
# Inputs: the vendor package, file URLs, app sources and models.
# ---------------------------------------------------------------------------------------------


def input_spec(
    node: Node,
    path: KeyPath,
    given: Mapping[str, Node],
    *,
    name: str,
    check: bool,
    sources: tuple[str, ...] = ("url", "path", "parts"),
    schemes: tuple[str, ...] = ("http", "https"),
) -> InputSpec:
    """An InputSpec from the input keys of ``given`` (other keys are the caller's)."""
    source = exactly_one(node, path, given, sources)
    sha256 = _checksum(given["sha256"], (*path, "sha256"), "sha256", 64) if "sha256" in given else None
    md5 = _checksum(given["md5"], (*path, "md5"), "md5", 32) if "md5" in given else None
    size = expect_int(given["size"], (*path, "size"), low=0) if "size" in given else None
    url = local = None
    parts: tuple[str, ...] = ()
    if source == "url":
        url = expect_url(given["url"], (*path, "url"), schemes)
        urls = [url]
    elif source == "parts":
        items = expect_str_list(given["parts"], (*path, "parts"))
        if not items:
            raise err(given["parts"], (*path, "parts"), "`parts` must list at least one URL")
        # a part without a scheme is a local file, relative to the file that declares it
        parts = tuple(
            check_url(text, item, item_path)
            if "://" in text
            else local_path(item, item_path, kind="file", check=check).as_uri()
            for text, item, item_path in items
        )
        urls = list(parts)
    else:
        local = local_path(given["path"], (*path, "path"), kind="any", check=check)
        urls = []
    plain_http = [u for u in urls if u.startswith("http:")]
    if plain_http and not (sha256 or md5):
        raise err(
            node,
            path,
            f"downloading {plain_http[0]} over plain http:// without a checksum is unsafe",
            "add sha256: <64 hex> (run sha256sum on the file), or use https://",
        )
    return InputSpec(
        url=url,
        path=local,
        parts=parts,
        sha256=sha256,
        md5=md5,
        size=size,
        where=entry_where(node, path),
        name=name,
    )


def words(node: Node, path: KeyPath, pattern: re.Pattern[str], hint: str) -> tuple[str, ...]:
    items = expect_str_list(node, path)
    if not items:
        raise err(node, path, "must list at least one entry")
    for text, item, item_path in items:
        if not pattern.fullmatch(text):
            raise err(item, item_path, f"{text!r} is not valid here", hint)
    return tuple(text for text, _, _ in items)
