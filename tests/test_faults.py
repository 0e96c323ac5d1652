"""Never lose, never lie: builds killed at exact points, full disks, concurrent builds.

Every test drives the real CLI as a subprocess on the miniature package, with a recipe that
changes ROOTFS, ROOTFS_RW, OPT and DATA, downloads its base and one file from a local HTTP server,
and writes the card image and the release zip (tests/faultkit.py). A kill point is reached
exactly: the build stalls there (the private `_AIRBOX_BUILD_STALL_AT` hook prints a `stalled`
event and waits), or, for a download, when its partial file in the cache has grown far enough;
then the whole process group gets SIGINT (what Ctrl-C sends) or SIGKILL.

After every kill: the previous bundle (from an earlier, different build in the same output
root) is byte for byte what it was; no cache entry looks complete without being so; after
SIGINT the exit code is 130, without a traceback, and nothing is left in the output root or
TMPDIR. Then a rerun must produce a bundle identical (sha256 of every file) to a reference
built in another folder without interruption, and remove what a SIGKILL left behind.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from faultkit import (
    BLOB,
    NAME,
    build_args,
    bundle_digests,
    cache_problems,
    cli_env,
    compare_bundles,
    run_cli,
    stalled,
    start_cli,
    temp_leftovers,
    wait_file_size,
    write_rich_recipe,
)
from httpserver import LocalHTTPServer

from builder.events import Reporter
from builder.outdir import PID_FILE, deferred_interrupts, remove_stale

BASE_PATH = "/pkg/sdcard.tgz"
SLOW = 0.02  # seconds per 16 KiB: a download of the miniature package takes about a second


@dataclass(frozen=True)
class World:
    server: LocalHTTPServer
    recipe: Path
    base_bytes: int
    reference: Path  # the bundle of an uninterrupted build in another folder
    earlier_out: Path  # an output root holding an earlier, different bundle of the same name
    earlier: dict[str, str]  # its digests
    warm_cache: Path  # a cache holding every download


@pytest.fixture(scope="module")
def world(shared_vendor_form, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("faults")
    data = shared_vendor_form("tgz").read_bytes()
    with LocalHTTPServer() as server:
        server.add(BASE_PATH, data)
        server.add("/files/blob.bin", BLOB)
        base = {"url": server.url(BASE_PATH), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        blob_url = server.url("/files/blob.bin")
        recipe = write_rich_recipe(root / "recipe", base, blob_url)
        earlier = write_rich_recipe(root / "earlier", base, blob_url, hostname="airbox-earlier")
        # the earlier bundle differs in every partition, so the build under test edits each one
        # (a partition edited as in the last build is taken from it: see test_incremental)
        doc = yaml.safe_load(earlier.read_text())
        doc["files"] += [
            {"path": "/data/earlier.txt", "content": "an earlier build\n"},
            {"path": "/etc/profile.d/earlier.sh", "content": "export EARLIER=1\n", "layer": "overlay"},
        ]
        earlier.write_text(yaml.safe_dump(doc, sort_keys=False))
        env = cli_env(root / "tmp")
        ref = run_cli(build_args(recipe, root / "ref-out", root / "ref-cache"), env)
        assert ref.returncode == 0, ref.stderr
        old = run_cli(build_args(earlier, root / "earlier-out", root / "warm-cache"), env)
        assert old.returncode == 0, old.stderr
        reference = root / "ref-out" / NAME
        digests = bundle_digests(root / "earlier-out" / NAME)
        assert compare_bundles(reference, root / "earlier-out" / NAME)  # they do differ
        yield World(server, recipe, len(data), reference, root / "earlier-out", digests, root / "warm-cache")


def _prepare(world: World, tmp: Path, *, warm: bool) -> tuple[Path, Path]:
    out, cache = tmp / "out", tmp / "cache"
    shutil.copytree(world.earlier_out, out, symlinks=True)
    if warm:  # every download, but no joined images: the build under test joins them
        shutil.copytree(world.warm_cache, cache, symlinks=True, ignore=shutil.ignore_patterns("images"))
    return out, cache


def kill_and_rerun(world: World, tmp: Path, point: str, sig: int, **env_extra: str) -> None:
    """Kill a build at `point` with `sig`, check what it left, rerun, compare with the reference."""
    download = point == "download"
    out, cache = _prepare(world, tmp, warm=not download)
    args = build_args(world.recipe, out, cache)
    env = cli_env(tmp / "tmp", **env_extra)
    if download:
        world.server.set(BASE_PATH, delay=SLOW)
        try:
            build = start_cli(args, env)
            wait_file_size(lambda: (cache / "partial").glob("*.part"), world.base_bytes // 3, build)
            build.signal(sig)
        finally:
            world.server.set(BASE_PATH, delay=0.0)
    else:
        build = start_cli(args, env, stall_at=point)
        build.wait_for(stalled)
        build.signal(sig)
    run = build.finish()

    if sig in (signal.SIGINT, signal.SIGTERM):  # a clean exit, like Ctrl-C
        assert run.returncode == (130 if sig == signal.SIGINT else 143), run.stderr
        assert "Traceback" not in run.stderr
        assert "interrupted" in run.stderr
        assert (run.last("error") or {}).get("message") == "interrupted"
        assert temp_leftovers(out) == []  # no temp folder, no lock file
    else:
        assert run.returncode == -signal.SIGKILL
    assert list((tmp / "tmp").iterdir()) == []  # nothing in $TMPDIR, even after a SIGKILL
    if point != "replace-between":
        assert bundle_digests(out / NAME) == world.earlier  # the previous bundle, intact
    assert cache_problems(cache) == []

    gets = len(world.server.gets(BASE_PATH))
    rerun = run_cli(args, cli_env(tmp / "tmp2"))
    assert rerun.returncode == 0, rerun.stderr
    assert compare_bundles(out / NAME, world.reference) == []
    assert temp_leftovers(out) == []  # the rerun removed what a SIGKILL left
    assert list((tmp / "tmp2").iterdir()) == []
    assert cache_problems(cache) == []
    if download:  # the rerun resumed the partial download instead of starting over
        resumed = world.server.gets(BASE_PATH)[gets:]
        assert [r.range for r in resumed] and all((r.range or "").startswith("bytes=") for r in resumed)


# A point of each phase; the slow tier below takes every point with both signals.
@pytest.mark.parametrize(
    ("point", "sig"),
    [("download", signal.SIGINT), ("progress:repack:5", signal.SIGKILL)],
    ids=["download-INT", "compress-KILL"],
)
def test_interrupted_build_loses_nothing_and_reruns_identically(
    world: World, tmp_path: Path, point: str, sig: int
) -> None:
    kill_and_rerun(world, tmp_path, point, sig)


POINTS = [
    "download",  # the base, a third downloaded
    "step:read package",  # the base extracted into the work folder
    "progress:join ROOTFS_RW:2",  # joining a partition image, in a worker thread
    "step:app budget",
    "step:fetch inputs",
    "step:customise",
    "step:edit DATA",  # before each batch goes in with debugfs
    "step:edit ROOTFS",
    "step:edit ROOTFS_RW",
    "progress:repack:5",  # compressing chunks, in a worker thread
    "step:card image",
    "step:release zip",
    "step:emit",  # report and SHA256SUMS
    "replace",  # the new bundle complete, about to take the old one's place
]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["INT", "KILL"])
@pytest.mark.parametrize("point", POINTS)
def test_every_kill_point(world: World, tmp_path: Path, point: str, sig: int) -> None:
    kill_and_rerun(world, tmp_path, point, sig)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["download", "progress:join ROOTFS_RW:2", "progress:repack:5", "step:emit"])
def test_sigterm_cleans_up_like_ctrl_c(world: World, tmp_path: Path, point: str) -> None:
    """SIGTERM (a cancelled CI job, `kill PID`) exits 143 after the same clean-up as Ctrl-C."""
    kill_and_rerun(world, tmp_path, point, signal.SIGTERM)


def test_sigkill_between_the_two_renames_is_repaired_by_the_next_build(
    world: World, tmp_path: Path
) -> None:
    """Where the atomic exchange is missing, the swap takes two renames: a SIGKILL between them
    leaves no output/<name>; the next build, even one that fails, puts the old bundle back."""
    out, cache = _prepare(world, tmp_path, warm=True)
    env = cli_env(tmp_path / "tmp", _AIRBOX_BUILD_NO_EXCHANGE="1")
    build = start_cli(build_args(world.recipe, out, cache), env, stall_at="replace-between")
    build.wait_for(stalled)
    build.signal(signal.SIGKILL)
    assert build.finish().returncode == -signal.SIGKILL
    assert not (out / NAME).exists()
    (left,) = out.glob(f".{NAME}.tmp-*")
    assert bundle_digests(left / "previous") == world.earlier
    # a build that fails (offline, nothing cached) still repairs the output root first
    failed = run_cli(build_args(world.recipe, out, tmp_path / "empty-cache", "--offline"), env)
    assert failed.returncode == 1 and "offline" in failed.stderr
    assert any("put it back" in e.get("message", "") for e in failed.events if e["event"] == "warning")
    assert bundle_digests(out / NAME) == world.earlier
    assert temp_leftovers(out) == []
    rerun = run_cli(build_args(world.recipe, out, cache), env)
    assert rerun.returncode == 0, rerun.stderr
    assert compare_bundles(out / NAME, world.reference) == []


def test_concurrent_builds_of_one_bundle_take_turns(world: World, tmp_path: Path) -> None:
    """The second build waits for the first (the output lock), then builds; neither clobbers the
    other, both succeed, and the bundle is the reference's."""
    out, cache = _prepare(world, tmp_path, warm=False)
    args = build_args(world.recipe, out, cache)
    world.server.set(BASE_PATH, delay=SLOW)
    try:
        first = start_cli(args, cli_env(tmp_path / "tmp1"))
        first.wait_for(lambda e: e.get("event") == "step-start" and e.get("step") == "fetch")
        second = start_cli(args, cli_env(tmp_path / "tmp2"))
        waiting = second.wait_for(lambda e: e.get("event") in ("info", "step-start"))
        assert "waiting for another airbox-build" in waiting.get("message", ""), waiting
        assert f"pid {first.proc.pid}" in waiting["message"]
        assert first.proc.poll() is None  # it was still building
    finally:
        world.server.set(BASE_PATH, delay=0.0)
    a, b = first.finish(), second.finish()
    assert (a.returncode, b.returncode) == (0, 0), (a.stderr, b.stderr)
    assert compare_bundles(out / NAME, world.reference) == []
    assert temp_leftovers(out) == []
    assert cache_problems(cache) == []
    assert len(world.server.gets(BASE_PATH)) >= 1


