"""Command line for updates in the field: `airbox-build push BUNDLE HOST...` (builder.push)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from builder.events import Reporter


def register(
    group: click.Group,
    guarded: Callable[[Callable[..., None]], Callable[..., None]],
    reporter_factory: Callable[[click.Context], Reporter],
) -> None:
    @group.command("push")
    @click.argument("bundle", metavar="BUNDLE", type=click.Path(path_type=Path, exists=True, file_okay=False))
    @click.argument("hosts", metavar="HOST...", nargs=-1)
    @click.option("--all", "all_devices", is_flag=True, help="Every device of a fleet output.")
    @click.option(
        "-j", "--jobs", type=click.IntRange(min=1), default=4, show_default=True, help="Boxes at once."
    )
    @click.option("-y", "--yes", is_flag=True, help="Arm the update and reboot without asking.")
    @click.option(
        "--stage-only", is_flag=True, help="Send and verify the bundle on each box; do not arm the update."
    )
    @click.option(
        "--dir",
        "folder",
        default="/data/ota",
        show_default=True,
        help="The update folder on the box (on an eMMC partition U-Boot can read: ext4 or FAT).",
    )
    @click.option(
        "--timeout",
        type=float,
        default=1800,
        show_default=True,
        help="Seconds to wait for a box to come back.",
    )
    @click.option(
        "--margin", default="64M", show_default=True, help="Free space to leave on the box's partition."
    )
    @click.option("--force", is_flag=True, help="Also update a box that already runs the bundle.")
    @click.option(
        "--trust-new-host-key",
        is_flag=True,
        help="A box that comes back with new host keys (identity: regenerate): accept them once to "
        "confirm the bundle, and print them (they are not added to any known_hosts file).",
    )
    @click.option(
        "--known-hosts",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help="Check host keys against this file (default: the fleet's known_hosts, else yours).",
    )
    @click.option(
        "-i",
        "--identity",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help="The SSH private key to log in with (as ssh -i).",
    )
    @click.pass_context
    @guarded
    def push(
        ctx: click.Context,
        bundle: Path,
        hosts: tuple[str, ...],
        all_devices: bool,
        jobs: int,
        yes: bool,
        stage_only: bool,
        folder: str,
        timeout: float,
        margin: str,
        force: bool,
        trust_new_host_key: bool,
        known_hosts: Path | None,
        identity: Path | None,
    ) -> None:
        """Update boxes in the field over SSH, the vendor's way (local_update.sh), safely.

        HOST is [user@]host[:port], or a device name when BUNDLE is a fleet output
        (OUTPUT/<recipe>). Each box is checked first (its partition table matches the bundle's,
        free space, a writable folder), gets only the files it lacks (resumable), checks them
        with md5sum -c on the box; then, with --yes or after you confirm, the box's update is
        armed and it reboots; push waits until it runs the new bundle (/etc/airbox-build.json).
        """
        from builder.errors import AirboxError
        from builder.push.bundle import resolve_jobs
        from builder.push.runner import push_all
        from builder.push.update import PushOptions
        from builder.units import parse_size

        reporter = reporter_factory(ctx)
        if not folder.startswith("/"):
            raise click.UsageError("--dir must be an absolute path on the box")
        job_list, fleet_keys = resolve_jobs(bundle, list(hosts), all_devices)
        arm = not stage_only
        if arm and not yes:
            if reporter.json_mode or not sys.stdin.isatty():
                raise AirboxError(
                    "updating boxes reflashes them: confirm with --yes "
                    "(or --stage-only to only send and verify)"
                )
            boxes = ", ".join(j.target.label for j in job_list)
            if not click.confirm(
                f"Update {len(job_list)} box(es) ({boxes}) to {bundle}? Each reflashes its eMMC and reboots.",
                default=False,
                err=True,
            ):
                raise AirboxError("not confirmed: nothing was sent")
        opts = PushOptions(
            folder=folder.rstrip("/") or "/",
            margin=parse_size(margin),
            timeout=timeout,
            arm=arm,
            force=force,
            trust_new_key=trust_new_host_key,
        )
        results = push_all(
            job_list,
            known_hosts or fleet_keys,
            opts,
            workers=jobs,
            json_mode=reporter.json_mode,
            identity=identity,
            loaded=lambda b: reporter.info(
                f"{b.card}: verified (bundle {(b.bundle_id or 'without id')[:12]})"
            ),
        )
        failed = [r for r in results if not r.ok]
        reporter.event(
            "result",
            ok=not failed,
            boxes=[
                {
                    "box": r.box,
                    "ok": r.ok,
                    "state": r.state,
                    "message": r.message,
                    "hint": r.hint,
                    "sent": r.sent,
                }
                for r in results
            ],
        )
        if not reporter.json_mode:
            click.echo("summary:")
            for r in results:
                click.echo(f"  {'ok  ' if r.ok else 'FAIL'} {r.box}: {r.state}: {r.message}")
                if r.hint:
                    click.echo(f"       hint: {r.hint}")
        if failed:
            raise AirboxError(
                f"{len(failed)} of {len(results)} box(es) failed: {', '.join(r.box for r in failed)}"
            )
