"""The schema table: the parser's keys and defaults come from it; the JSON Schema and the README's
reference are generated from it and kept up to date; shipped recipes pass both the schema and the
builder; bad recipes are refused by both."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.errors import RecipeError
from builder.recipe import load_recipe, schema
from builder.recipe.schemadoc import (
    REFERENCE_END,
    REFERENCE_START,
    SCHEMA_FILE,
    json_schema,
    json_schema_text,
    reference_markdown,
)
from tests.buildhelp import REPO, cli

jsonschema = pytest.importorskip(
    "jsonschema", reason="jsonschema is a test dependency: pip install -e '.[test]'"
)

SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def validator() -> Any:
    return jsonschema.Draft202012Validator(json_schema())


def test_the_schema_is_valid_draft_2020_12_and_the_committed_copy_is_current() -> None:
    jsonschema.Draft202012Validator.check_schema(json_schema())
    committed = (REPO / SCHEMA_FILE).read_text()
    assert committed == json_schema_text(), "run: airbox-build schema > docs/recipe.schema.json"
    out = cli("schema")
    assert out.returncode == 0 and out.stdout == committed


def test_the_readme_reference_is_generated_from_the_table() -> None:
    readme = (REPO / "README.md").read_text()
    start, end = readme.index(REFERENCE_START), readme.index(REFERENCE_END) + len(REFERENCE_END) + 1
    assert readme[start:end] == reference_markdown(), "run scripts/gen-schema to refresh the README"
    for path, key in schema.walk(schema.RECIPE):
        if path[0] != "devices" or len(path) == 1:
            assert f"`{key.name}`" in readme[start:end], path
    assert cli("schema", "--format", "markdown").stdout == reference_markdown()


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_point_at_the_schema_pass_it_and_load(recipe: Path) -> None:
    first = recipe.read_text().splitlines()[0]
    match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert match, f"{recipe.name}: first line must name the schema"
    assert (recipe.parent / match[1]).resolve() == (REPO / SCHEMA_FILE).resolve()
    errors = sorted(validator().iter_errors(yaml.safe_load(recipe.read_text())), key=str)
    assert errors == [], [e.message for e in errors]
    loaded = load_recipe(recipe, check_files=False)
    assert loaded.name == yaml.safe_load(recipe.read_text())["name"]


def test_the_shipped_recipes_load_as_they_say() -> None:
    b5 = load_recipe(REPO / "recipes" / "radxa-b5-basic.yaml", check_files=False)
    assert b5.base.url and b5.base.url.startswith("https://") and b5.base.md5
    assert b5.apt is not None and b5.pip is not None and b5.hostname
    sd = load_recipe(REPO / "recipes" / "airbox-sd-lcm-tpu.yaml")
    (app,) = sd.apps
    assert app.service is not None and app.service.port == 8999
    assert app.python is not None and app.python.lock.is_file()


def test_readme_recipe_examples_pass_the_schema() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    recipes = [yaml.safe_load(b) for b in blocks if re.search(r"^(base|extends):", b, re.M)]
    assert recipes
    for doc in recipes:
        errors = [e.message for e in validator().iter_errors(doc)]
        assert errors == [], (errors, doc)


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top key", {"hostnam": "x"}, "unknown key `hostnam`"),
    ("unknown nested key", {"output": {"zipp": True}}, "unknown key `zipp`"),
    ("wrong type", {"output": {"zip": "yes please"}}, "expected true or false"),
    ("bad enum", {"output": {"bundle_id": "sometimes"}}, "is not one of"),
    ("bad name", {"name": "My Box"}, "is not a valid name"),
    ("bad cidr", {"network": {"ethernets": {"eth0": {"addresses": ["10.0.0.1"]}}}}, "prefix length"),
    ("bad sha256", {"files": [{"path": "/x", "url": "https://h/x", "sha256": "abc"}]}, "64 hex digits"),
    ("bad mode", {"files": [{"path": "/x", "content": "", "mode": "rw-r--r--"}]}, "octal digits"),
    ("two sources", {"files": [{"path": "/x", "content": "a", "source": "b"}]}, "exactly one of"),
    ("no source", {"files": [{"path": "/x"}]}, "exactly one of"),
    ("relative device path", {"remove": ["etc/motd"]}, "absolute path"),
    ("bad unit", {"services": {"enable": ["ssh"]}}, "not a systemd unit name"),
    ("bad layout label", {"layout": {"data": "1GiB"}}, "not a partition label"),
    ("bad identity", {"identity": {"ssh_host_keys": "share"}}, "is not one of"),
    ("empty ssh", {"ssh": {}}, "sets nothing"),
    ("bond without members", {"network": {"bonds": {"bond0": {"dhcp4": True}}}}, "a bond needs `interfaces`"),
    ("bad port", {"apps": {"a": {"path": "/opt/a", "service": {"exec": "x", "port": 70000}}}}, "65535"),
    ("bad user", {"users": {"9 lives": {"lock": True}}}, "not a valid user name"),
    ("empty ntp", {"ntp": []}, "at least one server"),
]


@pytest.mark.parametrize(("doc", "message"), [(d, m) for _, d, m in BAD], ids=[i for i, _, _ in BAD])
def test_bad_recipes_are_refused_by_the_schema_and_by_the_builder(
    tmp_path: Path, doc: dict[str, Any], message: str
) -> None:
    full = {"name": "t", "base": {"url": "https://example.com/p.tgz", "sha256": SHA}, **doc}
    assert list(validator().iter_errors(full)), "the schema let it pass"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(full, sort_keys=False))
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe, check_files=False)
    assert message in str(caught.value) + (caught.value.hint or "")
    assert caught.value.where is not None and "r.yaml:" in caught.value.where


def test_good_forms_pass_the_schema_too(tmp_path: Path) -> None:
    """What the builder accepts, the schema must not refuse (YAML as pyyaml reads it)."""
    text = """\
