"""Shared pytest fixtures: miniature vendor packages built with the real tools.

- `vendor_package_session`: the default package, built once per session. Read only.
- `vendor_package`: a fresh private copy of it for one test (mutate freely).
- `make_vendor_package(**options)`: build a variant (PackageOptions fields) for one test.
- `shared_vendor_package(**options)`: a variant built once per session and cached. Read only.
- `vendor_form(form, pkg=None, **kw)`: the package (default: a fresh default copy) in one
  input form ("dir", "tgz", "tar.gz", "zip", "img", "img.zip", "img.xz") for one test.
- `shared_vendor_form(form, **kw)`: the default package in a form, cached per session. Read only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import vendor_fixture as vf
from hypothesis import HealthCheck, settings

# Shared machines are noisy: a per-example deadline would make property tests flaky.
# Blobs of a whole GPT (17 KiB) routinely exceed hypothesis's entropy budget: not a test failure.
settings.register_profile(
    "airbox",
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
settings.load_profile("airbox")


@pytest.fixture(scope="session")
def vendor_package_session(tmp_path_factory: pytest.TempPathFactory) -> vf.MiniPackage:
    return vf.build_package(tmp_path_factory.mktemp("vendor-default"))


@pytest.fixture
def vendor_package(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> vf.MiniPackage:
    return vendor_package_session.copy_to(tmp_path / "vendor")


@pytest.fixture
def make_vendor_package(tmp_path: Path) -> Callable[..., vf.MiniPackage]:
    counter = itertools.count()

    def make(**options: object) -> vf.MiniPackage:
        return vf.build_package(tmp_path / f"vendor-variant-{next(counter)}", **options)

    return make


@pytest.fixture(scope="session")
def shared_vendor_package(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., vf.MiniPackage]:
    cache: dict[str, vf.MiniPackage] = {}

    def get(**options: object) -> vf.MiniPackage:
        key = repr(sorted(options.items()))
        if key not in cache:
            cache[key] = vf.build_package(tmp_path_factory.mktemp("vendor-shared"), **options)
        return cache[key]

    return get


@pytest.fixture
def vendor_form(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> Callable[..., Path]:
    counter = itertools.count()

    def make(form: str, pkg: vf.MiniPackage | None = None, **kw: object) -> Path:
        n = next(counter)
        source = pkg or vendor_package_session.copy_to(tmp_path / f"vendor-form-src-{n}")
        return vf.make_form(source, form, tmp_path / f"vendor-form-{n}", **kw)

    return make


@pytest.fixture(scope="session")
def shared_vendor_form(
    vendor_package_session: vf.MiniPackage, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    cache: dict[str, Path] = {}

    def get(form: str, **kw: object) -> Path:
        key = repr((form, sorted(kw.items())))
        if key not in cache:
            cache[key] = vf.make_form(
                vendor_package_session, form, tmp_path_factory.mktemp("vendor-form"), **kw
            )
        return cache[key]

    return get
