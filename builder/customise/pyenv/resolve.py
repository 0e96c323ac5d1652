"""Resolving a lock for the target with uv (`airbox-build lock`)."""

from __future__ import annotations

import os
import re
import sys
from importlib.util import find_spec
from pathlib import Path

from builder.customise.pyenv.download import PipIndex
from builder.customise.pyenv.lock import Pin, parse_lock
from builder.errors import BuildError, ToolError
from builder.run import find_tool, run

# ---------------------------------------------------------------------------- resolving (the lock command)


def uv_platform(platform: str) -> str:
    """A wheel platform tag as uv's --python-platform: manylinux2014_aarch64 -> aarch64-manylinux2014."""
    found = re.fullmatch(r"(?P<libc>manylinux2014|manylinux_\d+_\d+)_(?P<arch>aarch64|x86_64)", platform)
    if found is None:
        raise BuildError(
            f"cannot resolve for the platform {platform!r}",
            hint="use manylinux2014_aarch64 or manylinux_2_N_aarch64 (the AirBox: aarch64, glibc 2.31)",
        )
    return f"{found['arch']}-{found['libc']}"


def find_uv() -> list[str]:
    """The command that runs uv: `uv` from PATH, else `python -m uv`."""
    exe = find_tool("uv")
    if exe is not None:
        return [exe]
    if find_spec("uv") is not None:
        return [sys.executable, "-m", "uv"]
    raise ToolError(
        "uv is needed to resolve a Python lock for another platform, and it is not installed",
        hint=f"install it: {sys.executable} -m pip install uv  (or see https://docs.astral.sh/uv/)",
    )


def resolve_lock(
    requirements_in: Path,
    out: Path,
    python_version: str,
    platform: str,
    exclude_newer: str | None,
    *,
    index: PipIndex | None = None,
) -> tuple[Pin, ...]:
    """Resolve `requirements_in` for the target with ``uv pip compile`` into the hashed lock `out`.

    Wheels only (``--only-binary :all:``); `exclude_newer` (``2024-08-15``) makes the resolution
    repeatable. The result is parsed (refusing e.g. opencv-python) before it replaces `out`.
    """
    index = index or PipIndex()
    args = [
        "pip", "compile", requirements_in.name,
        "--python-platform", uv_platform(platform), "--python-version", python_version,
        "--only-binary", ":all:", "--generate-hashes", "--no-header",
    ]  # fmt: skip
    # Any interpreter will do (nothing is installed into it): naming ours skips uv's search for a
    # Python of the target's version, which can take seconds and would find nothing useful.
    interpreter = ["--python", sys.executable]
    if exclude_newer:
        args += ["--exclude-newer", exclude_newer]
    if index.index_url:
        args += ["--index-url", index.index_url]
    for url in index.extra_index_urls:
        args += ["--extra-index-url", url]
    for link in index.find_links:
        args += ["--find-links", link]
    if index.no_index:
        args.append("--no-index")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    uv = find_uv()
    uv_version = run([*uv, "--version"]).stdout.decode(errors="replace").strip()
    cmd = [*uv, *args, *interpreter, "--output-file", str(tmp.resolve())]
    shown = " ".join(["uv", *args, "-o", out.name])
    env = {**os.environ, "UV_NO_PROGRESS": "1", "UV_PYTHON_DOWNLOADS": "never"}
    try:
        proc = run(cmd, cwd=requirements_in.parent, env=env, check=False)
        if proc.returncode != 0:
            err = "\n".join(proc.stderr.decode(errors="replace").strip().splitlines()[-15:])
            raise BuildError(
                f"uv could not resolve {requirements_in.name} for {platform} Python {python_version}\n{err}",
                where=str(requirements_in),
                hint="a package may have no wheel for the target: pin another version, or check the index",
            )
        header = (
            f"# Python lock for {platform}, CPython {python_version}: written by `airbox-build lock`.\n"
            f"# Resolved with {uv_version}: {shown}\n"
            "# Every pin is a wheel pinned by sha256; edit the .in file and re-run the lock command.\n"
        )
        body = tmp.read_text(encoding="utf-8")
        tmp.write_text(header + body, encoding="utf-8")
        pins = parse_lock(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return pins
