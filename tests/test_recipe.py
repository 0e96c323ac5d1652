"""builder.recipe, builder.recipe.network and builder.units: YAML -> frozen Recipe, every error located."""

from __future__ import annotations

import copy
import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.errors import RecipeError
from builder.inputs import InputSpec
from builder.recipe import Owner, Recipe, iter_inputs, load_recipe
from builder.units import format_size, parse_size

SHA = "ab" * 32
MD5 = "2C384AE51CE63CF2EA10EBCE597408C4"
HEAD = f"name: t\nbase: {{url: https://example.com/x.img, sha256: {SHA}}}\n"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Errors name files relative to the working directory: run each test inside its tmp_path.
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> str:
    text = textwrap.dedent(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def loc(text: str, needle: str, occurrence: int = 1) -> str:
    """``LINE:COL`` (1-based) of the n-th occurrence of ``needle`` in ``text``."""
    index = -1
    for _ in range(occurrence):
        index = text.index(needle, index + 1)
    line = text.count("\n", 0, index) + 1
    return f"{line}:{index - (text.rfind(chr(10), 0, index) + 1) + 1}"


def bare(spec: InputSpec | None) -> InputSpec:
    """An input without its location, to compare with an expected InputSpec."""
    assert spec is not None
    return dataclasses.replace(spec, where="")


def load(tmp_path: Path, body: str, **kwargs: bool) -> Recipe:
    write(tmp_path / "recipe.yaml", body)
    return load_recipe(tmp_path / "recipe.yaml", **kwargs)


def fails(tmp_path: Path, body: str) -> tuple[RecipeError, str]:
    """Load a recipe that must fail; return the error and the text as written."""
    text = write(tmp_path / "recipe.yaml", body)
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "recipe.yaml")
    return info.value, text


# ---------------------------------------------------------------------------------------------
# A full recipe
# ---------------------------------------------------------------------------------------------

FULL = f"""\
name: airbox-sd
description: SD web UI on every box
base:
  path: downloads/sdcard.tgz
  sha256: {SHA.upper()}
  md5: {MD5}
  size: 1288490188
vars: {{site: lab-3, ports: [1, 2], nested: {{deep: true}}}}
hostname: airbox-01
network:
  renderer: networkd
  ethernets:
    eth0: {{dhcp4: true}}
    eth1:
      addresses: [192.168.150.1/24, "fd00::1/64"]
      gateway4: 192.168.150.254
      gateway6: "fd00::fffe"
      nameservers: [223.5.5.5, 119.29.29.29]
      optional: true
      mtu: 1500
      routes:
        - {{to: 10.0.0.0/8, via: 192.168.150.253, metric: 100}}
    lan:
      match: {{macaddress: "00:11:22:33:44:55"}}
      set-name: lan0
      nameservers: {{addresses: [1.1.1.1], search: [lab.example.net]}}
  bonds:
    bond0: {{interfaces: [eth0, lan], parameters: {{mode: active-backup, primary: eth0}}, dhcp4: true}}
apt:
  mirror: https://mirrors.tuna.tsinghua.edu.cn/ubuntu-ports/
  suites: [focal, focal-updates, focal-backports, focal-security]
pip:
  index_url: https://pypi.tuna.tsinghua.edu.cn/simple
  extra_index_urls: [https://download.example.org/whl]
users:
  linaro:
    ssh_authorized_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq me@laptop"]
    password_hash: "$6$rounds=5000$salt$0123456789abcdefABCDEF./"
files:
  - path: /etc/motd
    content: "Welcome to {{{{ recipe.name }}}}\\n"
    mode: "0600"
    owner: root:root
  - path: /home/linaro//notes.txt
    source: files/notes.txt
    owner: linaro
  - path: /etc/default/app
    template: templates/app.env.j2
  - path: /data/blob.bin
    url: https://example.com/blob.bin
    sha256: {SHA}
    size: 3
  - path: /etc/profile.d/x.sh
    content: "export X=1\\n"
    layer: overlay
overlays:
  - path: ../shared/overlays/common
    owner: root:root
remove: [/etc/update-motd.d/50-landscape-sysinfo, /var/cache/apt/]
services:
  enable: [airbox-firstboot.service, getty@ttyS0.service]
  disable: [apt-daily.timer]
apps:
  sd-lcm-tpu:
    path: /data/SD-lcm-tpu/
    owner: linaro:linaro
    source:
      url: https://github.com/zifeng-radxa/SD-lcm-tpu/archive/ee2a9cb5.tar.gz
      sha256: {SHA}
      strip_components: 1
    models:
      - url: https://github.com/r/TPU-Edge-AI/releases/download/sd_v3/canny_multize.bmodel
        sha256: {SHA}
        dest: models/controlnet/canny_multize.bmodel
      - parts: ["https://e.example/x.tar.gz.aa", "https://e.example/x.tar.gz.ab"]
        md5: {MD5}
        extract: models/basic/
    python:
      lock: sd-lcm-tpu.lock
      target: .pydeps
      platform: manylinux2014_aarch64
      python: "3.8.10"
    service:
      exec: python3 gr.py
      user: linaro
      port: 8999
      environment: {{PYTHONPATH: "/data/SD-lcm-tpu/.pydeps:/opt/sophon", HF_HUB_OFFLINE: 1}}
      after: [bmrt_loadko.service, bmrt_setup.service]
    dirs: [models/controlnet, ./models/basic/]
layout:
  DATA: 12GiB
  OPT: 1073741824
mirrors:
  "https://github.com/": "https://mirror.example.net/github/"
output:
  image: true
  zip: false
  volume_label: CARD 01
"""


