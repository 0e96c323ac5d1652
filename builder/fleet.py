"""A fleet: one shared build, then each device as a small delta on it.

OUTPUT/<recipe>/_shared/ is the recipe built once without any device's fragment. Each device is
then built with that bundle as its vendor package and only the sections its fragment changes
(hostname, network, its own host keys, ...): the chunk machinery recompresses just the chunks
those edits touch and keeps the shared build's .gz for every other one. Every file of a device's
bundle that is byte-identical to the shared build's is then a hard link to it (a copy where the
filesystem cannot link). Each device folder is published atomically (builder.outdir), and one
whose inputs did not change since it was made is kept as it is: a killed fleet build, run again,
finishes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from builder import __version__
from builder.build import CARD, KNOWN_HOSTS, REPORT, SUMS, BuildOptions, BuildResult, box_names, build
from builder.emit import read_sha256sums
from builder.errors import BuildError
from builder.events import Reporter, checkpoint
from builder.hostkeys import ensure_host_keys, fingerprints, keys_dir, known_hosts_lines
from builder.inputs import InputSpec
from builder.recipe import Recipe
from builder.recipe.devices import Device, static_addresses
from builder.recipe.system import Identity

SHARED = "_shared"
FLEET_JSON = "fleet.json"
# sections that are the shared build's when every device has the recipe's, else each device's
_SECTIONS = (
    "hostname", "network", "apt", "pip", "users", "files", "overlays", "remove", "services", "apps",
    "ssh", "timezone", "locale", "ntp",
)  # fmt: skip
_TEMPLATED = ("files", "overlays")  # rendered with templates: per device when what they see differs
_EMPTY: dict[str, Any] = {"users": (), "files": (), "overlays": (), "remove": (), "apps": ()}


@dataclass(frozen=True)
class FleetResult:
    root: Path
    shared: BuildResult
    devices: dict[str, Path]  # name -> bundle folder
    skipped: tuple[str, ...]  # complete and up to date: kept as they were


def per_device_keys(recipe: Recipe) -> bool:
    return recipe.identity.ssh_host_keys == "per-device"


def build_recipe(recipe: Recipe, opts: BuildOptions, reporter: Reporter) -> BuildResult:
    """One bundle (no `devices`): with its own host keys when the recipe asks for them."""
    keys = None
    if per_device_keys(recipe):
        keys = ensure_host_keys(keys_dir(opts.output_dir, recipe.name, recipe.name), f"root@{recipe.name}")
    return build(recipe, opts, reporter, host_keys=keys)


def build_fleet(
    recipe: Recipe, opts: BuildOptions, reporter: Reporter, only: Sequence[str] = ()
) -> FleetResult:
    names = {d.name for d in recipe.devices}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise BuildError(
            f"no device {unknown[0]!r} in {recipe.path.name}",
            hint="devices: " + ", ".join(d.name for d in recipe.devices),
        )
    root = opts.output_dir / recipe.name
    if (root / CARD).is_dir() and not (root / FLEET_JSON).exists():
        reporter.info(f"{root} held a single bundle of this recipe: the fleet replaces it")
        shutil.rmtree(root)
    chosen = [d for d in recipe.devices if not only or d.name in only]
    # new host keys (ssh-keygen: about 1 s for rsa 3072) are made beside the shared build
    with ThreadPoolExecutor(1, thread_name_prefix="ssh-keygen") as keygen:
        pending = {
            d.name: keygen.submit(
                ensure_host_keys,
                keys_dir(opts.output_dir, recipe.name, d.name),
                f"root@{d.recipe.hostname or d.name}",
            )
            for d in chosen
            if per_device_keys(d.recipe)
        }
        with reporter.step("shared build", devices=len(chosen)):
            shared_recipe = shared_part(recipe)
            # no card image or zip of the shared build: only devices go on cards
            shared_opts = replace(opts, output_dir=root, image=False, zip=False)
            shared = build(shared_recipe, shared_opts, reporter, folder=SHARED)
        built: dict[str, Path] = {}
        skipped = []
        entries: dict[str, Any] = {}
        for device in chosen:
            keys = pending[device.name].result() if device.name in pending else None
            delta = device_delta(shared_recipe, device, shared.card)
            stamp = _fingerprint(shared.out_dir, delta, keys)
            folder = root / device.name
            checkpoint(f"device:{device.name}")  # tests kill a fleet build here
            if _up_to_date(folder, stamp):
                skipped.append(device.name)
                reporter.info(f"device {device.name}: up to date, kept")
            else:
                with reporter.step("device", device=device.name):
                    hook = _report_hook(device, shared, stamp)
                    build(delta, replace(opts, output_dir=root), reporter, folder=device.name, host_keys=keys,
                          report_hook=hook, base_bundle=shared.out_dir)  # fmt: skip
            link_identical(shared.out_dir, folder)
            built[device.name] = folder
            entries[device.name] = _entry(device, folder, keys)
    if not only:
        _remove_gone(root, names)
    _write_fleet(root, recipe, entries, complete=not only)
    return FleetResult(root, shared, built, tuple(skipped))


def _context(r: Recipe) -> tuple[Any, ...]:
    """What templates see (customise.files.template_vars), besides the recipe's name and path."""
    return (r.vars, r.hostname, r.description)


