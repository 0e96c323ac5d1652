"""Command line for the VM: `airbox-build boot PATH [--check]` and `airbox-build ssh PATH [CMD...]`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def register(
    group: click.Group,
    guarded: Callable[[Callable[..., None]], Callable[..., None]],
    reporter_factory: Callable[[click.Context], Any],
    fetch_options: Callable[[Callable[..., Any]], Callable[..., Any]],
    make_fetch_options: Callable[..., Any],
) -> None:
    @group.command("boot")
    @click.argument("path", type=click.Path(path_type=Path, exists=True))
    @click.option(
        "--check", is_flag=True, help="Check the running box against its recipe, reboot, check again."
    )
    @click.option("--fresh", is_flag=True, help="A new box: forget what earlier boots wrote to its eMMC.")
    @click.option("--keep", is_flag=True, help="Leave the VM running (stop it with --stop).")
    @click.option("--stop", is_flag=True, help="Stop the VM of this bundle (a clean poweroff).")
    @click.option(
        "--console", is_flag=True, help="The serial console on the terminal (else boot/console.log)."
    )
    @click.option(
        "--timeout",
        type=float,
        default=300.0,
        show_default=True,
        help="Seconds to wait for the box to come up (each boot).",
    )
    @click.option(
        "--identity",
        "-i",
        "identities",
        multiple=True,
        type=click.Path(path_type=Path, exists=True, dir_okay=False),
        help="Private key to log in with the recipe's ssh_authorized_keys (repeatable).",
    )
    @click.option(
        "--recipe",
        type=click.Path(path_type=Path, exists=True, dir_okay=False),
        help="The recipe to check against (default: the one named in build-report.json).",
    )
    @click.option(
        "--baseline",
        type=click.Path(path_type=Path, exists=True),
        help="The vendor package the bundle was built from (default: from build-report.json).",
    )
    @click.option(
        "--update-from",
        type=click.Path(path_type=Path, exists=True),
        help="Install this package (or bundle) first, then update the box to BUNDLE from its own eMMC, "
        "as `push` does; boot what the update leaves.",
    )
    @click.option(
        "--kernel",
        type=click.Path(path_type=Path, exists=True, dir_okay=False),
        help="Boot this arm64 kernel (with --initrd) instead of Debian's linux-image-arm64.",
    )
    @click.option(
        "--initrd",
        type=click.Path(path_type=Path, exists=True, dir_okay=False),
        help="With --kernel: an initramfs made by airbox-build (boot/initrd.img of another box).",
    )
    @click.option(
        "--keyring",
        type=click.Path(path_type=Path, exists=True, dir_okay=False),
        help="Keyring for the Debian archive's InRelease (default: Debian's archive keyring).",
    )
    @click.option(
        "--debian-archive",
        "archives",
        multiple=True,
        metavar="URL SUITE",
        help="Resolve the kernel from this archive and suite, e.g. 'http://deb.example/debian "
        "bookworm' (repeatable; default: the host's apt sources).",
    )
    @fetch_options
    @click.pass_context
    @guarded
    def boot(
        ctx: click.Context,
        path: Path,
        check: bool,
        fresh: bool,
        keep: bool,
        stop: bool,
        console: bool,
        timeout: float,
        identities: tuple[Path, ...],
        recipe: Path | None,
        baseline: Path | None,
        update_from: Path | None,
        kernel: Path | None,
        initrd: Path | None,
        keyring: Path | None,
        archives: tuple[str, ...],
        cache_dir: Path | None,
        offline: bool,
        input_dirs: tuple[Path, ...],
        mirrors: tuple[str, ...],
        locked: bool,
    ) -> None:
        """Boot a bundle's root in an arm64 VM (an output folder, card folder or card image).

        The bundle is flashed into an eMMC image by the project's simulator, and the VM writes
        into a copy-on-write overlay: the second `boot` is the second boot of the same box.
        """
        from builder.errors import AirboxError
        from builder.vm import machine
        from builder.vm.check import FAIL
        from builder.vm.debian import Archive
        from builder.vm.initramfs import KernelFiles
        from builder.vm.kernel import vm_kernel
        from builder.vm.session import BootOptions
        from builder.vm.session import boot as run_boot

        reporter = reporter_factory(ctx)
        bundle = machine.locate(path)
        if stop:
            vm = machine.VM.load(bundle.state)
            if vm is None:
                click.echo("no VM of this bundle is running")
                return
            vm.stop()
            reporter.event("result", ok=True, stopped=vm.pid)
            if not reporter.json_mode:
                click.echo(f"stopped the VM (pid {vm.pid})")
            return
        if (kernel is None) != (initrd is None):
            raise AirboxError("--kernel and --initrd go together")
        fopts = make_fetch_options(None, cache_dir, offline, input_dirs, mirrors, locked, reporter)
        arcs = []
        for a in archives:
            parts = a.split()
            if len(parts) != 2:
                raise click.BadParameter(f"{a!r} is not 'URL SUITE'", param_hint="--debian-archive")
            arcs.append(Archive(parts[0].rstrip("/"), parts[1]))
        given = KernelFiles(kernel, initrd, "given") if kernel and initrd else None

        def kernel_files() -> KernelFiles:
            with reporter.step("kernel"):
                files, desc = vm_kernel(fopts, archives=arcs or None, keyring=keyring)
            reporter.info(f"kernel: {desc}")
            return files

        def on_row(r: Any) -> None:
            reporter.event("check", **r.as_event())
            if not reporter.json_mode:
                mark = {"ok": "ok  ", "FAIL": "FAIL", "warn": "warn", "known": "vend"}[r.status]
                click.echo(f"  {mark}  {r.check:<38} {r.detail}")

        opts = BootOptions(
            check=check,
            fresh=fresh,
            keep=keep,
            console=console,
            timeout=timeout,
            identities=identities,
            recipe=recipe,
            baseline=baseline,
            kernel=given,
            update_from=update_from,
        )
        with reporter.step("boot"):
            result = run_boot(path, opts, fopts, info=reporter.info, on_row=on_row, kernel_files=kernel_files)
        timings = {k: round(v, 1) for k, v in result.timings.items()}
        if check:
            failed = [r for r in result.rows if r.status == FAIL]
            reporter.event(
                "result", ok=not failed, failed=len(failed), rows=len(result.rows), timings=timings, kept=keep
            )
            if not reporter.json_mode:
                click.echo(
                    f"{len(result.rows)} checks, {len(failed)} failed; "
                    + ", ".join(f"{k} {v} s" for k, v in timings.items())
                )
            if failed:
                raise AirboxError(
                    f"the box does not do what the recipe says: {len(failed)} check(s) failed: "
                    + "; ".join(r.check for r in failed[:6]),
                    hint=f"read the rows above and {bundle.state / 'console.log'}",
                )
            return
        vm = result.vm
        assert vm is not None
        reporter.event("result", ok=True, pid=vm.pid, ssh_port=vm.ssh_port, timings=timings)
        if keep:
            if not reporter.json_mode:
                click.echo(
                    f"running (pid {vm.pid}): airbox-build ssh {path}; stop: airbox-build boot {path} --stop"
                )
            return
        if not reporter.json_mode:
            click.echo(f"running: airbox-build ssh {path} in another terminal; Ctrl-C stops the box")
        try:
            while vm.alive():
                time.sleep(0.5)
        finally:
            vm.stop()

    @group.command("ssh", context_settings={"ignore_unknown_options": True})
    @click.argument("path", type=click.Path(path_type=Path, exists=True))
    @click.argument("command", nargs=-1, type=click.UNPROCESSED)
    @click.option("--user", "-l", help="Log in as this user (default: the recipe's first user, else linaro).")
    @click.option("--identity", "-i", type=click.Path(path_type=Path, exists=True, dir_okay=False))
    @click.pass_context
    @guarded
    def ssh(
        ctx: click.Context, path: Path, command: tuple[str, ...], user: str | None, identity: Path | None
    ) -> None:
        """SSH into the running VM of a bundle (started with `boot --keep`), host key pinned."""
        from builder.errors import AirboxError
        from builder.vm import machine
        from builder.vm.check import HOST_ALIAS

        bundle = machine.locate(path)
        vm = machine.VM.load(bundle.state)
        if vm is None:
            raise AirboxError(
                "no VM of this bundle is running", hint=f"start one: airbox-build boot {path} --keep"
            )
        kh = bundle.state / "known_hosts"
        if not kh.exists():
            _record_host_keys(vm, kh)
        if user is None:
            from builder.vm.session import load_recipe_of

            recipe = load_recipe_of(bundle, None)
            user = recipe.users[0].name if recipe is not None and recipe.users else "linaro"
        args = [
            "ssh",
            "-p",
            str(vm.ssh_port),
            "-o",
            f"UserKnownHostsFile={kh}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"HostKeyAlias={HOST_ALIAS}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ]
        if identity is not None:
            args += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
        args += [f"{user}@127.0.0.1", *command]
        os.execvp("ssh", args)


def _record_host_keys(vm: Any, known_hosts: Path) -> None:
    from builder.vm.check import HOST_ALIAS

    ag = vm.agent()
    ag.wait_ready(60, vm.alive)
    keys = ag.run("cat /etc/ssh/ssh_host_*_key.pub").out
    ag.close()
    known_hosts.write_text(
        "".join(f"{HOST_ALIAS} {' '.join(k.split()[:2])}\n" for k in keys.splitlines() if k.strip())
    )
