"""Command line for the card: `airbox-build write BUNDLE TARGET` and `verify TARGET --against BUNDLE`.

cli.py registers `write` with `register(main, guarded, reporter_factory)`, which keeps this module
free of an import of cli.py (it also runs as `python -m builder.cli`, i.e. as `__main__`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from builder.events import Reporter


def register(
    group: click.Group,
    guarded: Callable[[Callable[..., None]], Callable[..., None]],
    reporter_factory: Callable[[click.Context], Reporter],
) -> None:
    """Add the `write` command to `group`; `guarded` turns our errors into exit code 1."""

    @group.command("write")
    @click.argument("source", metavar="OUTPUT_OR_CARD_FOLDER", type=click.Path(path_type=Path, exists=True))
    @click.argument("target", metavar="TARGET", type=click.Path(path_type=Path))
    @click.option("-y", "--yes", is_flag=True, help="Remove files of an older bundle without asking.")
    @click.option(
        "--allow-non-fat",
        is_flag=True,
        help="Also fill a folder that is not the top of a FAT card (to stage a copy). "
        "The AirBox reads only FAT32 cards, so this is off by default.",
    )
    @click.pass_context
    @guarded
    def write(ctx: click.Context, source: Path, target: Path, yes: bool, allow_non_fat: bool) -> None:
        """Copy a bundle onto a mounted FAT32 card and read every file back.

        TARGET is the card's top folder: E:\\ (Windows), /Volumes/NO NAME (macOS),
        /media/<user>/<label> (Linux). Files of an older bundle are removed (after asking, or with
        --yes); boot.scr is written last, so an interrupted write leaves a card the AirBox ignores.
        """
        from builder.card import WriteOptions, next_steps, write_card

        reporter = reporter_factory(ctx)
        confirm = None if reporter.json_mode or not sys.stdin.isatty() else _ask
        opts = WriteOptions(yes=yes, allow_non_fat=allow_non_fat)
        result = write_card(source, target, opts, reporter, confirm)
        steps = next_steps(result.volume)
        reporter.event(
            "result",
            ok=True,
            target=str(result.target),
            filesystem=result.volume.kind,
            written=len(result.written),
            unchanged=len(result.unchanged),
            removed=list(result.removed),
            bytes_written=result.bytes_written,
            bytes_verified=result.bytes_verified,
            read_back=sorted(result.read_back),
            next_steps=steps,
        )
        if reporter.json_mode:
            return
        how = ", ".join(sorted(result.read_back)) or "-"
        lines = [
            f"wrote {len(result.written)} file(s) ({result.bytes_written:,} bytes) to {result.target}"
            + (f", {len(result.unchanged)} already there" if result.unchanged else "")
            + (f", removed {len(result.removed)} of an older bundle" if result.removed else ""),
            f"read back {len(result.digests)} file(s), {result.bytes_verified:,} bytes: all match the "
            f"bundle (cache bypassed with {how})",
            "next:",
            *(f"  {i}. {s}" for i, s in enumerate(steps, start=1)),
        ]
        click.echo("\n".join(lines))


def _ask(stale: Sequence[str]) -> bool:
    shown = "\n".join(f"  {n}" for n in stale[:20])
    if len(stale) > 20:
        shown += f"\n  ... ({len(stale)} in all)"
    return click.confirm(
        f"These files of an older bundle are on the card and must go:\n{shown}\nRemove them?",
        default=False,
        err=True,
    )


def against_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--against",
        type=click.Path(path_type=Path, exists=True, file_okay=False),
        help="Also compare every file with this bundle (OUTPUT/<name> or its card/), sha256 by sha256, "
        "reading a mounted card past the OS cache.",
    )(f)


def against_failures(files: Any, against: Path, reporter: Reporter) -> list[Any]:
    """Differences between an opened package (card folder, mounted card, card image) and a bundle,
    as verify Problems."""
    from builder.card import compare_with_bundle, hash_uncached, open_bundle
    from builder.package.source import DirSource
    from builder.verify import Problem

    bundle = open_bundle(against)
    total = sum(files.size(n) for n in files.names() if n in bundle.sizes)
    with (
        reporter.step("compare with bundle", bundle=str(bundle.card)),
        reporter.progress("compare", total or 1) as advance,
    ):
        if isinstance(files, DirSource):

            def digest(name: str) -> str:
                return hash_uncached(files.set_dir / name, advance)[0]

        else:

            def digest(name: str) -> str:
                return _stream_sha256(files, name, advance)

        diffs = compare_with_bundle(files.names(), files.size, digest, bundle)
    return [Problem(d.file, d.message) for d in diffs]


def _stream_sha256(files: Any, name: str, advance: Callable[[int], None]) -> str:
    import hashlib

    h = hashlib.sha256()
    with files.open(name) as f:
        while block := f.read(1 << 20):
            h.update(block)
            advance(len(block))
    return h.hexdigest()
