"""The check channel: a root shell agent on a virtio serial port, reached through a Unix socket in
the box's `boot/` folder (mode 0700), never over the network.

It lives only in the VM's /run (a tmpfs the initramfs hands to systemd), so it writes nothing
to the box's disks, and it does not depend on the image's sshd, network or accounts: a recipe
that breaks all three can still be inspected and told what broke. Commands run with the image's
own /bin/sh; one request per line (`ID base64(script)`), one answer per line
(`ID RC base64(output)`).
"""

from __future__ import annotations

import base64
import itertools
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.errors import AirboxError

PORT_NAME = "org.airbox-build.agent"
UNIT_NAME = "airbox-vm-agent.service"

AGENT_SH = r"""#!/run/airbox-vm/busybox sh
B=/run/airbox-vm/busybox
dev=""
while [ -z "$dev" ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$($B cat "$p/name" 2>/dev/null)" = "@PORT@" ] && dev="/dev/${p##*/}"
  done
  [ -z "$dev" ] && $B sleep 0.2
done
serve() {
  while IFS= read -r line <&3; do
    id="${line%% *}"
    echo "${line#* }" | $B base64 -d > /run/airbox-vm/cmd.sh
    /bin/sh /run/airbox-vm/cmd.sh > /run/airbox-vm/out 2>&1 < /dev/null
    rc=$?
    { printf '%s %s ' "$id" "$rc"; $B base64 -w0 /run/airbox-vm/out; echo; } >&3
  done
}
# a function's redirection may fail (no host on the socket) without ending the shell
while true; do
  serve 3<>"$dev"
  $B sleep 0.2
done
""".replace("@PORT@", PORT_NAME)

AGENT_UNIT = """[Unit]
Description=airbox-build VM check agent (VM only: not part of the bundle)
DefaultDependencies=no
After=systemd-udevd.service

[Service]
ExecStart=/run/airbox-vm/busybox sh /run/airbox-vm/agent.sh
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


def agent_files() -> dict[str, tuple[bytes, int]]:
    return {"agent.sh": (AGENT_SH.encode(), 0o700), UNIT_NAME: (AGENT_UNIT.encode(), 0o644)}


@dataclass
class Result:
    rc: int
    out: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class AgentError(AirboxError):
    pass


class Agent:
    """Talk to the agent; `run()` waits for its answer (bounded)."""

    def __init__(self, sock_path: Path) -> None:
        self.path = sock_path
        self.sock: socket.socket | None = None
        self.buf = b""
        self.ids = itertools.count(1)
        self.prefix = secrets.token_hex(4)

    def connect(self, timeout: float) -> None:
        self.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(self.path))
        self.sock = s
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def run(self, script: str, timeout: float = 60.0) -> Result:
        if self.sock is None:
            self.connect(timeout)
        assert self.sock is not None
        rid = f"{self.prefix}-{next(self.ids)}"  # never mistaken for a stale answer
        self.sock.sendall(f"{rid} {base64.b64encode(script.encode()).decode()}\n".encode())
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                parts = line.decode(errors="replace").split(" ", 2)
                if len(parts) >= 2 and parts[0] == rid:
                    out = base64.b64decode(parts[2]) if len(parts) == 3 and parts[2] else b""
                    return Result(int(parts[1]), out.decode(errors="replace"))
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"the VM's check agent did not answer within {timeout:.0f} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError as e:
                raise AgentError(f"the VM's check agent did not answer within {timeout:.0f} s") from e
            if not data:
                raise AgentError("the VM's check agent closed the channel (the VM stopped or rebooted)")
            self.buf += data

    def wait_ready(self, timeout: float, alive: Callable[[], bool] | None = None) -> None:
        """Until the agent answers `true` (the box's userland is up and systemd started it)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise AgentError("the VM stopped before its userland came up (see boot/console.log)")
            try:
                self.connect(5)
                if self.run("true", timeout=min(5.0, max(1.0, deadline - time.monotonic()))).ok:
                    return
            except (OSError, AgentError) as e:
                last = e
                self.close()
            time.sleep(0.5)
        raise AgentError(
            f"the box's userland did not come up within {timeout:.0f} s ({last})",
            hint="read boot/console.log; a slower machine may need a longer --timeout",
        )
