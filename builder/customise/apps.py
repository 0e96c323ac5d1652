"""Preinstalled applications: source, models, an offline Python tree and a systemd unit.

Everything is staged in a host folder first (archives extracted with safety checks,
wheels unpacked without running anything), then copied into the image in the same
debugfs batch as the rest of the partition's edits, owned by the app's owner.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from builder.cache import Cache, read_json, write_json_atomic
from builder.customise.budget import AppBudget, InputSize, check_budget, estimate_app_bytes
from builder.customise.context import OVERLAY_UPPER, ROOTFS, ROOTFS_RW, Customiser
from builder.customise.extract import extract_archive, unpacked_size
from builder.customise.pyenv import PipIndex, Target, download_wheels, estimate_python_tree, install_wheels
from builder.customise.stagecache import cached_tree, stage_key
from builder.customise.unit import render_app_unit
from builder.errors import BuildError, RecipeError
from builder.fetch import FetchOptions, head_size
from builder.fs.ext4 import FileType
from builder.inputs import InputSpec
from builder.recipe import App, AppPython


@dataclass(frozen=True)
class AppResult:
    name: str
    path: str
    partition: str
    files: int
    bytes: int
    unit: str | None
    port: int | None
    python_packages: int


def pip_index(py: AppPython) -> PipIndex:
    return PipIndex(
        index_url=py.index_url,
        find_links=(str(py.wheels),) if py.wheels else (),
        no_index=py.wheels is not None and py.index_url is None,
    )


def image_python(c: Customiser) -> str | None:
    """The X.Y of the image's `python3` (the box's view: overlay upper layer first), from the
    /usr/bin/python3 link (python3 -> python3.8) or, for a plain file, the one python3.X beside it."""
    for label, prefix in ((ROOTFS_RW, OVERLAY_UPPER), (ROOTFS, "")):
        if label == ROOTFS_RW and not (c.has_partition(ROOTFS_RW) and c.partition(ROOTFS_RW).chunks):
            continue
        img = c.image(label)
        for d in ("/usr/bin", "/bin"):
            st = img.stat(f"{prefix}{d}/python3")
            if st is None or st.is_whiteout:
                continue
            if st.type == FileType.SYMLINK:
                m = re.search(r"python(\d+\.\d+)$", img.readlink(f"{prefix}{d}/python3"))
                if m:
                    return m[1]
            names = [n for n in img.listdir(f"{prefix}{d}") if re.fullmatch(r"python3\.\d+", n)]
            if len(names) == 1:
                return names[0][len("python") :]
    return None


def check_app_python(c: Customiser) -> None:
    """An environment built for another Python than the image's python3 cannot import: refuse it."""
    wanted = [app for app in c.recipe.apps if app.python is not None]
    if not wanted:
        return
    have = image_python(c)
    for app in wanted:
        assert app.python is not None
        target = ".".join(app.python.python.split(".")[:2])
        if have is None:
            raise RecipeError(
                f"app {app.name}: the image has no python3 to run its Python {app.python.python} environment",
                where=app.python.where,
                hint="use a vendor package with python3, or drop `python:` from the app",
            )
        if target != have:
            raise RecipeError(
                f"app {app.name}: its Python environment is for Python {app.python.python}, but the image's "
                f"python3 is Python {have}: compiled wheels would not import",
                where=app.python.where,
                hint=f"set `python: \"{have}\"` (and re-lock: airbox-build lock RECIPE --update-python)",
            )


def check_app_budget(c: Customiser, opts: FetchOptions) -> list[AppBudget]:
    """Before any download: source + models + Python tree against what each partition can hold."""
    check_app_python(c)
    by_label: dict[str, list[AppBudget]] = {}
    for app in c.recipe.apps:
        label, _ = c.route(app.path, app.where)
        sizes: dict[InputSpec, InputSize | int | None] = {}
        archives = [app.source.input] if app.source else []
        archives += [m.input for m in app.models if m.extract is not None]
        for spec in [*archives, *(m.input for m in app.models if m.dest is not None)]:
            size = head_size(spec, opts)
            if spec in archives and spec.path is not None and spec.path.is_file():
                strip = app.source.strip_components if app.source and spec == app.source.input else 0
                sizes[spec] = InputSize(size, _unpacked_bytes(spec.path, strip, opts.cache_dir))
            else:
                sizes[spec] = size
        python = None
        if app.python is not None:
            py = app.python
            py_opts = replace(opts, input_dirs=(*opts.input_dirs, py.wheels)) if py.wheels else opts
            python = estimate_python_tree(py.lock, py.platform, py.python, py_opts, index=pip_index(py))
        by_label.setdefault(label, []).append(estimate_app_bytes(app, sizes, python))
    for label, budgets in by_label.items():
        part = c.partition(label)
        need = sum(b.total for b in budgets)
        check_budget(need, part.label, c.limit(label), part.image_bytes, budgets[0].path, budgets=budgets)
    return [b for bs in by_label.values() for b in bs]