def make_full(tmp_path: Path) -> Path:
    recipe_dir = tmp_path / "recipes"
    for rel in ("downloads/sdcard.tgz", "files/notes.txt", "templates/app.env.j2", "sd-lcm-tpu.lock"):
        (recipe_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (recipe_dir / rel).write_text("x\n")
    (tmp_path / "shared/overlays/common/etc").mkdir(parents=True)
    (recipe_dir / "recipe.yaml").write_text(FULL)
    return recipe_dir / "recipe.yaml"


def test_full_recipe_loads_every_section(tmp_path: Path) -> None:
    r = load_recipe(make_full(tmp_path))
    here = tmp_path / "recipes"
    assert (r.path, r.dir, r.name, r.extends) == (here / "recipe.yaml", here, "airbox-sd", ())
    assert r.description == "SD web UI on every box"
    assert bare(r.base) == InputSpec(
        path=here / "downloads/sdcard.tgz", sha256=SHA, md5=MD5.lower(), size=1288490188
    )
    assert r.base.where == f"recipes/recipe.yaml:{loc(FULL, 'path: downloads').split(':')[0]} base"
    assert not r.base_md5_only
    assert r.vars["site"] == "lab-3" and r.vars["ports"] == (1, 2) and r.vars["nested"]["deep"] is True
    assert r.hostname == "airbox-01"

    net = r.network
    assert net is not None and net.renderer == "networkd"
    eth0, eth1, lan = net.ethernets
    assert eth0.dhcp4 is True and eth0.addresses == ()
    assert eth1.addresses == ("192.168.150.1/24", "fd00::1/64")
    assert (eth1.gateway4, eth1.gateway6, eth1.mtu, eth1.optional) == (
        "192.168.150.254",
        "fd00::fffe",
        1500,
        True,
    )
    assert eth1.nameservers.addresses == ("223.5.5.5", "119.29.29.29")
    assert eth1.routes[0].to == "10.0.0.0/8" and eth1.routes[0].via == "192.168.150.253"
    assert (lan.name, lan.match.macaddress, lan.nameservers.search) == (
        "lan0",
        "00:11:22:33:44:55",
        ("lab.example.net",),
    )
    (bond,) = net.bonds
    assert bond.interfaces == ("eth0", "lan") and dict(bond.parameters) == {
        "mode": "active-backup",
        "primary": "eth0",
    }
    netplan = yaml.safe_load(yaml.safe_dump(net.to_netplan()))["network"]
    assert netplan["version"] == 2
    assert netplan["ethernets"]["eth1"]["nameservers"] == {"addresses": ["223.5.5.5", "119.29.29.29"]}
    assert netplan["ethernets"]["lan"]["set-name"] == "lan0"
    assert netplan["bonds"]["bond0"]["interfaces"] == ["eth0", "lan"]

    assert r.apt.mirror.endswith("/ubuntu-ports/") and r.apt.suites[-1] == "focal-security"
    assert r.apt.components == ("main", "restricted", "universe", "multiverse")
    assert r.pip.trusted_host == ("pypi.tuna.tsinghua.edu.cn", "download.example.org")
    (user,) = r.users
    assert (
        user.name == "linaro" and user.password_hash.startswith("$6$") and len(user.ssh_authorized_keys) == 1
    )

    motd, notes, app_env, blob, profile = r.files
    assert (motd.path, motd.content, motd.mode, motd.owner) == (
        "/etc/motd", "Welcome to {{ recipe.name }}\n", 0o600, Owner("root", "root"),
    )  # fmt: skip
    assert (notes.path, notes.source, notes.owner, notes.mode) == (
        "/home/linaro/notes.txt", here / "files/notes.txt", Owner("linaro"), 0o644,
    )  # fmt: skip
    assert app_env.template == here / "templates/app.env.j2" and app_env.owner is None
    assert bare(blob.input) == InputSpec(url="https://example.com/blob.bin", sha256=SHA, size=3)
    assert blob.where == f"recipes/recipe.yaml:{loc(FULL, '- path: /data/blob').split(':')[0]} files[3]"
    assert blob.input.name == "files[3]" and blob.input.where == blob.where
    assert (profile.layer, motd.layer) == ("overlay", "base")
    assert r.overlays[0].path == tmp_path / "shared/overlays/common" and r.overlays[0].owner == Owner(
        "root", "root"
    )
    assert [x.path for x in r.remove] == ["/etc/update-motd.d/50-landscape-sysinfo", "/var/cache/apt"]
    assert r.services.enable == ("airbox-firstboot.service", "getty@ttyS0.service")
    assert r.services.disable == ("apt-daily.timer",)

    (app,) = r.apps
    assert (app.name, app.path, app.owner) == ("sd-lcm-tpu", "/data/SD-lcm-tpu", Owner("linaro", "linaro"))
    assert app.source.strip_components == 1 and app.source.input.sha256 == SHA
    canny, basic = app.models
    assert (canny.dest, canny.extract) == ("models/controlnet/canny_multize.bmodel", None)
    assert (basic.dest, basic.extract, basic.input.md5) == (None, "models/basic", MD5.lower())
    assert basic.input.parts == ("https://e.example/x.tar.gz.aa", "https://e.example/x.tar.gz.ab")
    assert basic.input.name == "apps.sd-lcm-tpu.models[1]"
    assert app.python.lock == here / "sd-lcm-tpu.lock" and app.python.python == "3.8.10"
    assert app.device_path(app.python.target) == "/data/SD-lcm-tpu/.pydeps"
    service = app.service
    assert (service.name, service.exec, service.user, service.port, service.enable) == (
        "sd-lcm-tpu.service", "python3 gr.py", "linaro", 8999, True,
    )  # fmt: skip
    assert dict(service.environment) == {
        "PYTHONPATH": "/data/SD-lcm-tpu/.pydeps:/opt/sophon",
        "HF_HUB_OFFLINE": "1",
    }
    assert service.after == ("bmrt_loadko.service", "bmrt_setup.service")
    assert app.dirs == ("models/controlnet", "models/basic")

    assert dict(r.layout) == {"DATA": 12 * 2**30, "OPT": 2**30}
    assert r.mirrors == (("https://github.com/", "https://mirror.example.net/github/"),)
    assert (r.output.image, r.output.zip, r.output.shrink, r.output.volume_label) == (
        True,
        False,
        True,
        "CARD 01",
    )

    inputs = list(iter_inputs(r))
    assert inputs == [r.base, blob.input, app.source.input, canny.input, basic.input]
    assert list(r.inputs()) == inputs


def test_recipe_is_frozen(tmp_path: Path) -> None:
    r = load_recipe(make_full(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        r.vars["site"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        r.layout["DATA"] = 1  # type: ignore[index]
    assert isinstance(r.files, tuple) and isinstance(r.apps[0].models, tuple)


def test_minimal_recipe_defaults(tmp_path: Path) -> None:
    r = load(tmp_path, HEAD)
    assert (r.network, r.apt, r.pip, r.hostname, r.files, r.apps, r.mirrors) == (
        None,
        None,
        None,
        None,
        (),
        (),
        (),
    )
    assert r.output.shrink is True and r.output.image is False and r.output.volume_label == "AIRBOX"
    assert dict(r.layout) == {} and dict(r.vars) == {} and r.services.enable == ()


def test_md5_only_base_sets_the_flag_and_is_lower_cased(tmp_path: Path) -> None:
    r = load(tmp_path, f"name: t\nbase: {{url: https://example.com/x.img, md5: {MD5}}}\n")
    assert r.base_md5_only and r.base.md5 == MD5.lower()


def test_all_digit_md5_is_read_as_written(tmp_path: Path) -> None:
    # YAML reads 32 decimal digits as an integer; the text as written is the checksum.
    r = load(
        tmp_path, "name: t\nbase: {url: https://example.com/x.img, md5: 01234567890123456789012345678901}\n"
    )
    assert r.base.md5 == "01234567890123456789012345678901"


def test_check_files_false_skips_existence(tmp_path: Path) -> None:
    r = load(tmp_path, HEAD + "files:\n  - {path: /etc/a, source: missing.txt}\n", check_files=False)
    assert r.files[0].source == tmp_path / "missing.txt"


def test_yaml_merge_keys_and_aliases(tmp_path: Path) -> None:
    files = (
        'files:\n  - &motd {path: /etc/motd, content: hi, mode: "0600"}\n  - {<<: *motd, path: /etc/issue}\n'
    )
    r = load(tmp_path, HEAD + files)
    assert [(f.path, f.content, f.mode) for f in r.files] == [
        ("/etc/motd", "hi", 0o600),
        ("/etc/issue", "hi", 0o600),
    ]


# ---------------------------------------------------------------------------------------------
# Syntax, structure, types
# ---------------------------------------------------------------------------------------------


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    e, _text = fails(tmp_path, "name: t\nbase:\n  url: https://e.com/x\n  sha256: [ab\nhostname: x\n")
    assert e.where.startswith("recipe.yaml:")
    line, col = e.where.split(":")[1:3]
    # PyYAML reports the flow sequence that never closes at the next line's key.
    assert (int(line), int(col)) == (5, 9)
    assert "YAML syntax error" in e.message and "line 4" in e.message and e.hint


def test_bad_indentation_is_a_syntax_error(tmp_path: Path) -> None:
    e, _text = fails(tmp_path, "name: t\nbase:\n  url: x\n   sha256: y\n")
    assert e.where == "recipe.yaml:4:10" and "mapping values are not allowed" in e.message


def test_empty_and_non_mapping_recipes(tmp_path: Path) -> None:
    e, _ = fails(tmp_path, "# nothing\n")
    assert (e.where, e.message) == ("recipe.yaml:1:1", "the recipe is empty")
    e, _ = fails(tmp_path, "- a\n- b\n")
    assert e.where == "recipe.yaml:1:1" and "found a list" in e.message


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    e, text = fails(
        tmp_path, HEAD + "network:\n  ethernets:\n    eth0: {dhcp4: true}\n    eth0: {dhcp6: true}\n"
    )
    assert e.where == f"recipe.yaml:{loc(text, 'eth0', 2)}: network.ethernets.eth0"
    assert "given twice (first at line 5)" in e.message


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "hostnme: box\n")
    assert e.where == f"recipe.yaml:{loc(text, 'hostnme')}: hostnme"
    assert e.message == "unknown key `hostnme` (did you mean `hostname`?)"
    assert "hostname" in e.hint and "layout" in e.hint


def test_unknown_nested_key_suggests(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "files:\n  - path: /etc/a\n    contnet: hi\n")
    assert e.where == f"recipe.yaml:{loc(text, 'contnet')}: files[0].contnet"
    assert "did you mean `content`?" in e.message


def test_unknown_key_without_close_match_lists_known_keys(tmp_path: Path) -> None:
    e, _ = fails(tmp_path, HEAD + "output: {zzzz: 1}\n")
    assert e.message == "unknown key `zzzz`"
    assert e.hint == "known keys here: bundle_id, image, shrink, volume_label, zip"


def test_wrong_type_says_expected_and_found(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "hostname: [a, b]\n")
    assert e.where == f"recipe.yaml:{loc(text, '[a, b]')}: hostname"
    assert e.message == "expected a string, found a list"
    e, text = fails(tmp_path, HEAD + "output: {image: 'yes'}\n")
    assert e.message == 'expected true or false, found the string "yes"' and "without quotes" in e.hint
    e, text = fails(tmp_path, HEAD + "apps:\n  a:\n    path: /data/a\n    service: {exec: x, port: http}\n")
    assert e.where == f"recipe.yaml:{loc(text, 'http}')}: apps.a.service.port"
    assert e.message == 'expected a whole number, found the string "http"'


def test_missing_required_keys(tmp_path: Path) -> None:
    e, _ = fails(tmp_path, "name: t\n")
    assert (e.where, e.message) == ("recipe.yaml:1:1: base", "`base` is required here")
    e, _ = fails(tmp_path, "base: {path: .}\n")
    assert e.where == "recipe.yaml:1:1: name"


def test_invalid_name(tmp_path: Path) -> None:
    e, _text = fails(tmp_path, "name: My Box\nbase: {path: .}\n")
    assert e.where == "recipe.yaml:1:7: name" and e.hint == "e.g. my-box"


def test_bad_hostname(tmp_path: Path) -> None:
    e, _ = fails(tmp_path, HEAD + "hostname: -bad.example\n")
    assert e.where == "recipe.yaml:3:11: hostname" and "'-bad'" in e.message
    e, _ = fails(tmp_path, HEAD + f"hostname: {'a' * 64}\n")
    assert "not a valid hostname" in e.message


def test_alias_loop_is_refused(tmp_path: Path) -> None:
    e, _ = fails(tmp_path, HEAD + "vars: &v {self: *v}\n")
    assert "alias" in e.message and e.where.startswith("recipe.yaml:3:")


def test_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    body = HEAD + "vars:\n" + "".join(f"  {line}\n" for line in lines)
    e, _ = fails(tmp_path, body)
    assert "too many values" in e.message


def test_unsupported_tag_and_bad_scalar(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "hostname: !!python/object:os.system x\n")
    assert e.where == f"recipe.yaml:{loc(text, '!!python')}: hostname" and "cannot read" in e.message
    e, _ = fails(tmp_path, HEAD + "vars: !!set {a, b}\n")
    assert "not supported" in e.message


def test_non_utf8_file(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_bytes(b"name: t\nhostname: caf\xe9\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "recipe.yaml")
    assert info.value.where == "recipe.yaml:2:14" and "UTF-8" in info.value.message


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert info.value.where == "nope.yaml" and "cannot read" in info.value.message


# ---------------------------------------------------------------------------------------------
# Inputs, URLs, checksums, paths
# ---------------------------------------------------------------------------------------------


def test_base_needs_exactly_one_source(tmp_path: Path) -> None:
    e, _ = fails(tmp_path, f"name: t\nbase:\n  url: https://e.com/x\n  path: x.img\n  sha256: {SHA}\n")
    assert e.where == "recipe.yaml:3:3: base"
    assert "found `url` (line 3) and `path` (line 4)" in e.message
    e, _ = fails(tmp_path, f"name: t\nbase: {{sha256: {SHA}}}\n")
    assert "found none" in e.message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("abc", "64 hex digits, found 3 characters"), ("g" * 64, "64 hex digits"), ("[1]", "expected a string")],
)
def test_bad_sha256(tmp_path: Path, value: str, fragment: str) -> None:
    e, _text = fails(tmp_path, f"name: t\nbase:\n  url: https://e.com/x\n  sha256: {value}\n")
    assert e.where == "recipe.yaml:4:11: base.sha256" and fragment in e.message


def test_url_schemes(tmp_path: Path) -> None:
    e, _ = fails(tmp_path, f"name: t\nbase: {{url: 'ftp://e.com/x', sha256: {SHA}}}\n")
    assert e.where == "recipe.yaml:2:13: base.url" and "found `ftp:`" in e.message
    e, _ = fails(tmp_path, f"name: t\nbase: {{url: 'https:///x', sha256: {SHA}}}\n")
    assert "has no host" in e.message
    image = tmp_path / "x.img"
    r = load(tmp_path, f"name: t\nbase: {{url: 'file://{image}'}}\n")
    assert r.base.url == f"file://{image}"
    e, text = fails(tmp_path, HEAD + "files:\n  - {path: /a, url: 'file:///x', sha256: " + SHA + "}\n")
    at = loc(text, "'file:")  # a quoted value starts at its quote
    assert e.where == f"recipe.yaml:{at}: files[0].url" and "https://" in e.message


def test_plain_http_without_checksum_is_unsafe(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "files:\n  - path: /data/blob\n    url: http://example.com/blob\n")
    assert e.where == f"recipe.yaml:{loc(text, 'path: /data')}: files[0]"
    assert "plain http:// without a checksum is unsafe" in e.message and "sha256" in e.hint
    e, _ = fails(tmp_path, "name: t\nbase: {parts: ['https://a.example/1', 'http://a.example/2']}\n")
    assert "http://a.example/2" in e.message and e.where == "recipe.yaml:2:7: base"


def test_https_without_checksum_is_left_to_the_lock(tmp_path: Path) -> None:
    r = load(tmp_path, HEAD + "files:\n  - {path: /data/blob, url: 'https://example.com/b'}\n")
    assert r.files[0].input.sha256 is None and r.files[0].input.md5 is None
    r = load(
        tmp_path, HEAD + "files:\n  - {path: /data/blob, url: 'http://example.com/b', md5: " + MD5 + "}\n"
    )
    assert r.files[0].input.md5 == MD5.lower()


def test_checksum_only_applies_to_url_entries(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + f"files:\n  - {{path: /a, content: x, sha256: {SHA}}}\n")
    assert e.where == f"recipe.yaml:{loc(text, 'sha256', 2)}: files[0].sha256"


def test_local_paths_must_exist_relative_to_the_recipe(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "files:\n  - {path: /a, source: files/none.txt}\n")
    assert e.where == f"recipe.yaml:{loc(text, 'files/none')}: files[0].source"
    assert str(tmp_path / "files/none.txt") in e.message and "relative to the file" in e.hint
    (tmp_path / "adir").mkdir()
    e, _ = fails(tmp_path, HEAD + "files:\n  - {path: /a, template: adir}\n")
    assert "is not a file" in e.message
    e, _ = fails(tmp_path, HEAD + "overlays:\n  - path: recipe.yaml\n")
    assert e.where == "recipe.yaml:4:11: overlays[0].path" and "is not a directory" in e.message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("etc/motd", "absolute path"),
        ("/etc/../shadow", "`..`"),
        ("/etc/motd/", "cannot end with `/`"),
        ("/", "root directory"),
        ('"/etc/a\\nb"', "control or invisible"),
        ('"/etc/\\ud800"', "control or invisible"),
    ],
)
def test_device_paths(tmp_path: Path, value: str, fragment: str) -> None:
    e, _text = fails(tmp_path, HEAD + f"files:\n  - path: {value}\n    content: x\n")
    assert e.where == "recipe.yaml:4:11: files[0].path" and fragment in e.message


def test_file_written_twice_or_removed_and_written(tmp_path: Path) -> None:
    e, text = fails(
        tmp_path, HEAD + "files:\n  - {path: /etc/a, content: x}\n  - {path: /etc//a, content: y}\n"
    )
    assert e.where == f"recipe.yaml:{loc(text, '/etc//a')}: files[1].path"
    assert e.message == "/etc/a is written twice (also by recipe.yaml:4 files[0])"
    e, text = fails(tmp_path, HEAD + "files:\n  - {path: /etc/a, content: x}\nremove: [/tmp, /etc/a/]\n")
    assert (
        e.where == f"recipe.yaml:{loc(text, '/etc/a/')}: remove[1]"
        and "both removed and written" in e.message
    )


def test_files_need_exactly_one_kind(tmp_path: Path) -> None:
    e, _text = fails(tmp_path, HEAD + "files:\n  - path: /a\n    content: x\n    source: y\n")
    assert e.where == "recipe.yaml:4:5: files[0]"
    assert "exactly one of `content`, `source`, `template`, `url`" in e.message


def test_mode_must_be_a_quoted_octal_string(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "files:\n  - {path: /a, content: x, mode: 0644}\n")
    assert e.where == f"recipe.yaml:{loc(text, '0644')}: files[0].mode"
    assert "unquoted number 0644" in e.message and 'mode: "0644"' in e.hint
    e, _ = fails(tmp_path, HEAD + "files:\n  - {path: /a, content: x, mode: 755}\n")
    assert 'mode: "0755"' in e.hint
    e, _ = fails(tmp_path, HEAD + "files:\n  - {path: /a, content: x, mode: 420}\n")
    assert 'mode: "0420"' in e.hint
    e, _ = fails(tmp_path, HEAD + "files:\n  - {path: /a, content: x, mode: '0855'}\n")
    assert "octal digits" in e.message
    r = load(tmp_path, HEAD + "files:\n  - {path: /a, content: x, mode: '4755'}\n")
    assert r.files[0].mode == 0o4755


def test_owner_and_layer(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "files:\n  - {path: /a, content: x, owner: 'root:'}\n")
    at = loc(text, "'root:'")
    assert e.where == f"recipe.yaml:{at}: files[0].owner"
    e, _ = fails(tmp_path, HEAD + "files:\n  - {path: /a, content: x, layer: upper}\n")
    assert "base or overlay" in e.message
    r = load(tmp_path, HEAD + "files:\n  - {path: /a, content: '', owner: '1000:1000'}\n")
    assert r.files[0].owner == Owner("1000", "1000") and r.files[0].content == ""


# ---------------------------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------------------------


def test_plaintext_password_key_is_refused(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "users:\n  linaro:\n    password: linaro\n")
    assert e.where == f"recipe.yaml:{loc(text, 'password')}: users.linaro.password"
    assert "plaintext passwords are refused" in e.hint and "openssl passwd -6" in e.hint


@pytest.mark.parametrize("value", ["linaro", "'$6$nosalt'", "'$9$x$y'", "'$6$a$b c'"])
def test_password_hash_must_look_like_crypt(tmp_path: Path, value: str) -> None:
    e, text = fails(tmp_path, HEAD + f"users:\n  linaro: {{password_hash: {value}}}\n")
    assert e.where == f"recipe.yaml:{loc(text, value, text.count(value))}: users.linaro.password_hash"
    assert "mkpasswd -m sha-512" in e.hint


@pytest.mark.parametrize(
    "value", ["$y$j9T$abc$def", "$2b$12$abcdefghijklmnopqrstuv", "$1$salt$hash", "!", "*"]
)
def test_password_hash_accepts_crypt_forms(tmp_path: Path, value: str) -> None:
    r = load(tmp_path, HEAD + f"users:\n  linaro: {{password_hash: '{value}'}}\n")
    assert r.users[0].password_hash == value


def test_bad_ssh_key(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "users:\n  linaro: {ssh_authorized_keys: ['AAAA me@laptop']}\n")
    at = loc(text, "'AAAA")
    assert e.where == f"recipe.yaml:{at}: users.linaro.ssh_authorized_keys[0]"


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------

NET = HEAD + "network:\n  ethernets:\n"


def test_invalid_cidr(tmp_path: Path) -> None:
    e, text = fails(tmp_path, NET + "    eth1: {addresses: [192.168.150.1/33]}\n")
    assert e.where == f"recipe.yaml:{loc(text, '192.168')}: network.ethernets.eth1.addresses[0]"
    assert "CIDR" in e.message
    e, _ = fails(tmp_path, NET + "    eth1: {addresses: [192.168.150.1]}\n")
    assert e.message == "192.168.150.1 needs a prefix length" and e.hint == "e.g. 192.168.150.1/24"
    e, _ = fails(tmp_path, NET + "    eth1: {addresses: [300.1.1.1/24]}\n")
    assert "'300.1.1.1/24' is not a valid address in CIDR form" in e.message
    e, _ = fails(tmp_path, NET + "    eth1: {addresses: [192.168.150.0/24]}\n")
    assert "network address of 192.168.150.0/24" in e.message


def test_gateway_outside_subnet(tmp_path: Path) -> None:
    e, text = fails(
        tmp_path, NET + "    eth1:\n      addresses: [192.168.150.1/24]\n      gateway4: 192.168.151.1\n"
    )
    assert e.where == f"recipe.yaml:{loc(text, '192.168.151.1')}: network.ethernets.eth1.gateway4"
    assert e.message == "the gateway 192.168.151.1 is outside the subnets of eth1 (192.168.150.0/24)"


def test_gateway_rules(tmp_path: Path) -> None:
    e, _ = fails(tmp_path, NET + "    eth1: {gateway4: 10.0.0.1}\n")
    assert "has no static IPv4 address" in e.message
    e, _ = fails(tmp_path, NET + "    eth1: {addresses: [10.0.0.1/24], gateway4: 10.0.0.1}\n")
    assert "is an address of eth1 itself" in e.message
    e, _ = fails(tmp_path, NET + "    eth1: {addresses: [10.0.0.1/24], gateway4: 'fd00::1'}\n")
    assert "not an IPv4 address" in e.message
    e, text = fails(
        tmp_path,
        NET + "    eth1:\n      addresses: [10.0.0.1/24]\n      routes: [{to: default, via: 10.1.0.1}]\n",
    )
    assert e.where == f"recipe.yaml:{loc(text, '10.1.0.1')}: network.ethernets.eth1.routes[0].via"
    r = load(tmp_path, NET + "    eth1: {dhcp4: true, gateway4: 10.0.0.1, gateway6: 'fe80::1'}\n")
    assert r.network.ethernets[0].gateway4 == "10.0.0.1"
    r = load(
        tmp_path,
        NET
        + "    eth1:\n      addresses: [10.0.0.1/24]\n"
        + "      routes: [{to: 0.0.0.0/0, via: 10.9.0.1, on-link: true}]\n",
    )
    assert r.network.ethernets[0].routes[0].on_link is True


def test_duplicate_addresses_across_interfaces(tmp_path: Path) -> None:
    body = NET + "    eth0: {addresses: [10.0.0.1/24]}\n    eth1: {addresses: [10.0.1.1/24, 10.0.0.1/16]}\n"
    e, text = fails(tmp_path, body)
    assert e.where == f"recipe.yaml:{loc(text, '10.0.0.1', 2)}: network.ethernets.eth1.addresses[1]"
    assert e.message == "10.0.0.1 is already an address of eth0 (line 5)"


def test_undeclared_bond_member(tmp_path: Path) -> None:
    body = NET + "    eth0: {}\n  bonds:\n    bond0:\n      interfaces: [eth0, eth2]\n"
    e, text = fails(tmp_path, body)
    assert e.where == f"recipe.yaml:{loc(text, 'eth2')}: network.bonds.bond0.interfaces[1]"
    assert "eth2 is not declared under network.ethernets" in e.message and "ethernets: {eth2: {}}" in e.hint


def test_bond_rules(tmp_path: Path) -> None:
    e, _ = fails(
        tmp_path, NET + "    eth0: {}\n  bonds:\n    b0: {interfaces: [eth0]}\n    b1: {interfaces: [eth0]}\n"
    )
    assert "already a member of the bond b0" in e.message
    e, text = fails(
        tmp_path, NET + "    eth0: {}\n  bonds:\n    b0: {interfaces: [eth0], parameters: {mode: fast}}\n"
    )
    assert (
        e.where == f"recipe.yaml:{loc(text, 'fast')}: network.bonds.b0.parameters.mode"
        and "802.3ad" in e.hint
    )
    e, _ = fails(tmp_path, NET + "    eth0: {}\n  bonds:\n    b0: {parameters: {mode: active-backup}}\n")
    assert e.where.endswith("network.bonds.b0.interfaces")
    e, _ = fails(
        tmp_path, NET + "    eth0: {}\n  bonds:\n    b0: {interfaces: [eth0], parameters: {mdoe: x}}\n"
    )
    assert "did you mean `mode`" in e.message


@pytest.mark.parametrize("name", ["averyveryverylongname", "eth/0", "eth:0", "'..'", "'e 0'"])
def test_interface_names(tmp_path: Path, name: str) -> None:
    e, text = fails(tmp_path, NET + f"    {name}: {{dhcp4: true}}\n")
    assert e.where.startswith(f"recipe.yaml:{loc(text, name)}: network.ethernets")
    assert "not a valid interface name" in e.message and "1-15 characters" in e.hint


def test_nameservers_and_mac(tmp_path: Path) -> None:
    e, text = fails(tmp_path, NET + "    eth0: {dhcp4: true, nameservers: [223.5.5.5, dns.example]}\n")
    assert e.where == f"recipe.yaml:{loc(text, 'dns.example')}: network.ethernets.eth0.nameservers[1]"
    e, _ = fails(tmp_path, NET + "    eth0: {dhcp4: true, nameservers: {adresses: [1.1.1.1]}}\n")
    assert "did you mean `addresses`" in e.message
    # 11:22:33:44:55:66 is a YAML 1.1 base-60 integer: read as written
    r = load(tmp_path, NET + "    eth0: {dhcp4: true, macaddress: 11:22:33:44:55:66}\n")
    assert r.network.ethernets[0].macaddress == "11:22:33:44:55:66"
    e, _ = fails(tmp_path, NET + "    eth0: {dhcp4: true, macaddress: '11:22:33'}\n")
    assert "not a MAC address" in e.message
    e, _ = fails(tmp_path, NET + "    eth0: {set-name: lan}\n")
    assert "`set-name` needs a `match`" in e.message


def test_empty_network_is_refused(tmp_path: Path) -> None:
    e, _ = fails(tmp_path, HEAD + "network: {}\n")
    assert e.where == "recipe.yaml:3:10: network" and "no interface" in e.message


# ---------------------------------------------------------------------------------------------
# apt, pip, services, apps, layout, mirrors, output
# ---------------------------------------------------------------------------------------------


def test_apt_and_pip_urls(tmp_path: Path) -> None:
    e, _ = fails(tmp_path, HEAD + "apt: {mirror: 'mirrors.tuna.tsinghua.edu.cn/ubuntu-ports'}\n")
    assert e.where == "recipe.yaml:3:15: apt.mirror" and "found none" in e.message
    e, _ = fails(tmp_path, HEAD + "pip: {index_url: 'https://pypi.example/simple', trusted_host: 'a b'}\n")
    assert "not a host name" in e.message
    r = load(
        tmp_path,
        HEAD + "pip: {index_url: 'https://pypi.example/simple', trusted_host: [a.example, b.example]}\n",
    )
    assert r.pip.trusted_host == ("a.example", "b.example")


def test_services(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "services: {enable: [ssh]}\n")
    assert (
        e.where == f"recipe.yaml:{loc(text, 'ssh')}: services.enable[0]"
        and e.hint == "did you mean `ssh.service`?"
    )
    e, _ = fails(tmp_path, HEAD + "services: {enable: [a.service], disable: [a.service]}\n")
    assert "both enabled and disabled" in e.message and e.where.endswith("services.disable[0]")


APP = HEAD + "apps:\n  web:\n    path: /data/web\n"


def test_app_model_paths_stay_inside_the_app(tmp_path: Path) -> None:
    body = APP + "    models:\n      - {url: 'https://e.example/m', dest: ../escape.bin}\n"
    e, text = fails(tmp_path, body)
    assert e.where == f"recipe.yaml:{loc(text, '../escape')}: apps.web.models[0].dest"
    assert "must stay inside the app folder" in e.message
    e, _ = fails(tmp_path, APP + "    models:\n      - {url: 'https://e.example/m', dest: /abs}\n")
    assert "relative to the app folder" in e.message
    e, _ = fails(tmp_path, APP + "    dirs: [a/../../b]\n")
    assert e.where.endswith("apps.web.dirs[0]")


def test_app_model_needs_one_of_dest_and_extract(tmp_path: Path) -> None:
    e, text = fails(
        tmp_path, APP + "    models:\n      - {url: 'https://e.example/m', dest: a, extract: b}\n"
    )
    assert e.where == f"recipe.yaml:{loc(text, '{url', 2)}: apps.web.models[0]"
    assert "exactly one of `dest`, `extract`" in e.message
    e, _ = fails(
        tmp_path, APP + "    models:\n      - {url: 'https://e.example/m', dest: a, strip_components: 1}\n"
    )
    assert "only applies to `extract`" in e.message
    e, _ = fails(
        tmp_path,
        APP
        + "    models:\n      - {url: 'https://e.example/m', dest: a}\n"
        + "      - {url: 'https://e.example/n', dest: ./a}\n",
    )
    assert "also the dest of models[0]" in e.message


def test_app_python_and_service(tmp_path: Path) -> None:
    (tmp_path / "x.lock").write_text("")
    e, text = fails(tmp_path, APP + "    python: {lock: x.lock, python: 3.10}\n")
    assert (
        e.where == f"recipe.yaml:{loc(text, '3.10')}: apps.web.python.python" and e.hint == 'quote it: "3.10"'
    )
    e, _ = fails(tmp_path, APP + "    python: {target: deps}\n")
    assert e.where == "recipe.yaml:6:13: apps.web.python.lock"
    e, _ = fails(tmp_path, APP + "    service: {exec: x, environment: {'BAD-NAME': 1}}\n")
    assert "not an environment variable name" in e.message
    e, _ = fails(tmp_path, APP + "    service: {exec: x, after: [network]}\n")
    assert e.where.endswith("apps.web.service.after[0]")
    e, _ = fails(tmp_path, HEAD + "apps:\n  Web:\n    path: /data/web\n")
    assert e.where == "recipe.yaml:4:3: apps.Web"
    r = load(tmp_path, APP + "    service: {exec: ./run.sh, enable: false}\n")
    assert r.apps[0].service.enable is False and r.apps[0].service.name == "web.service"


def test_layout(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "layout: {data: 12GiB}\n")
    assert e.where == f"recipe.yaml:{loc(text, 'data')}: layout.data" and e.hint == "write DATA"
    e, text = fails(tmp_path, HEAD + "layout: {DATA: 12GB}\n")
    assert e.where == f"recipe.yaml:{loc(text, '12GB')}: layout.DATA" and "ambiguous" in e.message
    e, _ = fails(tmp_path, HEAD + "layout: {DATA: lots}\n")
    assert "not a size" in e.message
    e, _ = fails(tmp_path, HEAD + "layout: {DATA: 0}\n")
    assert "positive" in e.message


def test_mirrors(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "mirrors: {'https://github.com/': 'https://m.example/github'}\n")
    at = loc(text, "'https://m.")
    assert e.where == f'recipe.yaml:{at}: mirrors["https://github.com/"]'
    e, text = fails(tmp_path, HEAD + "mirrors: {'github.com/': 'https://m.example/github/'}\n")
    at = loc(text, "'github.com/")
    assert e.where == f'recipe.yaml:{at}: mirrors["github.com/"]'


def test_output_volume_label(tmp_path: Path) -> None:
    e, text = fails(tmp_path, HEAD + "output: {volume_label: airbox}\n")
    assert e.where == f"recipe.yaml:{loc(text, 'airbox')}: output.volume_label" and e.hint == "write 'AIRBOX'"
    e, _ = fails(tmp_path, HEAD + "output: {volume_label: ABCDEFGHIJKL}\n")
    assert "up to 11" in e.message


# ---------------------------------------------------------------------------------------------
# extends
# ---------------------------------------------------------------------------------------------


def test_extends_deep_merges_and_child_wins(tmp_path: Path) -> None:
    (tmp_path / "base/files").mkdir(parents=True)
    (tmp_path / "base/files/motd").write_text("hi")
    write(
        tmp_path / "base/common.yaml",
        f"""\
        name: common
        description: parent
        base: {{url: https://e.example/a.img, sha256: {SHA}, size: 10}}
        hostname: parent
        output: {{image: true, volume_label: PARENT}}
        apt: {{mirror: 'https://a.example/ubuntu-ports/', suites: [focal, focal-updates]}}
        files:
          - {{path: /etc/motd, source: files/motd}}
        """,
    )
    write(tmp_path / "site/site.yaml", "extends: ../base/common.yaml\nhostname: site\n")
    r = load(
        tmp_path,
        """\
        extends: site/site.yaml
        name: child
        description: null
        base: {url: https://e.example/b.img}
        output: {zip: true}
        apt: {suites: [jammy]}
        """,
    )
    assert r.extends == (tmp_path / "site/site.yaml", tmp_path / "base/common.yaml")
    assert (r.name, r.hostname, r.description) == ("child", "site", "")
    # base is replaced whole: the parent's sha256 does not stick to another URL
    assert bare(r.base) == InputSpec(url="https://e.example/b.img") and r.base.where == "recipe.yaml:4 base"
    assert (r.output.image, r.output.zip, r.output.volume_label) == (True, True, "PARENT")
    assert r.apt.mirror == "https://a.example/ubuntu-ports/" and r.apt.suites == ("jammy",)
    # paths are relative to the file that declares them
    assert r.files[0].source == tmp_path / "base/files/motd"
    assert r.files[0].where == "base/common.yaml:8 files[0]"


def test_error_in_extended_file_names_that_file(tmp_path: Path) -> None:
    parent = write(
        tmp_path / "parent.yaml", "name: p\nnetwork:\n  ethernets:\n    eth1: {addresses: [10.0.0.1/40]}\n"
    )
    e, _ = fails(tmp_path, f"extends: parent.yaml\nbase: {{url: https://e.example/a, sha256: {SHA}}}\n")
    assert e.where == f"parent.yaml:{loc(parent, '10.0.0.1')}: network.ethernets.eth1.addresses[0]"
    write(tmp_path / "parent.yaml", "name: p\nhostnam: x\n")
    e, _ = fails(tmp_path, f"extends: parent.yaml\nbase: {{url: https://e.example/a, sha256: {SHA}}}\n")
    assert e.where == "parent.yaml:2:1: hostnam"
    write(tmp_path / "parent.yaml", "name: p\nhostname: [x\n")
    e, _ = fails(tmp_path, "extends: parent.yaml\n")
    assert e.where.startswith("parent.yaml:") and "YAML syntax error" in e.message


def test_extends_cycle_and_missing(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "a.yaml")
    assert info.value.where == "b.yaml:1:10: extends" and "a.yaml -> b.yaml -> a.yaml" in info.value.message
    e, _ = fails(tmp_path, "extends: recipe.yaml\nname: x\n")
    assert "cycle" in e.message
    (tmp_path / "link.yaml").symlink_to(tmp_path / "recipe.yaml")
    e, _ = fails(tmp_path, "extends: link.yaml\nname: x\n")
    assert e.message == "`extends` makes a cycle: recipe.yaml -> link.yaml"
    e, _ = fails(tmp_path, "extends: none.yaml\nname: x\n")
    assert e.where == "recipe.yaml:1:10: extends" and "does not exist" in e.message


def test_extends_merge_can_make_a_conflict_that_null_resolves(tmp_path: Path) -> None:
    write(
        tmp_path / "p.yaml",
        "name: p\nbase: {path: .}\nfiles:\n  - {path: /a, content: x}\n"
        "apps:\n  w:\n    path: /data/w\n    source: {path: .}\n",
    )
    r = load(
        tmp_path,
        "extends: p.yaml\napps:\n  w:\n    source: {url: 'https://e.example/w.tgz'}\n    owner: linaro\n",
    )
    assert r.apps[0].source.input.url == "https://e.example/w.tgz" and r.apps[0].source.input.path is None
    assert r.apps[0].owner == Owner("linaro") and r.apps[0].path == "/data/w"
    r = load(tmp_path, "extends: p.yaml\nfiles: null\n")
    assert r.files == ()


# ---------------------------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (4096, 4096), ("4096", 4096), ("12GiB", 12 * 2**30), ("12G", 12 * 2**30), ("12g", 12 * 2**30),
        ("512MiB", 512 * 2**20), ("512M", 512 * 2**20), ("1.5GiB", 3 * 2**29), ("0.5K", 512),
        (" 3 KiB ", 3072), ("1T", 2**40), ("2PiB", 2**51), ("7B", 7), ("1.1GiB", 1181116006), (".5k", 512),
    ],
)  # fmt: skip
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (-1, "negative"), ("-1G", "negative"), ("12GB", "ambiguous"), ("12 furlongs", "unknown size unit"),
        ("", "not a size"), ("G", "not a size"), ("1..2G", "not a size"),
        (True, "not"), (1.5, "not"), (None, "not"),
    ],
)  # fmt: skip
def test_parse_size_refuses(text: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_size(text)


@given(
    st.integers(min_value=0, max_value=2**60),
    st.sampled_from(["", "B", "K", "KiB", "M", "MiB", "G", "GiB", "T"]),
)
def test_parse_size_integers_roundtrip(number: int, unit: str) -> None:
    factor = {
        "": 1,
        "B": 1,
        "K": 2**10,
        "KiB": 2**10,
        "M": 2**20,
        "MiB": 2**20,
        "G": 2**30,
        "GiB": 2**30,
        "T": 2**40,
    }
    assert parse_size(f"{number}{unit}") == number * factor[unit]


def test_format_size() -> None:
    assert [format_size(n) for n in (12 * 2**30, 3 * 2**19, 4096, 100)] == [
        "12 GiB",
        "1.5 MiB",
        "4 KiB",
        "100 B",
    ]


# ---------------------------------------------------------------------------------------------
# Property: whatever the YAML, the loader answers with a Recipe or a RecipeError, nothing else.
# ---------------------------------------------------------------------------------------------

KEYS = [
    "name", "description", "extends", "base", "url", "path", "parts", "sha256", "md5", "size", "vars",
    "hostname", "network", "ethernets", "bonds", "eth0", "eth1", "bond0", "dhcp4", "addresses", "gateway4",
    "gateway6", "nameservers", "search", "routes", "to", "via", "on-link", "match", "set-name", "macaddress",
    "mtu", "optional", "interfaces", "parameters", "mode", "primary", "apt", "mirror", "suites", "components",
    "pip", "index_url", "trusted_host", "extra_index_urls", "users", "linaro", "ssh_authorized_keys",
    "password_hash", "password", "files", "content", "source", "template", "owner", "layer", "overlays",
    "remove", "services", "enable", "disable", "apps", "app", "models", "dest", "extract", "strip_components",
    "python", "lock", "target", "platform", "service", "exec", "user", "port", "environment", "after", "dirs",
    "layout", "DATA", "mirrors", "output", "image", "zip", "shrink", "volume_label", "<<", "https://github.com/",
    "",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from([
        "192.168.1.1/24", "192.168.1.254", "10.0.0.1", "fd00::1/64", "fe80::1", "https://e.example/x",
        "http://e.x/y", "file:///tmp/x", "/etc/motd", "../x", "a/../../b", "0644", "root:root", "linaro",
        "$6$a$b", SHA, MD5, "12GiB", "eth0", "bond0", "active-backup", "x.service", ".", "recipe.yaml",
        "AIRBOX", "3.8", "default",
    ]),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=12,
)
SECTIONS = [
    "description", "extends", "vars", "hostname", "network", "apt", "pip", "users", "files", "overlays",
    "remove", "services", "apps", "layout", "mirrors", "output", "password",
]  # fmt: skip
TOP = st.builds(
    lambda name, base, rest: {"name": name, "base": base, **rest},
    st.one_of(st.just("t"), SCALARS),
    st.one_of(st.just({"path": "."}), VALUES),
    st.dictionaries(st.sampled_from(SECTIONS), VALUES, max_size=4),
)


def _only_recipe_errors(path: Path, shown: str) -> None:
    try:
        result = load_recipe(path)
    except RecipeError as exc:
        assert exc.where and exc.where.startswith(shown), exc.where
        return
    assert isinstance(result, Recipe)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=TOP)
