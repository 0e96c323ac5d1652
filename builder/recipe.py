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

import difflib
import json
import os
import posixpath
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import yaml

from builder.errors import RecipeError
from builder.inputs import InputSpec
from builder.units import parse_size

if TYPE_CHECKING:
    from builder.recipe_devices import Device
    from builder.recipe_network import Network
    from builder.recipe_system import Identity, Ntp, Setting, SshConfig

KeyPath = tuple[str | int, ...]

# ---------------------------------------------------------------------------------------------
# The YAML layer: nodes that remember where they were written, through aliases and extends.
# ---------------------------------------------------------------------------------------------

_MAX_NODES = 50_000  # an alias bomb expands beyond this; a real recipe stays far below
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Mark:
    """A position in a recipe file; line and col are 1-based."""

    file: Path
    shown: str  # the file as error messages name it
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.shown}:{self.line}:{self.col}"


@dataclass(frozen=True, eq=False)
class Node:
    """A YAML value: dict[str, Node], list[Node] or a scalar, with its position."""

    value: Any
    mark: Mark
    raw: str | None = None  # a scalar as written
    quoted: bool = False  # a scalar written in quotes (or as a block)
    key_marks: Mapping[str, Mark] = field(default_factory=dict)

    @property
    def is_map(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def is_list(self) -> bool:
        return isinstance(self.value, list)


def format_path(path: KeyPath) -> str:
    """``("network", "ethernets", "eth0", "addresses", 1)`` -> ``network.ethernets.eth0.addresses[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out


def err(at: Node | Mark, path: KeyPath, message: str, hint: str | None = None) -> RecipeError:
    """A RecipeError located at a node (or mark) and a key path."""
    mark = at.mark if isinstance(at, Node) else at
    where = f"{mark}: {format_path(path)}" if path else str(mark)
    return RecipeError(message, where=where, hint=hint)


def entry_where(node: Node, path: KeyPath) -> str:
    """The short location an entry keeps for build-time errors: ``demo.yaml:41 files[3]``."""
    return f"{node.mark.shown}:{node.mark.line} {format_path(path)}"


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def _line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


class _Converter:
    """yaml.Node -> Node, refusing duplicate keys, non-text keys, exotic tags and alias loops."""

    def __init__(self, file: Path, shown: str, budget: list[int]) -> None:
        self.file = file
        self.shown = shown
        self.budget = budget
        self.constructor = yaml.constructor.SafeConstructor()

    def mark(self, ynode: yaml.Node) -> Mark:
        m = ynode.start_mark
        return Mark(self.file, self.shown, m.line + 1, m.column + 1)

    def convert(self, ynode: yaml.Node, path: KeyPath, active: frozenset[int] = frozenset()) -> Node:
        mark = self.mark(ynode)
        self.budget[0] -= 1
        if self.budget[0] < 0:
            raise err(mark, path, "the document expands to too many values", "check the YAML aliases (*name)")
        if id(ynode) in active:
            raise err(mark, path, "a YAML alias refers to a value that contains it", "remove the alias loop")
        if isinstance(ynode, yaml.ScalarNode):
            return self.scalar(ynode, mark, path)
        inner = active | {id(ynode)}
        if isinstance(ynode, yaml.SequenceNode):
            if ynode.tag != _SEQ_TAG:
                raise err(mark, path, f"the YAML tag {ynode.tag} is not supported here", "remove the tag")
            items = [self.convert(child, (*path, i), inner) for i, child in enumerate(ynode.value)]
            return Node(items, mark)
        if ynode.tag != _MAP_TAG:
            raise err(mark, path, f"the YAML tag {ynode.tag} is not supported here", "remove the tag")
        return self.mapping(ynode, mark, path, inner)

    def scalar(self, ynode: yaml.ScalarNode, mark: Mark, path: KeyPath) -> Node:
        try:
            value = self.constructor.construct_object(ynode, deep=True)
        except Exception as exc:  # PyYAML's constructors raise ValueError, TypeError, ConstructorError...
            problem = getattr(exc, "problem", None) or str(exc)
            raise err(mark, path, f"cannot read the value {ynode.value!r}: {problem}", "quote it") from None
        return Node(value, mark, raw=ynode.value, quoted=ynode.style not in (None, ""))

    def mapping(self, ynode: yaml.MappingNode, mark: Mark, path: KeyPath, active: frozenset[int]) -> Node:
        items: dict[str, Node] = {}
        marks: dict[str, Mark] = {}
        merges: list[yaml.Node] = []
        for knode, vnode in ynode.value:
            if knode.tag == _MERGE_TAG:
                merges.append(vnode)
                continue
            kmark = self.mark(knode)
            if not isinstance(knode, yaml.ScalarNode):
                raise err(kmark, path, "a key must be plain text, not a list or a mapping")
            key = knode.value
            if key in items:
                raise err(
                    kmark,
                    (*path, key),
                    f"`{key}` is given twice (first at line {marks[key].line})",
                    "remove one of them; YAML would silently keep the last",
                )
            items[key] = self.convert(vnode, (*path, key), active)
            marks[key] = kmark
        # YAML merge keys (<<: *defaults): explicit keys win, then earlier merged mappings.
        for vnode in merges:
            sources = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]
            for source in sources:
                merged = self.convert(source, path, active)
                if not merged.is_map:
                    raise err(merged, path, "`<<` must merge a mapping or a list of mappings")
                for key, value in merged.value.items():
                    if key not in items:
                        items[key] = value
                        marks[key] = merged.key_marks[key]
        return Node(items, mark, key_marks=marks)


def read_yaml(file: Path, budget: list[int] | None = None) -> Node:
    """Parse one YAML file into a Node tree; syntax errors carry line and column."""
    shown = _shown(file)
    budget = budget if budget is not None else [_MAX_NODES]
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise RecipeError(
            f"cannot read the recipe: {exc.strerror or exc}",
            where=shown,
            hint="check the path (relative to the current folder) and that the file is readable",
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, col = _line_col(data[: exc.start].decode("utf-8", "replace"), exc.start)
        raise RecipeError(
            "the file is not UTF-8 text", where=f"{shown}:{line}:{col}", hint="save it as UTF-8"
        ) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, shown) from None
    except yaml.reader.ReaderError as exc:
        line, col = _line_col(text, exc.position)
        raise RecipeError(
            f"character {exc.character!r} is not allowed in YAML",
            where=f"{shown}:{line}:{col}",
            hint="remove it or write it as an escape inside a double-quoted string",
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"YAML error: {exc}", where=shown) from None
    except RecursionError:
        raise RecipeError("the YAML is nested too deeply", where=shown) from None
    if root is None:
        raise RecipeError("the recipe is empty", where=f"{shown}:1:1", hint="start with `name:` and `base:`")
    return _Converter(file, shown, budget).convert(root, ())


def _syntax_error(exc: yaml.MarkedYAMLError, shown: str) -> RecipeError:
    mark = exc.problem_mark or exc.context_mark
    where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
    message = f"YAML syntax error: {exc.problem or exc.context}"
    if exc.context and exc.problem and exc.context_mark:
        message += f" ({exc.context} at line {exc.context_mark.line + 1})"
    return RecipeError(
        message,
        where=where,
        hint="check the indentation and the quoting on this line and the one before; "
        "quote values that contain ': ' or ' #' or start with one of {[*&!%@`",
    )


# ---------------------------------------------------------------------------------------------
# Type checks with messages that say what was expected and what was found.
# ---------------------------------------------------------------------------------------------


def describe(node: Node) -> str:
    """What a value is, for 'expected X, found Y' messages."""
    value = node.value
    raw = node.raw if node.raw is not None else ""
    shown_raw = raw if len(raw) <= 40 else raw[:37] + "..."
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {shown_raw}"
    if isinstance(value, int):
        return f"the integer {shown_raw}"
    if isinstance(value, float):
        return f"the number {shown_raw}"
    if isinstance(value, str):
        return f"the string {json.dumps(shown_raw)}"
    if isinstance(value, bytes):
        return "binary data"
    return f"a date ({shown_raw})"


def _type_error(node: Node, path: KeyPath, expected: str, hint: str | None = None) -> RecipeError:
    if hint is None and expected.startswith("a string") and node.raw is not None and node.value is not None:
        hint = f"quote it: {json.dumps(node.raw)}"
    message = f"expected {expected}, found {describe(node)}"
    return err(node, path, message, hint or _type_hint(node, path, expected))


def _type_hint(node: Node, path: KeyPath, expected: str) -> str:
    key = next((part for part in reversed(path) if isinstance(part, str)), None)
    name = f"`{key}`" if key else "this value"
    if expected.startswith("a mapping"):
        return f"write {name} as indented `key: value` lines under it, or as {{key: value}}"
    if expected.startswith("a list"):
        return f"write {name} as a list: [a, b] or one `- item` per line"
    if node.is_map or node.is_list:
        return f"{name} takes {expected}: write one value, without [ ] or {{ }}"
    return f"{name} takes {expected}; see the Recipes section of README.md for an example"


def expect_map(node: Node, path: KeyPath) -> dict[str, Node]:
    if not node.is_map:
        raise _type_error(node, path, "a mapping (key: value lines)")
    return node.value


def expect_list(node: Node, path: KeyPath) -> list[Node]:
    if not node.is_list:
        hint = "write a list: [a, b] or one `- item` per line" if not node.is_map else None
        raise _type_error(node, path, "a list", hint)
    return node.value


def expect_str(node: Node, path: KeyPath, *, allow_empty: bool = False) -> str:
    if not isinstance(node.value, str):
        raise _type_error(node, path, "a string")
    if not allow_empty and not node.value.strip():
        raise err(node, path, "must not be empty")
    return node.value


def expect_bool(node: Node, path: KeyPath) -> bool:
    if not isinstance(node.value, bool):
        words = ("true", "false", "yes", "no", "on", "off")
        hint = "write true or false without quotes" if str(node.value).lower() in words else None
        raise _type_error(node, path, "true or false", hint)
    return node.value


def expect_int(node: Node, path: KeyPath, *, low: int | None = None, high: int | None = None) -> int:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(node, path, "a whole number")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise err(node, path, f"must be {bounds}, found {value}")
    return value


def expect_str_list(node: Node, path: KeyPath) -> list[tuple[str, Node, KeyPath]]:
    """A list of non-empty strings, each with its node and key path."""
    out = []
    for i, item in enumerate(expect_list(node, path)):
        out.append((expect_str(item, (*path, i)), item, (*path, i)))
    return out


def unknown_key(node: Node, path: KeyPath, key: str, allowed: Iterable[str]) -> RecipeError:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    message = f"unknown key `{key}`" + (f" (did you mean `{close[0]}`?)" if close else "")
    return err(
        node.key_marks.get(key, node.mark), (*path, key), message, f"known keys here: {', '.join(allowed)}"
    )


def fields(
    node: Node, path: KeyPath, allowed: Iterable[str], required: Iterable[str] = ()
) -> dict[str, Node]:
    """Check a mapping's keys; return the keys whose value is not null (null = not given)."""
    mapping = expect_map(node, path)
    allowed = set(allowed)
    for key in mapping:
        if key not in allowed:
            raise unknown_key(node, path, key, allowed)
    given = {key: value for key, value in mapping.items() if value.value is not None}
    for key in required:
        if key not in given:
            raise err(node, (*path, key), f"`{key}` is required here")
    return given


def key_mark(node: Node, key: str) -> Mark:
    return node.key_marks.get(key, node.mark)


def exactly_one(node: Node, path: KeyPath, given: Mapping[str, Node], options: tuple[str, ...]) -> str:
    """The one key of ``options`` present in ``given``; refuse none or several."""
    present = [key for key in options if key in given]
    if len(present) == 1:
        return present[0]
    wanted = ", ".join(f"`{k}`" for k in options)
    if not present:
        raise err(node, path, f"exactly one of {wanted} is required, found none")
    found = " and ".join(f"`{k}` (line {key_mark(node, k).line})" for k in present)
    raise err(
        node,
        path,
        f"exactly one of {wanted} is allowed, found {found}",
        "keep one; when extending a recipe, set the inherited key to null to drop it",
    )


# ---------------------------------------------------------------------------------------------
# Value forms: URLs, checksums, paths, owners, modes, names.
# ---------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEX = re.compile(r"[0-9a-fA-F]+")
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]+")
_UNIT = re.compile(
    r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?"
    r"\.(service|socket|device|mount|automount|swap|target|path|timer|slice|scope)"
)


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
        digits = raw if re.fullmatch(r"[0-7]{3,4}", raw) else f"{value:04o}"
        raise err(
            node,
            path,
            f"mode must be a quoted string of octal digits, found the unquoted number {raw}",
            f'quote it: mode: "{digits.zfill(4)}" (YAML reads 0644 as 420 and 644 as 644)',
        )
    text = expect_str(node, path)
    if not re.fullmatch(r"[0-7]{3,4}", text):
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

