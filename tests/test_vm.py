"""Boot what we build: bundles of a real arm64 Debian userland (tests/vm_fixture.py) booted in
QEMU by `airbox-build boot`, and checked against their recipes with `--check`.

Slow tier (CI runs it): the kernel comes from the Debian archive through the fetch layer (cached
outside the repo, like the U-Boot build); the userland is built once by mmdebstrap.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vm_fixture
from buildhelp import cli, write_recipe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DEMO_APP = REPO / "recipes" / "demo" / "app"
sys.path.insert(0, str(REPO / "recipes" / "demo"))
import make_demo_app  # noqa: E402


def _unavailable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def vm_package() -> Path:
    missing = vm_fixture.missing_tools()
    if missing:
        _unavailable("the VM tier needs: " + "; ".join(missing) + " (scripts/ci-vm-deps sets them up)")
    if os.geteuid() != 0:
        _unavailable("the VM fixture unpacks an arm64 userland with its owners: run as root")
    return vm_fixture.ensure_vm_package()


@pytest.fixture(scope="session")
def vm_cache() -> Path:
    """The fetch cache for the kernel (outside the repo, kept between runs like the U-Boot build)."""
    path = vm_fixture.cache_root() / "fetch-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def key(tmp_path: Path) -> Path:
    k = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tester@ci", "-f", str(k)], check=True
    )
    return k


def _no_vm_left(state: Path) -> None:
    vm = state / "vm.json"
    if vm.exists():
        pid = json.loads(vm.read_text())["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        pytest.fail(f"a VM (pid {pid}) was left running")


@pytest.fixture
def booted(tmp_path: Path) -> Iterator[list[Path]]:
    """Output folders booted by a test: no VM may outlive it (killed by pid, then failed)."""
    outs: list[Path] = []
    yield outs
    for o in outs:
        _no_vm_left(o / "boot")


def _build(recipe: Path, out: Path, cache: Path) -> Path:
    p = cli(recipe, "-o", out, "--cache-dir", cache, "--quiet")
    assert p.returncode == 0, p.stderr
    name = next(d for d in out.iterdir() if d.is_dir())
    return name


def _boot_check(
    bundle: Path, cache: Path, *args: str | Path
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    p = cli("--json", "boot", bundle, "--check", "--cache-dir", cache, "--timeout", "240", *args)
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return p, [e for e in events if e.get("event") == "check"]


def _row(rows: list[dict[str, Any]], check: str) -> dict[str, Any]:
    found = [r for r in rows if r["check"] == check]
    assert found, f"no row {check!r} in {[r['check'] for r in rows]}"
    return found[-1]


def _app_inputs(folder: Path) -> dict[str, Any]:
    """The demo's miniature app for a Debian 12 image: its Python 3.11, a pure wheel only."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "src.tar.gz").write_bytes(make_demo_app.source_tarball())
    (folder / "wheels").mkdir()
    name, data = make_demo_app.wheel(
        "tinypure", "1.0", "py3-none-any", {"tinypure/__init__.py": b"VALUE = 42\n"}
    )
    (folder / "wheels" / name).write_bytes(data)
    import hashlib

    (folder / "app.lock").write_text(
        f"tinypure==1.0 \\\n    --hash=sha256:{hashlib.sha256(data).hexdigest()}\n"
    )
    archive = make_demo_app.model_archive()
    (folder / "model.tar.gz").write_bytes(archive)
    return {
        "path": "/data/SD-demo",
        "owner": "linaro:linaro",
        "source": {
            "path": str(folder / "src.tar.gz"),
            "strip_components": 1,
            "sha256": hashlib.sha256((folder / "src.tar.gz").read_bytes()).hexdigest(),
        },
        "models": [
            {
                "path": str(folder / "model.tar.gz"),
                "extract": "models/basic/",
                "sha256": hashlib.sha256(archive).hexdigest(),
            },
        ],
        "python": {
            "lock": str(folder / "app.lock"),
            "target": ".pydeps",
            "platform": "manylinux2014_aarch64",
            "python": "3.11.2",
            "wheels": str(folder / "wheels"),
        },
        "service": {"exec": "python3 gr.py", "user": "linaro", "port": 8999},
        "dirs": ["models/controlnet"],
    }


