"""The size budget of the apps, checked before any long work.

An app needs, on the partition that holds it (DATA for /data): its unpacked source, its
models (files as they are, archives unpacked) and its Python tree. Before anything is
downloaded, sizes come from the lock or HEAD requests (builder.fetch.head_size) and from
the Python estimate (builder.customise.pyenv.estimate_python_tree); an archive's unpacked size
is then estimated with a factor. Once an archive is fetched, its exact unpacked size can be
given instead. Every size is rounded up to whole 4 KiB blocks.

When the apps do not fit, the error gives the numbers (needed, free, short by) and the
``layout:`` line that fixes it: the partition grown to hold what is used now plus what the
apps need, plus room for the file system (5 %) and 512 MiB to spare, rounded up to a whole GiB.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from builder.customise.pyenv import PythonEstimate, TreeSize
from builder.errors import BuildError
from builder.inputs import InputSpec
from builder.recipe import App
from builder.units import format_size

BLOCK = 4096
GIB = 1 << 30
# Unpacked bytes per byte of archive, when only the download size is known. Source trees
# (code, images, small binaries) compress about 3:1; model weights barely compress.
SOURCE_FACTOR = 3.0
MODEL_ARCHIVE_FACTOR = 1.25
ARCHIVE_SLACK = 1 << 20  # per archive: folders and the partly used last block of many files
# The check keeps this much free beyond the estimate: directories, extent blocks, journal growth.
MARGIN_FRACTION = 0.02
MARGIN_BYTES = 1 << 20  # the exact check after staging (Customiser) has the real numbers
# A grown partition also holds the file system's own tables, and some room to spare.
GROW_OVERHEAD = 0.05
GROW_SPARE = 512 << 20


@dataclass(frozen=True)
class InputSize:
    """What is known of one input's size: as downloaded, and (once fetched) unpacked."""

    download: int | None
    unpacked: int | None = None


@dataclass(frozen=True)
class AppBudget:
    """The bytes (block-rounded) an app needs on its partition, by part."""

    app: str
    path: str
    source: int
    models: int
    python: int
    folders: int
    estimated: tuple[str, ...]  # parts whose size is an estimate (not exact)
    unknown: tuple[str, ...]  # inputs whose size could not be found (counted as 0)

    @property
    def total(self) -> int:
        return self.source + self.models + self.python + self.folders

    def describe(self) -> str:
        """``source 12 MiB + models 3.2 GiB + Python 849 MiB`` (estimates marked with ~)."""
        parts = []
        for label, key, size in (
            ("source", "source", self.source),
            ("models", "models", self.models),
            ("Python", "python", self.python),
        ):
            if size:
                approx = "~" if any(e.startswith(key) for e in self.estimated) else ""
                parts.append(f"{label} {approx}{format_size(size)}")
        return " + ".join(parts) or "nothing"


def estimate_app_bytes(
    app: App,
    sizes: Mapping[InputSpec, InputSize | int | None],
    python: int | PythonEstimate | TreeSize | None = None,
    *,
    block: int = BLOCK,
) -> AppBudget:
    """The space `app` needs. `sizes` gives each input's size (an int is the download size),
    keyed by the InputSpec of the recipe; `python` the Python tree (bytes, an estimate or a
    measured tree). Missing sizes are listed in `unknown` and counted as 0."""
    estimated: list[str] = []
    unknown: list[str] = []
    source = 0
    if app.source is not None:
        source = _unpacked(app.source.input, sizes, SOURCE_FACTOR, "source", estimated, unknown, block)
    models = 0
    for i, model in enumerate(app.models):
        if model.dest is not None:
            size = _size_of(sizes.get(model.input)).download
            if size is None:
                unknown.append(model.input.name or f"models[{i}]")
            else:
                models += _round(size, block)
        else:
            label = f"models[{i}]"
            models += _unpacked(model.input, sizes, MODEL_ARCHIVE_FACTOR, label, estimated, unknown, block)
    python_bytes = 0
    if app.python is not None:
        python_bytes, exact, missing = _python_bytes(python)
        if not exact:
            estimated.append("python")
        unknown.extend(missing)
    folders = block * (1 + len(app.dirs))
    return AppBudget(
        app.name, app.path, source, models, python_bytes, folders, tuple(estimated), tuple(unknown)
    )