_INPUT_KEYS = ("url", "path", "parts", "sha256", "md5", "size")


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


# ---------------------------------------------------------------------------------------------
# The recipe, section by section.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Apt:
    mirror: str
    suites: tuple[str, ...] | None  # None: from the image's codename (focal, focal-updates, ...)
    components: tuple[str, ...]
    where: str


@dataclass(frozen=True)
class Pip:
    index_url: str
    trusted_host: tuple[str, ...]  # default: the hosts of index_url and extra_index_urls
    extra_index_urls: tuple[str, ...]
    where: str


@dataclass(frozen=True)
class User:
    name: str
    ssh_authorized_keys: tuple[str, ...]
    password_hash: str | None
    where: str
    create: bool = False  # make the account when the image has none (as Ubuntu's adduser would)
    uid: int | None = None  # None: the first free one from the image's /etc/login.defs
    groups: tuple[str, ...] = ()  # supplementary groups, which must exist in the image
    shell: str | None = None
    home: str | None = None  # None: /home/NAME for a new account
    lock: bool = False  # lock the password ('!' before the hash): no password login


@dataclass(frozen=True)
class FileEntry:
    """One file to write; exactly one of content/source/template/input is set."""

    path: str  # absolute device path
    content: str | None
    source: Path | None
    template: Path | None
    input: InputSpec | None  # from `url`
    mode: int
    owner: Owner | None  # None: root:root
    layer: str  # "base" or "overlay"
    where: str