@pytest.mark.slow
def test_ctrl_c_while_waiting_for_the_lock_leaves_the_running_build_alone(
    world: World, tmp_path: Path
) -> None:
    out, cache = _prepare(world, tmp_path, warm=True)
    args = build_args(world.recipe, out, cache)
    first = start_cli(args, cli_env(tmp_path / "tmp1"), stall_at="step:customise")
    first.wait_for(stalled)
    second = start_cli(args, cli_env(tmp_path / "tmp2"))
    second.wait_for(lambda e: "waiting for another airbox-build" in e.get("message", ""))
    second.signal(signal.SIGINT)
    run = second.finish()
    assert run.returncode == 130 and "Traceback" not in run.stderr
    assert first.proc.poll() is None  # still there, its lock and temp folder untouched
    assert len(list(out.glob(f".{NAME}.tmp-*"))) == 1 and (out / f".{NAME}.lock").exists()
    first.signal(signal.SIGINT)
    assert first.finish().returncode == 130
    assert temp_leftovers(out) == [] and bundle_digests(out / NAME) == world.earlier


# ---------------------------------------------------------------------------------------- stale


def _pid_file(folder: Path, pid: int, start: str | None = None) -> None:
    import socket

    from builder.outdir import _start_time

    folder.mkdir(parents=True)
    (folder / PID_FILE).write_text(f"{pid} {start or _start_time(pid) or '-'} {socket.gethostname()}\n")


