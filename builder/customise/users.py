"""Users: accounts made as Ubuntu's adduser would, SSH keys, password hashes and locks.

A new account takes the first free uid from the image's /etc/login.defs (UID_MIN..UID_MAX),
a user-private group when USERGROUPS_ENAB is yes (gid = uid when free), a home populated from
/etc/skel; /etc/passwd, /etc/group, /etc/shadow and /etc/gshadow are edited together so that
`pwck -r` and `grpck -r` find them consistent.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from builder.customise.context import ROOTFS, Customiser
from builder.errors import RecipeError
from builder.fs.ext4 import FileType
from builder.recipe import User

SKEL = "/etc/skel"
SHADOW_GID_NAME = "shadow"


@dataclass
class _Table:
    """One colon-separated account file, as lines of fields."""

    path: str
    rows: list[list[str]]
    mode: int
    changed: bool = False

    def find(self, name: str) -> list[str] | None:
        return next((r for r in self.rows if r and r[0] == name), None)

    def text(self) -> str:
        return "".join(":".join(r) + "\n" for r in self.rows)


@dataclass
class _Accounts:
    passwd: _Table
    group: _Table
    shadow: _Table | None
    gshadow: _Table | None
    defs: dict[str, str] = field(default_factory=dict)


def users(c: Customiser) -> None:
    if not c.recipe.users:
        return
    where = c.recipe.users[0].where
    acc = _load(c, where)
    for u in c.recipe.users:
        if u.create and acc.passwd.find(u.name) is None:
            _create(c, acc, u)
        elif acc.passwd.find(u.name) is None:
            c.user(u.name, u.where)  # raises: names the accounts the image has
        _update(acc, u)
    # passwd, group and gshadow first (homes and keys are owned by what they define); shadow last
    for table in (acc.passwd, acc.group, acc.gshadow):
        if table is not None and table.changed:
            _write_table(c, acc, table, where)
    for u in c.recipe.users:
        if u.create:
            _home(c, u)
        if u.ssh_authorized_keys:
            _authorized_keys(c, u)
    if acc.shadow is not None and acc.shadow.changed:
        _write_table(c, acc, acc.shadow, where)


def _write_table(c: Customiser, acc: _Accounts, table: _Table, where: str) -> None:
    gid = 0 if table.path in ("/etc/passwd", "/etc/group") else _group_id(acc, SHADOW_GID_NAME)
    c.write(
        table.path,
        data=table.text().encode(),
        mode=table.mode,
        gid=gid,
        origin=where,
        keep_existing_attrs=True,
    )


def _load(c: Customiser, where: str) -> _Accounts:
    def table(path: str, mode: int, required: bool) -> _Table | None:
        text = c.read_text_root(path)
        if text is None:
            if required:
                raise RecipeError(f"the image has no {path}", where=where)
            return None
        return _Table(path, [line.split(":") for line in text.splitlines()], mode)

    passwd = table("/etc/passwd", 0o644, True)
    group = table("/etc/group", 0o644, True)
    assert passwd is not None and group is not None
    return _Accounts(
        passwd, group, table("/etc/shadow", 0o640, False), table("/etc/gshadow", 0o640, False), _login_defs(c)
    )


def _login_defs(c: Customiser) -> dict[str, str]:
    out = {}
    for line in (c.read_text_root("/etc/login.defs") or "").splitlines():
        words = line.split()
        if len(words) >= 2 and not words[0].startswith("#"):
            out[words[0]] = words[1]
    return out


def _num(acc: _Accounts, key: str, default: int) -> int:
    try:
        return int(acc.defs.get(key, default))
    except ValueError:
        return default


def _group_id(acc: _Accounts, name: str) -> int:
    row = acc.group.find(name)
    return int(row[2]) if row is not None and len(row) > 2 and row[2].isdigit() else 0


def _create(c: Customiser, acc: _Accounts, u: User) -> None:
    uids = {int(r[2]) for r in acc.passwd.rows if len(r) > 2 and r[2].isdigit()}
    gids = {int(r[2]) for r in acc.group.rows if len(r) > 2 and r[2].isdigit()}
    low, high = _num(acc, "UID_MIN", 1000), _num(acc, "UID_MAX", 60000)
    if u.uid is not None:
        if u.uid in uids:
            owner = next(r[0] for r in acc.passwd.rows if len(r) > 2 and r[2] == str(u.uid))
            raise RecipeError(f"uid {u.uid} is already {owner}'s in the image's /etc/passwd", where=u.where)
        uid = u.uid
    else:
        uid = next((n for n in range(low, high + 1) if n not in uids), -1)
        if uid < 0:
            raise RecipeError(
                f"no free uid in UID_MIN..UID_MAX ({low}..{high}) of /etc/login.defs", where=u.where
            )
    if acc.defs.get("USERGROUPS_ENAB", "yes").lower() == "yes":
        if acc.group.find(u.name) is not None:
            raise RecipeError(
                f"a group named {u.name} already exists in the image: its user-private group cannot be made",
                where=u.where,
                hint="pick another user name",
            )
        glow, ghigh = _num(acc, "GID_MIN", 1000), _num(acc, "GID_MAX", 60000)
        gid = uid if uid not in gids else next((n for n in range(glow, ghigh + 1) if n not in gids), -1)
        if gid < 0:
            raise RecipeError(
                f"no free gid in GID_MIN..GID_MAX ({glow}..{ghigh}) of /etc/login.defs", where=u.where
            )
        acc.group.rows.append([u.name, "x", str(gid), ""])
        acc.group.changed = True
        if acc.gshadow is not None:
            acc.gshadow.rows.append([u.name, "!", "", ""])
            acc.gshadow.changed = True
    else:
        gid = _group_id(acc, "users") or 100
    home = u.home or posixpath.join("/home", u.name)
    shell = u.shell or next(
        (s for s in ("/bin/bash", "/bin/sh") if c.root_file_exists(s)),
        "/bin/sh",
    )
    acc.passwd.rows.append([u.name, "x", str(uid), str(gid), ",,,", home, shell])
    acc.passwd.changed = True
    if acc.shadow is not None:
        day = str(c.epoch // 86400)
        acc.shadow.rows.append([u.name, "!", day, "0", "99999", "7", "", "", ""])  # hash set by _update
        acc.shadow.changed = True


def _update(acc: _Accounts, u: User) -> None:
    row = acc.passwd.find(u.name)
    assert row is not None
    if u.create and u.shell and row[6:7] != [u.shell]:
        row[6] = u.shell
        acc.passwd.changed = True
    for name in u.groups:
        g = acc.group.find(name)
        if g is None:
            raise RecipeError(
                f"group {name!r} (users.{u.name}.groups) does not exist in the image's /etc/group",
                where=u.where,
                hint="groups: "
                + (", ".join(r[0] for r in acc.group.rows if r and r[0] in _USEFUL) or "none"),
            )
        _add_member(acc.group, g, 3, u.name)
        gs = acc.gshadow.find(name) if acc.gshadow is not None else None
        if acc.gshadow is not None and gs is not None:
            _add_member(acc.gshadow, gs, 3, u.name)
    if u.password_hash or u.lock:
        if acc.shadow is None:
            raise RecipeError("the image has no /etc/shadow to set a password in", where=u.where)
        s = acc.shadow.find(u.name)
        if s is None:
            raise RecipeError(f"user {u.name} has no line in the image's /etc/shadow", where=u.where)
        new = u.password_hash if u.password_hash else s[1] if s[1].startswith("!") else "!" + s[1]
        if s[1] != new:
            s[1] = new
            acc.shadow.changed = True


_USEFUL = ("sudo", "adm", "video", "dialout", "plugdev", "netdev", "audio", "docker", "users")


def _add_member(table: _Table, row: list[str], index: int, name: str) -> None:
    while len(row) <= index:
        row.append("")
    members = [m for m in row[index].split(",") if m]
    if name not in members:
        row[index] = ",".join([*members, name])
        table.changed = True


def _home(c: Customiser, u: User) -> None:
    acct = c.user(u.name, u.where)
    home = acct.home
    if c.read_text_root(home) is not None:
        raise RecipeError(f"the home {home} of {u.name} is a file in the image", where=u.where)
    c.mkdir(home, mode=0o755, uid=acct.uid, gid=acct.gid, origin=u.where)
    st = c.stat(ROOTFS, SKEL)
    if st is None or not st.is_dir:
        return
    img = c.image(ROOTFS)
    for dirpath, dirs, others in img.walk(SKEL):
        rel = dirpath[len(SKEL) :].lstrip("/")
        for d in dirs:
            c.mkdir(
                posixpath.join(home, rel, d.name), mode=d.mode, uid=acct.uid, gid=acct.gid, origin=u.where
            )
        for e in others:
            dest = posixpath.join(home, rel, e.name)
            src = posixpath.join(dirpath, e.name)
            if e.type is FileType.FILE:
                c.write(
                    dest, data=img.read_file(src), mode=e.mode, uid=acct.uid, gid=acct.gid, origin=u.where
                )
            elif e.type is FileType.SYMLINK:
                c.symlink(dest, img.readlink(src), uid=acct.uid, gid=acct.gid, origin=u.where)


def _authorized_keys(c: Customiser, u: User) -> None:
    acct = c.user(u.name, u.where)
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
