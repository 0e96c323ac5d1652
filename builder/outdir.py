"""The output root: one build of a bundle at a time, temp folders that never outlive their build,
and a bundle replaced only once the new one is complete.

Inside the output root (`-o`, default `output/`)::

    <name>/               the bundle (card/, SHA256SUMS, build-report.json, <name>.img, <name>.zip)
    .<name>.lock          while a build of <name> runs: an flock, so a second build waits
    .<name>.tmp-XXXXXXXX/ a build in progress, and all its work files:
        pid                 who owns it: pid, process start time, host
        work/               the joined partition images (as big as the partitions), staging
        result/             the new bundle, renamed to <name>/ when complete
        previous/           the old bundle, for the instant between the two renames

A build removes its temp folder when it ends, also on an error or Ctrl-C. A build that was
killed (SIGKILL, power loss) leaves it behind; the next build of the same bundle in the same
output root removes it, once its pid file shows that its build is gone (and puts the previous
bundle back if the kill fell between the two renames). A live build's folder is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from builder.errors import AirboxError, BuildError, ToolError
from builder.events import Reporter, checkpoint
from builder.units import format_size

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, stale folders are still recognised by pid
    fcntl = None  # type: ignore[assignment]

PID_FILE = "pid"
RESULT = "result"
PREVIOUS = "previous"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextlib.contextmanager
def build_slot(
    out_root: Path, name: str, reporter: Reporter, also_writes: Sequence[Path] = ()
) -> Iterator[Path]:
    """Hold the output lock of `name`, clean up after dead builds, yield a fresh temp folder.

    The folder (and the lock) are removed when the block ends, whatever way it ends. A failure
    caused by a full disk (or a file size limit) becomes one BuildError that names the disk:
    the output root's, or one of `also_writes` (the download cache).
    """
    out_root.mkdir(parents=True, exist_ok=True)
    lock = _OutputLock(out_root / f".{name}.lock")
    tmp: Path | None = None
    try:
        lock.acquire(
            on_wait=lambda owner: reporter.info(
                f"waiting for another airbox-build{f' (pid {owner})' if owner else ''} "
                f"that is building {out_root / name}"
            )
        )
        remove_stale(out_root, name, reporter)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_root))
        (tmp / PID_FILE).write_text(_identity(os.getpid()))
        yield tmp
    except Exception as e:
        places = [out_root, *also_writes, Path(tempfile.gettempdir())]
        if tmp is not None and (is_disk_full(e) or (isinstance(e, ToolError) and _nearly_full(places))):
            raise disk_full_error(e, tmp, places) from e
        raise
    finally:
        with deferred_interrupts():  # a second Ctrl-C must not leave half a temp folder behind
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            lock.release()


@contextlib.contextmanager
def scratch_tempdir(path: Path) -> Iterator[None]:
    """Send the temp files of this process and of the tools it runs into `path`, a folder inside
    the build's temp folder: removed with it, and by the next build when this one is killed."""
    path.mkdir(exist_ok=True)
    old_dir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(path)
    os.environ["TMPDIR"] = str(path)
    try:
        yield
    finally:
        tempfile.tempdir = old_dir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete bundle `tmp/result` at `final`; the old bundle ends up in `tmp` (removed
    with it). On Linux the two folders are exchanged in one atomic rename, so `final` is always
    a complete bundle. Elsewhere it takes two renames, with Ctrl-C held between them; a SIGKILL
    between them is repaired by the next build (remove_stale puts `previous` back)."""
    new = tmp / RESULT
    checkpoint("replace")
    with deferred_interrupts():
        present = final.exists() or final.is_symlink()
        if present and _exchange(new, final):
            return
        if present:
            os.rename(final, tmp / PREVIOUS)
        checkpoint("replace-between")  # only a SIGKILL can land here
        os.rename(new, final)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # e.g. some FUSE, NFS
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_stale(out_root: Path, name: str, reporter: Reporter | None = None) -> list[Path]:
    """Remove the temp folders of builds of `name` that are gone; returns what was removed."""
    final = out_root / name
    removed = []
    mine = re.compile(rf"\.{re.escape(name)}\.tmp-[A-Za-z0-9_]{{8}}")  # not `.<name>.tmp-x.tmp-...`
    for folder in sorted(out_root.glob(f".{name}.tmp-*")):
        if not mine.fullmatch(folder.name) or not folder.is_dir() or folder.is_symlink():
            continue
        if _owner_alive(folder / PID_FILE):
            continue
        previous = folder / PREVIOUS
        if previous.is_dir() and not (final.exists() or final.is_symlink()):
            os.rename(previous, final)
            if reporter is not None:
                reporter.warn(f"an interrupted build had moved {final} aside: put it back")
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed and reporter is not None:
        reporter.info(f"removed {len(removed)} temp folder(s) of interrupted builds of {name} in {out_root}")
    return removed


# ---------------------------------------------------------------------------------------- full disks


NEARLY_FULL = 8 << 20  # bytes free, below which a tool's unexplained failure is put on the disk
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# what tools print (strerror) when their writes fail that way, or when the size limit kills them
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large", "SIGXFSZ")


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a write refused for lack of space or a size limit."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(cur, AirboxError) and any(t in cur.message for t in _DISK_FULL_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _nearly_full(places: Sequence[Path]) -> bool:
    """A tool failed without saying why (mkfs.fat: "failed whilst writing FAT"): if one of the
    disks the build writes to is all but full, that is the likely cause."""
    for path in places:
        existing = _existing(path)
        if existing is not None and _space(existing)[0] < NEARLY_FULL:
            return True
    return False


def disk_full_error(e: BaseException, tmp: Path, places: Sequence[Path]) -> BuildError:
    """Name the disk that filled up, what the build had written, and where to build instead."""
    filename = _failed_file(e)
    place, free, total = _fullest(places, filename)
    written = format_size(tree_bytes(tmp))
    what = _first_line(e)
    if filename and filename not in what:
        what = f"{filename}: {what}"
    if _too_large(e):
        return BuildError(
            f"a file grew past the largest size allowed here ({what}); the build had written "
            f"{written} in {tmp.parent} when it stopped",
            where=str(place),
            hint="this filesystem cannot hold files that big (FAT32: under 4 GiB), or a file size "
            "limit is set (`ulimit -f`): build on an ext4, APFS or NTFS disk with -o DIR "
            "(and --cache-dir DIR for downloads), or lift the limit",
        )
    return BuildError(
        f"no space left on this disk: {format_size(free)} free of {format_size(total)} ({what}); "
        f"the build had written {written} in {tmp.parent} when it stopped",
        where=str(place),
        hint="free some space there, or build on a bigger disk: -o DIR moves the bundle and its "
        "work files (the changed partitions' images, as big as the partitions), --cache-dir DIR "
        "the downloads and joined images (--no-image-cache keeps none). Nothing was left behind; "
        "the previous bundle (if any) is unchanged",
    )


def _failed_file(e: BaseException) -> str | None:
    cur: BaseException | None = e
    while cur is not None:
        if isinstance(cur, OSError) and isinstance(cur.filename, str):
            return cur.filename
        cur = cur.__cause__ or cur.__context__
    return None


def _too_large(e: BaseException) -> bool:
    cur: BaseException | None = e
    while cur is not None:
        if isinstance(cur, OSError) and cur.errno == errno.EFBIG:
            return True
        if isinstance(cur, AirboxError) and ("File too large" in cur.message or "SIGXFSZ" in cur.message):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _first_line(e: BaseException) -> str:
    text = e.message if isinstance(e, AirboxError) else (getattr(e, "strerror", None) or str(e))
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    full = [ln for ln in lines if any(t in ln for t in _DISK_FULL_TEXT)]
    return (full or lines or [type(e).__name__])[0][:200]


def _fullest(places: Sequence[Path], filename: str | None) -> tuple[Path, int, int]:
    """(place, free, total) of the disk that filled up: the failed file's if known, else the one
    with least free space. Places on one disk are one candidate, named by the first of them."""
    disks: dict[int, tuple[Path, int, int]] = {}
    for path in places:
        existing = _existing(path)
        if existing is not None:
            free, total = _space(existing)
            disks.setdefault(os.stat(existing).st_dev, (path, free, total))
    if filename:
        existing = _existing(Path(filename))
        if existing is not None:
            dev = os.stat(existing).st_dev
            if dev in disks:
                return disks[dev]
            return (existing, *_space(existing))
    if not disks:
        return places[0], 0, 0
    return min(disks.values(), key=lambda d: d[1])


def _space(path: Path) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _existing(path: Path) -> Path | None:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return None


def tree_bytes(top: Path) -> int:
    """Bytes a folder's files take on disk (sparse files count what they hold)."""
    total = 0
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


