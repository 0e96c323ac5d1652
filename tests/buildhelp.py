"""Helpers for end-to-end tests: write a recipe, build it, read results back."""

from __future__ import annotations

import filecmp
import hashlib
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from builder.build import BuildOptions, BuildResult, build
from builder.events import Reporter
from builder.fetch import FetchOptions
from builder.recipe import load_recipe
from builder.repack import ImageEdit

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
    return build(r, BuildOptions(output_dir=out, fetch=fopts, **opts), Reporter(quiet=True), edits)


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