def _blank(name: str, r: Recipe) -> Any:
    if name == "services":
        return type(r.services)()
    if name == "identity":
        return Identity("keep", "keep", r.identity.where, explicit=False)
    return _EMPTY.get(name)


def _varies(recipe: Recipe, name: str) -> bool:
    """Whether some device's merged recipe differs from the recipe in this section (templated
    sections also when what their templates see differs)."""
    for d in recipe.devices:
        if getattr(d.recipe, name) != getattr(recipe, name):
            return True
        if name in _TEMPLATED and _context(d.recipe) != _context(recipe) and _renders(recipe, name):
            return True
    return False


_JINJA = ("{{", "{%", "{#")


def _renders(recipe: Recipe, name: str) -> bool:
    """Whether the section has templates whose output could depend on what they see."""
    if name == "files":
        return any(
            f.template is not None or any(m in (f.content or "") for m in _JINJA) for f in recipe.files
        )
    return any(p.name.endswith(".j2") for o in recipe.overlays for p in o.path.rglob("*"))


def shared_part(recipe: Recipe) -> Recipe:
    """The recipe without devices and without every section some device changes: those are
    applied by each device whole, so that a device's bundle is what its merged recipe built from
    the vendor package would be (a device can drop an entry of a list the recipe has: a shared
    build that applied it could not take it back)."""
    blank = {name: _blank(name, recipe) for name in (*_SECTIONS, "identity") if _varies(recipe, name)}
    return replace(recipe, devices=(), **blank)


def device_delta(shared: Recipe, device: Device, shared_card: Path) -> Recipe:
    """The device's recipe as a delta on the shared bundle: the sections the shared build left
    out (they vary between devices), and the device's own host keys."""
    mine = device.recipe
    changes: dict[str, Any] = {"base": InputSpec(path=shared_card, where=f"{SHARED} build", name="base")}
    for name in (*_SECTIONS, "identity"):
        if getattr(shared, name) == getattr(mine, name):
            changes[name] = _blank(name, mine)  # the shared build applied it
    if "identity" in changes and per_device_keys(mine):
        # the shared build removed the vendor's keys and machine-id; the keys are this device's own
        changes["identity"] = Identity("per-device", "keep", mine.identity.where, explicit=False)
    changes["layout"] = {}
    return replace(mine, **changes)


def _fingerprint(shared_dir: Path, delta: Recipe, keys: Mapping[str, Path] | None) -> str:
    h = hashlib.sha256(__version__.encode())
    h.update((shared_dir / SUMS).read_bytes())
    for f in fields(delta):
        h.update(f"{f.name}={getattr(delta, f.name)!r}\n".encode())
    for path in sorted(_local_inputs(delta)):
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for private in sorted((keys or {}).values()):
        h.update(private.with_name(private.name + ".pub").read_bytes())
    return h.hexdigest()


