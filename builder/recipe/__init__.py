"""The recipe: one YAML file (plus what it extends) -> a typed, frozen `Recipe`.

Modules, one job each:
- `schema`: the table of every recipe key (type, default, allowed values, description). The parser
  takes its keys from it; the JSON Schema (`airbox-build schema`) and the README's reference are
  generated from it.
- `nodes`: the YAML layer (nodes that remember file, line and column) and the type checks.
- `values`: value forms (URLs, checksums, paths, owners, modes, unit names, inputs).
- `model`: the frozen dataclasses the builder reads.
- `load`: extends/merge and the top-level sections; `users`, `apps`, `network`, `system` and
  `devices` parse their own sections.
"""

from builder.recipe.load import load_recipe
from builder.recipe.model import (
    App,
    AppPython,
    AppService,
    AppSource,
    Apt,
    FileEntry,
    Model,
    Output,
    Overlay,
    Pip,
    Recipe,
    Removal,
    Services,
    User,
    iter_inputs,
)
from builder.recipe.nodes import KeyPath, Mark, Node
from builder.recipe.values import Owner

__all__ = [
    "App",
    "AppPython",
    "AppService",
    "AppSource",
    "Apt",
    "FileEntry",
    "KeyPath",
    "Mark",
    "Model",
    "Node",
    "Output",
    "Overlay",
    "Owner",
    "Pip",
    "Recipe",
    "Removal",
    "Services",
    "User",
    "iter_inputs",
    "load_recipe",
]