def test_stale_temp_folders_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / NAME).mkdir(parents=True)
    done = subprocess.Popen(["true"])
    done.wait()
    live = subprocess.Popen(["sleep", "60"])
    tmp = f".{NAME}.tmp-"
    try:
        _pid_file(out / f"{tmp}dead0000", done.pid)
        (out / f"{tmp}dead0000" / "work").mkdir()
        (out / f"{tmp}nopid000").mkdir()  # killed before it wrote its pid file
        _pid_file(out / f"{tmp}live0000", live.pid)
        _pid_file(out / f"{tmp}reused00", live.pid, start="1")  # the pid now names another process
        _pid_file(out / f"{tmp}self0000", os.getpid())
        _pid_file(out / ".other.tmp-dead0000", done.pid)  # another bundle's: not ours to judge
        _pid_file(out / f"{tmp}x.tmp-dead0000", done.pid)  # the bundle named `{NAME}.tmp-x`
        removed = remove_stale(out, NAME, Reporter(quiet=True))
        assert sorted(p.name for p in removed) == [f"{tmp}{s}" for s in ("dead0000", "nopid000", "reused00")]
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [NAME, f"{tmp}live0000", f"{tmp}self0000", ".other.tmp-dead0000", f"{tmp}x.tmp-dead0000"]
        )
    finally:
        live.kill()
        live.wait()