name: t
base: {url: "https://example.com/p.tgz", md5: 12345678901234567890123456789012, size: 10}
output: {bundle_id: false, zip: true}
identity: keep
ssh: {permit_root_login: prohibit-password}
layout: {DATA: 12GiB, OPT: 4096}
network:
  ethernets:
    eth0: {dhcp4: true, nameservers: [223.5.5.5]}
    eth1: {addresses: [192.168.1.2/24], nameservers: {addresses: [1.1.1.1], search: [lab]}}
  bonds:
    bond0: {interfaces: [eth0], parameters: {mode: active-backup, mii-monitor-interval: 100ms}}
pip: {index_url: "https://pypi.org/simple", trusted_host: pypi.org}
files:
  - {path: /etc/x, content: "", mode: "0600", owner: "linaro:linaro", layer: overlay}
description: null
"""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    load_recipe(recipe, check_files=False)
    errors = [e.message for e in validator().iter_errors(yaml.safe_load(text))]
    assert errors == []


def test_an_extending_recipe_may_leave_out_name_and_base() -> None:
    assert not list(validator().iter_errors({"extends": "base.yaml", "hostname": "b"}))
    assert list(validator().iter_errors({"hostname": "b"}))


def test_the_parser_takes_its_keys_from_the_table(tmp_path: Path) -> None:
    """Each section's unknown-key error lists exactly the table's keys for that section."""
    cases = {
        ("output",): schema.OUTPUT,
        ("apt",): schema.APT,
        ("identity",): schema.IDENTITY_KEYS,
        ("network", "ethernets", "eth0"): schema.ETHERNET,
        ("apps", "a", "python"): schema.APP_PYTHON,
    }
    for path, spec in cases.items():
        doc: dict[str, Any] = {"name": "t", "base": {"url": "https://example.com/p.tgz", "sha256": SHA}}
        node = doc
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if part == "a":
                node["path"] = "/opt/a"
        node[path[-1]] = {"bogus": 1}
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(doc))
        with pytest.raises(RecipeError) as caught:
            load_recipe(recipe, check_files=False)
        assert caught.value.hint == f"known keys here: {', '.join(sorted(schema.keys_of(spec).names))}"


def test_defaults_of_the_table_are_what_the_parser_gives(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""\
name: t
base: {{url: "https://example.com/p.tgz", sha256: {SHA}}}
apt: {{mirror: "https://m.example/ubuntu-ports/"}}
files: [{{path: /etc/x, content: ""}}]
apps: {{a: {{path: /opt/a, python: {{lock: l.txt}}, service: {{exec: x}}, source: {{url: "https://h/s.tgz"}}}}}}
"""
    )
    r = load_recipe(recipe, check_files=False)
    assert r.output.image is schema.default(schema.OUTPUT, "image")
    assert r.output.zip is schema.default(schema.OUTPUT, "zip")
    assert r.output.shrink is schema.default(schema.OUTPUT, "shrink")
    assert r.output.volume_label == schema.default(schema.OUTPUT, "volume_label")
    assert r.output.bundle_id == schema.default(schema.OUTPUT, "bundle_id")
    assert r.identity.ssh_host_keys == schema.default(schema.IDENTITY_KEYS, "ssh_host_keys")
    assert r.identity.machine_id == schema.default(schema.IDENTITY_KEYS, "machine_id")
    assert r.apt is not None and list(r.apt.components) == schema.default(schema.APT, "components")
    (entry,) = r.files
    assert entry.mode == int(schema.default(schema.FILE, "mode"), 8) and entry.layer == "base"
    (app,) = r.apps
    assert app.python is not None and app.service is not None and app.source is not None
    assert app.python.python == schema.default(schema.APP_PYTHON, "python")
    assert app.python.platform == schema.default(schema.APP_PYTHON, "platform")
    assert app.python.target == schema.default(schema.APP_PYTHON, "target")
    assert app.service.enable is schema.default(schema.APP_SERVICE, "enable")
    assert app.source.strip_components == schema.default(schema.APP_SOURCE, "strip_components")
    assert r.description == schema.default(schema.RECIPE, "description")


