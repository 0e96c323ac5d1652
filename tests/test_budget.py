"""The apps' size budget: estimates by part, and an error that says how to fix the layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.customise.budget import (
    GIB,
    MODEL_ARCHIVE_FACTOR,
    SOURCE_FACTOR,
    InputSize,
    check_budget,
    estimate_app_bytes,
    layout_fix,
)
from builder.customise.pyenv import PythonEstimate, TreeSize
from builder.errors import BuildError
from builder.recipe import App, load_recipe
from builder.units import parse_size

SHA = "ab" * 32
MIB = 1 << 20
RECIPE = f"""\
name: t
base: {{url: https://example.com/x.img, sha256: {SHA}}}
apps:
  sd-lcm-tpu:
    path: /data/SD-lcm-tpu
    source: {{url: https://example.com/src.tar.gz, strip_components: 1}}
    models:
      - {{url: https://example.com/canny.bmodel, dest: models/controlnet/canny.bmodel}}
      - {{parts: [https://example.com/m.tar.gz.aa, https://example.com/m.tar.gz.ab], extract: models/basic}}
    python: {{lock: sd-lcm-tpu.lock}}
    dirs: [models/controlnet]
"""


@pytest.fixture
def app(tmp_path: Path) -> App:
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return load_recipe(tmp_path / "recipe.yaml", check_files=False).apps[0]


def test_estimate_before_download(app: App) -> None:
    assert app.source is not None
    sizes = {app.source.input: 10 * MIB, app.models[0].input: 300 * MIB + 1, app.models[1].input: 2 * GIB}
    python = PythonEstimate(bytes=980 * MIB, exact=False)
    budget = estimate_app_bytes(app, sizes, python)
    assert budget.source >= 10 * MIB * SOURCE_FACTOR
    assert budget.models >= 300 * MIB + 4096 + 2 * GIB * MODEL_ARCHIVE_FACTOR
    assert budget.models % 4096 == 0 and budget.source % 4096 == 0
    assert budget.python == 980 * MIB
    assert budget.estimated == ("source", "models[1]", "python")
    assert budget.unknown == ()
    assert budget.total == budget.source + budget.models + budget.python + budget.folders
    assert re.match(r"source ~3\d MiB \+ models ~2\.\d GiB \+ Python ~980 MiB$", budget.describe())


def test_exact_sizes_after_fetching(app: App) -> None:
    assert app.source is not None
    sizes = {
        app.source.input: InputSize(download=10 * MIB, unpacked=25 * MIB),
        app.models[0].input: 300 * MIB,
        app.models[1].input: InputSize(download=2 * GIB, unpacked=2 * GIB + 5),
    }
    tree = TreeSize(bytes=800 * MIB, files=23470, dirs=1849, disk_bytes=849 * MIB)
    budget = estimate_app_bytes(app, sizes, tree)
    assert budget.estimated == () and budget.python == 849 * MIB
    assert budget.models < 300 * MIB + 2 * GIB + 2 * MIB
    assert "~" not in budget.describe()


def test_unknown_sizes_are_listed(app: App) -> None:
    budget = estimate_app_bytes(app, {}, PythonEstimate(0, exact=False, unknown=("torch==2.2.0",)))
    assert budget.unknown == (
        "apps.sd-lcm-tpu.source",
        "apps.sd-lcm-tpu.models[0]",
        "apps.sd-lcm-tpu.models[1]",
        "torch==2.2.0",
    )


def test_fits(app: App) -> None:
    check_budget(3 * GIB, "DATA", 8 * GIB, 1 * GIB, "recipe.yaml:3 apps")


def test_does_not_fit_says_how_much_and_the_layout_line(app: App) -> None:
    assert app.source is not None
    budget = estimate_app_bytes(
        app,
        {app.source.input: 10 * MIB, app.models[0].input: 300 * MIB, app.models[1].input: 2800 * MIB},
        PythonEstimate(bytes=980 * MIB, exact=False),
    )
    used, size = 300 * MIB, 4 * GIB
    with pytest.raises(BuildError) as caught:
        check_budget(budget.total, "DATA", size, used, "recipe.yaml:3 apps", budgets=[budget])
    err = caught.value
    assert err.where == "recipe.yaml:3 apps"
    assert "do not fit in DATA" in err.message and "sd-lcm-tpu: source ~" in err.message
    assert "3.7 GiB free (4 GiB partition, 300 MiB used)" in err.message
    assert re.search(r"short by [0-9.]+ [MG]iB", err.message)
    found = re.search(r"`layout: \{DATA: (\d+)GiB\}`", err.hint or "")
    assert found is not None
    # The proposed size is enough, and not wildly more than needed.
    proposed = parse_size(found[1] + "GiB")
    check_budget(budget.total, "DATA", proposed, used, None)
    assert proposed <= budget.total + used + 2 * GIB


@given(
    used=st.integers(min_value=0, max_value=64 * GIB),
    need=st.integers(min_value=0, max_value=64 * GIB),
)
def test_the_proposed_layout_always_fits(used: int, need: int) -> None:
    size, line = layout_fix("DATA", used, need)
    if size >= GIB:
        assert size % GIB == 0 and line == f"layout: {{DATA: {size // GIB}GiB}}"
    else:  # small partitions (tests, miniature packages) get a MiB-sized proposal
        assert size % (1 << 20) == 0 and line == f"layout: {{DATA: {size >> 20}MiB}}"
    check_budget(need, "DATA", size, used, None)
    with pytest.raises(BuildError):
        check_budget(need, "DATA", used + need, used, None)  # no margin at all never passes