def test_ctrl_c_is_held_during_a_critical_section() -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reached = False
        with pytest.raises(KeyboardInterrupt), deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here: it must only take note
            reached = True
        assert reached
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_worker_threads_stop_with_the_pool() -> None:
    """A failure (or Ctrl-C) in the caller drops queued tasks and stops running ones."""
    from builder.pool import Cancelled, check_cancelled, worker_pool

    looping = threading.Event()
    ran: list[int] = []
    stopped: list[int] = []

    def task(i: int) -> int:
        ran.append(i)
        if i == 1:
            looping.set()
            try:
                while True:
                    check_cancelled()
                    time.sleep(0.01)
            except Cancelled:
                stopped.append(i)
                raise
        looping.wait(5)
        if i == 0:
            raise ValueError("a chunk failed")
        time.sleep(0.2)
        return i

    t0 = time.monotonic()
    with pytest.raises(ValueError), worker_pool(2) as pool:
        list(pool.map(task, range(50)))
    assert stopped == [1] and time.monotonic() - t0 < 5
    assert len(ran) <= 4  # the queued tasks never started
    assert not [t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")]


# ---------------------------------------------------------------------------------------- full disks


def _one_screen(run_stderr: str) -> list[str]:
    lines = [ln for ln in run_stderr.splitlines() if ln.startswith(("error:", "hint:"))]
    assert "Traceback" not in run_stderr
    assert len(lines) == 2 and len(run_stderr.splitlines()) <= 8, run_stderr
    return lines


def _limited(limit: int):  # type: ignore[no-untyped-def]
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.parametrize("stage", ["join", "card image", "release zip"])
def test_file_size_limit_fails_cleanly(world: World, tmp_path: Path, stage: str) -> None:
    """RLIMIT_FSIZE (no root needed) makes writes past N bytes fail (EFBIG in Python, SIGXFSZ in
    the tools): the build stops with one clear message, and leaves the previous bundle alone."""
    out, cache = _prepare(world, tmp_path, warm=True)
    recipe, more = world.recipe, ()
    img = world.reference / f"{NAME}.img"
    zipped = world.reference / f"{NAME}.zip"
    if stage == "join":
        limit = 1 << 20  # below any partition image
    elif stage == "card image":
        limit = img.stat().st_size // 2
    else:  # nothing joined, no image: the zip is the biggest file
        recipe, more = _noop_recipe(world, zip=True), ("--no-image",)
        limit = zipped.stat().st_size // 2
    args = build_args(recipe, out, cache, *more)
    run = run_cli(args, cli_env(tmp_path / "tmp"), preexec_fn=_limited(limit))
    assert run.returncode == 1, run.stderr
    error, hint = _one_screen(run.stderr)
    assert f"error: {out}: a file grew past the largest size allowed" in error
    assert "ulimit -f" in hint
    steps = run.steps()
    if stage != "join":
        assert steps[-1] == stage, steps
    else:
        assert "repack" not in steps
    assert bundle_digests(out / NAME) == world.earlier
    assert temp_leftovers(out) == []
    assert cache_problems(cache) == []


def _mount_tmpfs(where: Path, size: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)


def _can_mount() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux to mount a small tmpfs"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    reason = _can_mount()
    if reason is None:
        probe = tmp_path / "probe"
        probe.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)]).returncode:
            reason = "mounting a tmpfs is not allowed here"
        else:
            subprocess.run(["umount", str(probe)], check=True)
    if reason is not None:
        pytest.skip(reason)
    disk = tmp_path / "disk"
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        _mount_tmpfs(disk, size)
        mounted.append(disk)
        return disk

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _noop_recipe(world: World, **output: bool) -> Path:
    """The rich recipe without a single change (identity kept: nothing is even read), only the
    base, copied; `output` as given."""
    recipe = world.recipe.with_name("noop.yaml")
    text = world.recipe.read_text()
    flags = ", ".join(f"{k}: {str(v).lower()}" for k, v in output.items())
    recipe.write_text(text[: text.index("vars:")] + f"identity: keep\noutput: {{{flags}}}\n")
    return recipe


