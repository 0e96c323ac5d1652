"""The build: recipe -> fetched inputs -> vendor package -> customised bundle in output/<name>/."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from builder import __version__
from builder.customise import customise, needs_customising
from builder.customise.apps import app_report, check_app_budget
from builder.customise.context import Customiser
from builder.customise.identity import keep_warnings
from builder.digestmemo import DigestMemo, memo_file
from builder.emit import Artifact, emit_artifacts, read_sha256sums
from builder.errors import AirboxError, BuildError
from builder.events import Reporter
from builder.fetch import FetchOptions, fetch
from builder.hostkeys import fingerprints, known_hosts_lines
from builder.imagecache import ImageCache
from builder.inputs import InputSpec
from builder.manifest import MD5_NAME, parse_md5, write_sha256sums
from builder.outdir import RESULT, build_slot, replace_dir, scratch_tempdir
from builder.package.chunks import DEFAULT_LEVEL, JoinedImage
from builder.package.flashplan import FlashPlan, read_flash_plan
from builder.package.layout import LayoutChange, apply_layout
from builder.package.source import open_package
from builder.preflight import check_card_chunks, check_package_files, preflight_build
from builder.previous import EarlierPartition, PreviousBuild, load_previous
from builder.recipe import Recipe, iter_inputs
from builder.recipe.devices import static_addresses
from builder.redact import redact_data
from builder.repack import RepackResult, repack

CARD = "card"
KNOWN_HOSTS = "known_hosts"
REPORT = "build-report.json"
SUMS = "SHA256SUMS"


@dataclass(frozen=True)
class BuildOptions:
    output_dir: Path
    fetch: FetchOptions
    workers: int | None = None
    level: int = DEFAULT_LEVEL
    epoch: int | None = None  # SOURCE_DATE_EPOCH, when set
    image: bool | None = None  # also write <name>.img; None: as the recipe's output.image says
    zip: bool | None = None  # also write <name>.zip; None: as the recipe's output.zip says
    image_cache: bool = True  # keep joined vendor partitions and staged app trees in the cache


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    card: Path
    report: dict[str, Any]
    artifacts: tuple[Artifact, ...] = ()  # <name>.img / <name>.zip, beside card/


def source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BuildError(
            f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds",
            hint="set it to a Unix time, e.g. $(git log -1 --format=%ct)",
        ) from None


def build(
    recipe: Recipe,
    opts: BuildOptions,
    reporter: Reporter,
    *,
    folder: str | None = None,
    host_keys: Mapping[str, Path] | None = None,
    report_hook: Callable[[dict[str, Any]], None] | None = None,
    base_bundle: Path | None = None,
) -> BuildResult:
    """Build one bundle into OUTPUT/<folder or recipe name>/.

    `host_keys`: this box's own SSH host keys (identity.ssh_host_keys: per-device); the bundle
    then gets a known_hosts file. `report_hook` adds to the report before it is written (a fleet
    device's bundle says which fleet and shared build it comes from). `base_bundle`: the base is
    a bundle this tool made (a fleet's shared build): its files are hard-linked, not copied, and
    its md5.txt and SHA256SUMS spare hashing them again.
    """
    preflight_build(opts.output_dir)  # tools, e2fsprogs, the output filesystem: before any download
    for warning in keep_warnings(recipe.identity):
        reporter.warn(warning)
    out_root = opts.output_dir
    name = folder or recipe.name
    final = out_root / name
    # The temp folder (work files and the new bundle) lives beside the bundle: see builder.outdir.
    with (
        build_slot(out_root, name, reporter, also_writes=[opts.fetch.cache_dir]) as tmp,
        contextlib.ExitStack() as cleanup,
    ):
        cleanup.enter_context(scratch_tempdir(tmp / "scratch"))  # nothing left in $TMPDIR, even on SIGKILL
        result_dir = tmp / RESULT
        card = result_dir / CARD
        card.mkdir(parents=True)
        work = tmp / "work"
        work.mkdir()
        with reporter.step("fetch", input=recipe.base.display):
            base = fetch(recipe.base, opts.fetch)
        with open_package(base.path, work / "source", member=recipe.base.member) as package:
            files = LinkingSource(package) if base_bundle is not None else package
            with reporter.step("read package", form=files.form):
                plan = read_flash_plan(files)
                check_package_files(plan.files)
            epoch = opts.epoch if opts.epoch is not None else plan.headers["boot.scr"].timestamp
            layout = _plan_layout(recipe, plan, reporter)
            limits = {p.label: p.size_bytes for p in layout.table.partitions} if layout else None
            images_root = opts.fetch.cache_dir / "images" if opts.image_cache else None
            image_cache = ImageCache(images_root, workers=opts.workers)
            cleanup.callback(image_cache.close)
            previous = load_previous(final)  # what the last bundle of this recipe offers
            digest_memo = DigestMemo(memo_file(opts.fetch.cache_dir, final), fresh_under=[tmp])
            cust = Customiser(
                recipe,
                plan,
                files,
                work,
                epoch,
                reporter,
                workers=opts.workers,
                limits=limits,
                image_cache=image_cache,
                previous=previous,
                digest_memo=digest_memo,
                fetch_opts=opts.fetch,
                stage_cache=opts.fetch.cache_dir / "apps" if opts.image_cache else None,
                host_keys=host_keys,
            )
            cleanup.callback(cust.close)
            if recipe.apps:
                with reporter.step("app budget"):
                    check_app_budget(cust, opts.fetch)
            cust.fetched.update(_fetch_inputs(recipe, opts, reporter))
            images: dict[str, JoinedImage | EarlierPartition] = {}
            if needs_customising(cust):
                with reporter.step("customise"):
                    customise(cust)
                    images.update(cust.finish(shrink=recipe.output.shrink))
                    digest_memo.save()
            with reporter.step("repack"):
                repacked = _repack(
                    files,
                    plan,
                    card,
                    images,
                    opts,
                    reporter,
                    layout,
                    previous=previous,
                    linked_base=bundle_digests(base_bundle) if base_bundle is not None else None,
                )
                check_card_chunks(card, _card_chunks(repacked))
        artifacts = emit_artifacts(
            card,
            result_dir,
            f"{recipe.name}-{recipe.device}" if recipe.device else recipe.name,
            image=recipe.output.image if opts.image is None else opts.image,
            zip_=recipe.output.zip if opts.zip is None else opts.zip,
            volume_label=recipe.output.volume_label,
            epoch=epoch,
            reporter=reporter,
        )
        with reporter.step("emit"):
            report = _report(recipe, base, files.form, plan, repacked, reporter)
            report["changes"] = cust.report()
            report["apps"] = app_report(cust)
            report["bundle_id"] = cust.bundle_id
            report["artifacts"] = {a.kind: a.name for a in artifacts}
            if recipe.device is not None:
                report["recipe"]["device"] = recipe.device
            if host_keys is not None:
                report["host_keys"] = fingerprints(host_keys)
                lines = known_hosts_lines(box_names(recipe), host_keys)
                (result_dir / KNOWN_HOSTS).write_text("".join(line + "\n" for line in lines))
            if report_hook is not None:
                report_hook(report)
            report = redact_data(report)  # no URL credentials or password hashes (builder.redact)
            (result_dir / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
            listed = sorted(p for p in card.rglob("*") if p.is_file())
            listed += [result_dir / a.name for a in artifacts]
            known = {card / name: digest for name, digest in repacked.known_sha256.items()}
            write_sha256sums(result_dir / SUMS, result_dir, listed, known=known)
            replace_dir(tmp, final)
        return BuildResult(final, final / CARD, report, tuple(artifacts))


class LinkingSource:
    """A package folder that is a bundle of ours: members are hard-linked (reflinked where the
    filesystem can), never copied. Safe because bundles are replaced whole, never edited."""

    def __init__(self, files: Any) -> None:
        self._files = files

    def __getattr__(self, name: str) -> Any:
        return getattr(self._files, name)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def copy_to(self, name: str, dest: Path, *, link: bool = True) -> None:
        self._files.copy_to(name, dest, link=True)


def bundle_digests(bundle: Path) -> dict[str, tuple[Path, str, str]]:
    """card file name -> (path, md5, sha256), from a bundle's md5.txt and SHA256SUMS."""
    card = bundle / CARD
    try:
        md5 = dict(parse_md5((card / MD5_NAME).read_text()))
        sums = read_sha256sums(bundle / SUMS)
    except (OSError, ValueError, AirboxError):
        return {}
    prefix = f"{CARD}/"
    return {
        rel[len(prefix) :]: (bundle / rel, md5[rel[len(prefix) :]], digest)
        for rel, digest in sums.items()
        if rel.startswith(prefix) and rel[len(prefix) :] in md5
    }


def box_names(recipe: Recipe) -> list[str]:
    """What operators reach the box by: its hostname and its static addresses."""
    return ([recipe.hostname] if recipe.hostname else []) + static_addresses(recipe)


def _card_chunks(repacked: RepackResult) -> list[tuple[str, int]]:
    """(chunk file, uncompressed bytes) of every gzip chunk on the card."""
    return [
        (str(c["file"]), int(c["bytes"]))  # type: ignore[call-overload]
        for p in repacked.partitions
        for c in p.chunks
        if c.get("bytes") is not None
    ]


def _plan_layout(recipe: Recipe, plan: FlashPlan, reporter: Reporter) -> LayoutChange | None:
    """Apply the recipe's `layout:` to the package's table; refuse what cannot hold its image."""
    if not recipe.layout:
        return None
    with reporter.step("layout"):
        minimum = {p.label: p.image_bytes for p in plan.partitions if p.chunks}
        change = apply_layout(plan.table, recipe.layout, min_bytes=minimum)
    for label in change.resized:
        p = change.table.get(label)
        reporter.info(f"layout: {p.label} is now {p.size_kb} KiB")
    return change


def _fetch_inputs(recipe: Recipe, opts: BuildOptions, reporter: Reporter) -> dict[InputSpec, Path]:
    """Every input but the base (fetched first, alone): file URLs, app sources and models."""
    out: dict[InputSpec, Path] = {}
    specs = [s for s in iter_inputs(recipe) if s is not recipe.base]
    if specs:
        with reporter.step("fetch inputs", count=len(specs)):
            for spec in specs:
                if spec not in out:
                    out[spec] = fetch(spec, opts.fetch).path
    return out


def _repack(
    files: Any,
    plan: FlashPlan,
    card: Path,
    images: Mapping[str, JoinedImage | EarlierPartition],
    opts: BuildOptions,
    reporter: Reporter,
    layout: LayoutChange | None,
    previous: PreviousBuild | None = None,
    linked_base: Mapping[str, tuple[Path, str, str]] | None = None,
) -> RepackResult:
    total = sum(j.path.stat().st_size for j in images.values() if isinstance(j, JoinedImage))
    with reporter.progress("repack", max(total, 1)) as advance:
        return repack(
            files,
            plan,
            card,
            images,
            level=opts.level,
            workers=opts.workers,
            epoch=opts.epoch,
            layout=layout,
            progress=lambda _label, n, _total: advance(n),
            previous=previous,  # the last bundle: what it compressed is linked, not redone
            linked_base=linked_base,
        )


def _report(
    recipe: Recipe, base: Any, form: str, plan: FlashPlan, repacked: RepackResult, reporter: Reporter
) -> dict[str, Any]:
    return {
        "airbox_build": __version__,
        "recipe": {"name": recipe.name, "path": str(recipe.path)},
        "base": {
            "input": recipe.base.display,
            "form": form,
            "sha256": getattr(base, "sha256", None),
            "md5": getattr(base, "md5", None),
            "size": getattr(base, "size", None),
        },
        "chunk_sectors": plan.chunk_sectors,
        "partitions": [asdict(p) for p in repacked.partitions],
        "scripts_regenerated": repacked.scripts_regenerated,
        "warnings": list(reporter.warnings),
        "timings": {k: round(v, 3) for k, v in reporter.timings.items()},
    }
