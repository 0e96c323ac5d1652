"""The benchmark: airbox-build against the vendor's way of repacking, on a realistic package.

    python bench/run.py [--size small|full] [--repeat 3] [--baseline-repeat N] [--keep]
                        [--work DIR] [--profile] [--quick]

--quick: three airbox-build runs of each kind, one of the vendor method, the package kept:
under 10 minutes on 2 cores once the package exists (building it takes about 4 more).

1. Builds a vendor package with the real chunk size and real content (bench/bigpackage.py),
   and the app payload; kept between runs with --keep.
2. Measures, `--repeat` times each (the median is reported):
   - baseline: the vendor's method for the same result (bench/baseline.py);
   - cold: `airbox-build` with an empty cache and no previous output;
   - warm: the same recipe with only the netplan changed, right after a cold build.
3. Prints the table (times, ratios, peak RSS, bytes recompressed/reused, output sizes) and
   writes it, with the raw numbers, to WORK/results-<size>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import workload  # noqa: E402
from bench.baseline import run_baseline  # noqa: E402
from bench.bigpackage import SIZES, Size, build_big_package, build_payload  # noqa: E402

MiB = 1 << 20
DEFAULT_WORK = Path(os.environ.get("AIRBOX_BENCH_DIR", "/var/tmp/airbox-bench"))
NEEDS = {"full": 24 << 30, "small": 8 << 30}  # free disk the run needs
STAMP_VERSION = 3  # bump when the package builder changes


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- preparation


def prepare_package(work: Path, size: Size) -> tuple[Path, Path]:
    """The vendor package and the payload for `size`, reused when already built."""
    root = work / f"package-{size.name}"
    stamp = root / "STAMP.json"
    want = {"version": STAMP_VERSION, "size": asdict(size)}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        log(f"reusing the {size.name} package in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        log(f"building the {size.name} vendor package in {root} (real chunk size, gzip -6)")
        t = time.perf_counter()
        build_big_package(root, size)
        build_payload(root / "payload", size)
        stamp.write_text(json.dumps(want))
        log(f"package ready in {time.perf_counter() - t:.0f} s")
    return root / "sdcard", root / "payload"


def describe_package(package: Path, payload: Path) -> dict[str, Any]:
    chunks: dict[str, list[int]] = {}
    for p in package.iterdir():
        if "-of-" in p.name:
            chunks.setdefault(p.name.split(".")[0], []).append(p.stat().st_size)
    images = _image_sizes(package)
    return {
        "files": len(list(package.iterdir())),
        "bytes": sum(p.stat().st_size for p in package.iterdir()),
        "partitions": {
            k: {"chunks": len(v), "gz_bytes": sum(v), "image_bytes": images.get(k, 0)}
            for k, v in sorted(chunks.items())
        },
        "payload_bytes": sum(p.stat().st_size for p in payload.rglob("*") if p.is_file()),
        "payload_files": sum(1 for p in payload.rglob("*") if p.is_file()),
    }


def _image_sizes(package: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for cmd in package.glob("boot_emmc-*.cmd"):
        name = cmd.stem[len("boot_emmc-") :]
        total = 0
        for line in cmd.read_text().splitlines():
            if line.startswith("unzip "):
                total += int(line.split()[-1], 16)
        out[name] = total
    return out


# ----------------------------------------------------------------------------- runs


def run_airbox(recipe: Path, out: Path, cache: Path, result: Path, profile: Path | None) -> dict[str, Any]:
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "pyinstrument", "-o", str(profile)]
    cmd += [str(REPO / "bench" / "measure_build.py"), str(result), "--"]
    cmd += ["--quiet", "build", str(recipe), "-o", str(out), "--cache-dir", str(cache)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SOURCE_DATE_EPOCH", None)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"airbox-build failed ({proc.returncode}) on {recipe}")
    measured = json.loads(result.read_text())
    report = json.loads((out / workload.NAME / "build-report.json").read_text())
    card = out / workload.NAME / "card"
    parts = report["partitions"]
    recompressed = sum(p["bytes_recompressed"] for p in parts)
    image_bytes = sum(p["image_bytes_after"] for p in parts)
    return {
        "seconds": wall,
        "rss_self": measured["rss_self"],
        "rss_children": measured["rss_children"],
        "bytes_recompressed": recompressed,
        "bytes_reused": image_bytes - recompressed,
        "chunks_recompressed": sum(p["recompressed"] for p in parts),
        "chunks_reused": sum(p["reused"] for p in parts),
        "chunks_pooled": sum(p.get("pooled", 0) for p in parts),
        "bytes_pooled": sum(p.get("bytes_pooled", 0) for p in parts),
        "output_bytes": sum(p.stat().st_size for p in card.iterdir() if p.is_file()),
        "same_edits": sorted(p["label"] for p in parts if p.get("same_edits_as_earlier")),
        "timings": report.get("timings", {}),
    }


def measure(
    work: Path, package: Path, payload: Path, repeat: int, profile: bool, baseline_repeat: int
) -> dict[str, list[dict[str, Any]]]:
    recipes = work / "recipes"
    recipes.mkdir(exist_ok=True)
    cold_recipe = workload.write_recipe(recipes / "cold.yaml", package, payload, 0)
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "cold": [], "warm": []}
    edits = workload.baseline_edits(payload, 0)
    out, cache = work / "output", work / "cache"
    for r in range(repeat):
        variant = 1 + r % (len(workload.NETPLAN_ADDRESSES) - 1)
        warm_recipe = workload.write_recipe(recipes / f"warm-{variant}.yaml", package, payload, variant)

        if r < baseline_repeat:
            log(f"run {r + 1}/{repeat}: baseline (vendor method)")
            b = run_baseline(package, work / "baseline-out", work / "baseline-work", edits)
            runs["baseline"].append({"seconds": b.total, "steps": b.seconds, "output_bytes": b.output_bytes})
            log(f"  baseline {b.total:.1f} s  " + "  ".join(f"{k} {v:.1f}" for k, v in b.seconds.items()))
            shutil.rmtree(work / "baseline-out", ignore_errors=True)

        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        prof = (work / f"profile-cold-{r + 1}.txt") if profile and r == 0 else None
        log(f"run {r + 1}/{repeat}: cold airbox-build")
        c = run_airbox(cold_recipe, out, cache, work / "cold.json", prof)
        runs["cold"].append(c)
        log(f"  cold {c['seconds']:.1f} s, peak RSS {c['rss_self'] / MiB:.0f} MiB")

        prof = (work / f"profile-warm-{r + 1}.txt") if profile and r == 0 else None
        log(f"run {r + 1}/{repeat}: warm airbox-build (netplan changed)")
        w = run_airbox(warm_recipe, out, cache, work / "warm.json", prof)
        runs["warm"].append(w)
        log(f"  warm {w['seconds']:.1f} s, peak RSS {w['rss_self'] / MiB:.0f} MiB")
    return runs


# ----------------------------------------------------------------------------- the table


def machine() -> dict[str, str]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / (1 << 20):.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    e2fs = subprocess.run(["debugfs", "-V"], capture_output=True, check=False).stderr.decode().split("\n")[0]
    gz = (
        subprocess.run(["gzip", "--version"], capture_output=True, check=False).stdout.decode().split("\n")[0]
    )
    import isal

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "isal": isal.__version__,
        "e2fsprogs": e2fs.strip(),
        "gzip": gz.strip(),
    }


def _mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    base = med("baseline", "seconds")
    base_out = med("baseline", "output_bytes")
    s: dict[str, Any] = {"baseline": {"seconds": base, "output_bytes": base_out}}
    s["baseline"]["steps"] = {
        k: statistics.median(r["steps"][k] for r in runs["baseline"]) for k in runs["baseline"][0]["steps"]
    }
    for kind in ("cold", "warm"):
        s[kind] = {
            key: med(kind, key)
            for key in (
                "seconds",
                "rss_self",
                "rss_children",
                "bytes_recompressed",
                "bytes_reused",
                "chunks_recompressed",
                "chunks_reused",
                "chunks_pooled",
                "bytes_pooled",
                "output_bytes",
            )
        }
        s[kind]["ratio"] = s[kind]["seconds"] / base
        s[kind]["output_vs_baseline"] = s[kind]["output_bytes"] / base_out
        steps = sorted({k for r in runs[kind] for k in r["timings"]})
        s[kind]["steps"] = {k: statistics.median(r["timings"].get(k, 0.0) for r in runs[kind]) for k in steps}
        s[kind]["runs"] = [r["seconds"] for r in runs[kind]]
        s[kind]["same_edits"] = sorted({label for r in runs[kind] for label in r.get("same_edits", [])})
    s["baseline"]["runs"] = [r["seconds"] for r in runs["baseline"]]
    return s


TARGETS = {"cold": 0.25, "warm": 0.05}


def render(
    size: str, pkg: dict[str, Any], s: dict[str, Any], mach: dict[str, str], repeat: int, baseline_repeat: int
) -> str:
    of = f"median of {repeat}" + (f", baseline {baseline_repeat}" if baseline_repeat != repeat else "")
    lines = [
        f"#### `--size {size}` ({of})",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory']} RAM, Linux {mach['kernel']}, "
        f"Python {mach['python']}, isal {mach['isal']}, {mach['e2fsprogs']}, {mach['gzip']}.",
        "",
        "Package: "
        + ", ".join(
            f"{k.upper()} {v['chunks']} chunk(s) / {_mib(v['image_bytes'])}"
            for k, v in pkg["partitions"].items()
        )
        + f"; {_mib(pkg['bytes'])} in {pkg['files']} files. "
        f"App payload: {_mib(pkg['payload_bytes'])} in {pkg['payload_files']} files "
        f"({workload.PAYLOAD_FORM}).",
        "",
        "| run | time | × baseline | target | peak RSS (builder / tools) | recompressed | kept "
        "| output | vs baseline |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    b = s["baseline"]
    lines.append(
        f"| baseline (vendor method) | {b['seconds']:.1f} s | 1 | | | {_mib(sum(pkg_image(pkg)))} | 0 | "
        f"{_mib(b['output_bytes'])} | 1 |"
    )
    for kind in ("cold", "warm"):
        k = s[kind]
        ok = "✅" if k["ratio"] <= TARGETS[kind] else "❌"
        lines.append(
            f"| {kind} | {k['seconds']:.1f} s | {k['ratio']:.3f} | ≤ {TARGETS[kind]} {ok} | "
            f"{_mib(k['rss_self'])} / {_mib(k['rss_children'])} | "
            f"{_mib(k['bytes_recompressed'])} ({_chunks(k['chunks_recompressed'])}) | "
            f"{_mib(k['bytes_reused'])} ({k['chunks_reused']:.0f} vendor + "
            f"{k['chunks_pooled']:.0f} earlier-build chunks) | "
            f"{_mib(k['output_bytes'])} | {k['output_vs_baseline']:.3f} |"
        )
    lines += ["", "Steps (median seconds):", ""]
    lines.append("- baseline: " + ", ".join(f"{k} {v:.1f}" for k, v in b["steps"].items()))
    for kind in ("cold", "warm"):
        lines.append(f"- {kind}: " + ", ".join(f"{k} {v:.1f}" for k, v in s[kind]["steps"].items()))
    for kind in ("cold", "warm"):
        if s[kind]["same_edits"]:
            lines.append(
                f"- {kind}: edited exactly as in the last build, so taken from it (nothing applied): "
                + ", ".join(s[kind]["same_edits"])
            )
    lines.append(
        "- all runs (s): "
        + "; ".join(
            f"{kind} " + ", ".join(f"{x:.1f}" for x in s[kind]["runs"])
            for kind in ("baseline", "cold", "warm")
        )
    )
    return "\n".join(lines) + "\n"


def _chunks(n: float) -> str:
    return f"{n:.0f} chunk" + ("" if round(n) == 1 else "s")


def pkg_image(pkg: dict[str, Any]) -> list[int]:
    return [v["image_bytes"] for v in pkg["partitions"].values()]


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each kind; the median is reported")
    ap.add_argument(
        "--baseline-repeat",
        type=int,
        default=None,
        help="baseline runs (default: --repeat; it is the slow part)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the package and outputs (reused next time)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="one vendor-method run (the slow part) instead of --repeat; implies --keep",
    )
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"work folder (default {DEFAULT_WORK})")
    ap.add_argument(
        "--profile", action="store_true", help="profile the first cold and warm run (pyinstrument)"
    )
    args = ap.parse_args()
    if args.quick:
        args.baseline_repeat, args.keep = 1, True
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < NEEDS[args.size]:
        raise SystemExit(
            f"{work} has {free >> 30} GiB free; --size {args.size} needs {NEEDS[args.size] >> 30} GiB"
        )
    size = SIZES[args.size]
    try:
        package, payload = prepare_package(work, size)
        pkg = describe_package(package, payload)
        baseline_repeat = max(1, min(args.repeat, args.baseline_repeat or args.repeat))
        runs = measure(work, package, payload, args.repeat, args.profile, baseline_repeat)
        s = summarise(runs)
        mach = machine()
        text = render(args.size, pkg, s, mach, args.repeat, baseline_repeat)
        text += (
            f"\nWhole benchmark run: {(time.perf_counter() - started) / 60:.1f} min; load average at "
            f"start {load0:.1f}, at end {os.getloadavg()[0]:.1f} (other work on the machine skews times).\n"
        )
        (work / f"results-{args.size}.md").write_text(text)
        (work / f"results-{args.size}.json").write_text(
            json.dumps({"package": pkg, "summary": s, "runs": runs, "machine": mach}, indent=2)
        )
        print()
        print(text)
        print(f"(written to {work}/results-{args.size}.md and .json)")
    finally:
        for name in ("output", "cache", "baseline-out", "baseline-work"):
            shutil.rmtree(work / name, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work / f"package-{size.name}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