def _fill_check(
    world: World, tmp_path: Path, disk: Path, room: int, recipe: Path, reference: Path
) -> tuple[str, str]:
    """With the earlier bundle on the disk and `room` bytes left, build; check a clean outcome.
    Returns (the last step started, "ok" or "full")."""
    out = disk / "out"
    subprocess.run(["mount", "-o", f"remount,size={_used(disk) + room}", str(disk)], check=True)
    run = run_cli(build_args(recipe, out, tmp_path / "cache"), cli_env(tmp_path / "tmp"))
    step = (run.steps() or ["-"])[-1]
    if run.returncode == 0:
        assert compare_bundles(out / NAME, reference) == []
        shutil.rmtree(out / NAME)
        shutil.copytree(world.earlier_out / NAME, out / NAME, symlinks=True)
        return step, "ok"
    assert run.returncode == 1, run.stderr
    error, hint = _one_screen(run.stderr)
    assert error.startswith(f"error: {out}: no space left on this disk"), error
    assert "-o DIR" in hint and "previous bundle" in hint
    assert bundle_digests(out / NAME) == world.earlier
    assert temp_leftovers(out) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    return step, "full"


def _disk_with_earlier_bundle(world: World, tmp_path: Path, small_disk) -> Path:  # type: ignore[no-untyped-def]
    disk = small_disk(256 << 20)
    shutil.copytree(world.earlier_out, disk / "out", symlinks=True)
    shutil.copytree(world.warm_cache, tmp_path / "cache", symlinks=True)
    return disk


def test_full_disk_fails_cleanly_and_keeps_the_previous_bundle(
    world: World, tmp_path: Path, small_disk
) -> None:  # type: ignore[no-untyped-def]
    disk = _disk_with_earlier_bundle(world, tmp_path, small_disk)
    assert _fill_check(world, tmp_path, disk, 2 << 20, world.recipe, world.reference)[1] == "full"
    assert _fill_check(world, tmp_path, disk, 128 << 20, world.recipe, world.reference)[1] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["rich", "noop"])
