"""What the benchmark builds: one recipe (netplan, mirrors, files, a 500 MiB app payload) and
the same edits spelled out for the vendor-style baseline.

The recipe and the baseline must do the same work, so both are generated here from one
description. `payload_section()` is the one place that says how the app payload enters the
recipe: an `apps:` entry, from archives made once out of the payload folder
(`payload/data/app/...`), which the baseline copies as it is.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.manifest import file_digest

NAME = "bench"
LINARO = (1000, 1000)

# The base netplan (cold) and the variants a warm build switches to: only eth1's address changes.
NETPLAN_ADDRESSES = ("192.168.150.1/24", "192.168.151.1/24", "192.168.152.1/24", "192.168.153.1/24")

APT_MIRROR = "https://mirrors.tuna.tsinghua.edu.cn/ubuntu-ports/"
PIP_INDEX = "https://pypi.tuna.tsinghua.edu.cn/simple"

FILES: tuple[tuple[str, str, int, tuple[int, int]], ...] = (
    ("/etc/motd", "Welcome to the benchmark AirBox\n", 0o644, (0, 0)),
    ("/etc/default/app", "APP_HOME=/data/app\nAPP_THREADS=4\n", 0o600, (0, 0)),
    ("/data/app/VERSION", "1.0.0\n", 0o644, LINARO),
)


def payload_section(payload_root: Path) -> dict[str, Any]:
    """The app payload as the recipe's `apps:` entry: its code as a source tarball (stripped of
    its top folder, like a GitHub archive) and its weights as a model archive unpacked into
    models/, owned by linaro, at /data/app. The archives are made once from the payload folder."""
    source, models = app_archives(payload_root)
    return {
        "apps": {
            "app": {
                "path": "/data/app",
                "owner": "linaro:linaro",
                "source": {"path": str(source), "sha256": file_digest(source), "strip_components": 1},
                "models": [{"path": str(models), "sha256": file_digest(models), "extract": "models/"}],
            }
        }
    }


PAYLOAD_FORM = (
    "apps: the code as a source tarball (app-src.tar.gz, top folder stripped) and the weights as a "
    "model archive unpacked into models/, at /data/app, owner linaro:linaro"
)


def app_archives(payload_root: Path) -> tuple[Path, Path]:
    """app-src.tar.gz (everything but models/, under a top folder) and models.tar (models/'s
    content), beside the payload folder; made once, deterministically (sorted, owner 0, mtime 0)."""
    app = payload_root / "data" / "app"
    folder = payload_root.parent / "app-archives"
    source, models = folder / "app-src.tar.gz", folder / "models.tar"
    if not (source.is_file() and models.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        _tar(
            source.with_suffix(".partial"),
            [
                (p, "app-1.0/" + p.relative_to(app).as_posix())
                for p in _walk(app)
                if p.relative_to(app).parts[0] != "models"
            ],
            gz=True,
        )
        _tar(
            models.with_suffix(".partial"),
            [(p, p.relative_to(app / "models").as_posix()) for p in _walk(app / "models")],
            gz=False,
        )
        source.with_suffix(".partial").rename(source)
        models.with_suffix(".partial").rename(models)
    return source, models


def _walk(top: Path) -> list[Path]:
    out = []
    for dirpath, dirs, names in os.walk(top):
        dirs.sort()
        out += [Path(dirpath) / n for n in sorted(names)]
    return out


def _tar(dest: Path, members: list[tuple[Path, str]], *, gz: bool) -> None:
    with tarfile.open(dest, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        for path, name in members:
            if path.is_symlink() or not path.is_file():
                continue
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(path, "rb") as f:
                tar.addfile(info, f)


def network(variant: int) -> dict[str, Any]:
    return {
        "ethernets": {
            "eth0": {"dhcp4": True},
            "eth1": {
                "addresses": [NETPLAN_ADDRESSES[variant]],
                "gateway4": NETPLAN_ADDRESSES[variant].rsplit(".", 1)[0] + ".254",
                "nameservers": ["223.5.5.5", "119.29.29.29"],
                "optional": True,
            },
        }
    }


def recipe(package: Path, payload_root: Path, variant: int) -> dict[str, Any]:
    r: dict[str, Any] = {
        "name": NAME,
        "description": "airbox-build benchmark",
        "base": {"path": str(package)},
        "network": network(variant),
        "apt": {"mirror": APT_MIRROR},
        "pip": {"index_url": PIP_INDEX},
        "mirrors": {"https://github.com/": "https://ghproxy.example.net/https://github.com/"},
        "files": [
            {"path": p, "content": text, "mode": f"{mode:04o}"}
            | ({"owner": "linaro:linaro"} if owner == LINARO else {})
            for p, text, mode, owner in FILES
        ],
    }
    r.update(payload_section(payload_root))
    return r


def write_recipe(dest: Path, package: Path, payload_root: Path, variant: int) -> Path:
    # JSON is YAML: no quoting surprises, and the file stays diffable.
    dest.write_text(json.dumps(recipe(package, payload_root, variant), indent=2) + "\n")
    return dest


# ----------------------------------------------------------------------------- the baseline's edits


@dataclass(frozen=True)
class Edit:
    """One file or folder the baseline writes, as a person with the mounted image would copy it."""

    partition: str  # ROOTFS or DATA
    path: str  # inside the partition
    kind: str  # file | dir
    mode: int
    uid: int
    gid: int
    src: Path | None = None  # a host file to copy
    text: str | None = None  # or literal content


def netplan_text(variant: int) -> str:
    """The vendor-style (8-space) netplan the recipe's network section stands for."""
    addr = NETPLAN_ADDRESSES[variant]
    gw = addr.rsplit(".", 1)[0] + ".254"
    pad = " " * 8
    return (
        f"network:\n{pad}version: 2\n{pad}renderer: networkd\n{pad}ethernets:\n"
        f"{pad * 2}eth0:\n{pad * 3}dhcp4: true\n{pad * 3}addresses: []\n{pad * 3}optional: true\n"
        f"{pad * 2}eth1:\n{pad * 3}dhcp4: false\n{pad * 3}gateway4: {gw}\n"
        f"{pad * 3}nameservers:\n{pad * 4}addresses: [223.5.5.5, 119.29.29.29]\n"
        f"{pad * 3}addresses: [{addr}]\n{pad * 3}optional: true\n"
    )


