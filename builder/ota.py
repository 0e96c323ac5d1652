"""What an update from the box's own eMMC (the vendor's OTA path) writes, read from the bundle.

The vendor's flash scripts load every file from `/$ota_path/` on
`${devtype} ${devnum}:${distro_bootpart}`. From a card these are the card's FAT partition; for an
update in the field they name the eMMC partition that holds the bundle, and `load_partition` is
set to its GPT number. Each script says itself what it skips then: the vendor's generator puts
`if test -n $load_partition; then ... exit; fi` in the GPT script (the table is not rewritten)
and `if test $load_partition -eq N; then ... exit; fi` in partition N's script (the partition
that holds the bundle is not overwritten while it is read). See docs/OTA.md.

Nothing is assumed: the lines before a script's first chunk are evaluated with the given
`load_partition`; a script that tests `load_partition` in a way this module cannot read makes
it refuse.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from builder.errors import PackageError
from builder.manifest import MD5_NAME, parse_md5, render_md5
from builder.package.flashplan import FileSet, FlashPlan
from builder.package.scripts import ParsedScript, split_statements
from builder.package.uimage import encode_script

VAR = "load_partition"
_VAR_WORD = re.compile(r"^\$\{?" + VAR + r"\}?$")
FS_FORMATS = {1: "fat", 2: "ext4"}  # what U-Boot's `load` reads; raw partitions cannot hold a bundle


@dataclass(frozen=True)
class OtaPlan:
    holding: int  # GPT number of the partition that holds the bundle
    holding_label: str
    gpt_written: bool
    written: tuple[str, ...]  # labels the update writes, in flash order
    skipped: tuple[str, ...]  # labels it leaves as they are


class _Unreadable(Exception):
    pass


def _value(word: str, load_partition: str) -> str:
    word = word.strip("\"'")
    if _VAR_WORD.match(word):
        return load_partition
    if VAR in word:
        raise _Unreadable(word)
    return word


def _test(words: tuple[str, ...], load_partition: str) -> bool | None:
    """Evaluate `test ...` as U-Boot does for the forms the vendor uses; None: not about us."""
    if not any(VAR in w for w in words):
        return None
    if words[0] != "test":
        raise _Unreadable(" ".join(words))
    # U-Boot expands an empty variable to nothing: `test -n $x` is `test -n`, which is false
    args = [a for a in (_value(w, load_partition) for w in words[1:]) if a != ""]
    if len(args) == 1 and args[0] in ("-n", "-z"):
        return args[0] == "-z"
    if len(args) == 2 and args[0] in ("-n", "-z"):
        return (args[0] == "-n") == bool(args[1])
    if len(args) == 3 and args[1] in ("-eq", "-ne", "-lt", "-gt", "-le", "-ge"):
        try:
            a, b = int(args[0]), int(args[2])
        except ValueError:
            return False
        return {"-eq": a == b, "-ne": a != b, "-lt": a < b, "-gt": a > b, "-le": a <= b, "-ge": a >= b}[
            args[1]
        ]
    if len(args) == 3 and args[1] in ("=", "!="):
        return (args[0] == args[2]) == (args[1] == "=")
    raise _Unreadable(" ".join(words))


def exits_early(script: ParsedScript, load_partition: str) -> bool:
    """Does the script `exit` before its first chunk with this `load_partition`?"""
    end = script.chunks[0].first_line - 1 if script.chunks else len(script.lines)
    stack: list[bool] = []  # is each open if-branch taken
    expect_cond = False
    try:
        for line in script.lines[:end]:
            for words, _ in split_statements(line):
                head = words[0]
                active = all(stack)
                if head == "if":
                    expect_cond = True
                    continue
                if expect_cond:
                    expect_cond = False
                    result = _test(tuple(words), load_partition) if active else False  # not run
                    stack.append(bool(result) and active)
                    continue
                if head == "then":
                    continue
                if head == "else" and stack:
                    outer = all(stack[:-1])
                    stack[-1] = outer and not stack[-1]
                    continue
                if head == "fi" and stack:
                    stack.pop()
                    continue
                if head == "exit" and active:
                    return True
    except _Unreadable as e:
        raise PackageError(
            f"cannot tell what the script does with `{VAR}`: {e}",
            where=script.name,
            hint="the update would flash from the box's own eMMC on this script: use the card instead",
        ) from None
    return False


def ota_plan(plan: FlashPlan, holding: int) -> OtaPlan:
    """What an update from partition `holding` (GPT number) writes; refuses what would destroy it."""
    parts = {p.index + 1: p for p in plan.partitions}
    if holding not in parts:
        raise PackageError(
            f"the bundle has no partition {holding} (its layout has {len(parts)})",
            where="partition32G.xml",
            hint="the box's layout does not match the bundle's: update with a card",
        )
    part = parts[holding]
    if part.fmt not in FS_FORMATS:
        raise PackageError(
            f"partition {holding} ({part.label}) is {part.fmt_name}: U-Boot cannot load a bundle from it",
            hint="place the bundle on an ext4 or FAT partition (e.g. /data)",
        )
    value = str(holding)
    written: list[str] = []
    skipped: list[str] = []
    gpt_written = False
    by_script = {p.script: p for p in plan.partitions if p.script}
    for name in plan.emmc_order:
        script = plan.scripts[name]
        skip = exits_early(script, value)
        target = by_script.get(name)
        if target is None:  # the GPT script (or a vendor extra without a partition of its own)
            gpt_written = gpt_written or (not skip and bool(script.chunks))
            continue
        (skipped if skip else written).append(target.label)
    if part.label not in skipped and part.chunks:
        raise PackageError(
            f"{part.script} does not skip its own partition when {VAR}={holding}: an update from "
            f"{part.label} would overwrite the bundle while reading it",
            where=part.script,
            hint="place the bundle on another partition, or update with a card",
        )
    for p in plan.partitions:
        if not p.chunks and p.label not in skipped:
            skipped.append(p.label)
    return OtaPlan(holding, part.label, gpt_written, tuple(written), tuple(skipped))


# ---------------------------------------------------------------- the update as it goes to the box


def _without_chunks(script: ParsedScript) -> str:
    """The script with its chunk blocks taken out: the vendor's other lines (the skip test, the
    log lines) stay; nothing is loaded or written."""
    if not script.chunks:
        text = "\n".join(script.lines)
    else:
        lines = list(script.lines)
        text = "\n".join(lines[: script.chunks[0].first_line - 1] + lines[script.chunks[-1].end_line - 1 :])
    return text + "\n" if script.trailing_newline else text


def update_files(files: FileSet, plan: FlashPlan, update: OtaPlan) -> dict[str, bytes]:
    """The files that differ in the bundle as `push` places it on the box: the scripts of what the
    update skips, without their chunk blocks, and md5.txt to match.

    Why not rely on the scripts' own skip lines: they `exit` inside an `if` block, and U-Boot's
    hush shell ignores that there (measured with U-Boot 2023.01: the GPT and the holding
    partition were written anyway, and the update destroyed the bundle it was reading; see
    docs/OTA.md). A script with nothing to write is safe under any U-Boot.
    """
    skipped = set(update.skipped)
    neutral = [p.script for p in plan.partitions if p.script and p.label in skipped and p.chunks]
    if not update.gpt_written:
        neutral.append(plan.gpt_script)
    out: dict[str, bytes] = {}
    for name in neutral:
        text = _without_chunks(plan.scripts[name]).encode()
        header = plan.headers[name]
        out[name] = encode_script(text, header.name, header.timestamp)
        cmd = name[: -len(".scr")] + ".cmd"
        if name.endswith(".scr") and cmd in files.names():
            out[cmd] = text
    if MD5_NAME in files.names():
        with files.open(MD5_NAME) as f:
            vendor_text = f.read().decode("utf-8", errors="replace")
        digests = dict(parse_md5(vendor_text))
        for name, data in out.items():
            digests[name] = hashlib.md5(data).hexdigest()
        out[MD5_NAME] = render_md5(digests, vendor_text).encode()
    return out