def test_random_mappings_give_a_recipe_or_a_recipe_error(tmp_path: Path, document: dict) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    _only_recipe_errors(path, "r.yaml")


FULL_DOCUMENT = yaml.safe_load(FULL)
FAST_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _node_paths(value: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _node_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += _node_paths(child, (*prefix, i))
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_full_recipe_gives_a_recipe_or_a_recipe_error(tmp_path: Path, data: st.DataObject) -> None:
    # Random values deep inside a valid recipe reach every section's checks.
    path = (
        make_full(tmp_path)
        if not (tmp_path / "recipes/recipe.yaml").exists()
        else tmp_path / "recipes/recipe.yaml"
    )
    document = copy.deepcopy(FULL_DOCUMENT)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="mutations")):
        where = data.draw(st.sampled_from(_node_paths(document)[1:]), label="at")
        parent = document
        for part in where[:-1]:
            parent = parent[part]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
        if action == "delete":
            del parent[where[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(KEYS), label="key")] = data.draw(VALUES, label="value")
        else:
            parent[where[-1]] = data.draw(VALUES, label="value")
    path.write_text(yaml.dump(document, Dumper=FAST_DUMPER, allow_unicode=True))
    _only_recipe_errors(path, "recipes/recipe.yaml")


def test_full_recipe_survives_a_yaml_round_trip(tmp_path: Path) -> None:
    path = make_full(tmp_path)
    path.write_text(yaml.safe_dump(yaml.safe_load(FULL)))
    assert load_recipe(path).apps[0].models[1].extract == "models/basic"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(
        alphabet=st.sampled_from([*list("ab: -[]{},&*!|>'\"#%@`\n\t\\0189.<~?"), "\x00", "é"]), max_size=80
    )
)
def test_random_text_gives_a_recipe_or_a_recipe_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    _only_recipe_errors(path, "r.yaml")
