"""The bundle side of `push`: which bundle goes to which box, verified before any box is touched."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import AirboxError
from builder.manifest import MD5_NAME, parse_md5
from builder.package.flashplan import FlashPlan
from builder.package.source import open_package
from builder.push.ssh import Target, parse_target
from builder.verify import verify_fileset

CARD = "card"
REPORT = "build-report.json"
FLEET_JSON = "fleet.json"
KNOWN_HOSTS = "known_hosts"
UPDATE_SCRIPT = "local_update.sh"


@dataclass
class LocalBundle:
    root: Path  # the output folder (card/ and build-report.json), or the card folder itself
    card: Path
    bundle_id: str | None  # what /etc/airbox-build.json will say on the box
    known_hosts: Path | None
    plan: FlashPlan
    md5: dict[str, str]  # card file -> md5, as md5.txt lists it (checked by verify)
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.name if self.root != self.card else self.card.parent.name

    def files(self) -> list[str]:
        return sorted(self.sizes)


def load_bundle(path: Path, known_hosts: Path | None = None) -> LocalBundle:
    """Open and verify a bundle (every chunk decompressed, md5.txt checked): nothing unverified
    is ever sent to a box."""
    card = path / CARD if (path / CARD).is_dir() else path
    root = path if card != path else (path.parent if (path.parent / REPORT).is_file() else path)
    if not (card / "boot.scr").is_file():
        raise AirboxError(
            "not a bundle: no boot.scr", where=str(card), hint="give OUTPUT/<name> (or its card/ folder)"
        )
    with tempfile.TemporaryDirectory(prefix="airbox-push-") as tmp, open_package(card, Path(tmp)) as files:
        report = verify_fileset(files)
    if not report.ok or report.plan is None:
        shown = "; ".join(f"{p.file}: {p.message}" for p in report.failures[:3])
        raise AirboxError(
            f"the bundle does not verify ({len(report.failures)} problem(s)): {shown}",
            where=str(card),
            hint="rebuild it (airbox-build build); `airbox-build verify` lists every problem",
        )
    if MD5_NAME not in report.plan.files:
        raise AirboxError("the bundle has no md5.txt: the box checks the update against it", where=str(card))
    md5 = dict(parse_md5((card / MD5_NAME).read_text()))
    bundle_id = _bundle_id(root)
    if known_hosts is None and (root / KNOWN_HOSTS).is_file():
        known_hosts = root / KNOWN_HOSTS
    sizes = {p.name: p.stat().st_size for p in card.iterdir() if p.is_file()}
    return LocalBundle(root, card, bundle_id, known_hosts, report.plan, md5, sizes)


def _bundle_id(root: Path) -> str | None:
    try:
        doc = json.loads((root / REPORT).read_text())
    except (OSError, ValueError):
        return None
    bid = doc.get("bundle_id")
    return str(bid["bundle"]) if isinstance(bid, dict) and "bundle" in bid else None


@dataclass(frozen=True)
class Job:
    target: Target
    bundle: Path  # the bundle folder for this box


def resolve_jobs(bundle: Path, hosts: list[str], all_devices: bool) -> tuple[list[Job], Path | None]:
    """(box, bundle) pairs, and the fleet's known_hosts when BUNDLE is a fleet output."""
    fleet = bundle / FLEET_JSON
    if not fleet.is_file():
        if all_devices:
            raise AirboxError(
                "--all needs a fleet output (a folder with fleet.json)",
                where=str(bundle),
                hint="give the boxes' addresses instead",
            )
        if not hosts:
            raise AirboxError("no box given", hint="airbox-build push BUNDLE [user@]host[:port] ...")
        return [Job(parse_target(h), bundle) for h in hosts], None
    doc: dict[str, Any] = json.loads(fleet.read_text())
    devices: dict[str, Any] = doc.get("devices", {})
    known = bundle / KNOWN_HOSTS if (bundle / KNOWN_HOSTS).is_file() else None
    names = list(devices) if all_devices else hosts
    if not names:
        raise AirboxError(
            "no device given", hint=f"name devices of the fleet ({', '.join(devices)}) or use --all"
        )
    jobs = []
    for given in names:
        user, _, name = given.rpartition("@")
        if name not in devices:
            raise AirboxError(
                f"{name!r} is not a device of this fleet",
                where=str(fleet),
                hint=f"devices: {', '.join(devices)}",
            )
        entry = devices[name]
        address = (entry.get("addresses") or [None])[0] or entry.get("hostname") or name
        target = parse_target(f"{user + '@' if user else ''}{address}", name=name)
        jobs.append(Job(target, bundle / str(entry.get("bundle", name))))
    return jobs, known