@dataclass(frozen=True)
class Overlay:
    path: Path  # a local folder laid out like the device's filesystem
    owner: Owner | None
    where: str


@dataclass(frozen=True)
class Removal:
    path: str  # absolute device path
    where: str


@dataclass(frozen=True)
class Services:
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    where: str = ""


@dataclass(frozen=True)
class AppSource:
    input: InputSpec
    strip_components: int
    where: str


@dataclass(frozen=True)
class Model:
    """A model input: a file copied to ``dest``, or an archive unpacked into ``extract``."""

    input: InputSpec
    dest: str | None  # relative to the app folder
    extract: str | None  # relative to the app folder ("." = the app folder)
    strip_components: int
    where: str


@dataclass(frozen=True)
class AppPython:
    lock: Path  # hashed pins for the target
    target: str  # relative to the app folder
    platform: str
    python: str
    where: str
    requirements: Path | None = None  # the .in that `airbox-build lock` re-resolves the lock from
    exclude_newer: str | None = None  # resolve as of this date (uv --exclude-newer)
    wheels: Path | None = None  # a local folder of wheels (pip --find-links), e.g. for offline builds
    index_url: str | None = None  # where pip downloads the wheels (default: pip's own / mirrors)


@dataclass(frozen=True)
class AppService:
    name: str  # the unit file name, default <app>.service
    exec: str
    user: str | None  # None: the app owner's user, else root
    port: int | None
    environment: Mapping[str, str]
    after: tuple[str, ...]
    enable: bool
    where: str


