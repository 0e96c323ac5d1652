"""Parse the vendor's U-Boot flash scripts and regenerate their chunk blocks.

A per-partition script is a sequence of vendor lines with one *chunk block* per
chunk: `load` a file to an address, `unzip` it to another with the exact byte
count, `mmc write` it at a sector offset, each followed by the vendor's error
handling. Regeneration rewrites only the chunk blocks; every other vendor line
is kept as it was.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from builder.errors import PackageError

LOAD_COMMANDS = frozenset({"load", "fatload", "ext4load", "ext2load", "tftp", "tftpboot"})


@dataclass(frozen=True)
class Statement:
    """One U-Boot command: its words and the (1-based) line it is on."""

    words: tuple[str, ...]
    line: int
    conditional: bool  # inside an `if ...; then` on the same line

    @property
    def command(self) -> str:
        return self.words[0] if self.words else ""


@dataclass(frozen=True)
class Load:
    """A `load` of a file from the card."""

    file: str  # the name as loaded, without the `/$ota_path/` prefix
    path_word: str  # the whole path word, e.g. `/$ota_path/rootfs.1-of-27.gz`
    address: str
    line: int
    required: bool  # False when the script tolerates its failure (e.g. spi_flash.bin, post.scr)


@dataclass(frozen=True)
class ChunkBlock:
    """One chunk: a load, an optional unzip, an mmc write; and the lines it spans."""

    file: str
    unzip_bytes: int | None  # None: written as loaded (not compressed)
    offset_sectors: int
    count_sectors: int
    first_line: int  # 1-based, inclusive
    end_line: int  # 1-based, exclusive
    load_line: int
    unzip_line: int | None
    write_line: int


@dataclass(frozen=True)
class ParsedScript:
    name: str  # file name of the .scr, for messages
    lines: tuple[str, ...]
    loads: tuple[Load, ...]  # every load, including chunk loads
    sources: tuple[Load, ...]  # loads of scripts that are then `source`d, in order
    chunks: tuple[ChunkBlock, ...]
    trailing_newline: bool

    def where(self, line: int) -> str:
        return f"{self.name}:{line}"


_WORD = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'|[^\s;"\']+')


def split_statements(line: str) -> list[tuple[list[str], bool]]:
    """Split one script line into statements of words, honouring quotes.

    Returns (words, conditional) pairs; `conditional` is set for statements that
    follow an `if`/`then`/`else` on the same line.
    """
    statements: list[tuple[list[str], bool]] = []
    words: list[str] = []
    conditional = False
    i = 0
    n = len(line)
    while i < n:
        c = line[i]
        if c == "#" and not words:
            break
        if c == ";":
            if words:
                statements.append((words, conditional))
            words = []
            i += 1
            continue
        if c.isspace():
            i += 1
            continue
        m = _WORD.match(line, i)
        if m is None:  # an unmatched quote: take the rest as one word
            words.append(line[i:])
            break
        words.append(m.group(0))
        i = m.end()
        if len(words) == 1 and words[0] in ("if", "then", "else", "elif", "while", "do"):
            conditional = conditional or words[0] in ("if", "then", "else", "elif")
            statements.append((words, conditional))
            words = []
    if words:
        statements.append((words, conditional))
    return statements


def _statements(lines: Sequence[str]) -> list[Statement]:
    out = []
    for idx, line in enumerate(lines, start=1):
        for words, cond in split_statements(line):
            out.append(Statement(tuple(words), idx, cond))
    return out


def _number(word: str, where: str, what: str) -> int:
    try:
        return int(word, 16)  # U-Boot reads numbers as hex, with or without 0x
    except ValueError:
        raise PackageError(
            f"{what} is not a number: {word!r}", where=where, hint="the script is malformed"
        ) from None


def _file_of(path_word: str) -> str:
    return path_word.strip("\"'").rsplit("/", 1)[-1]


def _is_error_check(line: str) -> bool:
    return bool(re.match(r"\s*if\s+test\s+\$\?\s+-ne\s+0", line))


def _skip_if_block(lines: Sequence[str], start: int) -> int:
    """Given the 0-based index of an `if` line, return the index after its matching `fi`."""
    depth = 0
    i = start
    while i < len(lines):
        for words, _ in split_statements(lines[i]):
            if words[0] == "if":
                depth += 1
            elif words[0] == "fi":
                depth -= 1
        i += 1
        if depth <= 0:
            return i
    return i


def _block_end(lines: Sequence[str], write_idx: int) -> int:
    """Index after the chunk block whose `mmc write` is at 0-based `write_idx`.

    The block takes the write's error check, then the vendor's bare `echo`, then one blank line.
    """
    i = write_idx + 1
    if i < len(lines) and _is_error_check(lines[i]):
        i = _skip_if_block(lines, i)
    if i < len(lines) and lines[i].strip() == "echo":
        i += 1
    if i < len(lines) and lines[i].strip() == "":
        i += 1
    return i


def parse_script(text: bytes | str, name: str) -> ParsedScript:
    """Parse a script text into loads, sourced scripts and chunk blocks."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PackageError(f"script text is not UTF-8 at byte {e.start}", where=name) from None
    trailing = text.endswith("\n")
    lines = tuple(text.split("\n")[:-1] if trailing else text.split("\n"))
    stmts = _statements(lines)
    loads: list[Load] = []
    sources: list[Load] = []
    chunks: list[ChunkBlock] = []
    pending: Load | None = None  # the last load, waiting for source/unzip/mmc write
    pending_unzip: tuple[str, int, int] | None = None  # (dest address, bytes, line)
    block_start = 0
    for k, st in enumerate(stmts):
        w = st.words
        where = f"{name}:{st.line}"
        if w[0] in LOAD_COMMANDS and len(w) >= 3:
            path_word = w[-1]
            address = w[-2]
            required = not st.conditional and _next_is_fatal_check_or_use(stmts, k, address)
            load = Load(_file_of(path_word), path_word, address, st.line, required)
            loads.append(load)
            pending, pending_unzip, block_start = load, None, st.line
        elif w[0] == "source" and pending is not None:
            addr = w[1] if len(w) > 1 else pending.address
            if addr == pending.address:
                # `if test $? -eq 0; then source ...` after an optional load keeps it optional
                sources.append(replace(pending, required=pending.required or not st.conditional))
            pending = None
        elif w[0] == "unzip" and pending is not None:
            if len(w) < 3:
                raise PackageError("unzip needs a source and a destination address", where=where)
            if w[1] != pending.address:
                raise PackageError(
                    f"unzip reads {w[1]} but the last load ({pending.file}, line {pending.line}) "
                    f"went to {pending.address}",
                    where=where,
                    hint="each chunk must be loaded to the address it is unzipped from",
                )
            if len(w) < 4:
                raise PackageError(
                    f"unzip of {pending.file} has no size",
                    where=where,
                    hint="the vendor scripts give the exact uncompressed byte count",
                )
            pending_unzip = (w[2], _number(w[3], where, "unzip size"), st.line)
        elif w[:2] == ("mmc", "write") and pending is not None:
            if len(w) < 5:
                raise PackageError("mmc write needs an address, an offset and a count", where=where)
            src, off, cnt = w[2], _number(w[3], where, "mmc write offset"), _number(w[4], where, "count")
            if pending_unzip is not None and src != pending_unzip[0]:
                raise PackageError(
                    f"mmc write reads {src} but {pending.file} was unzipped to {pending_unzip[0]}",
                    where=where,
                )
            if pending_unzip is None and src != pending.address:
                raise PackageError(
                    f"mmc write reads {src} but {pending.file} was loaded to {pending.address}",
                    where=where,
                )
            end = _block_end(lines, st.line - 1) + 1
            chunks.append(
                ChunkBlock(
                    file=pending.file,
                    unzip_bytes=pending_unzip[1] if pending_unzip else None,
                    offset_sectors=off,
                    count_sectors=cnt,
                    first_line=block_start,
                    end_line=end,
                    load_line=pending.line,
                    unzip_line=pending_unzip[2] if pending_unzip else None,
                    write_line=st.line,
                )
            )
            loads[-1] = replace(loads[-1], required=True)
            pending, pending_unzip = None, None
    return ParsedScript(name, lines, tuple(loads), tuple(sources), tuple(chunks), trailing)


