"""The typed, frozen recipe: what the builder reads after loading."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.inputs import InputSpec
from builder.recipe import schema
from builder.recipe.values import Owner

if TYPE_CHECKING:
    from builder.recipe.devices import Device
    from builder.recipe.network import Network
    from builder.recipe.system import Identity, Ntp, Setting, SshConfig

# ---------------------------------------------------------------------------------------------
# The recipe, section by section.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Apt:
    mirror: str
    suites: tuple[str, ...] | None  # None: from the image's codename (focal, focal-updates, ...)
    components: tuple[str, ...]
    where: str


@dataclass(frozen=True)
class Pip:
    index_url: str
    trusted_host: tuple[str, ...]  # default: the hosts of index_url and extra_index_urls
    extra_index_urls: tuple[str, ...]
    where: str


@dataclass(frozen=True)
class User:
    name: str
    ssh_authorized_keys: tuple[str, ...]
    password_hash: str | None
    where: str
    create: bool = False  # make the account when the image has none (as Ubuntu's adduser would)
    uid: int | None = None  # None: the first free one from the image's /etc/login.defs
    groups: tuple[str, ...] = ()  # supplementary groups, which must exist in the image
    shell: str | None = None
    home: str | None = None  # None: /home/NAME for a new account
    lock: bool = False  # lock the password ('!' before the hash): no password login


@dataclass(frozen=True)
class FileEntry:
    """One file to write; exactly one of content/source/template/input is set."""

    path: str  # absolute device path
    content: str | None
    source: Path | None
    template: Path | None
    input: InputSpec | None  # from `url`
    mode: int
    owner: Owner | None  # None: root:root
    layer: str  # "base" or "overlay"
    where: str


@dataclass(frozen=True)
class Overlay:
    path: Path  # a local folder laid out like the device's filesystem
    owner: Owner | None
    where: str


@dataclass(frozen=True)
class Removal:
    path: str  # absolute device path
    where: str


@dataclass(frozen=True)
class Services:
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    where: str = ""


@dataclass(frozen=True)
class AppSource:
    input: InputSpec
    strip_components: int
    where: str


@dataclass(frozen=True)
class Model:
    """A model input: a file copied to ``dest``, or an archive unpacked into ``extract``."""

    input: InputSpec
    dest: str | None  # relative to the app folder
    extract: str | None  # relative to the app folder ("." = the app folder)
    strip_components: int
    where: str


@dataclass(frozen=True)
class AppPython:
    lock: Path  # hashed pins for the target
    target: str  # relative to the app folder
    platform: str
    python: str
    where: str
    requirements: Path | None = None  # the .in that `airbox-build lock` re-resolves the lock from
    exclude_newer: str | None = None  # resolve as of this date (uv --exclude-newer)
    wheels: Path | None = None  # a local folder of wheels (pip --find-links), e.g. for offline builds
    index_url: str | None = None  # where pip downloads the wheels (default: pip's own / mirrors)


@dataclass(frozen=True)
class AppService:
    name: str  # the unit file name, default <app>.service
    exec: str
    user: str | None  # None: the app owner's user, else root
    port: int | None
    environment: Mapping[str, str]
    after: tuple[str, ...]
    enable: bool
    where: str


@dataclass(frozen=True)
class App:
    name: str
    path: str  # absolute device path of the app folder
    owner: Owner | None
    source: AppSource | None
    models: tuple[Model, ...]
    python: AppPython | None
    service: AppService | None
    dirs: tuple[str, ...]  # relative to the app folder, created even when empty
    where: str

    def device_path(self, relative: str) -> str:
        """Where a path relative to the app folder is on the device."""
        return self.path if relative == "." else posixpath.join(self.path, relative)


@dataclass(frozen=True)
class Output:
    image: bool = schema.default(schema.OUTPUT, "image")
    zip: bool = schema.default(schema.OUTPUT, "zip")
    shrink: bool = schema.default(schema.OUTPUT, "shrink")
    volume_label: str = schema.default(schema.OUTPUT, "volume_label")
    bundle_id: str = schema.default(schema.OUTPUT, "bundle_id")  # /etc/airbox-build.json: auto, always, never


@dataclass(frozen=True)
class Recipe:
    path: Path  # the recipe file, absolute
    name: str
    description: str
    extends: tuple[Path, ...]  # the files merged under this one, nearest first
    base: InputSpec
    vars: Mapping[str, Any]
    hostname: str | None
    network: Network | None
    apt: Apt | None
    pip: Pip | None
    users: tuple[User, ...]
    files: tuple[FileEntry, ...]
    overlays: tuple[Overlay, ...]
    remove: tuple[Removal, ...]
    services: Services
    apps: tuple[App, ...]
    layout: Mapping[str, int]  # partition label -> bytes
    mirrors: tuple[tuple[str, str], ...]  # (URL prefix, replacement), in recipe order
    output: Output
    identity: Identity
    ssh: SshConfig | None
    timezone: Setting | None
    locale: Setting | None
    ntp: Ntp | None
    devices: tuple[Device, ...] = ()  # the fleet: each a complete recipe of its own
    device: str | None = None  # set on a device's recipe: the device's name

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def base_md5_only(self) -> bool:
        """The vendor package is pinned by md5 alone: the CLI should warn."""
        return bool(self.base.md5) and not self.base.sha256

    def inputs(self) -> Iterator[InputSpec]:
        return iter_inputs(self)


def iter_inputs(recipe: Recipe) -> Iterator[InputSpec]:
    """Every input the recipe downloads or reads: base, file URLs, app sources and models.

    The Python wheels named by an app's lock file are not listed here: they come from the lock.
    """
    yield recipe.base
    for entry in recipe.files:
        if entry.input is not None:
            yield entry.input
    for app in recipe.apps:
        if app.source is not None:
            yield app.source.input
        for model in app.models:
            yield model.input
