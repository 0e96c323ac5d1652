"""The one subprocess wrapper, and the preflight check for system tools."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from builder.errors import ToolError

log = logging.getLogger("airbox-build")

# Which Debian package provides each external tool we call.
TOOL_PACKAGES: dict[str, str] = {
    "debugfs": "e2fsprogs",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "tune2fs": "e2fsprogs",
    "e2undo": "e2fsprogs",
    "mcopy": "mtools",
    "mdir": "mtools",
    "mtype": "mtools",
    "mmd": "mtools",
    "minfo": "mtools",
    "mkfs.fat": "dosfstools",
    "fsck.fat": "dosfstools",
    "mkimage": "u-boot-tools",
    "dumpimage": "u-boot-tools",
    "sgdisk": "gdisk",
    "sfdisk": "fdisk",
    "xz": "xz-utils",
}

# Tools the build itself needs; the others are for tests and optional features.
BUILD_TOOLS = ("debugfs", "e2fsck", "resize2fs", "dumpe2fs", "mcopy", "mdir", "mkfs.fat")


# Homebrew's name where it differs from Debian's (None: not in Homebrew; macOS has its own).
BREW_PACKAGES: dict[str, str | None] = {"gdisk": "gptfdisk", "xz-utils": "xz", "fdisk": None}

# Where tools are looked for when PATH lacks them: e2fsprogs and dosfstools live in /sbin on
# Debian, which a user's PATH may lack; Homebrew's e2fsprogs is keg-only.
FALLBACK_DIRS = (
    "/usr/sbin",
    "/sbin",
    "/usr/local/sbin",
    "/opt/homebrew/opt/e2fsprogs/sbin",
    "/usr/local/opt/e2fsprogs/sbin",
)


def install_hint(missing: Sequence[str]) -> str:
    packages = sorted({TOOL_PACKAGES.get(t, t) for t in missing})
    brew = sorted({b for p in packages if (b := BREW_PACKAGES.get(p, p))})
    hint = f"install them: sudo apt-get install -y {' '.join(packages)}"
    return hint + (f"  (macOS: brew install {' '.join(brew)})" if brew else "")


def require_tools(*tools: str) -> None:
    """Fail before any long work when a system tool is missing, naming the package."""
    missing = [t for t in tools if find_tool(t) is None]
    if missing:
        named = ", ".join(f"{t} (package {TOOL_PACKAGES[t]})" if t in TOOL_PACKAGES else t for t in missing)
        raise ToolError(f"missing system tool(s): {named}", hint=install_hint(missing))


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        for d in FALLBACK_DIRS:
            cand = Path(d) / name
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return found


def run(
    cmd: Sequence[str | Path],
    *,
    input: bytes | None = None,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    capture: bool = True,
    hint: str | None = None,
    ok_codes: Sequence[int] = (0,),
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; on failure raise ToolError with its stderr and a hint."""
    args = [str(c) for c in cmd]
    exe = find_tool(args[0])
    if exe is None:
        raise ToolError(f"missing system tool: {args[0]}", hint=install_hint([args[0]]))
    args[0] = exe
    log.debug("run: %s", shlex.join(args))
    proc = subprocess.run(
        args,
        input=input,
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        check=False,
    )
    if check and proc.returncode not in ok_codes:
        err = (proc.stderr or b"").decode(errors="replace").strip()
        tail = "\n".join(err.splitlines()[-15:])
        raise ToolError(
            f"{Path(args[0]).name} failed ({exit_text(proc.returncode)}): {shlex.join(args[1:])[:300]}"
            + (f"\n{tail}" if tail else ""),
            hint=hint,
        )
    return proc


def exit_text(returncode: int) -> str:
    """`exit 1`, or the signal that killed the tool (SIGXFSZ: it hit the file size limit)."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"killed by signal {-returncode}"
    if name == "SIGXFSZ":
        return "killed by SIGXFSZ: File too large, the file size limit was reached"
    return f"killed by {name}"
