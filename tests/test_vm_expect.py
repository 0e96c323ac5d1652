"""What `boot --check` expects of a box, read from its recipe and build report (no VM needed)."""

from __future__ import annotations

from pathlib import Path

import vendor_fixture as vf
from buildhelp import write_recipe

from builder.recipe import load_recipe
from builder.vm.check import expectations


def test_expectations_from_recipe_and_report(vendor_package_session: vf.MiniPackage, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package_session.dir,
        name="exp",
        hostname="box-1",
        network={
            "ethernets": {
                "eth1": {
                    "addresses": ["192.168.150.7/24"],
                    "gateway4": "192.168.150.254",
                    "nameservers": ["223.5.5.5"],
                    "routes": [{"to": "10.0.0.0/8", "via": "192.168.150.1"}],
                }
            }
        },
        users={
            "linaro": {
                "ssh_authorized_keys": [
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExampleExample1 me"
                ]
            }
        },
        files=[
            {"path": "/etc/ssh/sshd_config.d/10.conf", "content": "# hardening\nPasswordAuthentication no\n"}
        ],
        services={"enable": ["a.service"], "disable": ["apt-daily.timer"]},
    )
    report = {
        "apps": [{"name": "sd", "unit": "sd.service", "port": 8999}],
        "changes": [
            {
                "action": "added",
                "type": "file",
                "device_path": "/etc/x",
                "sha256": "a" * 64,
                "origin": "r:3 files[0]",
            },
            {
                "action": "added",
                "type": "file",
                "device_path": "/data/SD/gr.py",
                "sha256": "b" * 64,
                "origin": "r:9 apps.sd",
            },
            {"action": "removed", "type": "file", "device_path": "/etc/motd", "origin": "r:2 remove[0]"},
            # removed from ROOTFS_RW's upper layer and written anew: not a removal on the box
            {"action": "removed", "type": "file", "device_path": "/etc/y", "origin": "r:4"},
            {
                "action": "changed",
                "type": "file",
                "device_path": "/etc/y",
                "sha256": "c" * 64,
                "origin": "r:4 files[1]",
            },
        ],
    }
    e = expectations(load_recipe(recipe), report)
    assert e.hostname == "box-1"
    assert e.addresses == {"eth1": ("192.168.150.7/24",)} and e.gateways == {"eth1": "192.168.150.254"}
    assert e.routes == {"eth1": (("10.0.0.0/8", "192.168.150.1"),)}
    assert e.nameservers == {"eth1": ("223.5.5.5",)}
    assert e.password_auth is False
    assert e.units == ("a.service", "sd.service") and e.disabled == ("apt-daily.timer",)
    assert e.ports == {"sd": 8999}
    assert [c["device_path"] for c in e.files] == ["/etc/x", "/etc/y"]  # app trees are not hashed on the box
    assert e.removed == ("/etc/motd",)
    assert list(e.users) == ["linaro"]


def test_without_a_recipe_the_report_still_says_what_to_check() -> None:
    e = expectations(None, {"apps": [{"name": "a", "unit": "a.service", "port": None}], "changes": []})
    assert e.units == ("a.service",) and e.ports == {} and e.hostname is None and e.password_auth is None
