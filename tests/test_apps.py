"""Preinstalled apps end to end: source, split model, single model, wheels, unit; refusals."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import vendor_fixture as vf
from buildhelp import REPO, cli, run_build, write_recipe

from builder.errors import AirboxError

DEMO = REPO / "recipes" / "demo" / "app"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def app_section(**over: Any) -> dict[str, Any]:
    parts = [str(DEMO / "DemoModel.tar.gz.aa"), str(DEMO / "DemoModel.tar.gz.ab")]
    joined = b"".join(Path(p).read_bytes() for p in parts)
    app: dict[str, Any] = {
        "path": "/data/SD-demo",
        "owner": "linaro:linaro",
        "source": {
            "path": str(DEMO / "sd-demo-src.tar.gz"),
            "sha256": sha(DEMO / "sd-demo-src.tar.gz"),
            "strip_components": 1,
        },
        "models": [
            {
                "path": str(DEMO / "canny_demo.bmodel"),
                "sha256": sha(DEMO / "canny_demo.bmodel"),
                "dest": "models/controlnet/canny_demo.bmodel",
            },
            {"parts": parts, "md5": hashlib.md5(joined).hexdigest(), "extract": "models/basic/"},
        ],
        "python": {
            "lock": str(DEMO / "demo-app.lock"),
            "target": ".pydeps",
            "python": "3.8.10",
            "wheels": str(DEMO / "wheels"),
        },
        "service": {
            "exec": "python3 gr.py",
            "user": "linaro",
            "port": 8999,
            "after": ["bmrt_loadko.service", "bmrt_setup.service"],
        },
        "dirs": ["models/controlnet", "outputs"],
    }
    app.update(over)
    return {"sd-demo": app}


def debugfs(image: Path, request: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True)


def stat_of(image: Path, path: str) -> tuple[int, int, int, str]:
    out = debugfs(image, f"stat {path}").stdout
    head = next(ln for ln in out.splitlines() if ln.startswith("Inode:")).split()
    user = next(ln for ln in out.splitlines() if ln.startswith("User:")).split()
    return int(head[5], 8), int(user[1]), int(user[3]), head[3]


@pytest.fixture(scope="module")
def app_build(vendor_package_session: vf.MiniPackage, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("app")
    recipe = write_recipe(tmp / "r", vendor_package_session.dir, name="app", apps=app_section())
    res = run_build(recipe, tmp / "out", tmp / "cache")
    parts = tmp / "parts"
    out = cli("verify", res.out_dir, "--simulate", tmp / "emmc.img", "--extract", parts)
    assert out.returncode == 0, out.stderr
    return res, parts


def test_app_tree_models_python_and_unit_land_with_owner_and_modes(app_build) -> None:  # type: ignore[no-untyped-def]
    res, parts = app_build
    data, rootfs = parts / "DATA.img", parts / "ROOTFS.img"
    expect = {
        "/SD-demo": (0o755, "directory"),
        "/SD-demo/gr.py": (0o664, "regular"),
        "/SD-demo/run.sh": (0o775, "regular"),
        "/SD-demo/models/controlnet/canny_demo.bmodel": (0o644, "regular"),
        "/SD-demo/models/basic/DemoModel/sdv15_unet_multisize.bmodel": (0o644, "regular"),
        "/SD-demo/.pydeps/tinypure/__init__.py": (0o644, "regular"),
        "/SD-demo/.pydeps/tinynative/_core.cpython-38-aarch64-linux-gnu.so": (0o755, "regular"),
        "/SD-demo/outputs": (0o755, "directory"),
    }
    for path, (mode, kind) in expect.items():
        got = stat_of(data, path)
        assert got == (mode, 1000, 1000, kind), path
    dumped = parts / "canny.out"
    debugfs(data, f"dump /SD-demo/models/controlnet/canny_demo.bmodel {dumped}")
    assert dumped.read_bytes() == (DEMO / "canny_demo.bmodel").read_bytes()
    basic = debugfs(data, "ls /SD-demo/models/basic").stdout.split()
    assert [n for n in basic if not n.startswith(("(", ".")) and not n.isdigit()] == [
        "DemoModel"
    ]  # nothing else sits in models/basic
    assert "not found" in debugfs(data, "stat /SD-demo/.pydeps/bin").stderr
    unit = debugfs(rootfs, "cat /etc/systemd/system/sd-demo.service").stdout
    assert "WorkingDirectory=/data/SD-demo" in unit and "User=linaro" in unit
    assert "PYTHONPATH=/data/SD-demo/.pydeps:/opt/sophon/sophon-opencv-latest/opencv-python" in unit
    assert "HF_HUB_OFFLINE=1" in unit and "RequiresMountsFor=" in unit
    assert "After=" in unit and "bmrt_setup.service" in unit
    link = debugfs(rootfs, "stat /etc/systemd/system/multi-user.target.wants/sd-demo.service").stdout
    assert 'Fast link dest: "/etc/systemd/system/sd-demo.service"' in link
    assert res.report["apps"][0]["port"] == 8999 and res.report["apps"][0]["python_packages"] == 2
    assert subprocess.run(["e2fsck", "-fn", str(data)], capture_output=True).returncode == 0


def test_wheels_installed_are_the_targets(app_build) -> None:  # type: ignore[no-untyped-def]
    _res, parts = app_build
    data = parts / "DATA.img"
    wheel = debugfs(data, "cat /SD-demo/.pydeps/tinynative-2.1.dist-info/WHEEL").stdout
    assert "Tag: cp38-cp38-manylinux_2_17_aarch64.manylinux2014_aarch64" in wheel


def _tar(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return gzip.compress(raw.getvalue())


@pytest.mark.parametrize(
    ("members", "links", "message"),
    [
        ({"top/../../evil": b"x"}, None, ".."),
        ({"/etc/passwd": b"x"}, None, "absolute"),
        ({"top/ok": b"x"}, {"top/link": "../../../etc"}, "outside"),
    ],
)
def test_unsafe_source_archive_is_refused(
    members: dict[str, bytes],
    links: dict[str, str] | None,
    message: str,
    vendor_package_session: vf.MiniPackage,
    tmp_path: Path,
) -> None:
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(_tar(members, links))
    apps = app_section(source={"path": str(evil), "sha256": sha(evil), "strip_components": 1}, python=None)
    apps["sd-demo"].pop("python")
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="evil", apps=apps)
    with pytest.raises(AirboxError) as e:
        run_build(recipe, tmp_path / "out", tmp_path / "cache")
    assert message in str(e.value) and "evil.tar.gz" in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_budget_error_before_any_long_work(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> None:
    big = tmp_path / "big.bmodel"
    with open(big, "wb") as f:
        f.truncate(40 << 20)  # 40 MiB of model into a 16 MiB DATA
    apps = app_section(models=[{"path": str(big), "dest": "models/controlnet/big.bmodel"}])
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="budget", apps=apps)
    out = cli("--json", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert out.returncode == 1
    import json

    events = [json.loads(ln) for ln in out.stdout.splitlines()]
    err = events[-1]
    assert err["event"] == "error" and "do not fit in DATA" in err["message"]
    assert "layout: {DATA:" in err["hint"]
    steps = [e["step"] for e in events if e["event"] == "step-start"]
    assert "app budget" in steps and "customise" not in steps  # nothing staged or joined for DATA


def test_opencv_python_in_the_lock_is_refused(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> None:
    lock = tmp_path / "bad.lock"
    lock.write_text("opencv-python==4.10.0.84 \\\n    --hash=sha256:" + "a" * 64 + "\n")
    apps = app_section(python={"lock": str(lock), "python": "3.8.10", "wheels": str(DEMO / "wheels")})
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="cv", apps=apps)
    out = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert out.returncode == 1 and "sophon-opencv" in out.stderr and "Traceback" not in out.stderr


def test_x86_wheel_is_refused(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    name = "tinyx86-1.0-cp38-cp38-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheels / name, "w") as zf:
        zf.writestr("tinyx86/__init__.py", "")
    lock = tmp_path / "x86.lock"
    lock.write_text(f"tinyx86==1.0 \\\n    --hash=sha256:{sha(wheels / name)}\n")
    apps = app_section(python={"lock": str(lock), "python": "3.8.10", "wheels": str(wheels)})
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="x86", apps=apps)
    out = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--offline")
    # a wheel for another machine is never used, even when its hash is in the lock
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "tinyx86==1.0" in out.stderr and "not in the cache" in out.stderr, out.stderr


@pytest.mark.slow
def test_lock_update_python_resolves_aarch64_cp38_wheels(tmp_path: Path) -> None:
    """Real PyPI: `airbox-build lock --update-python` re-resolves the SD-lcm-tpu pins for the box."""
    import shutil

    from builder.customise.pyenv import parse_lock

    for name in ("sd-lcm-tpu.in",):
        shutil.copy(REPO / "recipes" / name, tmp_path / name)
    recipe = write_recipe(
        tmp_path,
        {"path": str(tmp_path)},
        name="relock",
        apps={
            "sd": {
                "path": "/data/sd",
                "python": {
                    "lock": "sd-lcm-tpu.lock",
                    "requirements": "sd-lcm-tpu.in",
                    "exclude_newer": "2024-08-15",
                    "python": "3.8.10",
                },
            }
        },
    )
    (tmp_path / "sd-lcm-tpu.lock").write_text("")  # exists but stale: --update-python rewrites it
    out = cli(
        "lock", recipe, "--update-python", "--cache-dir", tmp_path / "cache", env={"PATH": os.environ["PATH"]}
    )
    # the base is a folder with no package: locking it is a no-op, the python lock is what counts
    pins = parse_lock(tmp_path / "sd-lcm-tpu.lock")
    assert out.returncode == 0, out.stderr
    names = {p.name for p in pins}
    assert {"torch", "gradio", "diffusers", "pillow"} <= names and "opencv-python" not in names
    assert len(pins) == len(parse_lock(REPO / "recipes" / "sd-lcm-tpu.lock"))


def test_python_target_other_than_the_images_is_refused(
    vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    """An environment for Python 3.11 on a box whose python3 is 3.8 could never import its wheels."""
    py = {"lock": str(DEMO / "demo-app.lock"), "python": "3.11.2", "wheels": str(DEMO / "wheels")}
    apps = app_section(python=py)
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="py311", apps=apps)
    out = cli("--json", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert out.returncode == 1, out.stdout
    import json

    err = [json.loads(ln) for ln in out.stdout.splitlines()][-1]
    assert err["event"] == "error"
    assert "Python 3.11.2" in err["message"] and "python3 is Python 3.8" in err["message"]
    assert 'python: "3.8"' in err["hint"] and "py311.yaml" in err["where"]
    assert not (tmp_path / "out" / "py311").exists()