def _unpacked_bytes(archive: Path, strip: int, cache_dir: Path) -> int:
    """What the archive unpacks to; remembered by its sha256 (listing a tarball reads all of it)."""
    cache = Cache(cache_dir)
    memo = cache.root / "stat" / f"unpacked-{cache.digests_of(archive).sha256}-{strip}.json"
    known = read_json(memo)
    if known is not None and isinstance(known.get("bytes"), int):
        return int(known["bytes"])
    size = unpacked_size(archive, strip_components=strip)[0]
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(memo, {"bytes": size})
    return size


def apps(c: Customiser) -> None:
    for app in c.recipe.apps:
        c.app_results.append(_install_app(c, app))


def _install_app(c: Customiser, app: App) -> AppResult:
    uid, gid = c.owner(app.owner, app.where)
    root = c.work / "apps" / app.name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    single_models: list[tuple[str, Path]] = []
    for model in app.models:
        if model.dest is not None:  # written straight from the cache (no copy)
            single_models.append((app.device_path(model.dest), _fetched(c, model.input)))
    if c.stage_cache is not None:  # the same inputs stage the same tree: kept between builds
        key = stage_key(app, lambda spec: _fetched(c, spec), Cache(c.fetch_opts.cache_dir))
        stage, info = cached_tree(c.stage_cache, key, app.name, lambda tree: _stage(c, app, tree, root))
    else:
        stage = root / "tree"
        info = _stage(c, app, stage, root)
    packages = int(info.get("python_packages", 0))
    files, size = _tree_size(stage)
    label = c.copy_tree(app.path, stage, uid=uid, gid=gid, origin=app.where, files=files, size=size)
    for device, src in single_models:
        c.write(device, src=src, mode=0o644, uid=uid, gid=gid, origin=app.where)
        files, size = files + 1, size + src.stat().st_size
    unit_name = port = None
    if app.service is not None:
        unit = render_app_unit(app)
        origin = app.service.where or app.where
        c.write(unit.path, data=unit.text.encode(), mode=0o644, origin=origin)
        if unit.enable_link and unit.enable_target:
            c.symlink(unit.enable_link, unit.enable_target, uid=0, gid=0, origin=origin)
        unit_name, port = unit.name, unit.port
    return AppResult(app.name, app.path, label, files, size, unit_name, port, packages)


def _stage(c: Customiser, app: App, stage: Path, root: Path) -> dict[str, Any]:
    """Stage the app's tree at `stage`: source, unpacked models, folders of single-file models,
    the Python tree, the empty folders. Returns what the report needs from it."""
    _mkdirs(stage)
    if app.source is not None:
        extract_archive(
            _fetched(c, app.source.input),
            stage,
            strip_components=app.source.strip_components,
            where=app.source.where,
        )
    for model in app.models:
        if model.dest is not None:  # its folder is staged so it gets the owner
            _mkdirs((stage / model.dest).parent)
        else:
            assert model.extract is not None
            into = stage / model.extract
            _mkdirs(into)
            extract_archive(
                _fetched(c, model.input), into, strip_components=model.strip_components, where=model.where
            )
    packages = 0
    if app.python is not None:
        py = app.python
        opts: FetchOptions = c.fetch_opts
        if py.wheels:  # a local wheelhouse is matched by sha256 like an --input-dir, offline too
            opts = replace(opts, input_dirs=(*opts.input_dirs, py.wheels))
        wheels = download_wheels(
            py.lock, py.platform, py.python, root / "wheels", opts, index=pip_index(py), where=py.where
        )
        _mkdirs(stage / py.target)
        install_wheels(wheels, stage / py.target, target=Target(py.python, py.platform), where=py.where)
        packages = len(wheels)
    for d in app.dirs:
        _mkdirs(stage / d)
    return {"python_packages": packages}


def _mkdirs(path: Path) -> None:
    """`mkdir -p` with 0755 for every folder it makes, whatever the umask: the staged tree's
    modes go into the image, and two builds must not differ by the umask they ran with."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir()
        os.chmod(folder, 0o755)


def _fetched(c: Customiser, spec: InputSpec) -> Path:
    path: Path | None = c.fetched.get(spec)
    if path is None:
        raise BuildError(f"input {spec.display} was not fetched", where=spec.where)
    return path


def _tree_size(top: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(top):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            files += 1
            size += st.st_size
    return files, size


def app_report(c: Customiser) -> list[Mapping[str, Any]]:
    return [r.__dict__ for r in c.app_results]
