"""The systemd unit of an app's service, rendered offline and enabled by a symlink.

systemd does not read /etc/profile, so the unit carries everything the app's run.sh would
export: the working directory (the app folder: SD-lcm-tpu opens paths relative to it), the
user, PYTHONPATH (the app's wheels, then sophon-opencv's cv2), LD_LIBRARY_PATH (libsophon),
HF_HUB_OFFLINE=1 (no Hugging Face downloads at start-up). It is ordered after the TPU driver
units (bmrt_loadko, bmrt_setup), which it also wants, and after network.target (without
pulling in network-online.target, which would delay the boot when no cable is plugged in);
RequiresMountsFor= names the app folder and /opt, so systemd orders it after whatever mounts
them. Enabling = the symlink `systemctl enable` would make in multi-user.target.wants/.

Quoting (systemd.unit and systemd.exec): every Environment= line holds one double-quoted
``"KEY=value"``, in which ``\\`` and ``"`` are backslash-escaped (systemd C-unescapes quoted
words) and ``%`` is written ``%%`` (specifier expansion). ExecStart= gets ``%%`` for ``%``
too; its ``$VAR`` references are left for systemd to expand, as the recipe writer meant.
A bare command (``python3 gr.py``) is looked up by systemd in its fixed PATH (systemd 239+;
Ubuntu 20.04 has 245).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2

from builder.errors import BuildError
from builder.recipe import App

UNIT_DIR = "/etc/systemd/system"
WANTS_DIR = f"{UNIT_DIR}/multi-user.target.wants"
TPU_UNITS = ("bmrt_loadko.service", "bmrt_setup.service")
SOPHON_PYTHONPATH = ("/opt/sophon/sophon-opencv-latest/opencv-python",)
SOPHON_LD_LIBRARY_PATH = ("/opt/sophon/libsophon-current/lib",)
OPT_MOUNT = "/opt"
_PATH_LISTS = {"PYTHONPATH", "LD_LIBRARY_PATH"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


@dataclass(frozen=True)
class RenderedUnit:
    """A unit file to write into the image, and its enable symlink (None: not enabled)."""

    name: str  # e.g. sd-lcm-tpu.service
    path: str  # device path of the unit file
    text: str
    enable_link: str | None  # device path of the symlink in multi-user.target.wants/
    enable_target: str | None  # what the symlink points to (the unit file, absolute)
    user: str
    port: int | None  # for the build report: where the app listens


def render_app_unit(app: App) -> RenderedUnit:
    """Render the unit of `app.service` (BuildError when the app has no service)."""
    service = app.service
    if service is None:
        raise BuildError(f"the app {app.name} has no `service:`", where=app.where)
    user, group = _account(app)
    environment = app_environment(app)
    after = _unique(["network.target", *TPU_UNITS, *service.after])
    wants = _unique([*TPU_UNITS, *(u for u in service.after if not u.endswith(".target"))])
    text = _template().render(
        unit_name=service.name,
        app_name=app.name,
        where=_plain(_recipe_where(service.where or app.where)),
        description=_plain(f"{app.name} (airbox-build app)"),
        after=after,
        wants=wants,
        mounts=_unique([app.path, OPT_MOUNT]),
        user=user,
        group=group,
        working_directory=_path_value(app.path),
        environment=[environment_line(k, v) for k, v in environment.items()],
        exec=_escape_specifiers(_no_control(service.exec, "service.exec", app)),
    )
    unit_path = posixpath.join(UNIT_DIR, service.name)
    enabled = service.enable
    return RenderedUnit(
        name=service.name,
        path=unit_path,
        text=text,
        enable_link=posixpath.join(WANTS_DIR, service.name) if enabled else None,
        enable_target=unit_path if enabled else None,
        user=user,
        port=service.port,
    )


def app_environment(app: App) -> dict[str, str]:
    """The service's environment: the device's needs first, then the recipe's.

    PYTHONPATH and LD_LIBRARY_PATH are merged (ours first, the recipe's entries after);
    any other recipe variable replaces ours (e.g. HF_HUB_OFFLINE).
    """
    assert app.service is not None
    python_path = list(SOPHON_PYTHONPATH)
    if app.python is not None:
        python_path.insert(0, app.device_path(app.python.target))
    env: dict[str, str] = {
        "PYTHONPATH": ":".join(python_path),
        "LD_LIBRARY_PATH": ":".join(SOPHON_LD_LIBRARY_PATH),
        "HF_HUB_OFFLINE": "1",
    }
    for key, value in app.service.environment.items():
        _no_control(value, f"service.environment.{key}", app)
        if key in _PATH_LISTS:
            entries = env[key].split(":")
            env[key] = ":".join(_unique([*entries, *(e for e in value.split(":") if e)]))
        else:
            env[key] = value
    return env


def environment_line(key: str, value: str) -> str:
    """One Environment= value: ``"KEY=value"`` quoted for systemd."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{key}={escaped}"'


def _account(app: App) -> tuple[str, str | None]:
    assert app.service is not None
    if app.service.user is not None:
        return app.service.user, None
    if app.owner is not None:
        return app.owner.user, app.owner.group
    return "root", None


def _escape_specifiers(text: str) -> str:
    return text.replace("%", "%%")


def _path_value(path: str) -> str:
    # WorkingDirectory= takes a path as is (no quoting); specifiers still apply.
    return _escape_specifiers(path)


def _recipe_where(where: str) -> str:
    """`FILE:LINE key` with FILE cut to its name: the unit must not depend on the folder (or the
    working directory) the recipe was built from, or two builds of it would differ."""
    m = re.match(r"^(.*?)(:\d+.*)$", where, re.DOTALL)
    if m is None:
        return where
    return re.split(r"[\\/]", m[1])[-1] + m[2]


def _plain(text: str) -> str:
    return _escape_specifiers(_CONTROL.sub(" ", text))


def _no_control(text: str, key: str, app: App) -> str:
    if _CONTROL.search(text):
        raise BuildError(
            f"{key} of the app {app.name} holds a control character, which a unit file cannot carry",
            where=app.service.where if app.service else app.where,
            hint="remove it (a unit line ends at the first newline)",
        )
    return text


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    return env.get_template("app.service.j2")


def environment_of(text: str) -> Mapping[str, str]:
    """Read the Environment= lines back from a unit this module rendered (for reports, tests)."""
    found: dict[str, str] = {}
    for line in text.split("\n"):  # systemd splits lines at LF only
        if not line.startswith('Environment="') or not line.endswith('"'):
            continue
        body = line[len('Environment="') : -1]
        out, i = [], 0
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body):
                out.append(body[i + 1])
                i += 2
            elif body.startswith("%%", i):
                out.append("%")
                i += 2
            else:
                out.append(body[i])
                i += 1
        key, _, value = "".join(out).partition("=")
        found[key] = value
    return found
