"""The app's systemd unit: rendered from a real recipe, checked by systemd's own parser."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.customise.unit import environment_line, environment_of, render_app_unit
from builder.errors import BuildError
from builder.recipe import App, load_recipe

SHA = "ab" * 32
RECIPE = f"""\
name: t
base: {{url: https://example.com/x.img, sha256: {SHA}}}
apps:
  sd-lcm-tpu:
    path: /data/SD-lcm-tpu
    owner: linaro:linaro
    source:
      url: https://github.com/zifeng-radxa/SD-lcm-tpu/archive/ee2a9cb5.tar.gz
      strip_components: 1
    python:
      lock: sd-lcm-tpu.lock
      python: "3.8.10"
    service:
      exec: python3 gr.py
      port: 8999
"""


def load_app(tmp_path: Path, text: str = RECIPE) -> App:
    (tmp_path / "recipe.yaml").write_text(text)
    return load_recipe(tmp_path / "recipe.yaml", check_files=False).apps[0]


def systemd_verify(tmp_path: Path, name: str, text: str) -> str:
    """systemd-analyze's complaints about a unit file (empty: it parsed cleanly)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "units" / name
    unit.parent.mkdir(exist_ok=True)
    unit.write_text(text)
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, check=False)
    return (proc.stdout + proc.stderr).strip()


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_flagship_unit(tmp_path: Path) -> None:
    unit = render_app_unit(load_app(tmp_path))
    assert unit.name == "sd-lcm-tpu.service"
    assert unit.path == "/etc/systemd/system/sd-lcm-tpu.service"
    assert unit.enable_link == "/etc/systemd/system/multi-user.target.wants/sd-lcm-tpu.service"
    assert unit.enable_target == unit.path
    assert (unit.user, unit.port) == ("linaro", 8999)
    body = lines(unit.text)
    for expected in (
        "[Unit]",
        "After=network.target bmrt_loadko.service bmrt_setup.service",
        "Wants=bmrt_loadko.service bmrt_setup.service",
        "RequiresMountsFor=/data/SD-lcm-tpu /opt",
        "User=linaro",
        "Group=linaro",
        "WorkingDirectory=/data/SD-lcm-tpu",
        "ExecStart=python3 gr.py",
        "Restart=on-failure",
        "WantedBy=multi-user.target",
    ):
        assert expected in body, expected
    assert environment_of(unit.text) == {
        "PYTHONPATH": "/data/SD-lcm-tpu/.pydeps:/opt/sophon/sophon-opencv-latest/opencv-python",
        "LD_LIBRARY_PATH": "/opt/sophon/libsophon-current/lib",
        "HF_HUB_OFFLINE": "1",
    }
    assert systemd_verify(tmp_path, unit.name, unit.text) == ""


def test_recipe_environment_user_and_ordering(tmp_path: Path) -> None:
    text = RECIPE + textwrap.indent(
        textwrap.dedent(
            """\
            user: ai
            name: sd.service
            enable: false
            environment: {PYTHONPATH: "/data/extra:/opt/sophon/sophon-opencv-latest/opencv-python",
                          LD_LIBRARY_PATH: /usr/local/lib, HF_HUB_OFFLINE: 0,
                          GREETING: 'say "hi" \\ to 50% of C:\\temp'}
            after: [redis.service, network-online.target]
            """
        ),
        "      ",
    )
    unit = render_app_unit(load_app(tmp_path, text))
    assert unit.name == "sd.service" and unit.enable_link is None and unit.enable_target is None
    body = lines(unit.text)
    assert "User=ai" in body and not any(line.startswith("Group=") for line in body)
    assert (
        "After=network.target bmrt_loadko.service bmrt_setup.service redis.service network-online.target"
        in body
    )
    assert "Wants=bmrt_loadko.service bmrt_setup.service redis.service" in body
    env = environment_of(unit.text)
    assert (
        env["PYTHONPATH"]
        == "/data/SD-lcm-tpu/.pydeps:/opt/sophon/sophon-opencv-latest/opencv-python:/data/extra"
    )
    assert env["LD_LIBRARY_PATH"] == "/opt/sophon/libsophon-current/lib:/usr/local/lib"
    assert env["HF_HUB_OFFLINE"] == "0"
    assert env["GREETING"] == 'say "hi" \\ to 50% of C:\\temp'
    assert 'Environment="GREETING=say \\"hi\\" \\\\ to 50%% of C:\\\\temp"' in body
    assert systemd_verify(tmp_path, unit.name, unit.text) == ""


def test_without_owner_or_python_runs_as_root(tmp_path: Path) -> None:
    text = f"""\
name: t
base: {{url: https://example.com/x.img, sha256: {SHA}}}
apps:
  web:
    path: /data/web
    service: {{exec: "/usr/bin/python3 -m http.server 8080 --bind 0.0.0.0 # 100%"}}
"""
    unit = render_app_unit(load_app(tmp_path, text))
    assert unit.user == "root" and unit.port is None
    assert "ExecStart=/usr/bin/python3 -m http.server 8080 --bind 0.0.0.0 # 100%%" in lines(unit.text)
    assert environment_of(unit.text)["PYTHONPATH"] == "/opt/sophon/sophon-opencv-latest/opencv-python"


def test_app_without_service(tmp_path: Path) -> None:
    text = (
        f"name: t\nbase: {{url: https://example.com/x.img, sha256: {SHA}}}\napps:\n  a: {{path: /data/a}}\n"
    )
    with pytest.raises(BuildError, match="has no `service:`"):
        render_app_unit(load_app(tmp_path, text))


def test_systemd_catches_a_broken_line(tmp_path: Path) -> None:
    """The verifier used above does report bad quoting (so its silence means something)."""
    unit = render_app_unit(load_app(tmp_path))
    broken = unit.text.replace('Environment="HF_HUB_OFFLINE=1"', 'Environment="HF_HUB_OFFLINE=1')
    assert "HF_HUB_OFFLINE" in systemd_verify(tmp_path, unit.name, broken)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, blacklist_characters="\x7f"), max_size=40))
def test_environment_quoting_round_trips(value: str) -> None:
    line = "Environment=" + environment_line("K", value)
    assert environment_of(line) == {"K": value}
    inner = line[len('Environment="') : -1]
    # No unescaped quote can end the word early, and no lone % reaches the specifier parser.
    assert '"' not in inner.replace('\\"', "").replace("\\\\", "")
    assert "%" not in inner.replace("%%", "")
