"""Command line: build (default), inspect, verify, write, lock, cache."""

from __future__ import annotations

import errno
import json
import logging
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from builder import __version__
from builder.cli_boot import register as register_boot_commands
from builder.cli_card import register as register_card_commands
from builder.cli_push import register as register_push_commands
from builder.errors import AirboxError, RecipeError

log = logging.getLogger("airbox-build")

EXIT_OK = 0
EXIT_ERROR = 1  # any AirboxError: a bad recipe, input, package, a failed verification
EXIT_USAGE = 2  # click's usage errors
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # SIGTERM (a cancelled CI job, `kill`): cleaned up like Ctrl-C


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a build cleans up its temp folder before it exits."""


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise Terminated


class DefaultGroup(click.Group):
    """`airbox-build RECIPE` means `airbox-build build RECIPE`."""

    GLOBAL_FLAGS = ("--debug", "--quiet", "-q", "--json")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # global flags may be given anywhere on the line: `airbox-build RECIPE --json`
        flags = [a for a in args if a in self.GLOBAL_FLAGS]
        args = flags + [a for a in args if a not in self.GLOBAL_FLAGS]
        first = next((a for a in args if not a.startswith("-")), None)
        if (
            first is not None
            and first not in self.commands
            and not any(a in ("--help", "-h", "--version") for a in args)
        ):
            idx = args.index(first)
            args = [*args[:idx], "build", *args[idx:]]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="airbox-build")
@click.option("--debug", is_flag=True, help="Log every command run and show tracebacks.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors.")
@click.option("--json", "json_mode", is_flag=True, help="One JSON event per line on stdout (for CI).")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool, json_mode: bool) -> None:
    """Turn the AirBox vendor flash package into a customised, verified TF-card bundle.

    `airbox-build RECIPE` builds RECIPE (same as `airbox-build build RECIPE`).
    """
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    from builder.redact import RedactingFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())  # no credential in a log line, --debug included
    ctx.obj = {"debug": debug, "quiet": quiet, "json": json_mode}
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def as_airbox_error(e: BaseException) -> AirboxError:
    """Turn what is not our own error into one a person can act on; never a bare traceback."""
    if isinstance(e, AirboxError):
        return e
    if isinstance(e, OSError):
        where = e.filename if isinstance(e.filename, str) else None
        hints = {
            errno.ENOSPC: "free some space (or use -o on a bigger disk) and run the build again",
            errno.EDQUOT: "free some space (or use -o on a bigger disk) and run the build again",
            errno.EACCES: "check the permissions of that path, or choose another output folder with -o",
            errno.EPERM: "check the permissions of that path, or choose another output folder with -o",
            errno.EROFS: "the filesystem is read-only: choose another output folder with -o",
        }
        return AirboxError(e.strerror or str(e), where=where, hint=hints.get(e.errno or 0))
    return AirboxError(
        f"internal error ({type(e).__name__}: {e})",
        hint="this is a bug in airbox-build: run again with --debug and report the traceback",
    )


def _fail(ctx: click.Context, e: BaseException) -> None:
    obj = ctx.find_root().obj or {}
    if obj.get("debug"):
        import traceback

        from builder.redact import redact_text

        sys.stderr.write(redact_text("".join(traceback.format_exception(e))))
    if isinstance(e, KeyboardInterrupt):
        if obj.get("json"):
            click.echo(json.dumps({"event": "error", "message": "interrupted"}, sort_keys=True))
        click.echo("interrupted; the previous output (if any) is left as it was", err=True)
        ctx.exit(EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED)
    err = as_airbox_error(e)
    if obj.get("json"):
        payload = {"event": "error", **err.public()}
        click.echo(json.dumps(payload, sort_keys=True))
    click.echo(err.render(), err=True)
    ctx.exit(EXIT_ERROR)


def guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """Run a command; turn every error into a one-screen message and exit 1 (130 on Ctrl-C)."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        ctx = click.get_current_context()
        try:
            fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (Exception, KeyboardInterrupt) as e:
            _fail(ctx, e)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _reporter(ctx: click.Context) -> Any:
    from builder.events import Reporter

    obj = ctx.find_root().obj or {}
    return Reporter(json_mode=bool(obj.get("json")), quiet=bool(obj.get("quiet")))