FIRSTBOOT_UNIT = """\
[Unit]
Description=runs once, on the first boot only
ConditionPathExists=!/var/lib/airbox-firstboot.done

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo ran >> /var/lib/airbox-firstboot.log; touch /var/lib/airbox-firstboot.done'

[Install]
WantedBy=multi-user.target
"""


def test_noop_bundle_boots_and_passes(
    vm_package: Path, vm_cache: Path, tmp_path: Path, booted: list[Path]
) -> None:
    recipe = write_recipe(tmp_path / "r", vm_package, name="vmnoop")
    out = _build(recipe, tmp_path / "out", vm_cache)
    booted.append(out)
    p, rows = _boot_check(out, vm_cache)
    assert p.returncode == 0, p.stdout + p.stderr
    assert _row(rows, "root filesystem")["status"] == "ok"
    assert _row(rows, "mount /data")["status"] == "ok"
    # the vendor-like unit needs the TPU: it fails in the VM, and the vendor baseline says so
    assert _row(rows, "boot 1: unit bm-sophon.service")["status"] == "known"
    # identity is on by default: the vendor's keys (in ROOTFS_RW's upper layer) are gone, the box
    # made its own on its first boot before sshd started, and kept them on the second
    assert _row(rows, "ssh host keys")["status"] == "ok", _row(rows, "ssh host keys")
    assert "not the vendor's" in _row(rows, "ssh host keys")["detail"]
    assert _row(rows, "sshd")["status"] == "ok"
    assert _row(rows, "machine-id")["status"] == "ok"
    assert _row(rows, "boot 2: host keys")["status"] == "ok"
    assert _row(rows, "boot 2: machine-id")["status"] == "ok"
    assert _row(rows, "user linaro: vendor password")["status"] == "warn"  # nothing asked to lock it
    assert (out / "boot" / "console.log").read_text(errors="replace").count(
        "airbox-vm: root is the overlay"
    ) == 2
    assert not (out / "boot" / "vm.json").exists()


def test_recipe_bundle_passes_check_twice(
    vm_package: Path, vm_cache: Path, tmp_path: Path, key: Path, booted: list[Path]
) -> None:
    pub = (key.with_suffix(".pub")).read_text().strip()
    recipe = write_recipe(
        tmp_path / "r",
        vm_package,
        name="vmbox",
        hostname="airbox-vm-01",
        network={
            "ethernets": {
                "eth0": {"dhcp4": True},
                "eth1": {
                    "addresses": ["192.168.150.11/24"],
                    "nameservers": ["223.5.5.5"],
                    "routes": [{"to": "10.20.0.0/16", "via": "192.168.150.254"}],
                    "optional": True,
                },
            }
        },
        apt={"mirror": "https://mirrors.tuna.tsinghua.edu.cn/debian/"},
        pip={"index_url": "https://pypi.tuna.tsinghua.edu.cn/simple"},
        users={"linaro": {"ssh_authorized_keys": [pub]}},
        files=[
            {"path": "/etc/ssh/sshd_config.d/10-airbox.conf", "content": "PasswordAuthentication no\n"},
            {"path": "/etc/systemd/system/airbox-firstboot.service", "content": FIRSTBOOT_UNIT},
        ],
        services={"enable": ["airbox-firstboot.service"]},
        apps={"sd-demo": _app_inputs(tmp_path / "app")},
    )
    out = _build(recipe, tmp_path / "out", vm_cache)
    booted.append(out)
    t0 = time.monotonic()
    p, rows = _boot_check(out, vm_cache, "--identity", key)
    first = time.monotonic() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    for check, status in (
        ("hostname", "ok"),
        ("address eth1", "ok"),
        ("nameservers eth1", "ok"),
        ("routes eth1", "ok"),
        ("files as built", "ok"),
        ("ssh password login", "ok"),
        ("user linaro: authorized_keys", "ok"),
        ("app sd-demo: port 8999", "ok"),
        ("boot 1: unit sd-demo.service", "ok"),
        ("boot 2: unit sd-demo.service", "ok"),
        ("boot 1: unit airbox-firstboot.service", "ok"),
    ):
        assert _row(rows, check)["status"] == status, _row(rows, check)
    assert "refused, as the recipe says" in _row(rows, "ssh password login")["detail"]
    logins = [r for r in rows if r["check"].startswith("user linaro: login with")]
    assert logins and all(r["status"] == "ok" for r in logins)

    # the second `boot` is the third boot of the same box: the first-boot unit stays done
    p2 = cli("boot", out, "--keep", "--cache-dir", vm_cache, "--timeout", "240")
    assert p2.returncode == 0, p2.stdout + p2.stderr
    try:
        ssh = cli("ssh", out, "--identity", key, "--user", "linaro", "cat", "/var/lib/airbox-firstboot.log")
        assert ssh.returncode == 0, ssh.stderr
        assert ssh.stdout.splitlines() == ["ran"]
    finally:
        stop = cli("boot", out, "--stop")
        assert stop.returncode == 0, stop.stderr
    print(f"boot --check of the recipe bundle: {first:.1f} s")


