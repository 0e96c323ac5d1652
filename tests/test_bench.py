"""The benchmark's vendor-method baseline stays runnable and does what the recipe does (bench/)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import vendor_fixture as vf
from buildhelp import cli

from bench import workload
from bench.baseline import run_baseline


def _payload(root: Path) -> Path:
    app = root / "data" / "app"
    (app / "code" / "pkg").mkdir(parents=True)
    (app / "code" / "pkg" / "__init__.py").write_text("print('hello')\n")
    (app / "models").mkdir()
    (app / "models" / "m.bmodel").write_bytes(bytes(range(256)) * 64)
    return root


def test_baseline_rebuilds_the_package_with_the_same_edits(
    vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    payload = _payload(tmp_path / "payload")
    out = tmp_path / "out"
    res = run_baseline(vendor_package.dir, out, tmp_path / "work", workload.baseline_edits(payload, 0))
    assert set(res.seconds) >= {"join", "edit", "gzip -6 (sequential)", "md5sum"}
    assert res.chunks >= 6 and res.output_bytes > 0
    md5 = subprocess.run(["md5sum", "-c", "--quiet", "md5.txt"], cwd=out, capture_output=True, check=False)
    assert md5.returncode == 0, md5.stdout
    parts = tmp_path / "parts"
    check = cli("verify", out, "--simulate", tmp_path / "emmc.img", "--extract", parts)
    assert check.returncode == 0, check.stdout + check.stderr

    def cat(image: str, path: str) -> bytes:
        got = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(parts / image)], capture_output=True, check=True
        )
        return got.stdout

    assert cat("ROOTFS.img", "/etc/netplan/01-netcfg.yaml").decode() == workload.netplan_text(0)
    assert cat("DATA.img", "/app/models/m.bmodel") == bytes(range(256)) * 64
    assert cat("DATA.img", "/app/VERSION") == b"1.0.0\n"


def test_recipe_and_baseline_describe_the_same_work(tmp_path: Path) -> None:
    payload = _payload(tmp_path / "payload")
    cold = workload.recipe(tmp_path / "pkg", payload, 0)
    warm = workload.recipe(tmp_path / "pkg", payload, 1)
    assert {k for k in cold if cold[k] != warm[k]} == {"network"}  # warm: only the netplan changes
    edits = workload.baseline_edits(payload, 0)
    assert {e.path for e in edits if e.partition == "DATA" and e.kind == "file"} == {
        "/app/code/pkg/__init__.py",
        "/app/models/m.bmodel",
        "/app/VERSION",
    }


def test_the_recipe_puts_the_payload_where_the_baseline_does(
    vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    """The benchmark recipe (the payload as an `apps:` entry) and the baseline's copies agree:
    the same files with the same bytes in DATA."""
    payload = _payload(tmp_path / "payload")
    recipe = workload.write_recipe(tmp_path / "bench.yaml", vendor_package.dir, payload, 0)
    res = cli("--quiet", "build", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    parts = tmp_path / "parts"
    check = cli(
        "verify", tmp_path / "out" / workload.NAME, "--simulate", tmp_path / "emmc.img", "--extract", parts
    )
    assert check.returncode == 0, check.stdout + check.stderr
    for e in workload.baseline_edits(payload, 0):
        if e.partition == "DATA" and e.kind == "file":
            got = subprocess.run(
                ["debugfs", "-R", f"cat {e.path}", str(parts / "DATA.img")], capture_output=True, check=True
            ).stdout
            want = e.src.read_bytes() if e.src is not None else (e.text or "").encode()
            assert got == want, e.path
