"""Load a recipe: YAML -> typed, frozen dataclasses, validating the whole document first.

Every error is a RecipeError whose ``where`` reads ``FILE:LINE:COL: key.path[2].sub``
(lines and columns are 1-based, as editors show them) and whose hint says what to do.
Every entry keeps a shorter ``where`` (``FILE:LINE key.path``) for errors at build time.

Rules decided here, for recipe writers:
- ``extends: other.yaml`` deep-merges mappings (this file wins, lists replace, a key set to
  ``null`` is dropped). ``base`` and ``apps.<name>.source`` are replaced as a whole: a URL
  and its checksums belong together.
- Local paths are relative to the file that declares them and must exist when loaded.
- ``mode`` is a quoted string of octal digits (``"0644"``). An unquoted number is refused:
  YAML 1.1 reads ``0644`` as 420 and ``644`` as 644, so nobody can tell what was meant.
- An input downloaded over plain ``http://`` needs a sha256 or md5 (else it is refused as
  unsafe); an https input may be unpinned: ``airbox-build lock`` pins it (builder.lockfile),
  and fetch warns about unpinned and md5-only inputs.
- Sizes use units.parse_size (binary units; ``12G`` = 12 GiB).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from builder.errors import RecipeError
from builder.recipe import schema
from builder.recipe.apps import parse_apps
from builder.recipe.devices import parse_devices
from builder.recipe.model import (
    Apt,
    FileEntry,
    Output,
    Overlay,
    Pip,
    Recipe,
    Removal,
    Services,
)
from builder.recipe.network import Network, parse_network
from builder.recipe.nodes import (
    _MAX_NODES,
    KeyPath,
    Node,
    _shown,
    _type_error,
    describe,
    entry_where,
    err,
    exactly_one,
    expect_bool,
    expect_list,
    expect_map,
    expect_str,
    expect_str_list,
    fields,
    key_mark,
    read_yaml,
)
from builder.recipe.system import Identity, parse_identity, parse_locale, parse_ntp, parse_ssh, parse_timezone
from builder.recipe.users import parse_users
from builder.recipe.values import (
    _FAT_LABEL,
    _HOST_LABEL,
    _LABEL,
    _NAME,
    _SUITE,
    check_url,
    device_path,
    expect_url,
    freeze,
    input_spec,
    local_path,
    parse_mode,
    parse_owner,
    unit_name,
    words,
)
from builder.units import parse_size

_REPLACED_WHOLE = (("base",), ("apps", "*", "source"))


def _merge(parent: Node, child: Node, path: KeyPath = ()) -> Node:
    """Deep-merge mappings: the child wins, lists and scalars replace, inputs replace whole."""
    replaced = any(
        len(p) == len(path) and all(a in ("*", b) for a, b in zip(p, path, strict=True))
        for p in _REPLACED_WHOLE
    )
    if replaced or not (parent.is_map and child.is_map):
        return child
    items = dict(parent.value)
    marks = dict(parent.key_marks)
    for key, value in child.value.items():
        items[key] = (
            _merge(items[key], value, (*path, key)) if key in items and value.value is not None else value
        )
        marks[key] = child.key_marks[key]
    return Node(items, child.mark, key_marks=marks)


def _load_chain(file: Path, seen: tuple[Path, ...], budget: list[int]) -> tuple[Node, tuple[Path, ...]]:
    root = read_yaml(file, budget)
    if not root.is_map:
        raise err(root, (), f"a recipe must be a mapping of sections, found {describe(root)}")
    given = dict(root.value)
    extends = given.pop("extends", None)
    root = Node(given, root.mark, key_marks=root.key_marks)
    if extends is None or extends.value is None:
        return root, ()
    parent = local_path(extends, ("extends",), kind="file", check=True)
    if os.path.realpath(parent) in {os.path.realpath(p) for p in (*seen, file)}:
        chain = " -> ".join(_shown(p) for p in (*seen, file, parent))
        raise err(extends, ("extends",), f"`extends` makes a cycle: {chain}", "remove one of the extends")
    parent_root, parents = _load_chain(parent, (*seen, file), budget)
    return _merge(parent_root, root), (parent, *parents)


def load_recipe(path: Path, *, check_files: bool = True) -> Recipe:
    """Read, merge (extends) and validate a recipe; raise RecipeError on the first problem.

    ``check_files=False`` skips checking that local paths exist (to validate a recipe
    away from its inputs).
    """
    try:
        file = Path(path).expanduser().absolute()
    except (OSError, RuntimeError) as exc:
        raise RecipeError(f"cannot locate the recipe {path}: {exc}") from None
    root, parents = _load_chain(file, (), [_MAX_NODES])
    given = dict(root.value)
    devices = given.pop("devices", None)
    root = Node(given, root.mark, key_marks=root.key_marks)
    recipe = _RecipeParser(check_files).parse(file, root, parents)
    if devices is None or devices.value is None:
        return recipe
    fleet = parse_devices(
        devices,
        recipe,
        lambda fragment, name: replace(
            _RecipeParser(check_files).parse(file, _merge(root, fragment), parents), device=name
        ),
    )
    return replace(recipe, devices=fleet)


class _RecipeParser:
    def __init__(self, check_files: bool) -> None:
        self.check = check_files
        self.written: dict[str, str] = {}  # device path -> where, of files[] entries

    def parse(self, file: Path, root: Node, parents: tuple[Path, ...]) -> Recipe:
        top = fields(root, (), schema.RECIPE)
        name = self.name(top["name"])
        base_fields = fields(top["base"], ("base",), schema.BASE)
        base = input_spec(
            top["base"],
            ("base",),
            base_fields,
            name="base",
            check=self.check,
            schemes=("http", "https", "file"),
        )
        if "member" in base_fields:
            inside = expect_str(base_fields["member"], ("base", "member"))
            if inside.startswith("/") or ".." in inside.split("/"):
                raise err(
                    base_fields["member"],
                    ("base", "member"),
                    f"{inside!r} is not a path inside the archive",
                    "write it relative to the archive's top, e.g. sophon-img/sdcard.tgz",
                )
            base = replace(base, member=inside)
        files = self.files(top["files"]) if "files" in top else ()
        removals = self.remove(top["remove"]) if "remove" in top else ()
        return Recipe(
            path=file,
            name=name,
            description=expect_str(top["description"], ("description",), allow_empty=True)
            if "description" in top
            else "",
            extends=parents,
            base=base,
            vars=self.vars(top["vars"]) if "vars" in top else MappingProxyType({}),
            hostname=self.hostname(top["hostname"]) if "hostname" in top else None,
            network=self.network(top["network"]) if "network" in top else None,
            apt=self.apt(top["apt"]) if "apt" in top else None,
            pip=self.pip(top["pip"]) if "pip" in top else None,
            users=parse_users(top["users"]) if "users" in top else (),
            files=files,
            overlays=self.overlays(top["overlays"]) if "overlays" in top else (),
            remove=removals,
            services=self.services(top["services"]) if "services" in top else Services(),
            apps=parse_apps(top["apps"], self.check) if "apps" in top else (),
            layout=self.layout(top["layout"]) if "layout" in top else MappingProxyType({}),
            mirrors=self.mirrors(top["mirrors"]) if "mirrors" in top else (),
            output=self.output(top["output"]) if "output" in top else Output(),
            **self.system(top),
        )

    @staticmethod
    def system(top: Mapping[str, Node]) -> dict[str, Any]:
        return {
            "identity": parse_identity(top["identity"]) if "identity" in top else Identity(),
            "ssh": parse_ssh(top["ssh"]) if "ssh" in top else None,
            "timezone": parse_timezone(top["timezone"]) if "timezone" in top else None,
            "locale": parse_locale(top["locale"]) if "locale" in top else None,
            "ntp": parse_ntp(top["ntp"]) if "ntp" in top else None,
        }

    def name(self, node: Node) -> str:
        text = expect_str(node, ("name",))
        if not _NAME.fullmatch(text) or text in (".", ".."):
            slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "my-recipe"
            raise err(
                node,
                ("name",),
                f"`{text}` is not a valid name: use a-z, 0-9, '.', '_' and '-'",
                f"e.g. {slug}",
            )
        return text

    @staticmethod
    def vars(node: Node) -> Mapping[str, Any]:
        expect_map(node, ("vars",))
        frozen: Mapping[str, Any] = freeze(node)
        return frozen

    def hostname(self, node: Node) -> str:
        text = expect_str(node, ("hostname",))
        labels = text.split(".")
        bad = [label for label in labels if not _HOST_LABEL.fullmatch(label)]
        if bad or len(text) > 253:
            problem = f"the label {bad[0]!r}" if bad else "it is longer than 253 characters"
            raise err(
                node,
                ("hostname",),
                f"`{text}` is not a valid hostname: {problem}",
                "labels of 1-63 letters, digits and '-', not starting or ending with '-', joined by '.'",
            )
        return text

    def network(self, node: Node) -> Network:
        return parse_network(node, ("network",))

    def apt(self, node: Node) -> Apt:
        path: KeyPath = ("apt",)
        given = fields(node, path, schema.APT)
        mirror = expect_url(given["mirror"], (*path, "mirror"))
        suites = None
        if "suites" in given:
            suites = words(given["suites"], (*path, "suites"), _SUITE, "a suite name such as focal-updates")
        components = tuple(schema.default(schema.APT, "components"))
        if "components" in given:
            components = words(given["components"], (*path, "components"), _SUITE, "e.g. main, universe")
        return Apt(mirror, suites, components, entry_where(node, path))

    def pip(self, node: Node) -> Pip:
        path: KeyPath = ("pip",)
        given = fields(node, path, schema.PIP)
        index_url = expect_url(given["index_url"], (*path, "index_url"))
        extra: tuple[str, ...] = ()
        if "extra_index_urls" in given:
            items = expect_str_list(given["extra_index_urls"], (*path, "extra_index_urls"))
            extra = tuple(check_url(text, item, item_path) for text, item, item_path in items)
        if "trusted_host" in given:
            host_node, host_path = given["trusted_host"], (*path, "trusted_host")
            if host_node.is_list:
                items = expect_str_list(host_node, host_path)
            else:
                items = [(expect_str(host_node, host_path), host_node, host_path)]
            for host, item, item_path in items:
                if not re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", host):
                    raise err(item, item_path, f"{host!r} is not a host name", "e.g. pypi.org")
            hosts = tuple(host for host, _, _ in items)
        else:
            hosts = tuple(dict.fromkeys(str(urllib.parse.urlsplit(u).hostname) for u in (index_url, *extra)))
        return Pip(index_url, hosts, extra, entry_where(node, path))

    def files(self, node: Node) -> tuple[FileEntry, ...]:
        entries = []
        for i, item in enumerate(expect_list(node, ("files",))):
            path: KeyPath = ("files", i)
            given = fields(item, path, schema.FILE)
            kind = exactly_one(item, path, given, ("content", "source", "template", "url"))
            if kind != "url":
                for key in ("sha256", "md5", "size"):
                    if key in given:
                        raise err(key_mark(item, key), (*path, key), f"`{key}` only applies to a `url` entry")
            content = source = template = spec = None
            if kind == "content":
                content = expect_str(given["content"], (*path, "content"), allow_empty=True)
            elif kind == "source":
                source = local_path(given["source"], (*path, "source"), kind="file", check=self.check)
            elif kind == "template":
                template = local_path(given["template"], (*path, "template"), kind="file", check=self.check)
            else:
                spec = input_spec(
                    item,
                    path,
                    given,
                    name=f"files[{i}]",
                    check=self.check,
                    sources=("url",),
                )
            layer = schema.default(schema.FILE, "layer")
            if "layer" in given:
                layer = expect_str(given["layer"], (*path, "layer"))
                if layer not in ("base", "overlay"):
                    raise err(
                        given["layer"], (*path, "layer"), f"layer must be base or overlay, found {layer!r}"
                    )
            device = device_path(given["path"], (*path, "path"))
            if device in self.written:
                raise err(
                    given["path"],
                    (*path, "path"),
                    f"{device} is written twice (also by {self.written[device]})",
                    "keep one entry per device path",
                )
            self.written[device] = entry_where(item, path)
            entries.append(
                FileEntry(
                    path=device,
                    content=content,
                    source=source,
                    template=template,
                    input=spec,
                    mode=parse_mode(given["mode"], (*path, "mode"))
                    if "mode" in given
                    else int(schema.default(schema.FILE, "mode"), 8),
                    owner=parse_owner(given["owner"], (*path, "owner")) if "owner" in given else None,
                    layer=layer,
                    where=entry_where(item, path),
                )
            )
        return tuple(entries)

    def remove(self, node: Node) -> tuple[Removal, ...]:
        removals = []
        for i, item in enumerate(expect_list(node, ("remove",))):
            device = device_path(item, ("remove", i), directory=True)
            if device in self.written:
                raise err(
                    item,
                    ("remove", i),
                    f"{device} is both removed and written (by {self.written[device]})",
                    "drop the `remove` entry: writing a file replaces it",
                )
            removals.append(Removal(device, entry_where(item, ("remove", i))))
        return tuple(removals)

    def overlays(self, node: Node) -> tuple[Overlay, ...]:
        out = []
        for i, item in enumerate(expect_list(node, ("overlays",))):
            path: KeyPath = ("overlays", i)
            given = fields(item, path, schema.OVERLAY)
            out.append(
                Overlay(
                    local_path(given["path"], (*path, "path"), kind="dir", check=self.check),
                    parse_owner(given["owner"], (*path, "owner")) if "owner" in given else None,
                    entry_where(item, path),
                )
            )
        return tuple(out)

    def services(self, node: Node) -> Services:
        given = fields(node, ("services",), schema.SERVICES)
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("enable", "disable"):
            items = expect_list(given[key], ("services", key)) if key in given else []
            lists[key] = tuple(unit_name(item, ("services", key, i)) for i, item in enumerate(items))
        for i, unit in enumerate(lists["disable"]):
            if unit in lists["enable"]:
                raise err(
                    given["disable"].value[i],
                    ("services", "disable", i),
                    f"{unit} is both enabled and disabled",
                )
        return Services(lists["enable"], lists["disable"], entry_where(node, ("services",)))

    def layout(self, node: Node) -> Mapping[str, int]:
        sizes: dict[str, int] = {}
        for label, value in expect_map(node, ("layout",)).items():
            path: KeyPath = ("layout", label)
            if not _LABEL.fullmatch(label):
                hint = f"write {label.upper()}" if _LABEL.fullmatch(label.upper()) else "e.g. DATA"
                raise err(
                    key_mark(node, label), path, f"`{label}` is not a partition label (upper case)", hint
                )
            if isinstance(value.value, bool) or not isinstance(value.value, (int, str)):
                raise _type_error(value, path, "a size such as 12GiB or a number of bytes")
            try:
                size = parse_size(value.value)
            except ValueError as exc:
                raise err(value, path, str(exc), "e.g. 12GiB, 512MiB or 4096 (bytes)") from None
            if size <= 0:
                raise err(value, path, "a partition size must be positive")
            sizes[label] = size
        return MappingProxyType(sizes)

    def mirrors(self, node: Node) -> tuple[tuple[str, str], ...]:
        rewrites: list[tuple[str, str]] = []
        for prefix, value in expect_map(node, ("mirrors",)).items():
            path: KeyPath = ("mirrors", prefix)
            check_url(prefix, key_mark(node, prefix), path)
            target = expect_url(value, path)
            if prefix.endswith("/") != target.endswith("/"):
                raise err(
                    value, path, "both prefixes must end with `/`, or neither", f"write {target.rstrip('/')}/"
                )
            rewrites.append((prefix, target))
        return tuple(rewrites)

    def output(self, node: Node) -> Output:
        path: KeyPath = ("output",)
        given = fields(node, path, schema.OUTPUT)
        flags = {
            key: expect_bool(given[key], (*path, key)) for key in ("image", "zip", "shrink") if key in given
        }
        label = Output.volume_label
        if "volume_label" in given:
            label = expect_str(given["volume_label"], (*path, "volume_label"))
            if not _FAT_LABEL.fullmatch(label):
                hint = f"write {label.upper()[:11]!r}" if _FAT_LABEL.fullmatch(label.upper()[:11]) else None
                raise err(
                    given["volume_label"],
                    (*path, "volume_label"),
                    f"{label!r} is not a FAT volume label: up to 11 upper-case letters, digits, space, _, -",
                    hint,
                )
        bundle_id = Output.bundle_id
        if "bundle_id" in given:
            node_id = given["bundle_id"]
            if isinstance(node_id.value, bool):  # `true`/`false` read as always/never
                bundle_id = "always" if node_id.value else "never"
            else:
                bundle_id = expect_str(node_id, (*path, "bundle_id"))
            if bundle_id not in schema.BUNDLE_ID_MODES:
                raise err(
                    node_id,
                    (*path, "bundle_id"),
                    f"{bundle_id!r} is not one of: {', '.join(schema.BUNDLE_ID_MODES)}",
                    "auto writes /etc/airbox-build.json whenever the build changes the image",
                )
        return Output(volume_label=label, bundle_id=bundle_id, **flags)