def test_every_key_has_a_description_and_patterns_compile() -> None:
    seen = 0
    for path, key in schema.walk(schema.RECIPE):
        seen += 1
        assert key.doc.strip(), path
        for t in _types(key.type):
            if t.pattern:
                re.compile(t.pattern)
    assert seen > 150
    output = json.loads(json_schema_text())["properties"]["output"]
    assert output["anyOf"][0]["properties"]["volume_label"]["default"] == "AIRBOX"


def _types(t: schema.Type) -> list[schema.Type]:
    out = [t]
    if t.values is not None:
        out += _types(t.values)
    for option in t.options:
        out += _types(option)
    return out


def test_the_typed_recipe_has_a_field_for_every_key_of_the_table() -> None:
    """The frozen dataclasses the builder reads and the table agree: every key of a section is a
    field of its dataclass (input keys live in the entry's InputSpec), so no key can be parsed
    into nowhere."""
    import dataclasses

    from builder.inputs import InputSpec
    from builder.recipe import model
    from builder.recipe.network import Interface, Match, Nameservers, Route
    from builder.recipe.system import Identity, SshConfig

    pairs = {
        "RECIPE": (schema.RECIPE, model.Recipe),
        "BASE": (schema.BASE, InputSpec),
        "APT": (schema.APT, model.Apt),
        "PIP": (schema.PIP, model.Pip),
        "USER": (schema.USER, model.User),
        "FILE": (schema.FILE, model.FileEntry),
        "OVERLAY": (schema.OVERLAY, model.Overlay),
        "SERVICES": (schema.SERVICES, model.Services),
        "APP": (schema.APP, model.App),
        "APP_SOURCE": (schema.APP_SOURCE, model.AppSource),
        "MODEL": (schema.MODEL, model.Model),
        "APP_PYTHON": (schema.APP_PYTHON, model.AppPython),
        "APP_SERVICE": (schema.APP_SERVICE, model.AppService),
        "OUTPUT": (schema.OUTPUT, model.Output),
        "IDENTITY_KEYS": (schema.IDENTITY_KEYS, Identity),
        "SSH": (schema.SSH, SshConfig),
        "ETHERNET": (schema.ETHERNET, Interface),
        "BOND": (schema.BOND, Interface),
        "ROUTE": (schema.ROUTE, Route),
        "MATCH": (schema.MATCH, Match),
        "NAMESERVERS_KEYS": (schema.NAMESERVERS_KEYS, Nameservers),
    }
    inputs = {f.name for f in dataclasses.fields(InputSpec)}
    renamed = {"from": "from_", "parameters": "parameters"}
    for section_name, (spec, cls) in pairs.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in schema.keys_of(spec).keys:
            name = renamed.get(key.name, key.name.replace("-", "_"))
            if name in fields:
                continue
            if key.name in ("extends",):
                assert "extends" in fields
            elif key.name in ("url", "path", "parts", "sha256", "md5", "size", "member"):
                assert "input" in fields or name in inputs, (section_name, key.name)
            else:
                raise AssertionError(f"{section_name}.{key.name} has no field in {cls.__name__}")