def _local_inputs(r: Recipe) -> list[Path]:
    out: list[Path] = []
    for f in r.files:
        out += [p for p in (f.source, f.template) if p is not None]
    for o in r.overlays:
        out += [p for p in o.path.rglob("*") if p.is_file()]
    return out


def _up_to_date(folder: Path, stamp: str) -> bool:
    try:
        report = json.loads((folder / REPORT).read_text())
    except (OSError, ValueError):
        return False
    return report.get("fleet", {}).get("fingerprint") == stamp and (folder / CARD).is_dir()


def _report_hook(device: Device, shared: BuildResult, stamp: str) -> Any:
    def hook(report: dict[str, Any]) -> None:
        base = shared.report
        mine = {c["device_path"] for c in report.get("changes", [])}
        report["recipe"] = {**base["recipe"], "device": device.name}
        report["base"] = base["base"]
        report["changes"] = [c for c in base.get("changes", []) if c["device_path"] not in mine] + report.get(
            "changes", []
        )
        if not report.get("apps"):
            report["apps"] = base.get("apps", [])
        report["fleet"] = {"device": device.name, "shared": SHARED, "fingerprint": stamp}

    return hook


def link_identical(shared: Path, folder: Path) -> int:
    """Hard-link every file of `folder` that is byte-identical to the shared bundle's (by the
    SHA256SUMS both list); returns how many were linked."""
    mine, theirs = _sums(folder / SUMS), _sums(shared / SUMS)
    linked = 0
    for rel, digest in mine.items():
        if theirs.get(rel) != digest:
            continue
        src, dest = shared / rel, folder / rel
        try:
            if os.path.samefile(src, dest):
                linked += 1
                continue
            if src.stat().st_size != dest.stat().st_size:
                continue
            tmp = dest.with_name(f".{dest.name}.link")
            tmp.unlink(missing_ok=True)
            os.link(src, tmp)
            os.replace(tmp, dest)
            linked += 1
        except OSError:
            continue  # another filesystem, or no hard links: the copy stays
    return linked


def _sums(path: Path) -> dict[str, str]:
    try:
        return read_sha256sums(path)
    except OSError:
        return {}


def _entry(device: Device, folder: Path, keys: Mapping[str, Path] | None) -> dict[str, Any]:
    boot = folder / CARD / "boot.scr"
    entry: dict[str, Any] = {
        "bundle": device.name,
        "boot_scr_sha256": hashlib.sha256(boot.read_bytes()).hexdigest() if boot.is_file() else None,
        "hostname": device.recipe.hostname,
        "addresses": static_addresses(device.recipe),
        "where": device.where,
    }
    if keys is not None:
        entry["host_keys"] = fingerprints(keys)
        entry["known_hosts"] = known_hosts_lines(box_names(device.recipe), keys)
    return entry


def _remove_gone(root: Path, names: set[str]) -> None:
    """Device folders of this fleet whose device left the recipe."""
    for d in root.iterdir():
        if d.name in names or d.name == SHARED or not d.is_dir() or d.name.startswith("."):
            continue
        try:
            report = json.loads((d / REPORT).read_text())
        except (OSError, ValueError):
            continue
        if "fleet" in report:
            shutil.rmtree(d)


def _write_fleet(root: Path, recipe: Recipe, entries: dict[str, Any], *, complete: bool) -> None:
    path = root / FLEET_JSON
    devices: dict[str, Any] = {}
    if not complete and path.is_file():
        try:
            devices = dict(json.loads(path.read_text()).get("devices", {}))
        except (OSError, ValueError):
            devices = {}
    devices.update(entries)
    order = [d.name for d in recipe.devices if d.name in devices]
    doc = {
        "airbox_build": __version__,
        "recipe": {"name": recipe.name, "path": str(recipe.path)},
        "shared": SHARED,
        "devices": {n: devices[n] for n in order},
    }
    tmp = path.with_name(f".{FLEET_JSON}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    lines = [line for n in order for line in devices[n].get("known_hosts", [])]
    hosts = root / KNOWN_HOSTS
    if lines:
        tmp = hosts.with_name(f".{KNOWN_HOSTS}.tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, hosts)
    else:
        hosts.unlink(missing_ok=True)
