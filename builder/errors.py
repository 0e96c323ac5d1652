"""One error base class; the CLI turns it into a one-screen message and exit code 1."""

from __future__ import annotations

from typing import NoReturn


class AirboxError(Exception):
    """An error meant for a human: what went wrong, where, and what to do."""

    def __init__(self, message: str, *, hint: str | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.where = where

    def render(self) -> str:
        lines = []
        if self.where:
            lines.append(f"error: {self.where}: {self.message}")
        else:
            lines.append(f"error: {self.message}")
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


class RecipeError(AirboxError):
    """The recipe is malformed or inconsistent."""


class FetchError(AirboxError):
    """An input could not be downloaded or verified."""


class PackageError(AirboxError):
    """The vendor package is malformed or inconsistent."""


class ToolError(AirboxError):
    """An external tool is missing or failed."""


class BuildError(AirboxError):
    """A build step could not be carried out (space, layout, conflicts)."""


class VerifyError(AirboxError):
    """A bundle failed verification."""


def die(message: str, *, hint: str | None = None, where: str | None = None) -> NoReturn:
    raise AirboxError(message, hint=hint, where=where)
