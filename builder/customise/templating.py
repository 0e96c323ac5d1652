"""Jinja2 rendering with StrictUndefined: an unknown variable names the template and line."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import jinja2

from builder.errors import RecipeError

_PACKAGE_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _env(loader: jinja2.BaseLoader | None = None) -> jinja2.Environment:
    return jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_string(text: str, variables: dict[str, Any], name: str, *, line_offset: int = 0) -> str:
    """Render a template given as text; `name` (e.g. recipe.yaml:12) locates errors."""
    try:
        # a loader that names the source, so tracebacks carry `name` and the template line
        env = _env(jinja2.FunctionLoader(lambda _n: (text, name, lambda: True)))
        return env.get_template(name).render(**variables)
    except jinja2.TemplateSyntaxError as e:
        raise RecipeError(
            f"template syntax error: {e.message}", where=f"{name} (template line {e.lineno})"
        ) from None
    except jinja2.UndefinedError as e:
        line = _template_line(e, name)
        raise RecipeError(
            f"unknown template variable: {e.message}",
            where=f"{name} (template line {line})" if line else name,
            hint=f"known variables: {', '.join(sorted(variables))}; recipe values are under `recipe.`, "
            "your own under `vars.`",
        ) from None


def render_file(path: Path, variables: dict[str, Any]) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read template: {e}", where=str(path)) from None
    return render_string(text, variables, str(path))


def render_builtin(name: str, variables: dict[str, Any]) -> str:
    """Render one of airbox-build's own templates (builder/templates/NAME)."""
    env = _env(jinja2.FileSystemLoader(str(_PACKAGE_TEMPLATES)))
    return env.get_template(name).render(**variables)


def _template_line(e: BaseException, name: str) -> int | None:
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if frame.filename == name or frame.filename.endswith(name):
            return frame.lineno
    return None
