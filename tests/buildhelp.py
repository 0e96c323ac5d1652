"""Helpers for end-to-end tests: write a recipe, build it, read results back."""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import builder.build
from builder.build import BuildOptions, BuildResult, build
from builder.errors import BuildError
from builder.events import Reporter
from builder.fetch import FetchOptions
from builder.package.chunks import JoinedImage, join_partition
from builder.package.flashplan import FileSet, FlashPlan
from builder.recipe import load_recipe

ImageEdit = Callable[[Path], None]  # a test's own change to a joined partition image

REPO = Path(__file__).resolve().parent.parent


def write_recipe(folder: Path, base: Path | Mapping[str, Any], name: str = "t", **sections: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"name": name}
    doc["base"] = {"path": str(base)} if isinstance(base, Path) else dict(base)
    doc.update(sections)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_build(
    recipe: Path,
    out: Path,
    cache: Path,
    edits: Mapping[str, Sequence[ImageEdit]] | None = None,
    **opts: Any,
) -> BuildResult:
    r = load_recipe(recipe)
    fopts = FetchOptions(cache_dir=cache, progress=False)
    with _edits_before_repack(edits or {}):
        return build(r, BuildOptions(output_dir=out, fetch=fopts, **opts), Reporter(quiet=True))


@contextlib.contextmanager
def _edits_before_repack(edits: Mapping[str, Sequence[ImageEdit]]) -> Iterator[None]:
    """Run a test's own edits on joined partition images just before the build repacks them.

    The product has no hook for this: the test wraps the build's repack step for the one build.
    """
    if not edits:
        yield
        return
    original = builder.build._repack

    def repack_with_edits(files: Any, plan: FlashPlan, card: Path, images: Any, *args: Any, **kw: Any) -> Any:
        work = card.parent.parent / "work"  # TMP/result/card beside TMP/work (builder.build)
        edited = dict(images)
        edited.update(apply_edits(files, plan, work, edits))
        return original(files, plan, card, edited, *args, **kw)

    builder.build._repack = repack_with_edits  # type: ignore[assignment]
    try:
        yield
    finally:
        builder.build._repack = original  # type: ignore[assignment]


def apply_edits(
    files: FileSet, plan: FlashPlan, work: Path, edits: Mapping[str, Sequence[ImageEdit]]
) -> dict[str, JoinedImage]:
    """Join each partition named in `edits` and run its edit callbacks on the image."""
    out: dict[str, JoinedImage] = {}
    for label, fns in edits.items():
        part = plan.partition(label)
        if part.script is None:
            raise BuildError(f"the test edits partition {part.label}, but the package has no image for it")
        joined = join_partition(files, part, work / f"{part.stem}.img")
        for fn in fns:
            fn(joined.path)
        out[part.label.upper()] = joined
    return out


def cli(
    *args: str | Path, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "builder.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        check=False,
    )


def flip_middle_byte(path: Path) -> None:
    """Damage a file in its middle (a gzip chunk keeps its frame and size trailer)."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_tree(a: Path, b: Path) -> list[str]:
    """Names that differ between two flat folders (missing on either side or different bytes)."""
    names_a = {p.name for p in a.iterdir()}
    names_b = {p.name for p in b.iterdir()}
    diff = sorted(names_a ^ names_b)
    for n in sorted(names_a & names_b):
        if not filecmp.cmp(a / n, b / n, shallow=False):
            diff.append(n)
    return diff


def mkimage_script(text: str | bytes, scr: Path, name: str | None = None, epoch: int | None = None) -> None:
    """Compile a script with the real mkimage, as the vendor's packer does."""
    cmd = scr.with_suffix(".cmd")
    cmd.write_bytes(text.encode() if isinstance(text, str) else text)
    env = dict(os.environ)
    if epoch is not None:
        env["SOURCE_DATE_EPOCH"] = str(epoch)
    args = ["-A", "arm64", "-O", "linux", "-T", "script", "-C", "none", "-a", "0", "-e", "0"]
    subprocess.run(
        ["mkimage", *args, "-n", name or scr.stem, "-d", str(cmd), str(scr)],
        check=True,
        capture_output=True,
        env=env,
    )


def refresh_md5(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "md5.txt")
    out = subprocess.run(["md5sum", *names], cwd=folder, check=True, capture_output=True, text=True).stdout
    (folder / "md5.txt").write_text(out)


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    ).stdout
