"""A box for `push` tests: a real OpenSSH sshd on 127.0.0.1 (its own host key, config and free
port) whose sessions run chrooted in a folder under the test's temp dir. The folder is a faithful
miniature of the box as push sees it: a static busybox for the shell tools, /proc/mounts naming
the eMMC's DATA partition for /data, sysfs' `partition` file, /dev/mmcblk0 holding the vendor's
GPT, /proc/sys/kernel/random/boot_id, and `reboot`, which plays the flash the box's bootloader
would do (it installs the bundle id the update carries, and starts a new boot).

Runs as root (sshd and chroot need it), as CI does; elsewhere the tests skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from builder.push.ssh import CONTROL_PREFIX
from builder.vm import machine

BUSYBOX_APPLETS = [
    "sh",
    "ash",
    "cat",
    "id",
    "tr",
    "dirname",
    "basename",
    "stat",
    "sed",
    "mkdir",
    "rm",
    "rmdir",
    "ln",
    "cp",
    "mv",
    "md5sum",
    "dd",
    "od",
    "sync",
    "sleep",
    "true",
    "false",
    "test",
    "[",
    "echo",
    "head",
    "tail",
    "ls",
    "wc",
    "cut",
    "printf",
    "grep",
    "readlink",
    "realpath",
    "touch",
    "chmod",
]

REBOOT = """#!/bin/sh
# the box's bootloader, in miniature: an armed update is applied, then a new boot
if [ -f /var/lib/armed ]; then
    cp /var/lib/next-airbox-build.json /etc/airbox-build.json 2>/dev/null
    rm -f /var/lib/armed
fi
echo "boot-$(cat /var/lib/boots 2>/dev/null)-$$" > /proc/sys/kernel/random/boot_id
echo x >> /var/lib/boots
"""

# The vendor helper's stand-in: checks md5.txt like the real one, records its call, arms.
RECORDER = """#!/bin/sh
cd "$(dirname "$0")" || exit 1
md5sum -c "$1" > /dev/null || { echo "update failed"; exit 1; }
echo "$0 $* $(pwd)" >> /var/log/local_update.calls
touch /var/lib/armed
echo "update success"
"""


def usable() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (sshd and chroot), as in CI"
    for tool, pkg in (
        ("/usr/sbin/sshd", "openssh-server"),
        ("ssh", "openssh-client"),
        ("busybox", "busybox-static"),
    ):
        if shutil.which(tool) is None:
            return f"needs {tool} (package {pkg})"
    ldd = subprocess.run(["ldd", shutil.which("busybox") or ""], capture_output=True, text=True)
    if "not a dynamic executable" not in ldd.stdout + ldd.stderr and "statically linked" not in ldd.stdout:
        return "needs a static busybox (package busybox-static)"
    return None


@dataclass
class SshBox:
    root: Path  # the box's filesystem
    port: int
    known_hosts: Path  # a known_hosts line for this box
    identity: Path  # the client's private key
    proc: subprocess.Popen[bytes]
    log: Path
    config: Path

    @property
    def address(self) -> str:
        return f"root@127.0.0.1:{self.port}"

    @property
    def ota(self) -> Path:
        return self.root / "data" / "ota"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def reboot_with_new_host_key(self) -> None:
        """sshd down, the miniature bootloader's reboot, sshd up with a key made anew: a box whose
        update regenerated its keys (nothing answers in between, as on a real box)."""
        self.stop()
        subprocess.run(["chroot", str(self.root), "/bin/sh", "/usr/sbin/reboot"], check=True)
        key = self.config.parent / "host_ed25519"
        key.unlink()
        Path(f"{key}.pub").unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        self.proc = _start_sshd(self.config, self.log, self.port)

    def calls(self) -> list[str]:
        path = self.root / "var" / "log" / "local_update.calls"
        return path.read_text().splitlines() if path.exists() else []

    def running(self) -> str | None:
        path = self.root / "etc" / "airbox-build.json"
        return path.read_text() if path.exists() else None


def make_box(work: Path, gpt: bytes, *, data_partition: int = 7, client_key: Path | None = None) -> SshBox:
    """Folder, keys, config; sshd started and answering. `gpt` is the 17408-byte primary GPT."""
    root = work / "box"
    for d in (
        "bin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "dev",
        "proc/sys/kernel/random",
        "var/lib",
        "var/log",
        "data",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    busybox = root / "bin" / "busybox"
    shutil.copy2(shutil.which("busybox") or "", busybox)
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "usr/sbin/reboot").write_text(REBOOT)
    (root / "usr/sbin/reboot").chmod(0o755)
    os.mknod(root / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    part = f"mmcblk0p{data_partition}"
    (root / "proc/mounts").write_text(
        f"/dev/mmcblk0p4 / ext4 ro,relatime 0 0\n/dev/{part} /data ext4 rw,relatime 0 0\n"
    )
    (root / "proc/sys/kernel/random/boot_id").write_text(str(uuid.uuid4()) + "\n")
    sysfs = root / "sys" / "class" / "block" / part
    sysfs.mkdir(parents=True)
    (sysfs / "partition").write_text(f"{data_partition}\n")
    with open(root / "dev" / "mmcblk0", "wb") as f:
        f.write(gpt)
        f.truncate(64 << 20)

    keys = work / "keys"
    keys.mkdir()
    host_key = keys / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    identity = client_key or keys / "client_ed25519"
    if client_key is None:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(identity)], check=True)
    (keys / "authorized_keys").write_text(Path(f"{identity}.pub").read_text())
    port = machine.free_port()
    known = keys / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {Path(f'{host_key}.pub').read_text().split(' ', 2)[0]} "
                     f"{Path(f'{host_key}.pub').read_text().split(' ', 2)[1]}\n")  # fmt: skip
    config = keys / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {keys / 'sshd.pid'}",
                f"AuthorizedKeysFile {keys / 'authorized_keys'}",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "PrintMotd no",
                "MaxSessions 50",
                "MaxStartups 50",
                f'ForceCommand /usr/sbin/chroot {root} /bin/sh -c "$SSH_ORIGINAL_COMMAND"',
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir (its package's)
    log = keys / "sshd.log"
    return SshBox(root, port, known, identity, _start_sshd(config, log, port), log, config)


def _start_sshd(config: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:  # sshd keeps its own copy of the descriptor
        proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=err
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"sshd did not start: {log.read_text()}")


def end_ssh_masters(pid: int) -> None:
    """What a push killed with SIGKILL leaves: its ssh connection master (ControlPersist) and the
    folder of its socket, known by the push's pid. Asked to exit, then removed."""
    for folder in Path(tempfile.gettempdir()).glob(f"{CONTROL_PREFIX}{pid}-*"):
        sock = folder / "c"
        if sock.exists():
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def boot_id(box: SshBox) -> str:
    return (box.root / "proc/sys/kernel/random/boot_id").read_text().strip()
