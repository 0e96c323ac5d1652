"""Preflight: missing tools, an old e2fsprogs and an unfit output folder stop a build before it
downloads anything, with the package to install or the folder to use instead."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import cli, write_recipe
from faultkit import with_hooks
from httpserver import LocalHTTPServer
from test_card import make_fat32, mount_fat

import builder.run
from builder.preflight import (
    case_insensitive_problem,
    check_output_filesystem,
    mode_problem,
    posix_problem,
)
from builder.run import BUILD_TOOLS, find_tool

OLD_DEBUGFS = """#!/bin/sh
# what e2fsprogs 1.44.1 (Ubuntu 18.04) prints
echo "debugfs 1.44.1 (24-Mar-2018)" >&2
echo "	Using EXT2FS Library version 1.44.1" >&2
exit 0
"""


@pytest.fixture
def served_base(shared_vendor_form, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A recipe whose base is downloaded from a local server: preflight must come before that GET."""
    data = shared_vendor_form("tgz").read_bytes()
    with LocalHTTPServer() as srv:
        srv.add("/sdcard.tgz", data)
        base = {"url": srv.url("/sdcard.tgz"), "sha256": hashlib.sha256(data).hexdigest()}
        yield srv, write_recipe(tmp_path / "r", base, name="pre")


def tool_dir(folder: Path, *, without: str = "", fakes: dict[str, str] | None = None) -> Path:
    """A PATH folder with links to the real build tools (but `without`), plus fake scripts."""
    folder.mkdir()
    for tool in BUILD_TOOLS:
        real = find_tool(tool)
        if tool != without and real is not None:
            (folder / tool).symlink_to(real)
    for name, text in (fakes or {}).items():
        (folder / name).unlink(missing_ok=True)
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def build_with_path(recipe: Path, tmp_path: Path, path: Path) -> object:
    env = with_hooks({"PATH": str(path), "_AIRBOX_BUILD_TOOL_DIRS": ""})  # no /usr/sbin fallback
    return cli("build", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache", env=env)


def test_missing_tool_names_the_package_before_any_download(served_base, tmp_path: Path) -> None:
    srv, recipe = served_base
    res = build_with_path(recipe, tmp_path, tool_dir(tmp_path / "bin", without="debugfs"))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert "missing system tool(s): debugfs (package e2fsprogs)" in res.stderr
    assert "hint: install them: sudo apt-get install -y e2fsprogs" in res.stderr
    assert "brew install e2fsprogs" in res.stderr
    assert srv.gets("/sdcard.tgz") == []
    assert not (tmp_path / "out").exists()


def test_every_missing_tool_is_named_with_its_package(served_base, tmp_path: Path) -> None:
    srv, recipe = served_base
    empty = tmp_path / "empty"
    empty.mkdir()
    res = build_with_path(recipe, tmp_path, empty)
    assert res.returncode == 1
    for tool in BUILD_TOOLS:
        assert tool in res.stderr
    assert "apt-get install -y dosfstools e2fsprogs mtools" in res.stderr
    assert srv.gets("/sdcard.tgz") == []


def test_fallback_dirs_find_tools_missing_from_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sbin = tool_dir(tmp_path / "sbin")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setattr(builder.run, "FALLBACK_DIRS", (str(sbin),))
    assert find_tool("debugfs") == str(sbin / "debugfs")
    monkeypatch.setattr(builder.run, "FALLBACK_DIRS", ())
    assert find_tool("debugfs") is None


def test_old_e2fsprogs_is_refused_before_any_download(served_base, tmp_path: Path) -> None:
    srv, recipe = served_base
    path = tool_dir(tmp_path / "bin", fakes={"debugfs": OLD_DEBUGFS})
    res = build_with_path(recipe, tmp_path, path)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert f"error: {path / 'debugfs'}: e2fsprogs 1.44.1 is too old" in res.stderr
    assert "1.45 or newer" in res.stderr and "hint: install e2fsprogs >= 1.45" in res.stderr
    assert srv.gets("/sdcard.tgz") == []


def test_a_posix_case_sensitive_folder_passes_and_is_left_clean(tmp_path: Path) -> None:
    assert case_insensitive_problem(tmp_path) is None
    assert posix_problem(tmp_path) is None
    out = tmp_path / "out" / "nested"
    check_output_filesystem(out)
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.fixture
def fat_mount(tmp_path: Path):  # type: ignore[no-untyped-def]
    card = mount_fat(make_fat32(tmp_path / "fat.img", 40), tmp_path / "mnt", tmp_path / "fusefat.log")
    try:
        yield card.mount
    finally:
        card.unmount()


def test_fat_output_folder_is_refused_before_any_download(
    served_base, fat_mount: Path, tmp_path: Path
) -> None:
    srv, recipe = served_base
    out = fat_mount / "out"
    res = cli("build", recipe, "-o", out, "--cache-dir", tmp_path / "cache")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert (
        f"error: {out}: the output folder is on a filesystem that does not tell upper from lower case"
        in res.stderr
    )
    assert "case-sensitive POSIX filesystem" in res.stderr and "airbox-build write" in res.stderr
    assert srv.gets("/sdcard.tgz") == []
    assert sorted(p.name for p in out.iterdir()) == []  # the probe folder is gone


def test_fat_folder_fails_each_probe(fat_mount: Path) -> None:
    probe = fat_mount / "probe"
    probe.mkdir()
    assert "upper from lower case" in (case_insensitive_problem(probe) or "")
    other = fat_mount / "probe2"
    other.mkdir()
    assert "symbolic links" in (posix_problem(other) or "")
    assert "does not keep file modes" in (mode_problem(other) or "")


def test_the_clean_default_package_passes_preflight_in_a_build(
    vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="ok")
    res = cli("build", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok"]  # no probe left
