"""Per-device SSH host keys: made once with the build machine's ssh-keygen, kept, reused.

They live beside the output (OUTPUT/<recipe>.host-keys/<device>/, 0700/0600), so a rebuild gives
every box the key it had: reflashing does not break the operators' known_hosts, and the bundle
stays reproducible. Delete a device's folder to rotate its keys. Private key bytes are only ever
read by the ext4 writer: never logged, reported or printed.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from builder.errors import BuildError
from builder.run import find_tool

KEY_TYPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ed25519", ()),
    ("ecdsa", ("-b", "256")),
    ("rsa", ("-b", "3072")),
)


def _keygen() -> str:
    found = find_tool("ssh-keygen")
    if found is None:
        raise BuildError(
            "identity.ssh_host_keys: per-device makes keys with ssh-keygen, which is not installed",
            hint="install openssh-client (Debian/Ubuntu: apt-get install openssh-client)",
        )
    return found


def keys_dir(output_dir: Path, recipe: str, device: str) -> Path:
    return output_dir / f"{recipe}.host-keys" / device


def ensure_host_keys(folder: Path, comment: str) -> dict[str, Path]:
    """type -> private key file (the .pub beside it); missing ones are made."""
    keygen = _keygen()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    out = {}
    for kind, extra in KEY_TYPES:
        private = folder / f"ssh_host_{kind}_key"
        public = private.with_name(private.name + ".pub")
        if not (private.is_file() and public.is_file()):
            for p in (private, public):
                p.unlink(missing_ok=True)
            tmp = folder / f".{private.name}.tmp"
            for p in (tmp, tmp.with_name(tmp.name + ".pub")):
                p.unlink(missing_ok=True)
            proc = subprocess.run(
                [keygen, "-q", "-t", kind, *extra, "-N", "", "-C", comment, "-f", str(tmp)],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                check=False,
            )
            if proc.returncode != 0:
                raise BuildError(
                    f"ssh-keygen could not make a {kind} host key in {folder}: {proc.stderr.strip()}"
                )
            os.replace(tmp.with_name(tmp.name + ".pub"), public)
            os.replace(tmp, private)
        os.chmod(private, 0o600)
        out[kind] = private
    return out


def public_lines(keys: Mapping[str, Path]) -> list[str]:
    """`type base64` of each key, in KEY_TYPES order."""
    out = []
    for kind, _ in KEY_TYPES:
        if kind in keys:
            words = keys[kind].with_name(keys[kind].name + ".pub").read_text().split()
            out.append(" ".join(words[:2]))
    return out


def fingerprints(keys: Mapping[str, Path]) -> list[str]:
    keygen = _keygen()
    out = []
    for kind, _ in KEY_TYPES:
        if kind in keys:
            pub = keys[kind].with_name(keys[kind].name + ".pub")
            p = subprocess.run([keygen, "-l", "-f", str(pub)], capture_output=True, text=True, check=False)
            words = p.stdout.split()
            out.append(f"{words[1]} ({kind})" if p.returncode == 0 and len(words) > 1 else f"? ({kind})")
    return out


def known_hosts_lines(names: Iterable[str], keys: Mapping[str, Path]) -> list[str]:
    """known_hosts lines for a box reachable under `names` (hostname, addresses)."""
    hosts = ",".join(dict.fromkeys(n for n in names if n))
    return [f"{hosts} {line}" for line in public_lines(keys)] if hosts else []
