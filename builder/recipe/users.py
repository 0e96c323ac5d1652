"""The `users` section: existing accounts changed, new ones declared."""

from __future__ import annotations

from collections.abc import Mapping

from builder.recipe import schema
from builder.recipe.model import User
from builder.recipe.nodes import (
    KeyPath,
    Node,
    entry_where,
    err,
    expect_bool,
    expect_int,
    expect_map,
    expect_str,
    expect_str_list,
    fields,
    key_mark,
)
from builder.recipe.values import _ACCOUNT, _CRYPT, _PLAINTEXT_HINT, _SSH_KEY, device_path, words


def parse_users(node: Node) -> tuple[User, ...]:
    users = []
    for name, item in expect_map(node, ("users",)).items():
        path: KeyPath = ("users", name)
        if not _ACCOUNT.fullmatch(name) or name.isdigit():
            raise err(key_mark(node, name), path, f"`{name}` is not a valid user name")
        if item.is_map and "password" in item.value:
            raise err(
                key_mark(item, "password"),
                (*path, "password"),
                "`password` would put a plaintext password in the recipe",
                _PLAINTEXT_HINT,
            )
        given = fields(item, path, schema.USER)
        create = expect_bool(given["create"], (*path, "create")) if "create" in given else False
        if not create:
            for key in ("uid", "shell", "home"):
                if key in given:
                    raise err(
                        key_mark(item, key),
                        (*path, key),
                        f"`{key}` applies to an account the recipe creates",
                        "add `create: true` (an existing account keeps its uid, shell and home)",
                    )
        lock = expect_bool(given["lock"], (*path, "lock")) if "lock" in given else False
        users.append(
            User(
                name,
                _authorized_keys(given, path),
                _password_hash(given, path),
                entry_where(item, path),
                create=create,
                uid=expect_int(given["uid"], (*path, "uid"), low=1, high=65533) if "uid" in given else None,
                groups=words(given["groups"], (*path, "groups"), _ACCOUNT, "a group name such as sudo")
                if "groups" in given
                else (),
                shell=device_path(given["shell"], (*path, "shell")) if "shell" in given else None,
                home=device_path(given["home"], (*path, "home"), directory=True) if "home" in given else None,
                lock=lock,
            )
        )
        if lock and users[-1].password_hash:
            raise err(
                key_mark(item, "lock"),
                (*path, "lock"),
                "`lock: true` and `password_hash` contradict each other",
                "keep one: a locked account has no password login",
            )
    return tuple(users)


def _authorized_keys(given: Mapping[str, Node], path: KeyPath) -> tuple[str, ...]:
    keys: list[str] = []
    if "ssh_authorized_keys" in given:
        for text, key_node, key_path in expect_str_list(
            given["ssh_authorized_keys"], (*path, "ssh_authorized_keys")
        ):
            if "\n" in text.strip() or not _SSH_KEY.search(text):
                raise err(
                    key_node,
                    key_path,
                    "not an OpenSSH public key line",
                    "paste one line of ~/.ssh/id_*.pub",
                )
            keys.append(text.strip())
    return tuple(keys)


def _password_hash(given: Mapping[str, Node], path: KeyPath) -> str | None:
    if "password_hash" not in given:
        return None
    if not isinstance(given["password_hash"].value, str):
        # never echo the value: it may be a plaintext password
        raise err(
            given["password_hash"],
            (*path, "password_hash"),
            "password_hash must be a quoted crypt(3) hash string",
            _PLAINTEXT_HINT,
        )
    password_hash = expect_str(given["password_hash"], (*path, "password_hash"))
    if not _CRYPT.fullmatch(password_hash):
        raise err(
            given["password_hash"],
            (*path, "password_hash"),
            "password_hash does not look like a crypt(3) hash ($6$salt$hash, $y$..., $2b$...)",
            _PLAINTEXT_HINT,
        )
    return password_hash