def _next_is_fatal_check_or_use(stmts: Sequence[Statement], k: int, address: str) -> bool:
    """A load is required when its file is used at once or a failure is fatal (`$? -ne 0`).

    Loads followed by `if test $? -eq 0` (use it if present) are optional.
    """
    if k + 1 >= len(stmts):
        return False
    nxt = stmts[k + 1].words
    if nxt[0] == "if":
        return k + 2 < len(stmts) and bool(re.match(r"test \$\? -ne 0", " ".join(stmts[k + 2].words)))
    return nxt[0] in ("source", "unzip") or nxt[:2] == ("mmc", "write")


# ---------------------------------------------------------------- regeneration


@dataclass(frozen=True)
class NewChunk:
    """What a regenerated chunk block must say."""

    file: str
    unzip_bytes: int
    offset_sectors: int
    count_sectors: int


def _hex(n: int) -> str:
    return f"0x{n:08x}"


def _substitute(block_lines: Sequence[str], old: ChunkBlock, new: NewChunk) -> list[str]:
    """Rewrite one vendor chunk block for a new chunk, touching only the changed words."""
    out = list(block_lines)
    base = old.first_line

    def sub_line(line_no: int | None, fn) -> None:  # type: ignore[no-untyped-def]
        if line_no is None:
            return
        i = line_no - base
        out[i] = fn(out[i])

    def new_load(line: str) -> str:
        # the path word is the last word of the load statement; swap its file-name part
        stmts = split_statements(line)
        for words, _ in stmts:
            if words[0] in LOAD_COMMANDS:
                path_word = words[-1]
                prefix = path_word.rsplit("/", 1)[0] + "/" if "/" in path_word else ""
                return line.replace(path_word, prefix + new.file, 1)
        return line

    def new_words(line: str, cmd: tuple[str, ...], positions: dict[int, str]) -> str:
        # replace words at given positions of the statement starting with `cmd`, keep spacing
        for words, _ in split_statements(line):
            if tuple(words[: len(cmd)]) == cmd:
                spans = _word_spans(line, words)
                for pos in sorted(positions, reverse=True):
                    s, e = spans[pos]
                    line = line[:s] + positions[pos] + line[e:]
                return line
        return line

    sub_line(old.load_line, new_load)
    sub_line(old.unzip_line, lambda ln: new_words(ln, ("unzip",), {3: _hex(new.unzip_bytes)}))
    sub_line(
        old.write_line,
        lambda ln: new_words(ln, ("mmc", "write"), {3: _hex(new.offset_sectors), 4: _hex(new.count_sectors)}),
    )
    return out


