"""Helpers for tests/test_faults.py and tests/test_reproducible.py.

- `write_rich_recipe(folder, base, blob_url)`: a recipe that changes ROOTFS, ROOTFS_RW, OPT and DATA
  (files of every kind, an overlay, users, network, services, removals, the demo app with its
  split model and offline wheels), grows DATA, downloads one file, and asks for the card image
  and the release zip. Every input is copied into `folder` and named by a relative path, so the
  folder can be copied elsewhere and built again.
- `start_cli(...)` / `StoppedBuild`: the real CLI as a subprocess (`--json`), optionally stalled
  at an exact point (`_AIRBOX_BUILD_STALL_AT`, see hooks/sitecustomize.py) to be signalled.
- `bundle_digests`, `compare_bundles`: what a bundle is, file by file (sha256), minus the report.
- `cache_problems`: every cache entry that looks complete but is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from buildhelp import REPO

from builder.cache import cache_list
from builder.imagecache import image_entries

DEMO_APP = REPO / "recipes" / "demo" / "app"
NAME = "rich"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFaultsFaultsFaultsFaultsFaultsFaultsFau me@laptop"
HASH = "$6$saltsalt$" + "b" * 86
BLOB = random.Random(1684).randbytes(192 << 10)  # incompressible: a changed DATA chunk for sure


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_rich_recipe(folder: Path, base: Mapping[str, Any], blob_url: str, **over: Any) -> Path:
    """Write `folder/rich.yaml` and its inputs (see the module docstring). `over` replaces
    top-level sections (e.g. a different motd for an earlier build)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "files").mkdir(exist_ok=True)
    (folder / "files" / "notes.txt").write_bytes(b"notes\x00with a NUL\n")
    (folder / "templates").mkdir(exist_ok=True)
    (folder / "templates" / "app.env.j2").write_text("SITE={{ vars.site }}\nNAME={{ recipe.name }}\n")
    ov = folder / "overlay"
    (ov / "etc" / "profile.d").mkdir(parents=True, exist_ok=True)
    (ov / "etc" / "profile.d" / "rich.sh").write_text("export RICH=1\n")
    os.chmod(ov / "etc" / "profile.d" / "rich.sh", 0o755)
    (ov / "etc" / "rich.conf.j2").write_text("host={{ recipe.hostname }}\n")
    (ov / "opt" / "rich").mkdir(parents=True, exist_ok=True)
    (ov / "opt" / "rich" / "data.bin").write_bytes(bytes(range(256)) * 40)
    if not (folder / "app").exists():
        shutil.copytree(DEMO_APP, folder / "app")
    app = folder / "app"
    parts = ["app/DemoModel.tar.gz.aa", "app/DemoModel.tar.gz.ab"]
    joined = b"".join((folder / p).read_bytes() for p in parts)
    doc: dict[str, Any] = {
        "name": NAME,
        "base": dict(base),
        "vars": {"site": "lab-9"},
        "hostname": "airbox-rich",
        "network": {
            "ethernets": {
                "eth0": {"dhcp4": True},
                "eth1": {"addresses": ["192.168.150.1/24"], "gateway4": "192.168.150.254", "optional": True},
            }
        },
        "users": {"linaro": {"ssh_authorized_keys": [KEY], "password_hash": HASH}},
        "files": [
            {"path": "/etc/motd", "content": "Welcome to {{ recipe.name }} at {{ vars.site }}\n"},
            {"path": "/etc/default/app", "template": "templates/app.env.j2", "mode": "0600"},
            {"path": "/home/linaro/notes.txt", "source": "files/notes.txt", "owner": "linaro:linaro"},
            {"path": "/data/blob.bin", "url": blob_url, "sha256": hashlib.sha256(BLOB).hexdigest()},
            {"path": "/etc/profile.d/x.sh", "content": "export X=1\n", "layer": "overlay"},
        ],
        "overlays": [{"path": "overlay"}],
        "remove": ["/etc/update-motd.d/50-landscape-sysinfo"],
        "services": {"enable": ["resize-helper.service"], "disable": ["apt-daily.timer"]},
        "apps": {
            "sd-demo": {
                "path": "/data/SD-demo",
                "owner": "linaro:linaro",
                "source": {
                    "path": "app/sd-demo-src.tar.gz",
                    "sha256": sha256_file(app / "sd-demo-src.tar.gz"),
                    "strip_components": 1,
                },
                "models": [
                    {
                        "path": "app/canny_demo.bmodel",
                        "sha256": sha256_file(app / "canny_demo.bmodel"),
                        "dest": "models/controlnet/canny_demo.bmodel",
                    },
                    {
                        "parts": parts,
                        "sha256": hashlib.sha256(joined).hexdigest(),
                        "extract": "models/basic/",
                    },
                ],
                "python": {"lock": "app/demo-app.lock", "python": "3.8.10", "wheels": "app/wheels"},
                "service": {"exec": "python3 gr.py", "port": 8999},
                "dirs": ["outputs"],
            }
        },
        "layout": {"DATA": "20MiB"},
        "output": {"image": True, "zip": True},
    }
    doc.update(over)
    path = folder / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------- the CLI


HOOKS = Path(__file__).resolve().parent / "hooks"  # the fault hooks, see hooks/sitecustomize.py


def with_hooks(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the test suite's fault hooks on PYTHONPATH (the product has none)."""
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOKS), out.get("PYTHONPATH", "")) if p)
    return out


