"""The description of one input to fetch: the vendor package, a file, a model, a wheel."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class InputSpec:
    """Where an input comes from and what it must hash to.

    Exactly one of `url`, `path` or `parts` is set. `parts` are URLs (or paths)
    concatenated in order; the pins apply to the whole.
    `where` says where in the recipe this input was declared (``file:line key``),
    for error messages.
    """

    url: str | None = None
    path: Path | None = None
    parts: tuple[str, ...] = ()
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    where: str = ""
    name: str = field(default="", compare=False)  # a human label, e.g. "base" or "files[2]"
    member: str | None = None  # base only: the package inside an SDK release archive (its path there)

    @property
    def display(self) -> str:
        if self.url:
            return self.url
        if self.path is not None:
            return str(self.path)
        return f"{len(self.parts)} parts: {self.parts[0]} ..."