def fetch_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            envvar="AIRBOX_BUILD_CACHE",
            help="Download cache (default: the user's cache dir; env AIRBOX_BUILD_CACHE).",
        ),
        click.option("--offline", is_flag=True, help="Use only the cache and --input-dir; never download."),
        click.option(
            "--input-dir",
            "input_dirs",
            multiple=True,
            type=click.Path(path_type=Path, file_okay=False),
            help="Folder of hand-downloaded inputs, matched by checksum.",
        ),
        click.option(
            "--mirror",
            "mirrors",
            multiple=True,
            metavar="FROM=TO",
            help="Rewrite URLs starting with FROM to start with TO (repeatable).",
        ),
        click.option("--locked", is_flag=True, help="Refuse any input not pinned by sha256."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _parse_mirrors(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{v!r} is not FROM=TO", param_hint="--mirror")
        a, b = v.split("=", 1)
        out.append((a, b))
    return tuple(out)


def make_fetch_options(
    recipe: Any,
    cache_dir: Path | None,
    offline: bool,
    input_dirs: tuple[Path, ...],
    mirrors: tuple[str, ...],
    locked: bool,
    reporter: Any,
) -> Any:
    from builder.fetch import FetchOptions, default_cache_dir
    from builder.lockfile import lock_path_for, read_lock

    lock = None
    if recipe is not None:
        lp = lock_path_for(recipe.path)
        if lp.exists():
            lock = read_lock(lp)
    recipe_mirrors = tuple(recipe.mirrors) if recipe is not None else ()
    return FetchOptions(
        cache_dir=cache_dir or default_cache_dir(),
        offline=offline,
        input_dirs=tuple(input_dirs),
        mirrors=_parse_mirrors(mirrors) + recipe_mirrors,
        locked=locked,
        lock=lock,
        progress=reporter.bars,
        on_event=lambda ev: _fetch_event(reporter, ev),
    )


def _fetch_event(reporter: Any, ev: dict[str, Any]) -> None:
    ev = dict(ev)
    kind = ev.pop("event", "fetch")
    if kind == "warning":
        # the fetcher also logs it, which prints it for humans; keep it for the report and --json
        reporter.warnings.append(str(ev.get("message", "")))
    reporter.event(f"fetch-{kind}" if kind != "warning" else "warning", **ev)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "-o",
    "--output",
    "output_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("output"),
    show_default=True,
    help="Output root; the bundle goes to OUTPUT/<name>/.",
)
@click.option(
    "-j", "--jobs", type=click.IntRange(1, 64), default=None, help="Worker threads (default: all cores)."
)
@click.option(
    "--image/--no-image",
    default=None,
    help="Also write OUTPUT/<name>/<name>.img, a card image for Etcher/dd (default: recipe output.image).",
)
@click.option(
    "--zip/--no-zip",
    "zip_",
    default=None,
    help="Also write OUTPUT/<name>/<name>.zip of the card folder (default: recipe output.zip).",
)
@click.option(
    "--image-cache/--no-image-cache",
    default=True,
    show_default=True,
    help="Keep the joined vendor partitions and staged app trees in the cache for the next build.",
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    metavar="NAME",
    help="Of a recipe with `devices:`, build only this device (repeatable; the shared build is kept fresh).",
)
@fetch_options
@click.pass_context
@guarded
def build(
    ctx: click.Context,
    recipe: Path,
    output_dir: Path,
    jobs: int | None,
    image: bool | None,
    zip_: bool | None,
    image_cache: bool,
    devices: tuple[str, ...],
    cache_dir: Path | None,
    offline: bool,
    input_dirs: tuple[Path, ...],
    mirrors: tuple[str, ...],
    locked: bool,
) -> None:
    """Build RECIPE into OUTPUT/<name>/ (card/, SHA256SUMS, build-report.json)."""
    from builder.recipe import load_recipe

    reporter = _reporter(ctx)
    r = load_recipe(recipe)  # first: a recipe error shows at once, before the build's imports

    from builder.build import BuildOptions, source_date_epoch
    from builder.emit import result_fields
    from builder.fleet import build_recipe

    fopts = make_fetch_options(r, cache_dir, offline, input_dirs, mirrors, locked, reporter)
    opts = BuildOptions(
        output_dir=output_dir,
        fetch=fopts,
        workers=jobs,
        epoch=source_date_epoch(),
        image=image,
        zip=zip_,
        image_cache=image_cache,
    )
    if r.devices:
        _build_fleet(r, opts, reporter, devices)
        return
    if devices:
        raise RecipeError(f"--device: {r.path.name} lists no `devices`", hint="drop --device")
    result = build_recipe(r, opts, reporter)
    changed = [p for p in result.report["partitions"] if p["changed"]]
    summary = (
        f"built {result.out_dir}: {len(list(result.card.iterdir()))} files on the card; "
        f"{len(changed)} partition(s) changed"
    )
    for p in changed:
        summary += (
            f"\n  {p['label']}: {p['chunks_after']} chunks: {p['reused']} the vendor's, "
            f"{p.get('pooled', 0)} from the last build, {p['recompressed']} compressed"
        )
        if p.get("same_edits_as_earlier"):
            summary += " (the same edits as the last build: nothing applied)"
    for a in result.artifacts:
        summary += f"\n  {a.kind}: {result.out_dir / a.name} ({a.size:,} bytes)"
    reporter.event(
        "result",
        out_dir=str(result.out_dir),
        card=str(result.card),
        report=str(result.out_dir / "build-report.json"),
        **result_fields(result.out_dir, result.artifacts),
    )
    if not reporter.json_mode and not reporter.quiet:
        click.echo(summary)


def _build_fleet(r: Any, opts: Any, reporter: Any, devices: tuple[str, ...]) -> None:
    from builder.fleet import FLEET_JSON, SHARED, build_fleet

    result = build_fleet(r, opts, reporter, devices)
    reporter.event(
        "result",
        out_dir=str(result.root),
        fleet=str(result.root / FLEET_JSON),
        shared=str(result.shared.out_dir),
        devices={name: str(path) for name, path in result.devices.items()},
        kept=list(result.skipped),
    )
    if not reporter.json_mode and not reporter.quiet:
        lines = [f"built fleet {result.root}: {len(result.devices)} device(s), shared build in {SHARED}/"]
        for name, path in result.devices.items():
            kept = " (up to date, kept)" if name in result.skipped else ""
            lines.append(f"  {name}: {path}{kept}")
        if (result.root / "known_hosts").is_file():
            lines.append(f"  known_hosts: {result.root / 'known_hosts'} (append it to ~/.ssh/known_hosts)")
        click.echo("\n".join(lines))


@main.command()
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the flash plan as JSON.")
@click.pass_context
@guarded
def inspect(ctx: click.Context, source: Path, as_json: bool) -> None:
    """Show the partitions and chunks of a package (folder, .tgz, .zip, .img, .img.zip, .img.xz)."""
    from builder.describe import plan_to_json, plan_to_table
    from builder.package.flashplan import read_flash_plan
    from builder.package.source import open_package

    with (
        tempfile.TemporaryDirectory(prefix="airbox-inspect-") as tmp,
        open_package(source, Path(tmp)) as files,
    ):
        plan = read_flash_plan(files)
        if as_json or (ctx.find_root().obj or {}).get("json"):
            click.echo(json.dumps(plan_to_json(plan), indent=2))
        else:
            click.echo(plan_to_table(plan, files.form))


@main.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--simulate",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also play the scripts into this (sparse) eMMC image.",
)
@click.option(
    "--extract",
    type=click.Path(path_type=Path, file_okay=False),
    help="With --simulate: cut every partition out of the eMMC image into this folder.",
)
@click.option(
    "--against",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Also compare every file, sha256 by sha256, with this bundle (OUTPUT/<name> or its card/); "
    "a mounted card is read past the OS cache.",
)
@click.option(
    "--ota-from",
    "ota_from",
    type=click.IntRange(min=1),
    metavar="N",
    help="With --simulate: play an update in the field from partition N of the box (the GPT number "
    "of the partition holding the bundle) over the existing eMMC image, as `push` triggers it.",
)
@click.pass_context
@guarded
def verify(
    ctx: click.Context,
    path: Path,
    simulate: Path | None,
    extract: Path | None,
    against: Path | None,
    ota_from: int | None,
) -> None:
    """Check a bundle (output folder, card folder or card image) before it touches a card,
    or a mounted card after writing it (against its md5.txt, and --against the bundle)."""
    from builder.errors import VerifyError
    from builder.package.source import open_package
    from builder.redact import redact_text
    from builder.verify import extract_partitions, verify_fileset

    reporter = _reporter(ctx)
    target = path / "card" if (path / "card").is_dir() else path
    if ota_from is not None and (simulate is None or not simulate.is_file()):
        raise click.UsageError("--ota-from needs --simulate EMMC.img naming an existing eMMC image")
    with (
        tempfile.TemporaryDirectory(prefix="airbox-verify-") as tmp,
        open_package(target, Path(tmp)) as files,
        reporter.step("verify"),
    ):
        rep = verify_fileset(files, simulate=simulate, ota=ota_from)
        if against is not None:
            from builder.cli_card import against_failures

            rep.failures.extend(against_failures(files, against, reporter))
    for w in rep.warnings:
        reporter.warn(f"{w.file}: {w.message}")
    for f in rep.failures:
        reporter.event("failure", file=f.file, message=f.message)
        if not reporter.json_mode:
            click.echo(redact_text(f"FAIL {f.file}: {f.message}"), err=True)
    if rep.failures:
        raise VerifyError(
            f"{len(rep.failures)} problem(s) found in {target}",
            hint=(
                "write the bundle to the card again (airbox-build write), or try another card or reader"
                if against is not None
                else "do not write it to a card: rebuild the bundle (airbox-build build), or for a vendor "
                "package, download it again"
            ),
        )
    if simulate is not None and extract is not None and rep.plan is not None:
        extract_partitions(simulate, rep.plan, extract)
    msg = f"ok: {rep.chunks_checked} chunks, {rep.bytes_checked} bytes checked"
    if simulate is not None:
        msg += f"; eMMC image written to {simulate}"
    if against is not None:
        msg += f"; every file matches {against}"
    reporter.event("result", ok=True, chunks=rep.chunks_checked, bytes=rep.bytes_checked)
    if not reporter.json_mode:
        click.echo(msg)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--update-python",
    is_flag=True,
    help="Re-resolve each app's Python lock from its `requirements:` (uv pip compile, for the target).",
)
@fetch_options
@click.pass_context
@guarded
def lock(
    ctx: click.Context,
    recipe: Path,
    update_python: bool,
    cache_dir: Path | None,
    offline: bool,
    input_dirs: tuple[Path, ...],
    mirrors: tuple[str, ...],
    locked: bool,
) -> None:
    """Pin every input of RECIPE by size and sha256 in RECIPE.lock (downloads what is not pinned).

    An app's Python lock is (re-)resolved from its `requirements:` when it does not exist yet or
    with --update-python; its wheels are pinned by sha256 in that lock.
    """
    from builder.customise.apps import pip_index
    from builder.customise.pyenv import resolve_lock
    from builder.fetch import lock_inputs
    from builder.lockfile import lock_path_for, write_lock
    from builder.recipe import iter_inputs, load_recipe

    reporter = _reporter(ctx)
    r = load_recipe(recipe, check_files=False)
    for app in r.apps:
        py = app.python
        if py is None or py.requirements is None or (py.lock.exists() and not update_python):
            continue
        with reporter.step("resolve python", app=app.name):
            pins = resolve_lock(
                py.requirements, py.lock, py.python, py.platform, py.exclude_newer, index=pip_index(py)
            )
        reporter.info(f"{app.name}: {py.lock} resolved, {len(pins)} pins")
    r = load_recipe(recipe)
    fopts = make_fetch_options(r, cache_dir, offline, input_dirs, mirrors, False, reporter)
    with reporter.step("lock"):
        new = lock_inputs(list(iter_inputs(r)), fopts, fopts.lock)
    path = lock_path_for(r.path)
    write_lock(path, new)
    reporter.event("result", lock=str(path), entries=len(new.entries))
    if not reporter.json_mode:
        click.echo(f"wrote {path} ({len(new.entries)} inputs pinned)")


