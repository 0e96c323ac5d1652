"""`airbox-build boot`: flash, boot, wait, check, reboot, check again; and the vendor baseline."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.cache import read_json, write_json_atomic
from builder.errors import AirboxError
from builder.fetch import FetchOptions
from builder.vm import machine
from builder.vm.agent import Agent, AgentError
from builder.vm.check import FAIL, Checker, Row, baseline_facts, expectations
from builder.vm.initramfs import KernelFiles


@dataclass
class BootOptions:
    check: bool = False
    fresh: bool = False
    keep: bool = False
    console: bool = False
    timeout: float = 300.0
    identities: Sequence[Path] = ()
    recipe: Path | None = None
    baseline: Path | None = None
    kernel: KernelFiles | None = None
    update_from: Path | None = None  # the box runs this package first, then gets the bundle by an update


@dataclass
class BootResult:
    vm: machine.VM | None
    rows: list[Row] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(r.status == FAIL for r in self.rows)


def bundle_host_keys(bundle: machine.Bundle) -> tuple[str, ...]:
    """`type base64` of the keys the bundle's known_hosts says the box has (per-device keys)."""
    known = bundle.path / "known_hosts"
    if not known.is_file():
        return ()
    return tuple(
        " ".join(line.split()[1:3]) for line in known.read_text().splitlines() if len(line.split()) >= 3
    )


def load_recipe_of(bundle: machine.Bundle, path: Path | None) -> Any:
    from builder.recipe import load_recipe

    if path is None:
        rp = (bundle.report.get("recipe") or {}).get("path")
        if not rp or not Path(rp).is_file():
            return None
        path = Path(rp)
    recipe = load_recipe(path, check_files=False)
    device = (bundle.report.get("recipe") or {}).get("device")
    if device and recipe.devices:
        from builder.recipe.devices import device_by_name

        return device_by_name(recipe, device)
    return recipe


def _vendor_path(bundle: machine.Bundle, given: Path | None, opts: FetchOptions) -> Path | None:
    if given is not None:
        return given
    base = bundle.report.get("base") or {}
    inp = base.get("input")
    if inp and Path(inp).exists():
        return Path(inp)
    sha = base.get("sha256")
    if sha:
        cand = Path(opts.cache_dir) / "sha256" / str(sha)[:2] / str(sha)
        if cand.exists():
            return cand
    return None