def _size_of(value: InputSize | int | None) -> InputSize:
    if isinstance(value, InputSize):
        return value
    return InputSize(download=value)


def _unpacked(
    spec: InputSpec,
    sizes: Mapping[InputSpec, InputSize | int | None],
    factor: float,
    label: str,
    estimated: list[str],
    unknown: list[str],
    block: int,
) -> int:
    size = _size_of(sizes.get(spec))
    if size.unpacked is not None:
        return _round(size.unpacked, block) + ARCHIVE_SLACK
    if size.download is None:
        unknown.append(spec.name or label)
        return 0
    estimated.append(label)
    return _round(math.ceil(size.download * factor), block) + ARCHIVE_SLACK


def _python_bytes(python: int | PythonEstimate | TreeSize | None) -> tuple[int, bool, tuple[str, ...]]:
    if python is None:
        return 0, False, ("python",)
    if isinstance(python, TreeSize):
        return python.disk_bytes, True, ()
    if isinstance(python, PythonEstimate):
        return python.bytes, python.exact, python.unknown
    return python, True, ()


def _round(size: int, block: int) -> int:
    return -(-size // block) * block


# ---------------------------------------------------------------------------- the check


def needed_with_margin(need_bytes: int) -> int:
    return need_bytes + math.ceil(need_bytes * MARGIN_FRACTION) + MARGIN_BYTES


def layout_fix(label: str, used_bytes: int, need_bytes: int) -> tuple[int, str]:
    """The partition size (whole GiB) that holds what is used plus `need_bytes`, and its
    recipe line: ``layout: {DATA: 8GiB}``."""
    base = (used_bytes + needed_with_margin(need_bytes)) * (1 + GROW_OVERHEAD)
    wanted = base + min(GROW_SPARE, base * 0.25)
    mib = math.ceil(wanted / (1 << 20))
    if mib < 1024:
        return mib << 20, f"layout: {{{label}: {mib}MiB}}"
    gib = math.ceil(wanted / GIB)
    return gib * GIB, f"layout: {{{label}: {gib}GiB}}"


def check_budget(
    need_bytes: int,
    partition_label: str,
    partition_bytes: int,
    used_bytes: int,
    where: str | None,
    *,
    budgets: Sequence[AppBudget] = (),
) -> None:
    """Raise BuildError when `need_bytes` (plus a margin) does not fit in the free space of the
    partition (`partition_bytes` as it will be, `used_bytes` already used). The error gives
    the numbers, each app's parts (`budgets`) and the layout line that would fix it."""
    free = max(0, partition_bytes - used_bytes)
    with_margin = needed_with_margin(need_bytes)
    if with_margin <= free:
        return
    _, line = layout_fix(partition_label, used_bytes, need_bytes)
    detail = "; ".join(f"{b.app}: {b.describe()}" for b in budgets)
    unknown = sorted({u for b in budgets for u in b.unknown})
    message = (
        f"the apps do not fit in {partition_label}: they need {format_size(need_bytes)}"
        + (f" ({detail})" if detail else "")
        + f" plus {format_size(with_margin - need_bytes)} of margin, but {partition_label} has "
        f"{format_size(free)} free ({format_size(partition_bytes)} partition, "
        f"{format_size(used_bytes)} used): short by {format_size(with_margin - free)}"
    )
    if unknown:
        message += f"; sizes not known (counted as 0): {', '.join(unknown)}"
    raise BuildError(
        message,
        where=where,
        hint=f"grow the partition in the recipe: `{line}` (or install fewer models)",
    )
