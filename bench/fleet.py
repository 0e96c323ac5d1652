"""The fleet benchmark: one device against N, on the benchmark's realistic package.

    python bench/fleet.py [--size full|small] [--devices 20] [--work DIR] [--keep]

Both runs start cold (empty cache, no output) and build the benchmark recipe (bench/workload.py:
netplan, mirrors, files, the app payload) with `identity: {ssh_host_keys: per-device}` and a
`devices:` list: each device its hostname and eth1 address. The 1-device fleet is the baseline:
the shared build plus one device. Printed: the time and the disk space (hard links counted once)
each extra device costs, against the targets (2 s per device; the files that differ from the
shared build: changed chunks, scripts, md5.txt, the bundle's own report/sums/known_hosts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import workload  # noqa: E402
from bench.bigpackage import SIZES  # noqa: E402
from bench.run import DEFAULT_WORK, log, prepare_package  # noqa: E402

MiB = 1 << 20


def fleet_recipe(path: Path, package: Path, payload: Path, devices: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    workload.write_recipe(path, package, payload, 0)
    doc = yaml.safe_load(path.read_text())
    doc["identity"] = {"ssh_host_keys": "per-device"}
    doc["devices"] = [
        {
            "name": f"d{i:02d}",
            "hostname": f"airbox-{i:02d}",
            "network": {"ethernets": {"eth1": {"addresses": [f"192.168.150.{10 + i}/24"]}}},
        }
        for i in range(1, devices + 1)
    ]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def disk_bytes(top: Path) -> int:
    """Allocated bytes under `top`, each inode once (hard links are not counted twice)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def own_bytes(device: Path, shared: Path) -> int:
    """Allocated bytes of a device folder's files that are not links to the shared build's."""
    shared_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in shared.rglob("*") if p.is_file()}
    return sum(
        p.stat().st_blocks * 512
        for p in device.rglob("*")
        if p.is_file() and (p.stat().st_dev, p.stat().st_ino) not in shared_inodes
    )


def run_fleet(recipe: Path, work: Path, tag: str) -> dict[str, Any]:
    out, cache = work / f"fleet-out-{tag}", work / f"fleet-cache-{tag}"
    for p in (out, cache):
        shutil.rmtree(p, ignore_errors=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SOURCE_DATE_EPOCH", None)
    cmd = [sys.executable, "-m", "builder.cli", "--json", "build", str(recipe), "-o", str(out)]
    cmd += ["--cache-dir", str(cache)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"airbox-build failed on {recipe}:\n{proc.stderr[-2000:]}")
    steps: dict[str, float] = {}
    device_seconds = []
    for line in proc.stdout.splitlines():
        ev = json.loads(line)
        if ev.get("event") == "step-end" and ev.get("step") in ("shared build", "device"):
            if ev["step"] == "device":
                device_seconds.append(ev["seconds"])
            else:
                steps["shared"] = ev["seconds"]
    root = out / workload.NAME
    devices = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("d"))
    result = {
        "seconds": wall,
        "shared_seconds": steps.get("shared", 0.0),
        "device_seconds": device_seconds,
        "disk_bytes": disk_bytes(root),
        "device_own_bytes": [own_bytes(d, root / "_shared") for d in devices],
    }
    shutil.rmtree(cache, ignore_errors=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--keep", action="store_true", help="keep the package (reused next time) and outputs")
    args = ap.parse_args()
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    size = SIZES[args.size]
    try:
        package, payload = prepare_package(work, size)
        recipes = work / "fleet-recipes"
        recipes.mkdir(exist_ok=True)
        one = fleet_recipe(recipes / f"{workload.NAME}.yaml", package, payload, 1)
        log("1 device (the shared build + one device), cold")
        r1 = run_fleet(one, work, "1")
        many = fleet_recipe(recipes / "many" / f"{workload.NAME}.yaml", package, payload, args.devices)
        log(f"{args.devices} devices, cold")
        rn = run_fleet(many, work, str(args.devices))
        extra = args.devices - 1
        per_time = (rn["seconds"] - r1["seconds"]) / extra
        per_disk = (rn["disk_bytes"] - r1["disk_bytes"]) / extra
        own = sorted(rn["device_own_bytes"])[len(rn["device_own_bytes"]) // 2]
        dev = sorted(rn["device_seconds"])[len(rn["device_seconds"]) // 2]
        lines = [
            f"## Fleet benchmark ({args.size} package, {os.cpu_count()} cores)",
            "",
            "| | 1 device | " + f"{args.devices} devices |",
            "|---|---|---|",
            f"| wall time | {r1['seconds']:.1f} s | {rn['seconds']:.1f} s |",
            f"| shared build | {r1['shared_seconds']:.1f} s | {rn['shared_seconds']:.1f} s |",
            f"| output on disk (links once) | {r1['disk_bytes'] / MiB:.1f} MiB "
            f"| {rn['disk_bytes'] / MiB:.1f} MiB |",
            "",
            f"- per extra device: **{per_time:.2f} s** (target <= 2 s: "
            f"{'met' if per_time <= 2 else 'MISSED'}); a device step's median {dev:.2f} s",
            f"- disk per extra device: **{per_disk / MiB:.2f} MiB**; a device's own files (not links to the "
            f"shared build) median {own / MiB:.2f} MiB (target: disk per device <= its own files: "
            f"{'met' if per_disk <= own * 1.05 + 64 * 1024 else 'MISSED'})",
            f"- ratio {args.devices} devices / 1 device: {rn['seconds'] / r1['seconds']:.2f}x time, "
            f"{rn['disk_bytes'] / r1['disk_bytes']:.2f}x disk",
        ]
        text = "\n".join(lines) + "\n"
        (work / f"fleet-{args.size}.md").write_text(text)
        (work / f"fleet-{args.size}.json").write_text(json.dumps({"one": r1, "many": rn}, indent=2))
        print(text)
    finally:
        if not args.keep:
            for p in work.glob("fleet-out-*"):
                shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(work / f"package-{size.name}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