def baseline(
    vendor: Path, kernel: KernelFiles, opts: FetchOptions, timeout: float, info: Callable[[str], None]
) -> dict[str, Any]:
    """Boot the unmodified vendor package once (per package and kernel) and remember what it does."""
    work = opts.cache_dir / "vm"
    work.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{machine.bundle_digest(vendor)} {kernel.kernel.parent.name}".encode()).hexdigest()[
        :20
    ]
    memo = work / f"baseline-{key}.json"
    with open(work / f"baseline-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run waits for the first one's answer
        known = read_json(memo)
        if known is not None:
            return known
        info(f"booting the unmodified vendor package once to learn what fails there ({vendor})")
        probe = machine.locate(vendor, state=Path(tempfile.mkdtemp(prefix="baseline-work-", dir=work)))
        try:
            flashed = machine.flash(probe)
            disk, _ = machine.prepare_disk(probe.state, flashed, fresh=True)
            vm = machine.start(probe.state, kernel, disk, flashed)
            try:
                ag = vm.agent()
                ag.wait_ready(timeout, vm.alive)
                facts = baseline_facts(ag)
                ag.close()
            finally:
                vm.stop(clean=False)
        finally:
            shutil.rmtree(probe.state, ignore_errors=True)
        write_json_atomic(memo, facts)
        return facts


def _boot_id(ag: Agent) -> str:
    return ag.run("cat /proc/sys/kernel/random/boot_id", timeout=20).out.strip()


def _reboot(vm: machine.VM, ag: Agent, timeout: float) -> None:
    before = _boot_id(ag)
    ag.run("systemctl --no-block reboot", timeout=20)
    ag.close()
    deadline = time.monotonic() + timeout
    time.sleep(3)
    while time.monotonic() < deadline:
        if not vm.alive():
            raise AirboxError("the VM stopped instead of rebooting", hint="read boot/console.log")
        try:
            ag.wait_ready(max(5.0, deadline - time.monotonic()), vm.alive)
            if _boot_id(ag) != before:
                return
        except AirboxError:
            pass
        ag.close()
        time.sleep(1)
    raise AirboxError(
        f"the box did not come back within {timeout:.0f} s after a reboot", hint="read boot/console.log"
    )


def boot(
    path: Path,
    o: BootOptions,
    fetch_opts: FetchOptions,
    *,
    info: Callable[[str], None],
    on_row: Callable[[Row], None],
    kernel_files: Callable[[], KernelFiles],
) -> BootResult:
    t0 = time.monotonic()
    machine.require_qemu()
    bundle = machine.locate(path)
    running = machine.VM.load(bundle.state)
    if running is not None:
        raise AirboxError(
            f"a VM of this bundle is already running (pid {running.pid}, "
            f"ssh on 127.0.0.1:{running.ssh_port})",
            hint=f"use it (`airbox-build ssh {path}`), or stop it: airbox-build boot {path} --stop",
        )
    recipe = load_recipe_of(bundle, o.recipe) if o.check else None
    kernel = o.kernel or kernel_files()
    result = BootResult(None)
    result.timings["kernel"] = time.monotonic() - t0
    if o.update_from is not None:
        from builder.vm.update import flash_update

        fl = flash_update(bundle, o.update_from, info)
    else:
        fl = machine.flash(bundle)
    disk, new = machine.prepare_disk(bundle.state, fl, fresh=o.fresh)
    result.timings["flash"] = time.monotonic() - t0 - result.timings["kernel"]
    info(
        f"eMMC: {'reused the flash of this bundle' if fl.reused else 'flashed the bundle'}; "
        f"{'a new box (first boot)' if new else 'the same box again (its state kept; --fresh for a new one)'}"
    )
    base_facts: dict[str, Any] | None = None
    if o.check:
        vendor = _vendor_path(bundle, o.baseline, fetch_opts)
        if vendor is None:
            info("no vendor package to compare failed units with (pass --baseline VENDOR_PACKAGE)")
        else:
            base_facts = baseline(vendor, kernel, fetch_opts, o.timeout, info)
    app_ports = [a["port"] for a in bundle.report.get("apps", []) if a.get("port")]
    t_start = time.monotonic()
    vm = machine.start(bundle.state, kernel, disk, fl, app_ports=app_ports, console=o.console)
    result.vm = vm
    with machine.running(vm, keep=o.keep or not o.check):
        ag = vm.agent()
        try:
            ag.wait_ready(o.timeout, vm.alive)
        except AgentError as e:
            if o.kernel is not None:  # --kernel/--initrd: an initrd of its own has no agent in it
                e.hint = (
                    "the --initrd given may not be one airbox-build made (its /init starts the check agent): "
                    f"use the cached one (CACHE/vm/*/initrd.base) or drop --kernel/--initrd; {e.hint}"
                )
            raise
        # up = systemd finished booting (running or degraded): sshd and the apps have started
        state = ag.run("systemctl is-system-running --wait", timeout=o.timeout).out.strip()
        result.timings["up"] = time.monotonic() - t_start
        info(
            f"the box is up after {result.timings['up']:.1f} s ({state}); ssh on 127.0.0.1:{vm.ssh_port}"
            + "".join(f", port {g} on 127.0.0.1:{h}" for g, h in vm.ports.items() if g != machine.GUEST_SSH)
        )
        if not o.check:
            ag.close()
            return result
        checker = Checker(
            ag,
            expectations(recipe, bundle.report, bundle_host_keys(bundle)),
            ssh_port=vm.ssh_port,
            forwards=vm.ports,
            known_hosts=bundle.state / "known_hosts",
            identities=o.identities,
            baseline=base_facts,
            ro_part=fl.ro_part,
            rw_part=fl.rw_part,
            on_row=on_row,
        )
        before = checker.first_boot()
        result.timings["check"] = time.monotonic() - t_start - result.timings["up"]
        t_reboot = time.monotonic()
        _reboot(vm, ag, o.timeout)
        checker.second_boot(before)
        result.timings["reboot"] = time.monotonic() - t_reboot
        ag.close()
        result.rows = checker.rows
    result.timings["total"] = time.monotonic() - t0
    return result
