"""`ssh:` — an sshd drop-in; and the warning for vendor default passwords open to SSH.

sshd takes the first value it reads for a keyword, and reads an `Include` where it stands: the
drop-in is named 00-... so it is read first among sshd_config.d/*.conf, and the image's
sshd_config must include that folder before it sets the same keywords itself.
"""

from __future__ import annotations

import fnmatch
import posixpath
import shutil
import subprocess

from builder.customise.context import ROOTFS, Customiser
from builder.errors import RecipeError
from builder.recipe.system import VENDOR_PASSWORDS

SSHD_CONFIG = "/etc/ssh/sshd_config"
DROP_IN_DIR = "/etc/ssh/sshd_config.d"
DROP_IN = f"{DROP_IN_DIR}/00-airbox-build.conf"


def _directives(text: str) -> list[tuple[int, str, str]]:
    """(line number, keyword lower-cased, value) of the top-level lines, up to the first Match."""
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        words = line.strip().split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        key = words[0].lower()
        if key == "match":
            break
        out.append((n, key, words[1].strip() if len(words) > 1 else ""))
    return out


def _include_patterns(value: str) -> list[str]:
    """The paths an `Include` line names (relative ones are under /etc/ssh, as sshd reads them)."""
    return [p if p.startswith("/") else posixpath.join("/etc/ssh", p) for p in value.split()]


def _includes_drop_in(value: str) -> bool:
    return any(fnmatch.fnmatch(DROP_IN, pattern) for pattern in _include_patterns(value))


def ssh(c: Customiser) -> None:
    conf = c.recipe.ssh
    if conf is None:
        return
    text = c.read_text_root(SSHD_CONFIG)
    if text is None:
        raise RecipeError(f"the image has no {SSHD_CONFIG} to apply `ssh:` to", where=conf.where)
    settings = {
        "passwordauthentication": ("PasswordAuthentication", _yes(conf.password_authentication)),
        "permitrootlogin": ("PermitRootLogin", conf.permit_root_login),
    }
    wanted = {k: v for k, v in settings.items() if v[1] is not None}
    lines = _directives(text)
    include_line = next((n for n, key, value in lines if key == "include" and _includes_drop_in(value)), None)
    if include_line is None:
        raise RecipeError(
            f"the image's {SSHD_CONFIG} does not include {DROP_IN_DIR}/*.conf: a drop-in would be ignored",
            where=conf.where,
            hint=f"add `Include {DROP_IN_DIR}/*.conf` as its first line (replace the file with `files:`)",
        )
    for n, key, _ in lines:
        if n < include_line and key in wanted:
            raise RecipeError(
                f"the image's {SSHD_CONFIG} sets {wanted[key][0]} on line {n}, before its Include of "
                f"{DROP_IN_DIR} (line {include_line}): sshd keeps the first value it reads, so the drop-in "
                "would not apply",
                where=conf.where,
                hint=f"replace {SSHD_CONFIG} with `files:` (Include {DROP_IN_DIR}/*.conf on its first line)",
            )
    body = "".join(f"{name} {value}\n" for name, value in wanted.values())
    c.mkdir(DROP_IN_DIR, mode=0o755, uid=0, gid=0, origin=conf.where)
    c.write(
        DROP_IN,
        data=f"# Written by airbox-build for {c.recipe.name}\n{body}".encode(),
        mode=0o644,
        origin=conf.where,
    )


def _yes(value: bool | None) -> str | None:
    return None if value is None else "yes" if value else "no"


def password_login(c: Customiser) -> bool:
    """Whether sshd on the box accepts passwords: the first PasswordAuthentication it reads."""
    text = c.read_text_root(SSHD_CONFIG)
    if text is None:
        return False
    for _, key, value in _directives(text):
        if key == "include":
            for pattern in _include_patterns(value):
                for path in _glob(c, pattern):
                    for _, k, v in _directives(c.read_text_root(path) or ""):
                        if k == "passwordauthentication":
                            return v.lower() == "yes"
        if key == "passwordauthentication":
            return value.lower() == "yes"
    return True  # OpenSSH's default


def _glob(c: Customiser, pattern: str) -> list[str]:
    folder, name = posixpath.split(pattern)
    return [posixpath.join(folder, n) for n in c.listdir_root(folder) if fnmatch.fnmatch(n, name)]


def default_passwords(c: Customiser) -> None:
    """Warn when an account's password is the vendor's public one and SSH takes passwords.

    Only when the build reads the root anyway: a recipe that leaves ROOTFS alone never joins it."""
    if not c.is_open(ROOTFS) or not password_login(c):
        return
    shadow = c.read_text_root("/etc/shadow") or ""
    for line in shadow.splitlines():
        f = line.split(":")
        if len(f) < 2 or f[0] not in VENDOR_PASSWORDS:
            continue
        if f[1].startswith(("!", "*")) or not f[1]:
            continue
        if _matches(f[1], VENDOR_PASSWORDS[f[0]]) is False:
            continue
        c.reporter.warn(
            f"user {f[0]} keeps the vendor's public password ({VENDOR_PASSWORDS[f[0]]!r}) and SSH accepts "
            f"passwords: anyone on the network can log in. Fix it in the recipe with "
            f"`users: {{{f[0]}: {{lock: true}}}}`, `users: {{{f[0]}: {{password_hash: ...}}}}` or "
            "`ssh: {password_authentication: false}`"
        )


def _matches(crypt_hash: str, password: str) -> bool | None:
    """Whether a crypt(3) hash is of this password; None when it cannot be told here."""
    parts = crypt_hash.split("$")
    if len(parts) < 4 or parts[1] not in ("1", "5", "6") or shutil.which("openssl") is None:
        return None
    salt = parts[-2]
    if parts[2].startswith("rounds="):
        return None
    p = subprocess.run(
        ["openssl", "passwd", f"-{parts[1]}", "-salt", salt, "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=False,
    )
    return p.stdout.strip() == crypt_hash if p.returncode == 0 else None