@dataclass(frozen=True)
class App:
    name: str
    path: str  # absolute device path of the app folder
    owner: Owner | None
    source: AppSource | None
    models: tuple[Model, ...]
    python: AppPython | None
    service: AppService | None
    dirs: tuple[str, ...]  # relative to the app folder, created even when empty
    where: str

    def device_path(self, relative: str) -> str:
        """Where a path relative to the app folder is on the device."""
        return self.path if relative == "." else posixpath.join(self.path, relative)


@dataclass(frozen=True)
class Output:
    image: bool = False
    zip: bool = False
    shrink: bool = True
    volume_label: str = "AIRBOX"
    bundle_id: str = "auto"  # /etc/airbox-build.json: auto (when the build changes the image), always, never


BUNDLE_ID_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class Recipe:
    path: Path  # the recipe file, absolute
    name: str
    description: str
    extends: tuple[Path, ...]  # the files merged under this one, nearest first
    base: InputSpec
    vars: Mapping[str, Any]
    hostname: str | None
    network: Network | None
    apt: Apt | None
    pip: Pip | None
    users: tuple[User, ...]
    files: tuple[FileEntry, ...]
    overlays: tuple[Overlay, ...]
    remove: tuple[Removal, ...]
    services: Services
    apps: tuple[App, ...]
    layout: Mapping[str, int]  # partition label -> bytes
    mirrors: tuple[tuple[str, str], ...]  # (URL prefix, replacement), in recipe order
    output: Output
    identity: Identity
    ssh: SshConfig | None
    timezone: Setting | None
    locale: Setting | None
    ntp: Ntp | None
    devices: tuple[Device, ...] = ()  # the fleet: each a complete recipe of its own
    device: str | None = None  # set on a device's recipe: the device's name

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def base_md5_only(self) -> bool:
        """The vendor package is pinned by md5 alone: the CLI should warn."""
        return bool(self.base.md5) and not self.base.sha256

    def inputs(self) -> Iterator[InputSpec]:
        return iter_inputs(self)