def test_planted_faults_each_named(
    vm_package: Path, vm_cache: Path, tmp_path: Path, key: Path, booted: list[Path]
) -> None:
    pub = (key.with_suffix(".pub")).read_text().strip()
    recipe = write_recipe(
        tmp_path / "r",
        vm_package,
        name="vmfaults",
        users={"linaro": {"ssh_authorized_keys": [pub]}},
        files=[
            {"path": "/etc/ssh/sshd_config.d/50-bad.conf", "content": "NoSuchSshdOption yes\n"},
            {
                "path": "/home/linaro/.ssh/authorized_keys",
                "content": pub + "\n",
                "mode": "0600",
                "owner": "admin:admin",
            },
            {
                "path": "/etc/netplan/60-bad.yaml",
                "content": "network:\n  version: 2\n  ethernets:\n    eth1: {addresses: [not-an-address]}\n",
                "mode": "0600",
            },
            {
                "path": "/etc/systemd/system/exits.service",
                "content": "[Service]\nExecStart=/bin/sh -c 'echo giving up; exit 3'\n"
                "[Install]\nWantedBy=multi-user.target\n",
            },
        ],
        services={"enable": ["exits.service"]},
        network={"ethernets": {"eth1": {"addresses": ["192.168.150.12/24"]}}},
    )
    out = _build(recipe, tmp_path / "out", vm_cache)
    booted.append(out)
    p, rows = _boot_check(out, vm_cache, "--identity", key)
    assert p.returncode == 1, p.stdout
    sshd = _row(rows, "sshd")
    assert sshd["status"] == "fail" and "NoSuchSshdOption" in sshd["detail"]
    ak = _row(rows, "user linaro: authorized_keys")
    assert ak["status"] == "fail" and "owned by admin" in ak["detail"]
    net = _row(rows, "address eth1")
    assert net["status"] == "fail" and "60-bad.yaml" in net["detail"]
    unit = _row(rows, "boot 1: unit exits.service")
    assert unit["status"] == "fail" and "giving up" in unit["detail"]
    err = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")][-1]
    assert err["event"] == "error" and "check(s) failed" in err["message"]