def sources_list() -> str:
    suites = ("focal", "focal-updates", "focal-backports", "focal-security")
    return "".join(f"deb {APT_MIRROR} {s} main restricted universe multiverse\n" for s in suites)


def baseline_edits(payload_root: Path, variant: int) -> list[Edit]:
    edits = [
        Edit("ROOTFS", "/etc/netplan/01-netcfg.yaml", "file", 0o600, 0, 0, text=netplan_text(variant)),
        Edit("ROOTFS", "/etc/apt/sources.list", "file", 0o644, 0, 0, text=sources_list()),
        Edit("ROOTFS", "/etc/pip.conf", "file", 0o644, 0, 0, text=f"[global]\nindex-url = {PIP_INDEX}\n"),
    ]
    edits += list(_payload_edits(payload_root))  # before the files: they may land in its folders
    for path, text, mode, (uid, gid) in FILES:
        if path.startswith("/data/"):
            edits.append(Edit("DATA", path[len("/data") :], "file", mode, uid, gid, text=text))
        else:
            edits.append(Edit("ROOTFS", path, "file", mode, uid, gid, text=text))
    return edits


def _payload_edits(payload_root: Path) -> Iterator[Edit]:
    """The payload tree (payload/data/... goes to DATA), parents before children."""
    data = payload_root / "data"
    for dirpath, dirnames, filenames in os.walk(data):
        dirnames.sort()
        here = Path(dirpath)
        inner = "/" + here.relative_to(data).as_posix() if here != data else "/"
        if here != data:
            mode = stat.S_IMODE(here.stat().st_mode)
            yield Edit("DATA", inner, "dir", mode, *LINARO)
        for name in sorted(filenames):
            p = here / name
            if p.is_file() and not p.is_symlink():
                path = inner.rstrip("/") + "/" + name
                yield Edit("DATA", path, "file", stat.S_IMODE(p.stat().st_mode), *LINARO, src=p)
