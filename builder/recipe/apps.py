"""The `apps` section: an app's folder, source, models, Python environment and service."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from builder.recipe import schema
from builder.recipe.model import App, AppPython, AppService, AppSource, Model
from builder.recipe.nodes import (
    KeyPath,
    Node,
    _type_error,
    entry_where,
    err,
    exactly_one,
    expect_bool,
    expect_int,
    expect_list,
    expect_map,
    expect_str,
    fields,
    key_mark,
)
from builder.recipe.values import (
    _ACCOUNT,
    _ENV_NAME,
    device_path,
    expect_url,
    inner_path,
    input_spec,
    local_path,
    parse_owner,
    unit_name,
)


def parse_apps(node: Node, check: bool) -> tuple[App, ...]:
    apps = []
    paths: dict[str, str] = {}
    for name, item in expect_map(node, ("apps",)).items():
        app = _app(name, item, node, check)
        if app.path in paths:
            raise err(item, ("apps", name, "path"), f"{app.path} is also the folder of app {paths[app.path]}")
        paths[app.path] = name
        apps.append(app)
    return tuple(apps)


def _app(name: str, node: Node, parent: Node, check: bool) -> App:
    path: KeyPath = ("apps", name)
    if not re.fullmatch(schema.APP_NAME_PATTERN, name):
        raise err(
            key_mark(parent, name),
            path,
            f"`{name}` is not a valid app name",
            "use a-z, 0-9, '.', '_', '-'",
        )
    given = fields(node, path, schema.APP)
    source = None
    if "source" in given:
        source_node = given["source"]
        source_path = (*path, "source")
        source_fields = fields(source_node, source_path, schema.APP_SOURCE)
        spec = input_spec(
            source_node,
            source_path,
            source_fields,
            name=f"apps.{name}.source",
            check=check,
        )
        strip = _strip(source_fields, source_path)
        source = AppSource(spec, strip, entry_where(source_node, source_path))
    models = _models(name, given["models"], (*path, "models"), check) if "models" in given else ()
    dirs: tuple[str, ...] = ()
    if "dirs" in given:
        dirs = tuple(
            inner_path(d, (*path, "dirs", i))
            for i, d in enumerate(expect_list(given["dirs"], (*path, "dirs")))
        )
    return App(
        name=name,
        path=device_path(given["path"], (*path, "path"), directory=True),
        owner=parse_owner(given["owner"], (*path, "owner")) if "owner" in given else None,
        source=source,
        models=models,
        python=_app_python(given["python"], (*path, "python"), check) if "python" in given else None,
        service=_app_service(name, given["service"], (*path, "service")) if "service" in given else None,
        dirs=dirs,
        where=entry_where(node, path),
    )


def _strip(given: Mapping[str, Node], path: KeyPath) -> int:
    if "strip_components" not in given:
        return int(schema.default(schema.APP_SOURCE, "strip_components"))
    return expect_int(given["strip_components"], (*path, "strip_components"), low=0, high=64)


def _models(app: str, node: Node, path: KeyPath, check: bool) -> tuple[Model, ...]:
    models = []
    dests: dict[str, int] = {}
    for i, item in enumerate(expect_list(node, path)):
        item_path = (*path, i)
        given = fields(item, item_path, schema.MODEL)
        spec = input_spec(
            item,
            item_path,
            given,
            name=f"apps.{app}.models[{i}]",
            check=check,
        )
        target = exactly_one(item, item_path, given, ("dest", "extract"))
        dest = extract = None
        if target == "dest":
            dest = inner_path(given["dest"], (*item_path, "dest"))
            if given["dest"].value.endswith("/"):
                raise err(
                    given["dest"], (*item_path, "dest"), "`dest` names a file; to unpack, use `extract`"
                )
            if dest in dests:
                raise err(
                    given["dest"],
                    (*item_path, "dest"),
                    f"{dest} is also the dest of models[{dests[dest]}]",
                )
            dests[dest] = i
            if "strip_components" in given:
                raise err(
                    key_mark(item, "strip_components"),
                    (*item_path, "strip_components"),
                    "`strip_components` only applies to `extract`",
                )
        else:
            extract = inner_path(given["extract"], (*item_path, "extract"), allow_top=True)
        models.append(Model(spec, dest, extract, _strip(given, item_path), entry_where(item, item_path)))
    return tuple(models)


def _app_python(node: Node, path: KeyPath, check: bool) -> AppPython:
    given = fields(node, path, schema.APP_PYTHON)
    python = str(schema.default(schema.APP_PYTHON, "python"))
    if "python" in given:
        version = given["python"]
        if isinstance(version.value, (int, float)) and not isinstance(version.value, bool):
            raise _type_error(
                version, (*path, "python"), "a quoted version string", f'quote it: "{version.raw}"'
            )
        python = expect_str(version, (*path, "python"))
        if not re.fullmatch(schema.PYTHON_PATTERN, python):
            raise err(
                version,
                (*path, "python"),
                f"{python!r} is not a Python 3 version",
                'e.g. "3.8" or "3.8.10"',
            )
    platform = str(schema.default(schema.APP_PYTHON, "platform"))
    if "platform" in given:
        platform = expect_str(given["platform"], (*path, "platform"))
        if not re.fullmatch(schema.PLATFORM_PATTERN, platform):
            raise err(given["platform"], (*path, "platform"), f"{platform!r} is not a wheel platform tag")
    exclude_newer = None
    if "exclude_newer" in given:
        exclude_newer = expect_str(given["exclude_newer"], (*path, "exclude_newer"))
        if not re.fullmatch(schema.DATE_PATTERN, exclude_newer):
            raise err(
                given["exclude_newer"],
                (*path, "exclude_newer"),
                f"{exclude_newer!r} is not a date",
                'e.g. "2024-08-15"',
            )
    return AppPython(
        lock=local_path(given["lock"], (*path, "lock"), kind="file", check=check),
        target=inner_path(given["target"], (*path, "target"))
        if "target" in given
        else schema.default(schema.APP_PYTHON, "target"),
        platform=platform,
        python=python,
        where=entry_where(node, path),
        requirements=local_path(given["requirements"], (*path, "requirements"), kind="file", check=check)
        if "requirements" in given
        else None,
        exclude_newer=exclude_newer,
        wheels=local_path(given["wheels"], (*path, "wheels"), kind="dir", check=check)
        if "wheels" in given
        else None,
        index_url=expect_url(given["index_url"], (*path, "index_url"), ("http", "https"))
        if "index_url" in given
        else None,
    )


def _app_service(app: str, node: Node, path: KeyPath) -> AppService:
    given = fields(node, path, schema.APP_SERVICE)
    command = expect_str(given["exec"], (*path, "exec"))
    if "\n" in command.strip():
        raise err(given["exec"], (*path, "exec"), "`exec` must be one command line")
    user = None
    if "user" in given:
        user = expect_str(given["user"], (*path, "user"))
        if not _ACCOUNT.fullmatch(user):
            raise err(given["user"], (*path, "user"), f"`{user}` is not a valid user name")
    environment: dict[str, str] = {}
    if "environment" in given:
        env_path = (*path, "environment")
        env_node = given["environment"]
        for key, value in expect_map(env_node, env_path).items():
            if not _ENV_NAME.fullmatch(key):
                raise err(
                    key_mark(env_node, key),
                    (*env_path, key),
                    f"`{key}` is not an environment variable name",
                )
            if value.is_map or value.is_list or value.value is None:
                raise _type_error(value, (*env_path, key), "a string")
            text = value.value if isinstance(value.value, str) else (value.raw or "")
            if "\n" in text:
                raise err(value, (*env_path, key), "an environment value cannot span lines")
            environment[key] = text
    after: tuple[str, ...] = ()
    if "after" in given:
        after = tuple(
            unit_name(u, (*path, "after", i))
            for i, u in enumerate(expect_list(given["after"], (*path, "after")))
        )
    return AppService(
        name=unit_name(given["name"], (*path, "name")) if "name" in given else f"{app}.service",
        exec=command.strip(),
        user=user,
        port=expect_int(given["port"], (*path, "port"), low=1, high=65535) if "port" in given else None,
        environment=MappingProxyType(environment),
        after=after,
        enable=expect_bool(given["enable"], (*path, "enable"))
        if "enable" in given
        else schema.default(schema.APP_SERVICE, "enable"),
        where=entry_where(node, path),
    )
