"""One box in a VM: its eMMC (the bundle flashed by our simulator, kept pristine, under a qcow2
overlay that holds the box's own state), QEMU started and stopped by pid, and the state folder.

State folder (`boot/` of an output folder; `<card>.boot/` beside a card folder or image):
  flash.img, flash.json   the bundle as U-Boot would write it (reused while the bundle is unchanged)
  disk.qcow2              the box's eMMC: what it writes at run time (a second boot sees it)
  initrd.img              the base initramfs + this box's agent files
  vm.json                 pid, ports, start time of the running VM
  console.log             the serial console of the last boot (console.prev.log: the one before)
  known_hosts             the box's SSH host keys, recorded through the agent on first contact
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.cache import read_json, write_json_atomic
from builder.errors import AirboxError, ToolError
from builder.package.flashplan import FlashPlan
from builder.package.source import open_package
from builder.run import find_tool, run
from builder.vm.agent import PORT_NAME, Agent, agent_files
from builder.vm.initramfs import KernelFiles, extra_archive

QEMU = "qemu-system-aarch64"
QEMU_HINT = "install QEMU for arm64 guests: sudo apt-get install -y qemu-system-arm qemu-utils"
GUEST_SSH = 22
SOCK_MAX = 100  # sun_path is 108 bytes


class VMError(AirboxError):
    pass


@dataclass(frozen=True)
class Bundle:
    """What `boot` was pointed at."""

    path: Path  # output folder, card folder or card image
    card: Path  # the card folder or image opened
    state: Path  # the state folder
    report: dict[str, Any] = field(default_factory=dict, compare=False)


def locate(path: Path, state: Path | None = None) -> Bundle:
    path = path.resolve()
    report: dict[str, Any] = {}
    if (path / "fleet.json").is_file() and not (path / "card").is_dir():
        devices = sorted(json.loads((path / "fleet.json").read_text()).get("devices", {}))
        raise VMError(
            f"{path} is a fleet: boot one device's bundle",
            hint=f"e.g. airbox-build boot {path / devices[0]}" if devices else "build the fleet first",
        )
    if (path / "card").is_dir():
        card, default_state = path / "card", path / "boot"
        rp = path / "build-report.json"
        if rp.is_file():
            report = json.loads(rp.read_text())
    elif path.exists():
        card, default_state = path, path.with_name(path.name + ".boot")
        rp = path.parent / "build-report.json"
        if path.name == "card" and rp.is_file():
            report = json.loads(rp.read_text())
            default_state = path.parent / "boot"
    else:
        raise VMError(f"{path} does not exist", hint="give an output folder, a card folder or a card image")
    return Bundle(path, card, (state or default_state).resolve(), report)


def require_qemu() -> None:
    missing = [t for t in (QEMU, "qemu-img") if find_tool(t) is None]
    if missing:
        raise ToolError(f"missing system tool(s): {', '.join(missing)}", hint=QEMU_HINT)


# ----------------------------------------------------------------------------- the eMMC


@dataclass(frozen=True)
class Flash:
    image: Path
    ro_part: int  # GPT numbers of ROOTFS and ROOTFS_RW
    rw_part: int
    digest: str  # identifies the bundle that was flashed
    reused: bool


def bundle_digest(card: Path) -> str:
    """What identifies a bundle (its md5.txt, every file's identity), without reading its chunks."""
    with tempfile.TemporaryDirectory(prefix="airbox-boot-") as tmp, open_package(card, Path(tmp)) as files:
        return _bundle_digest(files)


def _bundle_digest(files: Any) -> str:
    h = hashlib.sha256()
    names = files.names()
    if "md5.txt" in names:
        with files.open("md5.txt") as f:
            h.update(f.read())
    for n in sorted(names):  # each file's identity (path, size, mtime, inode), as the image cache keys
        h.update(json.dumps(files.member_identity(n), default=str).encode() + b"\n")
    return h.hexdigest()


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def flash(bundle: Bundle, progress: Any = None) -> Flash:
    """Flash the bundle into state/flash.img with the project's simulator; reuse it when unchanged."""
    from builder.verify import verify_fileset

    state = bundle.state
    state.mkdir(parents=True, exist_ok=True)
    image, meta = state / "flash.img", state / "flash.json"
    with (
        tempfile.TemporaryDirectory(prefix="airbox-boot-", dir=state) as tmp,
        open_package(bundle.card, Path(tmp)) as files,
    ):
        digest = _bundle_digest(files)
        old = read_json(meta) if image.exists() else None
        if old is not None and old.get("digest") == digest:
            return Flash(image, old["ro_part"], old["rw_part"], digest, True)
        part = image.with_suffix(".part")
        rep = verify_fileset(files, simulate=part, progress=progress)
        if rep.failures or rep.plan is None:
            part.unlink(missing_ok=True)
            first = rep.failures[0] if rep.failures else None
            raise VMError(
                f"the bundle does not verify ({len(rep.failures)} problem(s)"
                + (f"; first: {first.file}: {first.message}" if first else "")
                + ")",
                hint=f"run `airbox-build verify {bundle.path}` for the list; rebuild the bundle",
            )
        ro, rw = _root_parts(rep.plan)
        with open(part, "r+b") as f:
            f.truncate(_pow2(os.fstat(f.fileno()).st_size))  # QEMU's SD card wants a power of two
        part.replace(image)
        write_json_atomic(meta, {"digest": digest, "ro_part": ro, "rw_part": rw})
    return Flash(image, ro, rw, digest, False)


def _root_parts(plan: FlashPlan) -> tuple[int, int]:
    by_label = {p.label.upper(): p for p in plan.partitions}
    for label in ("ROOTFS", "ROOTFS_RW"):
        p = by_label.get(label)
        if p is None or not p.chunks:
            raise VMError(
                f"the bundle has no {label} image: nothing to boot",
                hint="the box's initramfs mounts ROOTFS read-only and ROOTFS_RW as the overlay's upper layer",
            )
    return by_label["ROOTFS"].index + 1, by_label["ROOTFS_RW"].index + 1


def prepare_disk(state: Path, fl: Flash, *, fresh: bool) -> tuple[Path, bool]:
    """state/disk.qcow2 over the pristine flash; a new one when fresh, missing or the bundle changed.
    Returns (path, new)."""
    disk, meta = state / "disk.qcow2", state / "disk.json"
    if not fresh and disk.exists() and (read_json(meta) or {}).get("digest") == fl.digest:
        return disk, False
    disk.unlink(missing_ok=True)
    size = fl.image.stat().st_size
    run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", fl.image.name, disk.name, str(size)],
        cwd=state,
        hint=QEMU_HINT,
    )
    write_json_atomic(meta, {"digest": fl.digest})
    (state / "known_hosts").unlink(missing_ok=True)  # a new box: its keys are recorded again
    return disk, True


