"""The e2fsprogs tools: the version check, the environment every run gets (fake time, our own
e2fsck.conf, LC_ALL=C) and the epoch rule."""

from __future__ import annotations

import atexit
import os
import re
import tempfile
from functools import cache
from pathlib import Path

from builder.errors import BuildError, ToolError
from builder.fs.ext4.inodes import MIN_VERSION, TOOLS
from builder.run import require_tools, run

# ----------------------------------------------------------------------------- tools, environment


@cache
def e2fsprogs_version() -> tuple[int, int, int]:
    """The e2fsprogs version of the debugfs on PATH, e.g. (1, 47, 0)."""
    require_tools(*TOOLS)
    proc = run(["debugfs", "-V"], check=False, env=_env(None))
    text = (proc.stderr or b"").decode(errors="replace") + (proc.stdout or b"").decode(errors="replace")
    m = re.search(r"debugfs (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise ToolError(
            f"cannot tell the e2fsprogs version from `debugfs -V`: {text.strip()[:200]!r}",
            hint="install e2fsprogs 1.45 or newer",
        )
    return int(m[1]), int(m[2]), int(m[3] or 0)


def require_e2fsprogs() -> tuple[int, int, int]:
    """Fail before any work when e2fsprogs is missing or older than MIN_VERSION."""
    version = e2fsprogs_version()
    if version[:2] < MIN_VERSION:
        have = ".".join(map(str, version))
        raise ToolError(
            f"e2fsprogs {have} is too old: airbox-build needs {'.'.join(map(str, MIN_VERSION))} or newer",
            hint="install e2fsprogs >= 1.45 (Ubuntu 20.04+, Debian 11+; macOS: brew install e2fsprogs)",
        )
    return version


_E2FSCK_CONF = "[options]\n\tbroken_system_clock = 1\n"


def _e2fsck_config() -> str:
    """The e2fsck config file, in the current temp folder (a build's own, see builder.outdir)."""
    name = _e2fsck_config_in(tempfile.gettempdir())
    if not os.path.exists(name):  # its folder was cleaned: make another
        _e2fsck_config_in.cache_clear()
        name = _e2fsck_config_in(tempfile.gettempdir())
    return name


@cache
def _e2fsck_config_in(folder: str) -> str:
    fd, name = tempfile.mkstemp(prefix="airbox-e2fsck-", suffix=".conf", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(_E2FSCK_CONF)
    atexit.register(lambda: Path(name).unlink(missing_ok=True))
    return name


def _env(epoch: int | None, *, e2fsck: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("LANGUAGE", "E2FSPROGS_FAKE_TIME", "SOURCE_DATE_EPOCH", "E2FSCK_TIME", "DEBUGFS_PAGER"):
        env.pop(var, None)
    env.update(LC_ALL="C", LANG="C", TZ="UTC", PAGER="__none__", DEBUGFS_PAGER="__none__")
    if e2fsck:
        env["E2FSCK_CONFIG"] = _e2fsck_config()
    if epoch is not None:
        env["E2FSPROGS_FAKE_TIME"] = env["SOURCE_DATE_EPOCH"] = env["E2FSCK_TIME"] = str(epoch)
    return env


def _check_epoch(epoch: int | None, what: str) -> int:
    if epoch is None:
        raise BuildError(
            f"{what} needs a timestamp epoch for deterministic output, and none was given",
            hint="pass epoch= (SOURCE_DATE_EPOCH or the recipe's timestamp) to Ext4Image or edit()",
        )
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch < 1 << 32:
        raise BuildError(
            f"timestamp epoch {epoch!r} is not usable for ext4",
            hint="use whole seconds from 1 to 4294967295 (e2fsprogs reads 0 as 'use the clock')",
        )
    return epoch