@main.command()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "markdown"]),
    default="json",
    show_default=True,
    help="json: the recipe's JSON Schema (draft 2020-12); markdown: the README's recipe reference.",
)
def schema(fmt: str) -> None:
    """Print the recipe schema, generated from the table the parser reads its keys from.

    Editors take it through a first line `# yaml-language-server: $schema=...` in the recipe.
    """
    from builder.recipe.schemadoc import json_schema_text, reference_markdown

    click.echo(json_schema_text() if fmt == "json" else reference_markdown(), nl=False)


@main.group()
def cache() -> None:
    """Look at or prune the download cache."""


def _cache_dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cache-dir",
        type=click.Path(path_type=Path),
        envvar="AIRBOX_BUILD_CACHE",
        help="Download cache (default: the user's cache dir).",
    )(f)


@cache.command("list")
@_cache_dir_option
@click.pass_context
@guarded
def cache_list_cmd(ctx: click.Context, cache_dir: Path | None) -> None:
    """List cached inputs: size, sha256, last use, URLs."""
    from builder.cache import cache_list, default_cache_dir
    from builder.customise.stagecache import tree_entries
    from builder.imagecache import image_entries
    from builder.redact import redact_url

    root = cache_dir or default_cache_dir()
    entries = cache_list(root)
    images = image_entries(root)
    trees = tree_entries(root)
    if (ctx.find_root().obj or {}).get("json"):
        for i in images:
            click.echo(
                json.dumps(
                    {
                        "event": "cache-image",
                        "path": str(i.path),
                        "partition": i.label,
                        "size": i.size,
                        "disk_bytes": i.disk_bytes,
                        "last_used": i.last_used,
                    },
                    sort_keys=True,
                )
            )
        for e in entries:
            click.echo(
                json.dumps(
                    {
                        "event": "cache-entry",
                        "path": str(e.path),
                        "size": e.size,
                        "sha256": e.sha256,
                        "urls": [redact_url(u) for u in e.urls],
                        "partial": e.partial,
                        "last_used": e.last_used,
                    },
                    sort_keys=True,
                    default=str,
                )
            )
        for tree, app, size, used in trees:
            click.echo(
                json.dumps(
                    {"event": "cache-tree", "path": str(tree), "app": app, "disk_bytes": size}
                    | {"last_used": used},
                    sort_keys=True,
                )
            )
        return
    total = 0
    for e in entries:
        total += e.size
        state = "partial " if e.partial else ""
        urls = " ".join(map(redact_url, e.urls))
        click.echo(f"{state}{e.size:>14,}  {(e.sha256 or '-')[:16]}  {e.last_used}  {urls}")
    for i in images:
        total += i.disk_bytes
        click.echo(f"image {i.disk_bytes:>14,}  {i.path.stem[:16]}  {i.last_used}  joined {i.label}")
    for tree, app, size, used in trees:
        total += size
        click.echo(f"tree  {size:>14,}  {tree.parent.name[:16]}  {used}  staged app {app}")
    click.echo(f"{len(entries) + len(images) + len(trees)} entries, {total:,} bytes in {root}")