# ----------------------------------------------------------------------------- QEMU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VM:
    state: Path
    pid: int
    ssh_port: int
    ports: dict[int, int]  # guest port -> host port on 127.0.0.1
    sock: Path
    started: float

    def save(self) -> None:
        data = {
            "pid": self.pid,
            "ssh_port": self.ssh_port,
            "ports": {str(k): v for k, v in self.ports.items()},
            "sock": str(self.sock),
            "started": self.started,
        }
        write_json_atomic(self.state / "vm.json", data)

    @classmethod
    def load(cls, state: Path) -> VM | None:
        p = state / "vm.json"
        d = read_json(p)
        if d is None:
            return None
        vm = cls(
            state,
            d["pid"],
            d["ssh_port"],
            {int(k): v for k, v in d["ports"].items()},
            Path(d["sock"]),
            d["started"],
        )
        if not vm.alive():
            p.unlink(missing_ok=True)
            return None
        return vm

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # a reused pid is not our QEMU
        try:
            cmd = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return True
        return bool(cmd) and cmd[0].endswith(QEMU.encode()) and str(self.state).encode() in b" ".join(cmd)

    def agent(self) -> Agent:
        return Agent(self.sock)

    def stop(self, timeout: float = 30.0, *, clean: bool = True) -> None:
        """Power the box off through the agent (a clean shutdown, bounded by timeout), or with
        clean=False only flush its disks (`sync`) and end QEMU, which writes out the qcow2: what
        the box wrote survives either way. Then SIGTERM, then SIGKILL, by pid."""
        if self.alive():
            with contextlib.suppress(Exception):
                ag = self.agent()
                ag.connect(3)
                ag.run("systemctl --no-block poweroff" if clean else "sync", timeout=20)
                ag.close()
            if clean:
                self._wait_exit(timeout)
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if not self.alive():
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            self._wait_exit(wait)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, os.WNOHANG)
        (self.state / "vm.json").unlink(missing_ok=True)
        if self.sock.parent != self.state:
            shutil.rmtree(self.sock.parent, ignore_errors=True)
        else:
            self.sock.unlink(missing_ok=True)

    def _wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(self.pid, os.WNOHANG)
            time.sleep(0.2)


