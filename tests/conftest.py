"""Shared pytest fixtures: miniature vendor packages built with the real tools.

- `vendor_package_session`: the default package, built once per session. Read only.
- `vendor_package`: a fresh private copy of it for one test (mutate freely).
- `make_vendor_package(**options)`: build a variant (PackageOptions fields) for one test.
- `shared_vendor_package(**options)`: a variant built once per session and cached. Read only.
- `vendor_form(form, pkg=None, **kw)`: the package (default: a fresh default copy) in one
  input form ("dir", "tgz", "tar.gz", "zip", "img", "img.zip", "img.xz") for one test.
- `shared_vendor_form(form, **kw)`: the default package in a form, cached per session. Read only.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import vendor_fixture as vf
from hypothesis import HealthCheck, settings

# Shared machines are noisy: a per-example deadline would make property tests flaky.
# Blobs of a whole GPT (17 KiB) routinely exceed hypothesis's entropy budget: not a test failure.
settings.register_profile(
    "airbox",
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
settings.load_profile("airbox")

# ---------------------------------------------------------------------------------------------
# Clean runs: the suite leaves nothing behind.
#
# Every process of the run (the test workers, the builds and tools they start) gets its own
# $TMPDIR, a fresh folder; pytest's own tmp_path folders stay where they always are. At the end
# that folder must be empty, and the checkout must hold no file it did not hold before: else the
# run fails, naming what was left. (Set AIRBOX_TESTS_KEEP_TMP=1 to keep leftovers for a look.)

_REPO = Path(__file__).resolve().parent.parent
_IGNORED = (".venv/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".hypothesis/", "__pycache__/")
_SESSION_TMP = "AIRBOX_TESTS_TMPDIR"


def _checkout_files() -> set[str] | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=all", "--ignored"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout: nothing to compare
    names = {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!")}
    return {n for n in names if not any(part in n for part in _IGNORED) and not n.endswith(".pyc")}


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or os.environ.get(_SESSION_TMP):
        return  # an xdist worker: the controller set $TMPDIR for every process already
    root = tempfile.gettempdir()
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", root)  # tmp_path folders stay in the usual place
    session_tmp = tempfile.mkdtemp(prefix="airbox-tests-", dir=root)
    os.environ[_SESSION_TMP] = os.environ["TMPDIR"] = session_tmp
    tempfile.tempdir = None  # re-read $TMPDIR
    config.stash[_checkout_key] = _checkout_files()


_checkout_key = pytest.StashKey[set[str] | None]()


def _still_running(paths: list[str]) -> list[str]:
    """Processes (Linux /proc) whose command line names one of the run's folders: a daemon a
    test started and left (gpg-agent, sshd, QEMU, ...). Given a moment to finish exiting."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    found: list[str] = []
    for _ in range(20):
        found = []
        for entry in proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if cmd and any(p in cmd for p in paths):
                found.append(f"{entry.name} {cmd[:160]}")
        if not found:
            return []
        time.sleep(0.1)
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if hasattr(config, "workerinput") or _checkout_key not in config.stash:
        return
    problems = []
    session_tmp = Path(os.environ[_SESSION_TMP])
    left = sorted(p.name for p in session_tmp.iterdir()) if session_tmp.is_dir() else []
    if left:
        problems.append(f"left in the temp dir ({session_tmp}): {', '.join(left[:20])}")
    before = config.stash[_checkout_key]
    after = _checkout_files()
    if before is not None and after is not None and after - before:
        problems.append(f"new files in the checkout: {', '.join(sorted(after - before)[:20])}")
    running = _still_running([str(session_tmp), str(config._tmp_path_factory.getbasetemp())])  # type: ignore[attr-defined]
    if running:
        problems.append(f"still running: {'; '.join(running[:10])}")
    if not os.environ.get("AIRBOX_TESTS_KEEP_TMP"):
        shutil.rmtree(session_tmp, ignore_errors=True)
    if problems:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        for problem in problems:
            if reporter is not None:
                reporter.write_line(f"CLEAN RUN CHECK FAILED: {problem}", red=True)
        if session.exitstatus == 0:
            session.exitstatus = 1


@pytest.fixture(scope="session")
def vendor_package_session(tmp_path_factory: pytest.TempPathFactory) -> vf.MiniPackage:
    return vf.build_package(tmp_path_factory.mktemp("vendor-default"))


@pytest.fixture
def vendor_package(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> vf.MiniPackage:
    return vendor_package_session.copy_to(tmp_path / "vendor")


@pytest.fixture
def make_vendor_package(tmp_path: Path) -> Callable[..., vf.MiniPackage]:
    counter = itertools.count()

    def make(**options: object) -> vf.MiniPackage:
        return vf.build_package(tmp_path / f"vendor-variant-{next(counter)}", **options)

    return make


@pytest.fixture(scope="session")
def shared_vendor_package(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., vf.MiniPackage]:
    cache: dict[str, vf.MiniPackage] = {}

    def get(**options: object) -> vf.MiniPackage:
        key = repr(sorted(options.items()))
        if key not in cache:
            cache[key] = vf.build_package(tmp_path_factory.mktemp("vendor-shared"), **options)
        return cache[key]

    return get


@pytest.fixture
def vendor_form(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> Callable[..., Path]:
    counter = itertools.count()

    def make(form: str, pkg: vf.MiniPackage | None = None, **kw: object) -> Path:
        n = next(counter)
        source = pkg or vendor_package_session.copy_to(tmp_path / f"vendor-form-src-{n}")
        return vf.make_form(source, form, tmp_path / f"vendor-form-{n}", **kw)

    return make


@pytest.fixture(scope="session")
def shared_vendor_form(
    vendor_package_session: vf.MiniPackage, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    cache: dict[str, Path] = {}

    def get(form: str, **kw: object) -> Path:
        key = repr((form, sorted(kw.items())))
        if key not in cache:
            cache[key] = vf.make_form(
                vendor_package_session, form, tmp_path_factory.mktemp("vendor-form"), **kw
            )
        return cache[key]

    return get