def parse_age(text: str) -> Any:
    import re
    from datetime import timedelta

    m = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text)
    if m is None:
        raise click.BadParameter(f"{text!r} is not an age like 30d, 12h or 2w", param_hint="--older-than")
    n, unit = int(m[1]), m[2] or "d"
    return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[unit]: n})


@cache.command("prune")
@_cache_dir_option
@click.option("--older-than", default=None, help="Only entries not used for this long (30d, 12h, 2w).")
@click.pass_context
@guarded
def cache_prune_cmd(ctx: click.Context, cache_dir: Path | None, older_than: str | None) -> None:
    """Delete cached inputs, joined images and staged app trees (all, or those unused for --older-than)."""
    import time

    from builder.cache import cache_prune, default_cache_dir
    from builder.customise.stagecache import prune_trees
    from builder.imagecache import prune_images

    root = cache_dir or default_cache_dir()
    age = parse_age(older_than) if older_than else None
    res = cache_prune(root, age)
    cutoff = time.time() - age.total_seconds() if age is not None else None
    files, freed = prune_images(root, cutoff)
    trees, tree_bytes = prune_trees(root, cutoff)
    click.echo(f"removed {res.files + files + trees} files, {res.bytes + freed + tree_bytes:,} bytes")


register_card_commands(main, guarded, _reporter)
register_push_commands(main, guarded, _reporter)
register_boot_commands(main, guarded, _reporter, fetch_options, make_fetch_options)


def run() -> None:
    main(prog_name="airbox-build")


if __name__ == "__main__":
    run()
