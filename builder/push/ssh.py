"""Talk to a box with the system's OpenSSH client: strict host keys, no prompts, one connection.

Host keys are always checked (`StrictHostKeyChecking=yes`): against a fleet's known_hosts when the
bundle comes with one, else the user's own. Commands are POSIX sh scripts sent on stdin, so the box
needs nothing but a shell and coreutils (or busybox).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from builder.errors import AirboxError

CONTROL_PREFIX = "airbox-ssh-"  # + pid: what a killed push leaves is known by its pid
SOCKET_MAX = 100  # a Unix socket path must fit sun_path (108 bytes); ssh adds ".<16 chars>" while binding
SSH_FAILED = 255  # what ssh exits with when it, not the remote command, failed
_TARGET = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s]+)(?::(?P<port>\d+))?$")


def _control_base() -> str:
    """Where the connection master's socket goes: $TMPDIR, or /tmp when $TMPDIR is too deep for a
    Unix socket path (ssh would fail with "too long for Unix domain socket")."""
    base = tempfile.gettempdir()
    if len(base) + len(CONTROL_PREFIX) + 40 + 20 > SOCKET_MAX and os.path.isdir("/tmp"):
        return "/tmp"
    return base


class BoxError(AirboxError):
    """A box cannot be updated: says which box, what and what to do."""


@dataclass(frozen=True)
class Target:
    host: str
    user: str | None = None
    port: int | None = None
    name: str | None = None  # the fleet device it is, if any

    @property
    def label(self) -> str:
        where = (
            f"{self.user + '@' if self.user else ''}{self.host}{':' + str(self.port) if self.port else ''}"
        )
        return f"{self.name} ({where})" if self.name and self.name != self.host else where


def parse_target(text: str, name: str | None = None) -> Target:
    m = _TARGET.match(text.strip())
    if m is None:
        raise BoxError(
            f"{text!r} is not a box address", hint="write [user@]host[:port], e.g. linaro@10.0.0.5"
        )
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 0 < port < 65536:
        raise BoxError(f"{text!r}: port {port} is out of range")
    return Target(m["host"].strip("[]"), m["user"], port, name)


class Ssh:
    """One box: a multiplexed connection (ControlMaster) for the work, fresh ones for polling."""

    def __init__(
        self,
        target: Target,
        known_hosts: Path | None,
        *,
        identity: Path | None = None,
        connect_timeout: int = 10,
    ) -> None:
        self.target = target
        self.known_hosts = known_hosts
        self.identity = identity
        self.connect_timeout = connect_timeout
        self._dir = tempfile.TemporaryDirectory(prefix=f"{CONTROL_PREFIX}{os.getpid()}-", dir=_control_base())
        self._control = Path(self._dir.name) / "c"
        self.new_keys: Path | None = None  # after a reflash with new host keys, if trusted: see trust_new_key

    def trust_new_key(self) -> None:
        """From now on, accept the key the box offers *once*, recorded in a file of our own (never
        the user's known_hosts), and check it strictly after that: for confirming the bundle id of a
        box whose update gave it new host keys (identity.ssh_host_keys: regenerate)."""
        self.new_keys = Path(self._dir.name) / "new_known_hosts"
        self.new_keys.touch()

    def new_key_lines(self) -> list[str]:
        if self.new_keys is None or not self.new_keys.is_file():
            return []
        return [ln for ln in self.new_keys.read_text().splitlines() if ln.strip()]

    def base_args(self, *, multiplex: bool = True) -> list[str]:
        t = self.target
        args = [
            "ssh",
            *("-o", "BatchMode=yes"),
            *("-o", f"StrictHostKeyChecking={'accept-new' if self.new_keys else 'yes'}"),
            *("-o", f"ConnectTimeout={self.connect_timeout}"),
            *("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"),
            *("-o", "LogLevel=ERROR"),
        ]
        if self.new_keys is not None:
            args += ["-o", f"UserKnownHostsFile={self.new_keys}", "-o", "GlobalKnownHostsFile=/dev/null"]
        elif self.known_hosts is not None:
            args += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
        if multiplex:
            args += [
                "-o",
                "ControlMaster=auto",
                "-o",
                f"ControlPath={self._control}",
                "-o",
                "ControlPersist=30",
            ]
        else:
            args += ["-o", "ControlPath=none"]
        if self.identity is not None:
            args += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        if t.port:
            args += ["-p", str(t.port)]
        if t.user:
            args += ["-l", t.user]
        return [*args, "--", t.host]

    def run(
        self,
        script: str,
        *args: str,
        timeout: float = 120,
        multiplex: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a POSIX sh script (sent on stdin) on the box, with `args` as $1, $2, ..."""
        remote = "sh -s -- " + " ".join(shlex.quote(a) for a in args) if args else "sh -s"
        try:
            return subprocess.run(
                [*self.base_args(multiplex=multiplex), remote],
                input=script.encode(),
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(
                [], SSH_FAILED, b"", f"no answer within {timeout:.0f} s".encode()
            )

    def append(
        self, local: BinaryIO, remote_path: str, total: int, progress: Callable[[int], None]
    ) -> subprocess.CompletedProcess[bytes]:
        """Stream the rest of `local` (from its position) onto the end of `remote_path`;
        `progress` gets the bytes sent so far."""
        cmd = [*self.base_args(), f"cat >> {shlex.quote(remote_path)}"]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stderr is not None
        sent = 0
        try:
            while block := local.read(1 << 20):
                proc.stdin.write(block)
                sent += len(block)
                progress(sent)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        err = proc.stderr.read()
        proc.wait()
        return subprocess.CompletedProcess(cmd, proc.returncode, b"", err)

    def close(self) -> None:
        if self._control.exists():
            subprocess.run(
                [*self.base_args()[:-2], "-O", "exit", "--", self.target.host], capture_output=True
            )
        self._dir.cleanup()


def explain_ssh_failure(target: Target, stderr: bytes, known_hosts: Path | None) -> BoxError:
    """ssh's own failure (exit 255), in words: unknown or changed host key, refused, unreachable."""
    text = stderr.decode(errors="replace").strip()
    last = text.splitlines()[-1] if text else "no answer"
    keys = f"the fleet's {known_hosts}" if known_hosts else "~/.ssh/known_hosts"
    port = f" -p {target.port}" if target.port else ""
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or ("Host key for" in text and "has changed" in text):
        return BoxError(
            f"box {target.label}: its SSH host key is not the one in {keys}",
            hint="a reflashed box with regenerated keys, or another machine on that address: check the "
            "key on the box's console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), "
            f"then update {keys}",
        )
    if "Host key verification failed" in text or "No ED25519 host key is known" in text or "host key" in text:
        return BoxError(
            f"box {target.label}: its SSH host key is not known ({keys})",
            hint=f"check its fingerprint on the box's console, then add it: ssh-keyscan{port} {target.host} "
            f">> ~/.ssh/known_hosts (compare first!), or push a fleet output whose known_hosts lists it",
        )
    if "Permission denied" in text:
        return BoxError(
            f"box {target.label}: SSH login refused ({last})",
            hint="log in with a key: give the user as user@host and make sure your key is in its "
            "authorized_keys (recipe `users: {NAME: {ssh_authorized_keys: [...]}}`)",
        )
    return BoxError(
        f"box {target.label}: cannot reach it over SSH ({last})",
        hint="check that it is powered, on the network, and that the address and port are right",
    )