# ---------------------------------------------------------------------------------------- signals


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for a short critical section; they take effect right after it.

    Only on the main thread (the only one Python delivers signals to); elsewhere a no-op.
    The handler is swapped rather than the signal masked, so a signal whose Python handler is
    still pending when the section starts is held too.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, hold)
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            _deliver(caught[0], previous.get(caught[0]))


def _deliver(signum: int, handler: Any) -> None:
    if callable(handler):
        handler(signum, None)  # SIGINT: default_int_handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


# ---------------------------------------------------------------------------------------- owners


def _identity(pid: int) -> str:
    return f"{pid} {_start_time(pid) or '-'} {socket.gethostname()}\n"


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux: clock ticks since boot), to tell a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _owner_alive(pid_file: Path) -> bool:
    """Whether the build that wrote `pid_file` may still run. No pid file: it was killed before
    writing one, under the lock we now hold, so it is gone. Another host: assume alive."""
    try:
        pid_text, start, host = pid_file.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return True
    if not _pid_exists(pid):
        return False
    return start == "-" or _start_time(pid) in (None, start)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process
        return True
    return True


# ---------------------------------------------------------------------------------------- lock


class _OutputLock:
    """An exclusive flock on `.<name>.lock`, waited for; the file is removed on release.

    Removing a lock file is safe with this protocol: the holder unlinks it before closing, and
    a waiter that wakes up holding a lock on an unlinked file starts again with a fresh one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, on_wait: Callable[[str], None]) -> None:
        if fcntl is None:  # pragma: no cover
            return
        waited = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not waited:
                        on_wait(os.pread(fd, 32, 0).decode(errors="replace").strip())
                        waited = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as e:
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    # a filesystem without locks (some network mounts): build unlocked
                    self.fd = fd
                    return
                if _same_file(fd, self.path):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    self.fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)
