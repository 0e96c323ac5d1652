"""The YAML layer of a recipe: nodes that remember where they were written, and type checks
whose errors say what was expected, what was found, and where."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from builder.errors import RecipeError
from builder.recipe.schema import Type

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
        if ynode.tag != _MAP_TAG or not isinstance(ynode, yaml.MappingNode):
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
    mapping: dict[str, Node] = node.value
    return mapping


def expect_list(node: Node, path: KeyPath) -> list[Node]:
    if not node.is_list:
        hint = "write a list: [a, b] or one `- item` per line" if not node.is_map else None
        raise _type_error(node, path, "a list", hint)
    items: list[Node] = node.value
    return items


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


def fields(node: Node, path: KeyPath, spec: Type) -> dict[str, Node]:
    """Check a mapping's keys against its section of the schema table; return the keys whose
    value is not null (null = not given)."""
    assert spec.section is not None, "fields() takes a section of builder.recipe.schema"
    mapping = expect_map(node, path)
    allowed = set(spec.section.names)
    for key in mapping:
        if key not in allowed:
            raise unknown_key(node, path, key, allowed)
    given = {key: value for key, value in mapping.items() if value.value is not None}
    for required in spec.section.required:
        if required.name not in given:
            raise err(node, (*path, required.name), required.missing or f"`{required.name}` is required here")
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