def test_fleet_devices_boot_with_their_own_identity(
    vm_package: Path, vm_cache: Path, tmp_path: Path, key: Path, booted: list[Path]
) -> None:
    """A 3-device fleet: two with host keys made at build time (checked strictly against the
    fleet's known_hosts), one that makes its own on its first boot; a new account logs in with its
    key, the locked vendor accounts do not with their public passwords."""
    pub = (key.with_suffix(".pub")).read_text().strip()
    recipe = write_recipe(
        tmp_path / "r",
        vm_package,
        name="vmfleet",
        identity={"ssh_host_keys": "per-device"},
        users={
            "ops": {"create": True, "groups": ["sudo"], "ssh_authorized_keys": [pub]},
            "linaro": {"lock": True},
            "admin": {"lock": True},
        },
        ssh={"permit_root_login": False},
        network={"ethernets": {"eth0": {"dhcp4": True}}},  # devices add eth1 (deep merge)
        timezone="Asia/Shanghai",
        locale="C.UTF-8",
        ntp=["ntp.aliyun.com", "203.107.6.88"],
        devices=[
            {
                "name": "a",
                "hostname": "airbox-a",
                "network": {"ethernets": {"eth1": {"addresses": ["192.168.150.11/24"]}}},
            },
            {
                "name": "b",
                "hostname": "airbox-b",
                "network": {"ethernets": {"eth1": {"addresses": ["192.168.150.12/24"]}}},
            },
            {"name": "c", "hostname": "airbox-c", "identity": {"ssh_host_keys": "regenerate"}},
        ],
    )
    out = tmp_path / "out"
    p = cli(recipe, "-o", out, "--cache-dir", vm_cache, "--quiet")
    assert p.returncode == 0, p.stderr
    root = out / "vmfleet"
    known = (root / "known_hosts").read_text()
    for device, host in (("a", "airbox-a"), ("b", "airbox-b"), ("c", "airbox-c")):
        bundle = root / device
        booted.append(bundle)
        p, rows = _boot_check(bundle, vm_cache, "--identity", key)
        assert p.returncode == 0, p.stdout + p.stderr
        keys = _row(rows, "ssh host keys")
        assert keys["status"] == "ok", keys
        if device != "c":
            assert "the bundle's known_hosts pins" in keys["detail"]
            box = {
                " ".join(line.split()[1:3])
                for line in (bundle / "boot" / "known_hosts").read_text().splitlines()
            }
            assert box == {
                " ".join(line.split()[1:3]) for line in known.splitlines() if line.startswith(host)
            }
        else:
            assert "not the vendor's" in keys["detail"] and not (bundle / "known_hosts").exists()
        for check in (
            "sshd",
            "hostname",
            "machine-id",
            "boot 2: host keys",
            "boot 2: machine-id",
            "user ops",
            "user ops: authorized_keys",
            "user linaro: vendor password",
            "user admin: vendor password",
            "timezone",
            "locale",
            "ntp",
        ):
            assert _row(rows, check)["status"] == "ok", _row(rows, check)
        logins = [r for r in rows if r["check"].startswith("user ops: login with")]
        assert logins and all(r["status"] == "ok" for r in logins), logins
        assert "sudo" in _row(rows, "user ops")["detail"]


def test_stop_and_ssh_without_vm(vm_package: Path, vm_cache: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r", vm_package, name="idle")
    out = _build(recipe, tmp_path / "out", vm_cache)
    p = cli("ssh", out, "true")
    assert p.returncode == 1 and "no VM of this bundle is running" in p.stderr
    p = cli("boot", out, "--stop")
    assert p.returncode == 0 and "no VM" in p.stdout
    shutil.rmtree(out)


def test_an_update_in_the_field_boots_and_names_the_new_bundle(
    vm_package: Path, vm_cache: Path, tmp_path: Path, booted: list[Path]
) -> None:
    """The box runs the vendor package, gets the bundle by an update from its own eMMC (placed on
    DATA as push places it, played as U-Boot plays it), and boots onto it."""
    recipe = write_recipe(
        tmp_path / "r",
        vm_package,
        name="vmupdate",
        hostname="airbox-updated",
        files=[{"path": "/etc/airbox/updated.txt", "content": "by an update\n"}],
    )
    out = _build(recipe, tmp_path / "out", vm_cache)
    booted.append(out)
    bundle_id = json.loads((out / "build-report.json").read_text())["bundle_id"]["bundle"]
    p, rows = _boot_check(out, vm_cache, "--update-from", vm_package)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "updated to the bundle from p7" in p.stdout + p.stderr
    row = _row(rows, "bundle id")
    assert row["status"] == "ok" and row["detail"].startswith(bundle_id[:12]), row
    assert _row(rows, "hostname")["status"] == "ok"
    assert _row(rows, "mount /data")["status"] == "ok"
    assert _row(rows, "files as built")["status"] == "ok"