def cli_env(tmpdir: Path, **extra: str) -> dict[str, str]:
    """The environment of a build subprocess: its own TMPDIR (checked for leftovers)."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("_AIRBOX_BUILD_")}
    env.pop("SOURCE_DATE_EPOCH", None)
    env.update(TMPDIR=str(tmpdir), PYTHONUNBUFFERED="1", **extra)
    return with_hooks(env)


def build_args(recipe: Path, out: Path, cache: Path, *more: str | Path) -> list[str]:
    return [
        sys.executable, "-m", "builder.cli", "--json", "build", str(recipe),
        "-o", str(out), "--cache-dir", str(cache), *map(str, more),
    ]  # fmt: skip


@dataclass
class Run:
    """A finished CLI run: exit code, JSON events, stderr."""

    returncode: int
    events: list[dict[str, Any]]
    stderr: str
    seconds: float

    def steps(self) -> list[str]:
        return [e["step"] for e in self.events if e.get("event") == "step-start"]

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e.get("event") == kind), None)


def run_cli(args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None, **popen: Any) -> Run:
    start = time.monotonic()
    proc = subprocess.run(list(args), capture_output=True, text=True, env=dict(env), cwd=cwd, **popen)
    return Run(proc.returncode, _events(proc.stdout), proc.stderr, time.monotonic() - start)


def _events(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": "text", "line": line})
    return out


@dataclass
class StoppedBuild:
    """A CLI build started in its own session (so a signal reaches it and its tools, like a
    Ctrl-C from a terminal reaches the whole foreground group)."""

    proc: subprocess.Popen[str]
    started: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)

    def wait_for(self, pred: Any, timeout: float = 120) -> dict[str, Any]:
        """Read events until one satisfies `pred`; fail if the build ends or time runs out."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            ev = _events(line)[0]
            self.events.append(ev)
            if pred(ev):
                return ev
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise AssertionError(f"the build never reached the point; events: {self.events[-5:]}")

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 120) -> Run:
        out, err = self.proc.communicate(timeout=timeout)
        self.events += _events(out)
        return Run(self.proc.returncode, self.events, err, time.monotonic() - self.started)


def start_cli(args: Sequence[str], env: Mapping[str, str], stall_at: str | None = None) -> StoppedBuild:
    env = with_hooks(env)
    if stall_at is not None:
        env["_AIRBOX_BUILD_STALL_AT"] = stall_at
    proc = subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    return StoppedBuild(proc)


def _default_sigint() -> None:
    """A shell runs background jobs (`cmd &`, nohup) with SIGINT ignored, and exec keeps that:
    the build under test must get Ctrl-C as a terminal would give it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stalled(ev: dict[str, Any]) -> bool:
    return ev.get("event") == "stalled"


def wait_file_size(
    files: Callable[[], Iterable[Path]], at_least: int, build: StoppedBuild, timeout: float = 60
) -> int:
    """Poll until one of `files()` holds `at_least` bytes (a download under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in files():
            try:
                size = p.stat().st_size
            except OSError:
                continue
            if size >= at_least:
                return size
        if build.proc.poll() is not None:
            raise AssertionError("the build ended before the download got that far")
        time.sleep(0.01)
    raise AssertionError(f"no partial download reached {at_least} bytes")


# ---------------------------------------------------------------------------------------- checks


def bundle_digests(bundle: Path) -> dict[str, str]:
    """relative path -> sha256 of every file of a bundle but the report (it holds timings)."""
    return {
        p.relative_to(bundle).as_posix(): sha256_file(p)
        for p in sorted(bundle.rglob("*"))
        if p.is_file() and p.name != "build-report.json"
    }


def compare_bundles(a: Path, b: Path) -> list[str]:
    """Paths that differ between two bundles (missing on one side or other bytes)."""
    da, db = bundle_digests(a), bundle_digests(b)
    return sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))


def cache_problems(cache: Path) -> list[str]:
    """Complete-looking entries whose bytes are not what their name and metadata say."""
    problems = []
    for entry in cache_list(cache):
        if entry.partial:
            assert entry.path.parent.name == "partial", entry.path
            continue
        digest = sha256_file(entry.path)
        if digest != entry.sha256 or entry.path.name != entry.sha256:
            problems.append(f"{entry.path}: sha256 {digest}")
        if entry.path.stat().st_size != entry.size:
            problems.append(f"{entry.path}: {entry.path.stat().st_size} bytes, metadata says {entry.size}")
    for image in image_entries(cache):  # a joined vendor image: its bytes are the chunks' it lists
        meta = json.loads(image.path.with_suffix(".json").read_text())
        with open(image.path, "rb") as f:
            for (offset, length), digest in zip(meta["chunk_ranges"], meta["chunk_digests"], strict=True):
                f.seek(offset)
                if hashlib.sha256(f.read(length)).hexdigest() != digest:
                    problems.append(f"{image.path}: bytes {offset}+{length} are not the chunk it lists")
    for index in sorted((cache / "md5").glob("*/*")):
        target = cache / "sha256" / index.read_text().strip()[:2] / index.read_text().strip()
        if target.exists() and hashlib.md5(target.read_bytes()).hexdigest() != index.name:
            problems.append(f"{index}: points to a blob with another md5")
    return problems


def temp_leftovers(out_root: Path, name: str = NAME) -> list[str]:
    """Anything in the output root but the bundle itself."""
    return sorted(p.name for p in out_root.iterdir() if p.name != name) if out_root.exists() else []


def signal_name(sig: int) -> str:
    return signal.Signals(sig).name
