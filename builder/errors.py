"""One error base class; the CLI turns it into a one-screen message and exit code 1."""

from __future__ import annotations

from typing import NoReturn

from builder.redact import redact_text


class AirboxError(Exception):
    """An error meant for a human: what went wrong, where, and what to do."""

    def __init__(self, message: str, *, hint: str | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.where = where

    def public(self) -> dict[str, str | None]:
        """message, where and hint as they may be shown: credentials masked (builder.redact)."""
        return {
            "message": redact_text(self.message),
            "where": redact_text(self.where) if self.where else self.where,
            "hint": redact_text(self.hint) if self.hint else self.hint,
        }

    def render(self) -> str:
        shown = self.public()
        lines = []
        if shown["where"]:
            lines.append(f"error: {shown['where']}: {shown['message']}")
        else:
            lines.append(f"error: {shown['message']}")
        if shown["hint"]:
            lines.append(f"hint: {shown['hint']}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


class RecipeError(AirboxError):
    """The recipe is malformed or inconsistent."""


class FetchError(AirboxError):
    """An input could not be downloaded or verified."""


class PackageError(AirboxError):
    """The vendor package is malformed or inconsistent."""

    DEFAULT_HINT = (
        "the vendor package is damaged or inconsistent: download it again (and check its checksum), "
        "or run `airbox-build verify` on it to list every problem"
    )

    def __init__(self, message: str, *, hint: str | None = None, where: str | None = None) -> None:
        super().__init__(message, hint=hint or self.DEFAULT_HINT, where=where)


class ToolError(AirboxError):
    """An external tool is missing or failed."""


class BuildError(AirboxError):
    """A build step could not be carried out (space, layout, conflicts)."""


class VerifyError(AirboxError):
    """A bundle failed verification."""


def die(message: str, *, hint: str | None = None, where: str | None = None) -> NoReturn:
    raise AirboxError(message, hint=hint, where=where)