def _word_spans(line: str, words: Sequence[str]) -> list[tuple[int, int]]:
    spans = []
    pos = 0
    for w in words:
        s = line.index(w, pos)
        spans.append((s, s + len(w)))
        pos = s + len(w)
    return spans


def regenerate(script: ParsedScript, new_chunks: Sequence[NewChunk]) -> str:
    """Return the script text with its chunk blocks replaced by `new_chunks`.

    Block i is rewritten from the vendor's block i (or the last vendor block for
    added chunks). Lines between blocks are kept after the block they followed;
    lines that followed blocks that no longer exist are kept after the last block.
    """
    if not script.chunks:
        raise PackageError("script has no chunk block to regenerate", where=script.name)
    for c in script.chunks:
        if c.unzip_bytes is None:
            raise PackageError(
                "cannot regenerate a chunk block that writes an uncompressed file",
                where=script.where(c.load_line),
            )
    lines = script.lines
    old = script.chunks
    prefix = list(lines[: old[0].first_line - 1])
    suffix = list(lines[old[-1].end_line - 1 :])
    between = [list(lines[old[i].end_line - 1 : old[i + 1].first_line - 1]) for i in range(len(old) - 1)]
    out = prefix
    for i, nc in enumerate(new_chunks):
        tpl = old[min(i, len(old) - 1)]
        out += _substitute(lines[tpl.first_line - 1 : tpl.end_line - 1], tpl, nc)
        if i < len(new_chunks) - 1 and i < len(between):
            out += between[i]
    for extra in between[max(len(new_chunks) - 1, 0) :]:
        out += extra
    out += suffix
    text = "\n".join(out)
    return text + "\n" if script.trailing_newline else text