def _socket_path(state: Path) -> Path:
    p = state / "agent.sock"
    if len(str(p)) <= SOCK_MAX:
        return p
    return Path(tempfile.mkdtemp(prefix="airbox-vm-")) / "agent.sock"


def start(
    state: Path,
    kernel: KernelFiles,
    disk: Path,
    fl: Flash,
    *,
    app_ports: Sequence[int] = (),
    console: bool = False,
    memory_mib: int = 2048,
    cpus: int = 2,
) -> VM:
    require_qemu()
    initrd = state / "initrd.img"
    base = kernel.initrd.read_bytes()
    # the kernel reads an uncompressed archive after a compressed one only at a 4-byte boundary
    initrd.write_bytes(base + bytes(-len(base) % 4) + extra_archive(agent_files()))
    log = state / "console.log"
    if log.exists():
        log.replace(state / "console.prev.log")
    sock = _socket_path(state)
    sock.unlink(missing_ok=True)
    ssh_port = free_port()
    ports = {GUEST_SSH: ssh_port}
    for p in app_ports:
        if p not in ports:
            ports[p] = free_port()
    fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in sorted(ports.items()))
    append = (
        f"console=ttyAMA0 net.ifnames=0 panic=10 airbox.ro=/dev/mmcblk0p{fl.ro_part} "
        f"airbox.rw=/dev/mmcblk0p{fl.rw_part}"
    )
    cmd = [
        find_tool(QEMU) or QEMU,
        "-name", "airbox-vm,debug-threads=off",
        "-machine", "virt", "-cpu", "cortex-a53", "-smp", str(cpus), "-m", str(memory_mib),
        "-display", "none", "-monitor", "none",
        "-serial", "stdio" if console else f"file:{log}",
        "-kernel", str(kernel.kernel), "-initrd", str(initrd), "-append", append,
        "-drive", f"file={disk},if=none,id=emmc,format=qcow2,cache=writeback",
        "-device", "sdhci-pci", "-device", "sd-card,drive=emmc",
        "-nic", f"user,model=virtio-net-pci,{fwd}",
        "-nic", "user,model=virtio-net-pci",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={PORT_NAME}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=state,
        stdin=subprocess.DEVNULL,
        stdout=None if console else subprocess.DEVNULL,
        stderr=open(state / "qemu.log", "wb"),  # noqa: SIM115 - QEMU keeps it
        start_new_session=not console,
    )
    vm = VM(state, proc.pid, ssh_port, ports, sock, time.time())
    vm.save()
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None:
            err = (state / "qemu.log").read_text(errors="replace").strip()
            (state / "vm.json").unlink(missing_ok=True)
            raise VMError(f"QEMU exited at once ({proc.returncode}): {err[-800:]}", hint=QEMU_HINT)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return vm


@contextlib.contextmanager
def running(vm: VM, keep: bool) -> Iterator[VM]:
    """Stop the VM on the way out (also on errors and Ctrl-C) unless asked to keep it."""
    try:
        yield vm
    except BaseException:
        vm.stop(clean=False)
        raise
    if not keep:
        vm.stop(clean=False)


def console_tail(state: Path, lines: int = 15) -> str:
    log = state / "console.log"
    if not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