def iter_inputs(recipe: Recipe) -> Iterator[InputSpec]:
    """Every input the recipe downloads or reads: base, file URLs, app sources and models.

    The Python wheels named by an app's lock file are not listed here: they come from the lock.
    """
    yield recipe.base
    for entry in recipe.files:
        if entry.input is not None:
            yield entry.input
    for app in recipe.apps:
        if app.source is not None:
            yield app.source.input
        for model in app.models:
            yield model.input


_TOP_KEYS = (
    "name", "description", "extends", "base", "vars", "hostname", "network", "apt", "pip", "users", "files",
    "overlays", "remove", "services", "apps", "layout", "mirrors", "output", "identity", "ssh", "timezone",
    "locale", "ntp", "devices",
)  # fmt: skip
_NAME = re.compile(r"[a-z0-9._-]+")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_SUITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_FAT_LABEL = re.compile(r"[A-Z0-9 _!#$%&'()@^`{}~-]{1,11}")
_LABEL = re.compile(r"[A-Z0-9_]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SSH_KEY = re.compile(
    r"(^|\s)(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)\s+[A-Za-z0-9+/]+={0,3}(\s|$)"
)
_CRYPT = re.compile(r"!?\$(1|2a|2b|2x|2y|5|6|7|y|gy|sha1|md5)\$[A-Za-z0-9./=,+$-]*\$[A-Za-z0-9./=+-]+|[!*]")
_PLAINTEXT_HINT = (
    "plaintext passwords are refused; make a hash with `openssl passwd -6` or `mkpasswd -m sha-512`"
)
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
    from builder.recipe_devices import parse_devices

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
        top = fields(root, (), (*_TOP_KEYS,), required=("name", "base"))
        name = self.name(top["name"])
        base_fields = fields(top["base"], ("base",), (*_INPUT_KEYS, "member"))
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
            users=self.users(top["users"]) if "users" in top else (),
            files=files,
            overlays=self.overlays(top["overlays"]) if "overlays" in top else (),
            remove=removals,
            services=self.services(top["services"]) if "services" in top else Services(),
            apps=self.apps(top["apps"]) if "apps" in top else (),
            layout=self.layout(top["layout"]) if "layout" in top else MappingProxyType({}),
            mirrors=self.mirrors(top["mirrors"]) if "mirrors" in top else (),
            output=self.output(top["output"]) if "output" in top else Output(),
            **self.system(top),
        )

    @staticmethod
    def system(top: Mapping[str, Node]) -> dict[str, Any]:
        from builder.recipe_system import (
            Identity,
            parse_identity,
            parse_locale,
            parse_ntp,
            parse_ssh,
            parse_timezone,
        )

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
        return freeze(node)

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
        from builder.recipe_network import parse_network

        return parse_network(node, ("network",))

    def apt(self, node: Node) -> Apt:
        path: KeyPath = ("apt",)
        given = fields(node, path, ("mirror", "suites", "components"), required=("mirror",))
        mirror = expect_url(given["mirror"], (*path, "mirror"))
        suites = None
        if "suites" in given:
            suites = self.words(
                given["suites"], (*path, "suites"), _SUITE, "a suite name such as focal-updates"
            )
        components = ("main", "restricted", "universe", "multiverse")
        if "components" in given:
            components = self.words(given["components"], (*path, "components"), _SUITE, "e.g. main, universe")
        return Apt(mirror, suites, components, entry_where(node, path))

    @staticmethod
    def words(node: Node, path: KeyPath, pattern: re.Pattern[str], hint: str) -> tuple[str, ...]:
        items = expect_str_list(node, path)
        if not items:
            raise err(node, path, "must list at least one entry")
        for text, item, item_path in items:
            if not pattern.fullmatch(text):
                raise err(item, item_path, f"{text!r} is not valid here", hint)
        return tuple(text for text, _, _ in items)

    def pip(self, node: Node) -> Pip:
        path: KeyPath = ("pip",)
        given = fields(node, path, ("index_url", "trusted_host", "extra_index_urls"), required=("index_url",))
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

    def users(self, node: Node) -> tuple[User, ...]:
        users = []
        for name, item in expect_map(node, ("users",)).items():
            path: KeyPath = ("users", name)
            if not _ACCOUNT.fullmatch(name) or name.isdigit():
                raise err(key_mark(node, name), path, f"`{name}` is not a valid user name")
            if item.is_map and "password" in item.value:
                raise err(
                    key_mark(item, "password"),
                    (*path, "password"),
                    "`password` would put a plaintext password in the recipe",
                    _PLAINTEXT_HINT,
                )
            keys = (
                "ssh_authorized_keys",
                "password_hash",
                "create",
                "uid",
                "groups",
                "shell",
                "home",
                "lock",
            )
            given = fields(item, path, keys)
            create = expect_bool(given["create"], (*path, "create")) if "create" in given else False
            if not create:
                for key in ("uid", "shell", "home"):
                    if key in given:
                        raise err(
                            key_mark(item, key),
                            (*path, key),
                            f"`{key}` applies to an account the recipe creates",
                            "add `create: true` (an existing account keeps its uid, shell and home)",
                        )
            lock = expect_bool(given["lock"], (*path, "lock")) if "lock" in given else False
            users.append(
                User(
                    name,
                    self.authorized_keys(given, path),
                    self.password_hash(given, path),
                    entry_where(item, path),
                    create=create,
                    uid=expect_int(given["uid"], (*path, "uid"), low=1, high=65533)
                    if "uid" in given
                    else None,
                    groups=self.words(
                        given["groups"], (*path, "groups"), _ACCOUNT, "a group name such as sudo"
                    )
                    if "groups" in given
                    else (),
                    shell=device_path(given["shell"], (*path, "shell")) if "shell" in given else None,
                    home=device_path(given["home"], (*path, "home"), directory=True)
                    if "home" in given
                    else None,
                    lock=lock,
                )
            )
            if lock and users[-1].password_hash:
                raise err(
                    key_mark(item, "lock"),
                    (*path, "lock"),
                    "`lock: true` and `password_hash` contradict each other",
                    "keep one: a locked account has no password login",
                )
        return tuple(users)

    @staticmethod
    def authorized_keys(given: Mapping[str, Node], path: KeyPath) -> tuple[str, ...]:
        keys: list[str] = []
        if "ssh_authorized_keys" in given:
            for text, key_node, key_path in expect_str_list(
                given["ssh_authorized_keys"], (*path, "ssh_authorized_keys")
            ):
                if "\n" in text.strip() or not _SSH_KEY.search(text):
                    raise err(
                        key_node,
                        key_path,
                        "not an OpenSSH public key line",
                        "paste one line of ~/.ssh/id_*.pub",
                    )
                keys.append(text.strip())
        return tuple(keys)

    @staticmethod
    def password_hash(given: Mapping[str, Node], path: KeyPath) -> str | None:
        if "password_hash" not in given:
            return None
        if not isinstance(given["password_hash"].value, str):
            # never echo the value: it may be a plaintext password
            raise err(
                given["password_hash"],
                (*path, "password_hash"),
                "password_hash must be a quoted crypt(3) hash string",
                _PLAINTEXT_HINT,
            )
        password_hash = expect_str(given["password_hash"], (*path, "password_hash"))
        if not _CRYPT.fullmatch(password_hash):
            raise err(
                given["password_hash"],
                (*path, "password_hash"),
                "password_hash does not look like a crypt(3) hash ($6$salt$hash, $y$..., $2b$...)",
                _PLAINTEXT_HINT,
            )
        return password_hash

    def files(self, node: Node) -> tuple[FileEntry, ...]:
        keys = (
            "path",
            "content",
            "source",
            "template",
            "url",
            "sha256",
            "md5",
            "size",
            "mode",
            "owner",
            "layer",
        )
        entries = []
        for i, item in enumerate(expect_list(node, ("files",))):
            path: KeyPath = ("files", i)
            given = fields(item, path, keys, required=("path",))
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
            layer = "base"
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
                    mode=parse_mode(given["mode"], (*path, "mode")) if "mode" in given else 0o644,
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
            given = fields(item, path, ("path", "owner"), required=("path",))
            out.append(
                Overlay(
                    local_path(given["path"], (*path, "path"), kind="dir", check=self.check),
                    parse_owner(given["owner"], (*path, "owner")) if "owner" in given else None,
                    entry_where(item, path),
                )
            )
        return tuple(out)

    def services(self, node: Node) -> Services:
        given = fields(node, ("services",), ("enable", "disable"))
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

    def apps(self, node: Node) -> tuple[App, ...]:
        apps = []
        paths: dict[str, str] = {}
        for name, item in expect_map(node, ("apps",)).items():
            app = self.app(name, item, node)
            if app.path in paths:
                raise err(
                    item, ("apps", name, "path"), f"{app.path} is also the folder of app {paths[app.path]}"
                )
            paths[app.path] = name
            apps.append(app)
        return tuple(apps)

    def app(self, name: str, node: Node, parent: Node) -> App:
        path: KeyPath = ("apps", name)
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
            raise err(
                key_mark(parent, name),
                path,
                f"`{name}` is not a valid app name",
                "use a-z, 0-9, '.', '_', '-'",
            )
        keys = ("path", "owner", "source", "models", "python", "service", "dirs")
        given = fields(node, path, keys, required=("path",))
        source = None
        if "source" in given:
            source_node = given["source"]
            source_path = (*path, "source")
            source_fields = fields(source_node, source_path, (*_INPUT_KEYS, "strip_components"))
            spec = input_spec(
                source_node,
                source_path,
                source_fields,
                name=f"apps.{name}.source",
                check=self.check,
            )
            strip = self.strip(source_fields, source_path)
            source = AppSource(spec, strip, entry_where(source_node, source_path))
        models = self.models(name, given["models"], (*path, "models")) if "models" in given else ()
        dirs = ()
        if "dirs" in given:
            dirs = tuple(
                inner_path(d, (*path, "dirs", i))
                for i, d in enumerate(expect_list(given["dirs"], (*path, "dirs")))
            )
        return App(
            name=name,
            path=device_path(given["path"], (*path, "path"), directory=True),
            owner=parse_owner(given["owner"], (*path, "owner")) if "owner" in given else None,
            source=source,
            models=models,
            python=self.app_python(given["python"], (*path, "python")) if "python" in given else None,
            service=self.app_service(name, given["service"], (*path, "service"))
            if "service" in given
            else None,
            dirs=dirs,
            where=entry_where(node, path),
        )

    @staticmethod
    def strip(given: Mapping[str, Node], path: KeyPath) -> int:
        if "strip_components" not in given:
            return 0
        return expect_int(given["strip_components"], (*path, "strip_components"), low=0, high=64)

    def models(self, app: str, node: Node, path: KeyPath) -> tuple[Model, ...]:
        models = []
        dests: dict[str, int] = {}
        for i, item in enumerate(expect_list(node, path)):
            item_path = (*path, i)
            given = fields(item, item_path, (*_INPUT_KEYS, "dest", "extract", "strip_components"))
            spec = input_spec(
                item,
                item_path,
                given,
                name=f"apps.{app}.models[{i}]",
                check=self.check,
            )
            target = exactly_one(item, item_path, given, ("dest", "extract"))
            dest = extract = None
            if target == "dest":
                dest = inner_path(given["dest"], (*item_path, "dest"))
                if given["dest"].value.endswith("/"):
                    raise err(
                        given["dest"], (*item_path, "dest"), "`dest` names a file; to unpack, use `extract`"
                    )
                if dest in dests:
                    raise err(
                        given["dest"],
                        (*item_path, "dest"),
                        f"{dest} is also the dest of models[{dests[dest]}]",
                    )
                dests[dest] = i
                if "strip_components" in given:
                    raise err(
                        key_mark(item, "strip_components"),
                        (*item_path, "strip_components"),
                        "`strip_components` only applies to `extract`",
                    )
            else:
                extract = inner_path(given["extract"], (*item_path, "extract"), allow_top=True)
            models.append(
                Model(spec, dest, extract, self.strip(given, item_path), entry_where(item, item_path))
            )
        return tuple(models)

    def app_python(self, node: Node, path: KeyPath) -> AppPython:
        keys = (
            "lock",
            "target",
            "platform",
            "python",
            "requirements",
            "exclude_newer",
            "wheels",
            "index_url",
        )
        given = fields(node, path, keys, required=("lock",))
        python = "3.8"
        if "python" in given:
            version = given["python"]
            if isinstance(version.value, (int, float)) and not isinstance(version.value, bool):
                raise _type_error(
                    version, (*path, "python"), "a quoted version string", f'quote it: "{version.raw}"'
                )
            python = expect_str(version, (*path, "python"))
            if not re.fullmatch(r"3\.[0-9]+(\.[0-9]+)?", python):
                raise err(
                    version,
                    (*path, "python"),
                    f"{python!r} is not a Python 3 version",
                    'e.g. "3.8" or "3.8.10"',
                )
        platform = "manylinux2014_aarch64"
        if "platform" in given:
            platform = expect_str(given["platform"], (*path, "platform"))
            if not re.fullmatch(r"[a-z0-9_]+", platform):
                raise err(given["platform"], (*path, "platform"), f"{platform!r} is not a wheel platform tag")
        exclude_newer = None
        if "exclude_newer" in given:
            exclude_newer = expect_str(given["exclude_newer"], (*path, "exclude_newer"))
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}(T[0-9:]+Z?)?", exclude_newer):
                raise err(
                    given["exclude_newer"],
                    (*path, "exclude_newer"),
                    f"{exclude_newer!r} is not a date",
                    'e.g. "2024-08-15"',
                )
        return AppPython(
            lock=local_path(given["lock"], (*path, "lock"), kind="file", check=self.check),
            target=inner_path(given["target"], (*path, "target")) if "target" in given else ".pydeps",
            platform=platform,
            python=python,
            where=entry_where(node, path),
            requirements=local_path(
                given["requirements"], (*path, "requirements"), kind="file", check=self.check
            )
            if "requirements" in given
            else None,
            exclude_newer=exclude_newer,
            wheels=local_path(given["wheels"], (*path, "wheels"), kind="dir", check=self.check)
            if "wheels" in given
            else None,
            index_url=expect_url(given["index_url"], (*path, "index_url"), ("http", "https"))
            if "index_url" in given
            else None,
        )

    def app_service(self, app: str, node: Node, path: KeyPath) -> AppService:
        keys = ("exec", "user", "port", "environment", "after", "name", "enable")
        given = fields(node, path, keys, required=("exec",))
        command = expect_str(given["exec"], (*path, "exec"))
        if "\n" in command.strip():
            raise err(given["exec"], (*path, "exec"), "`exec` must be one command line")
        user = None
        if "user" in given:
            user = expect_str(given["user"], (*path, "user"))
            if not _ACCOUNT.fullmatch(user):
                raise err(given["user"], (*path, "user"), f"`{user}` is not a valid user name")
        environment: dict[str, str] = {}
        if "environment" in given:
            env_path = (*path, "environment")
            env_node = given["environment"]
            for key, value in expect_map(env_node, env_path).items():
                if not _ENV_NAME.fullmatch(key):
                    raise err(
                        key_mark(env_node, key),
                        (*env_path, key),
                        f"`{key}` is not an environment variable name",
                    )
                if value.is_map or value.is_list or value.value is None:
                    raise _type_error(value, (*env_path, key), "a string")
                text = value.value if isinstance(value.value, str) else (value.raw or "")
                if "\n" in text:
                    raise err(value, (*env_path, key), "an environment value cannot span lines")
                environment[key] = text
        after = ()
        if "after" in given:
            after = tuple(
                unit_name(u, (*path, "after", i))
                for i, u in enumerate(expect_list(given["after"], (*path, "after")))
            )
        return AppService(
            name=unit_name(given["name"], (*path, "name")) if "name" in given else f"{app}.service",
            exec=command.strip(),
            user=user,
            port=expect_int(given["port"], (*path, "port"), low=1, high=65535) if "port" in given else None,
            environment=MappingProxyType(environment),
            after=after,
            enable=expect_bool(given["enable"], (*path, "enable")) if "enable" in given else True,
            where=entry_where(node, path),
        )

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
        given = fields(node, path, ("image", "zip", "shrink", "volume_label", "bundle_id"))
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
            if bundle_id not in BUNDLE_ID_MODES:
                raise err(
                    node_id,
                    (*path, "bundle_id"),
                    f"{bundle_id!r} is not one of: {', '.join(BUNDLE_ID_MODES)}",
                    "auto writes /etc/airbox-build.json whenever the build changes the image",
                )
        return Output(volume_label=label, bundle_id=bundle_id, **flags)
