"""Users: SSH authorized keys and password hashes, for accounts that exist in the image."""

from __future__ import annotations

import posixpath

from builder.customise.context import Customiser
from builder.errors import RecipeError


def users(c: Customiser) -> None:
    hashes: dict[str, tuple[str, str]] = {}
    for u in c.recipe.users:
        acct = c.user(u.name, u.where)
        if u.ssh_authorized_keys:
            if not acct.home.startswith("/") or acct.home in ("/", "/nonexistent"):
                raise RecipeError(
                    f"user {u.name} has no usable home directory ({acct.home!r}) for SSH keys", where=u.where
                )
            ssh = posixpath.join(acct.home, ".ssh")
            c.mkdir(ssh, mode=0o700, uid=acct.uid, gid=acct.gid, origin=u.where)
            keys = "".join(k.strip() + "\n" for k in u.ssh_authorized_keys)
            c.write(
                posixpath.join(ssh, "authorized_keys"),
                data=keys.encode(),
                mode=0o600,
                uid=acct.uid,
                gid=acct.gid,
                origin=u.where,
            )
        if u.password_hash:
            hashes[u.name] = (u.password_hash, u.where)
    if hashes:
        _set_password_hashes(c, hashes)


def _set_password_hashes(c: Customiser, hashes: dict[str, tuple[str, str]]) -> None:
    where = next(iter(hashes.values()))[1]
    text = c.read_text_root("/etc/shadow")
    if text is None:
        raise RecipeError("the image has no /etc/shadow to set a password hash in", where=where)
    lines = text.splitlines()
    seen = set()
    for i, line in enumerate(lines):
        fields = line.split(":")
        if len(fields) >= 2 and fields[0] in hashes:
            fields[1] = hashes[fields[0]][0]
            lines[i] = ":".join(fields)
            seen.add(fields[0])
    for name, (_, w) in hashes.items():
        if name not in seen:
            raise RecipeError(f"user {name} has no line in the image's /etc/shadow", where=w)
    c.write(
        "/etc/shadow",
        data=("\n".join(lines) + "\n").encode(),
        mode=0o640,
        gid=42,
        origin=where,
        keep_existing_attrs=True,
    )