def test_full_disk_at_every_stage(world: World, tmp_path: Path, small_disk, variant: str) -> None:  # type: ignore[no-untyped-def]
    """From no room at all up to enough: every build fails cleanly (one message naming the disk,
    the previous bundle intact, nothing left) or succeeds identically to the reference. The
    rich recipe fills the disk while joining, editing and repacking; the no-op one (which
    writes the card image and the zip) while copying, imaging and zipping."""
    disk = _disk_with_earlier_bundle(world, tmp_path, small_disk)
    recipe, reference = world.recipe, world.reference
    if variant == "noop":
        recipe = _noop_recipe(world, image=True, zip=True)
        ref = run_cli(build_args(recipe, tmp_path / "ref", tmp_path / "cache"), cli_env(tmp_path / "tmp"))
        assert ref.returncode == 0, ref.stderr
        reference = tmp_path / "ref" / NAME
    outcomes = []
    room, last_full = 64 << 10, 0
    while True:  # coarse: until it fits
        step, outcome = _fill_check(world, tmp_path, disk, room, recipe, reference)
        outcomes.append((room, step, outcome))
        if outcome == "ok":
            break
        last_full = room
        room = room * 3 // 2
        assert room < 256 << 20, outcomes
    for k in range(1, 8):  # fine: the last steps before it fits
        between = last_full + (room - last_full) * k // 8
        outcomes.append((between, *_fill_check(world, tmp_path, disk, between, recipe, reference)))
    print(f"{variant}: room, last step, outcome:", *sorted(outcomes), sep="\n  ")
    failed_in = {step for _, step, outcome in outcomes if outcome == "full"}
    assert len(failed_in) >= 2, outcomes


def test_cache_disk_full_while_joining_names_the_cache(world: World, tmp_path: Path, small_disk) -> None:  # type: ignore[no-untyped-def]
    """Room for the downloads, not for the joined images: the error names the cache's disk and
    how to do without; no half-joined image is left or looks complete."""
    files = [p for p in world.warm_cache.rglob("*") if p.is_file()]
    images = sum(p.stat().st_blocks * 512 for p in files if p.parent.name == "images")
    downloads = sum(p.stat().st_blocks * 512 for p in files) - images
    assert images > 1 << 20
    disk = small_disk(downloads + images // 2)
    shutil.copytree(world.warm_cache, disk / "cache", symlinks=True, ignore=shutil.ignore_patterns("images"))
    out = tmp_path / "out"
    run = run_cli(build_args(world.recipe, out, disk / "cache"), cli_env(tmp_path / "tmp"))
    _failed_naming_the_full_cache(run, disk / "cache", out, hint_names="--no-image-cache")
    assert not list((disk / "cache" / "images").glob("*.partial-*"))
    ok = run_cli(build_args(world.recipe, out, disk / "cache", "--no-image-cache"), cli_env(tmp_path / "tmp"))
    assert ok.returncode == 0, ok.stderr
    assert compare_bundles(out / NAME, world.reference) == []


def test_full_cache_disk_names_the_cache(world: World, tmp_path: Path, small_disk) -> None:  # type: ignore[no-untyped-def]
    """The download cache is on the full disk: the error names it; nothing in it looks complete."""
    disk = small_disk(world.base_bytes // 2)
    out = tmp_path / "out"
    run = run_cli(build_args(world.recipe, out, disk / "cache"), cli_env(tmp_path / "tmp"))
    _failed_naming_the_full_cache(run, disk / "cache", out, hint_names="--cache-dir")


def _failed_naming_the_full_cache(run, cache: Path, out: Path, *, hint_names: str) -> None:  # type: ignore[no-untyped-def]
    """Exit 1, one screen naming the cache's disk (hint: `hint_names`), nothing complete-looking
    in the cache, nothing in the output root."""
    assert run.returncode == 1, run.stderr
    error, hint = _one_screen(run.stderr)
    assert error.startswith(f"error: {cache}: no space left on this disk"), error
    assert hint_names in hint
    assert cache_problems(cache) == []
    assert temp_leftovers(out) == [] and not (out / NAME).exists()
