"""The command line: build by default, downloads, one-screen errors, nothing half-written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import vendor_fixture as vf
from buildhelp import cli, same_tree, write_recipe
from httpserver import LocalHTTPServer


def test_default_command_builds_a_recipe(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, vendor_package_session.dir, name="plain")
    out = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    assert same_tree(tmp_path / "out" / "plain" / "card", vendor_package_session.dir) == []
    report = json.loads((tmp_path / "out" / "plain" / "build-report.json").read_text())
    assert report["recipe"]["name"] == "plain" and report["chunk_sectors"] == 2048


def test_base_downloaded_over_http_and_verified(
    shared_vendor_form, vendor_package_session, tmp_path: Path
) -> None:
    tgz = shared_vendor_form("tgz")
    data = tgz.read_bytes()
    with LocalHTTPServer() as srv:
        srv.add("/pkg/sdcard.tgz", data)
        base = {
            "url": srv.url("/pkg/sdcard.tgz"),
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
        recipe = write_recipe(tmp_path, base, name="web")
        out = cli("--json", "build", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
        assert out.returncode == 0, out.stderr
        events = [json.loads(ln) for ln in out.stdout.splitlines()]
        assert events[-1]["event"] == "result"
        assert {"step-start", "step-end"} <= {e["event"] for e in events}
        assert same_tree(tmp_path / "out" / "web" / "card", vendor_package_session.dir) == []
        # a second build is a cache hit: no new GET
        gets = len(srv.gets("/pkg/sdcard.tgz"))
        out = cli("build", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--offline")
        assert out.returncode == 0, out.stderr
        assert len(srv.gets("/pkg/sdcard.tgz")) == gets


def test_bad_checksum_fails_without_output(shared_vendor_form, tmp_path: Path) -> None:
    tgz = shared_vendor_form("tgz")
    recipe = write_recipe(tmp_path, {"path": str(tgz), "sha256": "0" * 64}, name="bad")
    out = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "sha256" in out.stderr and "error:" in out.stderr
    assert not (tmp_path / "out" / "bad").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_recipe_error_is_one_screen_with_file_and_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nbase:\n  path: /nowhere\nhostnme: box\n")
    out = cli(recipe)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "r.yaml:4" in out.stderr and "hostname" in out.stderr  # did you mean
    assert len(out.stderr.splitlines()) < 12


def test_debug_shows_traceback(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nbase: {path: /nowhere}\n")
    out = cli("--debug", recipe, "-o", tmp_path / "out")
    assert out.returncode == 1
    assert "Traceback" in out.stderr


def test_broken_package_names_file_and_line(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    (vendor_package.dir / "boot_emmc.scr").write_bytes(b"\x27\x05\x19\x56" + b"\0" * 70)
    recipe = write_recipe(tmp_path, vendor_package.dir, name="broken")
    out = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert out.returncode == 1
    assert "boot_emmc.scr" in out.stderr and "CRC" in out.stderr
    assert "Traceback" not in out.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_inspect_missing_scripts(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "readme.txt").write_text("hi")
    out = cli("inspect", tmp_path / "pkg")
    assert out.returncode == 1 and "boot.scr" in out.stderr and "Traceback" not in out.stderr


def test_version_and_help() -> None:
    assert cli("--version").stdout.startswith("airbox-build")
    out = cli("--help")
    assert out.returncode == 0
    for cmd in ("build", "inspect", "verify", "lock", "cache"):
        assert cmd in out.stdout


def test_lock_then_locked_build_and_cache_commands(
    shared_vendor_form, vendor_package_session, tmp_path: Path
) -> None:
    import yaml

    tgz = shared_vendor_form("tgz")
    data = tgz.read_bytes()
    cache = tmp_path / "cache"
    with LocalHTTPServer() as srv:
        srv.add("/sdcard.tgz", data)
        srv.add("/motd", b"hello from the web\n")
        recipe = write_recipe(
            tmp_path,
            {"url": srv.url("/sdcard.tgz"), "md5": hashlib.md5(data).hexdigest()},
            name="locked",
            files=[
                {
                    "path": "/etc/motd",
                    "url": srv.url("/motd"),
                    "md5": hashlib.md5(b"hello from the web\n").hexdigest(),
                }
            ],
        )
        # md5-only pins: --locked refuses before downloading anything
        out = cli(recipe, "--locked", "-o", tmp_path / "out", "--cache-dir", cache)
        assert out.returncode == 1 and "sha256" in out.stderr and "Traceback" not in out.stderr
        assert srv.gets("/sdcard.tgz") == []
        out = cli("lock", recipe, "--cache-dir", cache)
        assert out.returncode == 0, out.stderr
        lock = yaml.safe_load(recipe.with_name("locked.yaml.lock").read_text())
        text = json.dumps(lock)
        assert hashlib.sha256(data).hexdigest() in text
        assert hashlib.sha256(b"hello from the web\n").hexdigest() in text
        out = cli(recipe, "--locked", "-o", tmp_path / "out", "--cache-dir", cache)
        assert out.returncode == 0, out.stderr
    # the server is gone: an offline rebuild is served from the cache
    out = cli(recipe, "--locked", "--offline", "-o", tmp_path / "out2", "--cache-dir", cache)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out2" / "locked" / "card").is_dir()
    listing = cli("cache", "list", "--cache-dir", cache)
    assert listing.returncode == 0 and "sdcard.tgz" in listing.stdout
    pruned = cli("cache", "prune", "--cache-dir", cache)
    assert pruned.returncode == 0 and "removed" in pruned.stdout
    out = cli(recipe, "--offline", "-o", tmp_path / "out3", "--cache-dir", cache)
    assert out.returncode == 1 and "offline" in out.stderr.lower()


def test_input_dir_matches_by_checksum(shared_vendor_form, tmp_path: Path) -> None:
    tgz = shared_vendor_form("tgz")
    data = tgz.read_bytes()
    hand = tmp_path / "downloads"
    hand.mkdir()
    (hand / "renamed-by-browser (1).bin").write_bytes(data)
    recipe = write_recipe(
        tmp_path,
        {"url": "https://unreachable.invalid/sdcard.tgz", "sha256": hashlib.sha256(data).hexdigest()},
        name="handmade",
    )
    out = cli(recipe, "--input-dir", hand, "--offline", "-o", tmp_path / "out", "--cache-dir", tmp_path / "c")
    assert out.returncode == 0, out.stderr
