"""A fleet from one recipe, end to end on the miniature package: first-boot identity, accounts,
time and locale, per-device bundles as deltas on one shared build, read back from each device's
simulated flash with debugfs, e2fsck, pwck and grpck."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import vendor_fixture as vf
import yaml
from buildhelp import cli, debugfs, write_recipe
from faultkit import build_args, stalled, start_cli
from test_customise import cat, simulate, stat

OPS_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOpsOpsOpsOpsOpsOpsOpsOpsOpsOpsOpsOpsOpsOpsOps ops@laptop"
FLEET = {
    "identity": {"ssh_host_keys": "per-device"},
    "ssh": {"password_authentication": False, "permit_root_login": False},
    "timezone": "Europe/Berlin",
    "locale": "en_US.UTF-8",
    "ntp": ["ntp.aliyun.com", "203.107.6.88"],
    "users": {
        "ops": {"create": True, "groups": ["sudo", "video"], "ssh_authorized_keys": [OPS_KEY]},
        "linaro": {"lock": True},
    },
    "devices": [
        {
            "name": "site-a",
            "hostname": "airbox-a",
            "network": {"ethernets": {"eth1": {"addresses": ["192.168.150.11/24"]}}},
            "vars": {"site": "A"},
        },
        {
            "name": "site-b",
            "hostname": "airbox-b",
            "network": {"ethernets": {"eth1": {"addresses": ["192.168.150.12/24"]}}},
        },
        {"name": "site-c", "hostname": "airbox-c", "identity": {"ssh_host_keys": "regenerate"}},
    ],
}
ROOT_EXT4 = ("ROOTFS", "ROOTFS_RW", "OPT", "DATA", "RECOVERY")


@pytest.fixture(scope="module")
def vendor_ident(tmp_path_factory: pytest.TempPathFactory) -> vf.MiniPackage:
    return vf.build_package(tmp_path_factory.mktemp("vendor-ident"), vendor_identity=True)


@pytest.fixture(scope="module")
def fleet(vendor_ident: vf.MiniPackage, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("fleet")
    recipe = write_recipe(tmp / "r", vendor_ident.dir, "fleet", **FLEET)
    res = cli("--json", recipe, "-o", tmp / "out", "--cache-dir", tmp / "cache")
    assert res.returncode == 0, res.stderr
    root = tmp / "out" / "fleet"
    parts = {}
    for name in ("site-a", "site-b", "site-c"):
        (tmp / f"flash-{name}").mkdir()
        parts[name] = simulate(root / name, tmp / f"flash-{name}")
    return root, parts, res, recipe, tmp


def _ls(image: Path, path: str) -> list[str]:
    out = debugfs(image, f"ls -l {path}")
    return [
        line.split()[-1] for line in out.splitlines() if line.strip() and line.split()[-1] not in (".", "..")
    ]


def test_no_vendor_identity_is_left_in_either_layer(fleet) -> None:  # type: ignore[no-untyped-def]
    _root, parts, _res, _recipe, _tmp = fleet
    vendor = {vf.vendor_host_key(k, False).encode() for k in vf.VENDOR_KEY_TYPES}
    vendor |= {vf.vendor_host_key(k, True).encode() for k in vf.VENDOR_KEY_TYPES}
    for name, p in parts.items():
        rootfs, rw = p / "ROOTFS.img", p / "ROOTFS_RW.img"
        for f in _ls(rootfs, "/etc/ssh"):
            if f.startswith("ssh_host_"):
                assert cat(rootfs, f"/etc/ssh/{f}") not in vendor, (name, f)
        assert not [f for f in _ls(rw, "/overlay/etc/ssh") if f.startswith("ssh_host_")], name
        assert cat(rootfs, "/etc/machine-id") == b"", name
        assert stat(rootfs, "/etc/machine-id")["mode"] == 0o444
        assert "machine-id" not in _ls(rw, "/overlay/etc"), name
        assert "machine-id" not in _ls(rw, "/overlay/var/lib/dbus"), name
        link = debugfs(rootfs, "stat /var/lib/dbus/machine-id")
        assert "Type: symlink" in link and '"/etc/machine-id"' in link, name


def test_per_device_keys_differ_and_match_known_hosts(fleet) -> None:  # type: ignore[no-untyped-def]
    root, parts, _res, _recipe, _tmp = fleet
    known = (root / "known_hosts").read_text().splitlines()
    assert len(known) == 6  # site-a and site-b, three key types each; site-c makes its own on the box
    seen = {}
    for name, host, addr in (
        ("site-a", "airbox-a", "192.168.150.11"),
        ("site-b", "airbox-b", "192.168.150.12"),
    ):
        rootfs = parts[name] / "ROOTFS.img"
        pubs = []
        for kind in ("ed25519", "ecdsa", "rsa"):
            st = stat(rootfs, f"/etc/ssh/ssh_host_{kind}_key")
            assert (st["mode"], st["uid"], st["gid"]) == (0o600, 0, 0)
            assert stat(rootfs, f"/etc/ssh/ssh_host_{kind}_key.pub")["mode"] == 0o644
            pub = " ".join(cat(rootfs, f"/etc/ssh/ssh_host_{kind}_key.pub").decode().split()[:2])
            assert f"{host},{addr} {pub}" in known
            private = cat(rootfs, f"/etc/ssh/ssh_host_{kind}_key")
            assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
            pubs.append(pub)
        bundle_known = (root / name / "known_hosts").read_text().splitlines()
        assert [line.split(None, 1)[1] for line in bundle_known] == pubs
        seen[name] = set(pubs)
    assert not seen["site-a"] & seen["site-b"]
    fleet_json = json.loads((root / "fleet.json").read_text())
    assert fleet_json["devices"]["site-a"]["hostname"] == "airbox-a"
    assert fleet_json["devices"]["site-a"]["addresses"] == ["192.168.150.11"]
    assert len(fleet_json["devices"]["site-a"]["host_keys"]) == 3
    assert "host_keys" not in fleet_json["devices"]["site-c"]


def test_regenerate_device_gets_the_first_boot_unit_before_sshd(fleet) -> None:  # type: ignore[no-untyped-def]
    _root, parts, _res, _recipe, _tmp = fleet
    rootfs = parts["site-c"] / "ROOTFS.img"
    assert not [f for f in _ls(rootfs, "/etc/ssh") if f.startswith("ssh_host_")]
    unit = cat(rootfs, "/etc/systemd/system/airbox-ssh-host-keys.service").decode()
    assert "ExecStart=/usr/bin/ssh-keygen -A" in unit and "Before=ssh.service" in unit
    for wants in ("multi-user.target.wants", "ssh.service.wants"):
        assert "airbox-ssh-host-keys.service" in _ls(rootfs, f"/etc/systemd/system/{wants}")
    # the per-device boxes do not need it
    assert "airbox-ssh-host-keys.service" not in _ls(parts["site-a"] / "ROOTFS.img", "/etc/systemd/system")


def test_accounts_are_made_like_adduser_and_stay_consistent(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _root, parts, _res, _recipe, _tmp = fleet
    rootfs = parts["site-b"] / "ROOTFS.img"
    passwd = cat(rootfs, "/etc/passwd").decode()
    group = cat(rootfs, "/etc/group").decode()
    shadow = cat(rootfs, "/etc/shadow").decode()
    gshadow = cat(rootfs, "/etc/gshadow").decode()
    assert "ops:x:1002:1002:,,,:/home/ops:/bin/bash\n" in passwd  # first free uid >= UID_MIN
    assert "ops:x:1002:\n" in group  # its user-private group
    assert "sudo:x:27:linaro,admin,ops\n" in group and "video:x:44:linaro,ops\n" in group
    assert "ops:!::\n" in gshadow and "sudo:*::linaro,admin,ops\n" in gshadow
    ops_shadow = next(line for line in shadow.splitlines() if line.startswith("ops:"))
    assert ops_shadow.split(":")[1] == "!"  # no password: key login only
    linaro = next(line for line in shadow.splitlines() if line.startswith("linaro:"))
    assert linaro.split(":")[1].startswith("!$6$fixture1$")  # locked, hash kept
    assert stat(rootfs, "/etc/shadow") | {} == {"type": "regular", "mode": 0o640, "uid": 0, "gid": 42}
    home = stat(rootfs, "/home/ops")
    assert (home["type"], home["mode"], home["uid"], home["gid"]) == ("directory", 0o755, 1002, 1002)
    for name, text in vf.SKEL.items():
        assert cat(rootfs, f"/home/ops/{name}").decode() == text
        st = stat(rootfs, f"/home/ops/{name}")
        assert (st["uid"], st["gid"]) == (1002, 1002)
    assert cat(rootfs, "/home/ops/.ssh/authorized_keys").decode() == OPS_KEY + "\n"
    assert stat(rootfs, "/home/ops/.ssh/authorized_keys")["uid"] == 1002
    # the box's own consistency checks, on the files read back, in a root of their own
    etc = tmp_path / "root" / "etc"
    etc.mkdir(parents=True)
    for name, text in (("passwd", passwd), ("group", group), ("shadow", shadow), ("gshadow", gshadow)):
        (etc / name).write_text(text)
    for tool in ("pwck", "grpck"):
        if os.geteuid() == 0:
            p = subprocess.run([tool, "-r", "-R", tmp_path / "root"], capture_output=True, text=True)
        else:  # no chroot: the files by name, users looked up on this machine
            names = ("passwd", "shadow") if tool == "pwck" else ("group", "gshadow")
            p = subprocess.run([tool, "-r", *(etc / n for n in names)], capture_output=True, text=True)
        # homes and shells are on the image, not in this root: pwck may complain only about them
        skip = ("directory '", "program '", "no user", "no changes")
        out = [ln for ln in (p.stdout + p.stderr).splitlines() if not any(s in ln for s in skip)]
        assert not out, (tool, p.stdout + p.stderr)


def test_time_locale_ntp_ssh_and_each_devices_own_settings(fleet) -> None:  # type: ignore[no-untyped-def]
    _root, parts, _res, _recipe, _tmp = fleet
    for name, host in (("site-a", "airbox-a"), ("site-b", "airbox-b"), ("site-c", "airbox-c")):
        rootfs = parts[name] / "ROOTFS.img"
        lt = debugfs(rootfs, "stat /etc/localtime")
        assert "Type: symlink" in lt and '"/usr/share/zoneinfo/Europe/Berlin"' in lt
        assert cat(rootfs, "/etc/timezone") == b"Europe/Berlin\n"
        assert cat(rootfs, "/etc/default/locale") == b"LANG=en_US.UTF-8\n"
        ntp = cat(rootfs, "/etc/systemd/timesyncd.conf.d/50-airbox-build.conf").decode()
        assert "[Time]\nNTP=ntp.aliyun.com 203.107.6.88\n" in ntp
        drop = cat(rootfs, "/etc/ssh/sshd_config.d/00-airbox-build.conf").decode()
        assert "PasswordAuthentication no\n" in drop and "PermitRootLogin no\n" in drop
        assert cat(rootfs, "/etc/hostname") == f"{host}\n".encode()
        assert f"127.0.1.1\t{host}\n" in cat(rootfs, "/etc/hosts").decode()
        netplan = cat(rootfs, "/etc/netplan/01-netcfg.yaml").decode()
        if name != "site-c":
            addr = {"site-a": "192.168.150.11/24", "site-b": "192.168.150.12/24"}[name]
            assert addr in netplan
        else:
            assert "netplan" not in netplan or "192.168.150.1" in netplan  # the vendor's, untouched
        for label in ROOT_EXT4:
            img = parts[name] / f"{label}.img"
            fsck = subprocess.run(["e2fsck", "-fn", img], capture_output=True, text=True)
            assert fsck.returncode == 0, (name, label, fsck.stdout)


def test_devices_are_deltas_hard_linked_to_the_shared_build(fleet) -> None:  # type: ignore[no-untyped-def]
    root, _parts, _res, _recipe, _tmp = fleet
    shared = root / "_shared" / "card"
    linked = {}
    for name in ("site-a", "site-b", "site-c"):
        card = root / name / "card"
        assert sorted(p.name for p in card.iterdir()) == sorted(p.name for p in shared.iterdir())
        same = [p.name for p in card.iterdir() if p.read_bytes() == (shared / p.name).read_bytes()]
        linked[name] = same
        for n in same:
            assert (card / n).stat().st_ino == (shared / n).stat().st_ino, (name, n)
        changed = set(p.name for p in card.iterdir()) - set(same)
        # only ROOTFS(_RW) chunks, their scripts and md5.txt differ from the shared build
        assert changed and all(
            n.startswith(("rootfs", "boot_emmc-rootfs")) or n == "md5.txt" for n in changed
        ), changed
        assert any(n.startswith("rootfs.") and n.endswith(".gz") for n in same)  # untouched ROOTFS chunks
        report = json.loads((root / name / "build-report.json").read_text())
        assert report["recipe"]["device"] == name and report["fleet"]["shared"] == "_shared"
        assert report["base"]["input"] != str(shared)  # the vendor package, not the shared build
    # a chunk no device touched is the same file in all three
    common = set(linked["site-a"]) & set(linked["site-b"]) & set(linked["site-c"])
    assert any(n.startswith("rootfs.") for n in common)


def test_private_keys_never_reach_report_logs_or_json(fleet) -> None:  # type: ignore[no-untyped-def]
    root, _parts, res, _recipe, tmp = fleet
    secrets = []
    for device in ("site-a", "site-b"):
        folder = tmp / "out" / "fleet.host-keys" / device
        assert folder.stat().st_mode & 0o777 == 0o700
        for kind in ("ed25519", "ecdsa", "rsa"):
            key = folder / f"ssh_host_{kind}_key"
            assert key.stat().st_mode & 0o777 == 0o600
            body = key.read_text().splitlines()[1]  # a line of the base64 body
            secrets.append(body)
    texts = [res.stdout, res.stderr, (root / "fleet.json").read_text(), (root / "known_hosts").read_text()]
    for p in root.rglob("*"):
        if p.is_file() and p.suffix in (".json", "") and "card" not in p.parts:
            texts.append(p.read_text(errors="replace"))
    for s in secrets:
        assert not any(s in t for t in texts)
    report = json.loads((root / "site-a" / "build-report.json").read_text())
    keys = [c for c in report["changes"] if re.fullmatch(r"/etc/ssh/ssh_host_\w+_key", c["device_path"])]
    assert keys and all(
        c.get("diff") in (None, "(diff redacted: the file holds password hashes or a private key)")
        for c in keys
    )


def test_rerun_finishes_only_what_is_missing(fleet) -> None:  # type: ignore[no-untyped-def]
    root, _parts, _res, recipe, tmp = fleet
    out = tmp / "out2"
    first = cli("--json", recipe, "-o", out, "--cache-dir", tmp / "cache", "--device", "site-b")
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (out / "fleet").iterdir() if p.is_dir()) == ["_shared", "site-b"]
    b_ino = (out / "fleet" / "site-b" / "build-report.json").stat().st_ino
    again = cli("--json", recipe, "-o", out, "--cache-dir", tmp / "cache")
    assert again.returncode == 0, again.stderr
    result = [json.loads(line) for line in again.stdout.splitlines() if '"result"' in line][-1]
    assert result["kept"] == ["site-b"]
    assert (out / "fleet" / "site-b" / "build-report.json").stat().st_ino == b_ino  # not rebuilt
    assert sorted(json.loads((out / "fleet" / "fleet.json").read_text())["devices"]) == [
        "site-a",
        "site-b",
        "site-c",
    ]
    # keys are kept beside the output: a rebuild gives every box the key it had
    assert (out / "fleet" / "known_hosts").read_text().count("airbox-a") == 3
    # the same device built into another output with its keys copied gives the same bundle
    for device in ("site-a",):
        a, b = root / device / "known_hosts", out / "fleet" / device / "known_hosts"
        assert a.read_text() != b.read_text()  # other output, other keys (made there)
    # boot names a device when given the fleet's folder (no VM is started)
    fleet_boot = cli("boot", out / "fleet")
    assert fleet_boot.returncode == 1 and "is a fleet: boot one device's bundle" in fleet_boot.stderr
    # write and verify take a device's folder
    ver = cli("verify", out / "fleet" / "site-a")
    assert ver.returncode == 0, ver.stderr
    target = tmp / "card-site-a"
    target.mkdir()
    wr = cli("write", out / "fleet" / "site-a", target, "--yes", "--allow-non-fat")
    assert wr.returncode == 0, wr.stderr
    assert (target / "md5.txt").read_bytes() == (out / "fleet" / "site-a" / "card" / "md5.txt").read_bytes()


def test_killed_fleet_leaves_each_device_complete_or_absent(
    vendor_ident: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "r", vendor_ident.dir, "fleet", **FLEET)
    out, cache = tmp_path / "out", tmp_path / "cache"
    build = start_cli(build_args(recipe, out, cache), os.environ, stall_at="device:site-b")
    build.wait_for(stalled)
    build.signal(signal.SIGKILL)
    assert build.finish().returncode == -signal.SIGKILL
    root = out / "fleet"
    assert (root / "_shared" / "card").is_dir() and (root / "site-a" / "card").is_dir()
    assert not (root / "site-b").exists() and not (root / "site-c").exists()
    assert cli("verify", root / "site-a").returncode == 0
    again = cli("--json", recipe, "-o", out, "--cache-dir", cache)
    assert again.returncode == 0, again.stderr
    result = [json.loads(line) for line in again.stdout.splitlines() if '"result"' in line][-1]
    assert result["kept"] == ["site-a"]  # only what was missing was built
    for device in ("site-a", "site-b", "site-c"):
        assert cli("verify", root / device).returncode == 0
    assert not [p.name for p in root.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]


def test_one_bundle_with_per_device_keys_gets_known_hosts_and_keeps_its_keys(
    vendor_ident: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = write_recipe(
        tmp_path / "r",
        vendor_ident.dir,
        "solo",
        hostname="solo-1",
        identity={"ssh_host_keys": "per-device", "machine_id": "keep"},
    )
    res = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    assert "identity.machine_id: keep" in res.stderr
    known = (tmp_path / "out" / "solo" / "known_hosts").read_text()
    assert known.startswith("solo-1 ssh-ed25519 ")
    sums = (tmp_path / "out" / "solo" / "SHA256SUMS").read_text()
    again = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "out" / "solo" / "SHA256SUMS").read_text() == sums  # same keys: same bundle
    assert (tmp_path / "out" / "solo" / "known_hosts").read_text() == known


def test_keep_warns_and_changes_nothing(vendor_ident: vf.MiniPackage, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r", vendor_ident.dir, "keep", identity="keep")
    res = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    assert "identity.ssh_host_keys: keep" in res.stderr and "identity.machine_id: keep" in res.stderr
    card = tmp_path / "out" / "keep" / "card"
    for p in vendor_ident.dir.iterdir():
        assert (card / p.name).read_bytes() == p.read_bytes(), p.name


def test_default_passwords_warn_until_fixed(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    plain = write_recipe(tmp_path / "a", vendor_package.dir, "plain", hostname="box")
    res = cli(plain, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    assert "user linaro keeps the vendor's public password ('linaro')" in res.stderr
    assert "user admin keeps the vendor's public password ('admin')" in res.stderr
    assert "lock: true" in res.stderr and "password_authentication: false" in res.stderr
    fixed = write_recipe(
        tmp_path / "b",
        vendor_package.dir,
        "fixed",
        hostname="box",
        users={"linaro": {"lock": True}},
        ssh={"password_authentication": False},
    )
    res = cli(fixed, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    assert "public password" not in res.stderr
    locked = write_recipe(
        tmp_path / "c",
        vendor_package.dir,
        "locked",
        users={"linaro": {"lock": True}, "admin": {"lock": True}},
    )
    res = cli(locked, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0 and "public password" not in res.stderr, res.stderr


def test_fleet_keep_warns_once_and_images_are_named_by_device(
    vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package.dir,
        "imgfleet",
        identity="keep",
        output={"zip": True},
        devices=[{"name": "one", "hostname": "box-1"}, {"name": "two", "hostname": "box-2"}],
    )
    res = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("identity.ssh_host_keys: keep") == 1
    root = tmp_path / "out" / "imgfleet"
    assert (root / "one" / "imgfleet-one.zip").is_file() and (root / "two" / "imgfleet-two.zip").is_file()
    assert not list((root / "_shared").glob("*.zip"))


def test_csv_devices(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "devices.csv").write_text("name,hostname,vars.site\nn1,box-1,North\nn2,box-2,South\n")
    (tmp_path / "r" / "motd.j2").write_text("site {{ vars.site }} on {{ recipe.hostname }}\n")
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package.dir,
        "csvfleet",
        devices="devices.csv",
        identity="keep",
        files=[{"path": "/etc/motd", "template": "motd.j2"}],
    )
    res = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    for name, host, site in (("n1", "box-1", "North"), ("n2", "box-2", "South")):
        (tmp_path / f"f-{name}").mkdir()
        parts = simulate(tmp_path / "out" / "csvfleet" / name, tmp_path / f"f-{name}")
        assert cat(parts / "ROOTFS.img", "/etc/motd") == f"site {site} on {host}\n".encode()
        assert cat(parts / "ROOTFS.img", "/etc/hostname") == f"{host}\n".encode()


BAD_DEVICES = [
    (
        [{"name": "a", "hostname": "h1"}, {"name": "a", "hostname": "h2"}],
        r"name a is used by two devices: \S+:\d+ devices\[0\] and this one",
    ),
    (
        [{"name": "a", "hostname": "h1"}, {"name": "b", "hostname": "h1"}],
        r"hostname h1 is used by two devices: \S+:\d+ devices\[0\]",
    ),
    (
        [
            {"name": "a", "network": {"ethernets": {"eth1": {"addresses": ["10.0.0.5/24"]}}}},
            {"name": "b", "network": {"ethernets": {"eth0": {"addresses": ["10.0.0.5/16"]}}}},
        ],
        r"static address 10.0.0.5 is used by two devices",
    ),
    ([{"hostname": "h1"}], r"every device needs a `name`"),
    ([{"name": "a", "base": {"path": "."}}], r"unknown key `base`"),
    ([{"name": "_shared"}], r"not a valid device name"),
    ([], r"lists no device"),
]


@pytest.mark.parametrize(("devices", "message"), BAD_DEVICES)
def test_bad_devices_are_refused_before_any_work(
    devices: object, message: str, vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "r", vendor_package.dir, "bad", devices=devices)
    res = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 1
    assert re.search(message, res.stderr), res.stderr
    assert "bad.yaml:" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        (
            "name,hostname\na,h1\nb,h1\n",
            r"devices.csv:3:1: devices .*hostname h1 is used by two devices: \S*devices.csv:2",
        ),
        ("name,host\na,h1\n", r"devices.csv:1:1: .*unknown column `host`"),
        ("hostname\nh1\n", r"has no `name` column"),
        ("name,hostname\na\n", r"devices.csv:2:1: .*has 1 fields, the header 2"),
    ],
)
def test_bad_csv_devices_name_the_line(
    csv: str, message: str, vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "devices.csv").write_text(csv)
    recipe = write_recipe(tmp_path / "r", vendor_package.dir, "bad", devices="devices.csv")
    res = cli(recipe, "-o", tmp_path / "out")
    assert res.returncode == 1
    assert re.search(message, res.stderr), res.stderr


def test_unknown_device_option(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r", vendor_package.dir, "f", devices=[{"name": "a"}])
    res = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "c", "--device", "zz")
    assert res.returncode == 1 and "no device 'zz'" in res.stderr and "devices: a" in res.stderr
    solo = write_recipe(tmp_path / "s", vendor_package.dir, "s")
    res = cli(solo, "-o", tmp_path / "out", "--device", "a")
    assert res.returncode == 1 and "lists no `devices`" in res.stderr


BAD_SYSTEM = [
    ({"identity": {"ssh_host_keys": "rotate"}}, r"identity.ssh_host_keys: 'rotate' is not one of"),
    ({"identity": "yes"}, r"identity: 'yes' is not understood"),
    ({"timezone": "Mars/Olympus"}, r"time zone Mars/Olympus is not in the image"),
    ({"timezone": "Asia/Shanghia"}, r"did you mean Asia/Shanghai"),
    (
        {"locale": "de_DE.UTF-8"},
        r"locale de_DE.UTF-8 is not in the image.*hint: the image has: C.UTF-8, en_US.utf8",
    ),
    ({"ntp": []}, r"must list at least one server"),
    ({"ntp": ["bad host!"]}, r"not a host name or IP address"),
    ({"ssh": {}}, r"`ssh` sets nothing"),
    ({"ssh": {"permit_root_login": "maybe"}}, r"'maybe' is not one of"),
    ({"users": {"ops": {"uid": 1500}}}, r"`uid` applies to an account the recipe creates"),
    ({"users": {"ops": {"create": True, "uid": 1000}}}, r"uid 1000 is already linaro's"),
    (
        {"users": {"ops": {"create": True, "groups": ["wheel"]}}},
        r"group 'wheel' \(users.ops.groups\) does not exist",
    ),
    ({"users": {"linaro": {"lock": True, "password_hash": "$6$s$" + "a" * 86}}}, r"contradict"),
    ({"users": {"sudo": {"create": True}}}, r"a group named sudo already exists"),
    ({"users": {"ghost": {"lock": True}}}, r"user 'ghost' does not exist"),
]


@pytest.mark.parametrize(("sections", "message"), BAD_SYSTEM)
def test_bad_system_sections(
    sections: dict[str, object], message: str, vendor_package: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "r", vendor_package.dir, "bad", **sections)
    res = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 1, res.stderr
    assert re.search(message, res.stderr, re.S), res.stderr
    assert "Traceback" not in res.stderr


def test_sshd_config_without_include_is_refused(make_vendor_package, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for text, message in (
        ("PasswordAuthentication yes\n", "does not include /etc/ssh/sshd_config.d/\\*.conf"),
        (
            "PasswordAuthentication yes\nInclude /etc/ssh/sshd_config.d/*.conf\n",
            "sets PasswordAuthentication on line 1",
        ),
    ):
        pkg = make_vendor_package(extra_files={"ROOTFS": {"/etc/ssh/sshd_config": text}})
        recipe = write_recipe(tmp_path / "r", pkg.dir, "nosshd", ssh={"password_authentication": False})
        res = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
        assert res.returncode == 1
        assert re.search(message, res.stderr), res.stderr
        assert "hint: " in res.stderr


def test_ntp_needs_timesyncd(vendor_package: vf.MiniPackage, tmp_path: Path) -> None:
    # an image without systemd-timesyncd: the recipe's own removal takes it away first
    recipe = write_recipe(
        tmp_path / "r",
        vendor_package.dir,
        "nontp",
        remove=["/lib/systemd/system/systemd-timesyncd.service"],
        ntp=["pool.ntp.org"],
    )
    res = cli(recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 1
    assert "the image has no systemd-timesyncd.service" in res.stderr and "nontp.yaml:" in res.stderr


def test_recipe_yaml_round_trip_of_fleet_keys(tmp_path: Path) -> None:
    doc = {"name": "x", "base": {"path": str(tmp_path)}, **FLEET}
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(doc))
    from builder.recipe import load_recipe

    r = load_recipe(tmp_path / "x.yaml")
    assert [d.name for d in r.devices] == ["site-a", "site-b", "site-c"]
    a = r.devices[0].recipe
    assert a.hostname == "airbox-a" and a.device == "site-a" and a.vars == {"site": "A"}
    assert a.identity.ssh_host_keys == "per-device"
    assert r.devices[2].recipe.identity.ssh_host_keys == "regenerate"
    ops = next(u for u in r.users if u.name == "ops")
    assert ops.create and ops.groups == ("sudo", "video")
    assert os.path.basename(r.path) == "x.yaml"


# ---------------------------------------------------------------------------------------------
# Found by mutation testing (scripts/mutants.py): each test fails on a mutant that survived.


def _build_users(pkg: vf.MiniPackage, tmp_path: Path, users: dict) -> tuple[Path, dict]:  # type: ignore[type-arg]
    recipe = write_recipe(tmp_path / "r", pkg.dir, name="acc", users=users)
    res = cli("build", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out" / "acc"
    return simulate(out, tmp_path), json.loads((out / "build-report.json").read_text())


def test_a_new_account_takes_uid_min_from_the_images_login_defs(make_vendor_package, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    defs = vf.LOGIN_DEFS.replace("UID_MIN\t\t\t 1000", "UID_MIN\t\t\t 2000")
    assert defs != vf.LOGIN_DEFS
    pkg = make_vendor_package(extra_files={"ROOTFS": {"/etc/login.defs": defs}})
    parts, _ = _build_users(pkg, tmp_path, {"ops": {"create": True}})
    passwd = cat(parts / "ROOTFS.img", "/etc/passwd").decode()
    assert re.search(r"^ops:x:2000:2000:", passwd, re.M), passwd


def test_a_new_home_gets_the_skeletons_symlinks(make_vendor_package, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pkg = make_vendor_package(
        extra_files={"ROOTFS": {"/etc/skel/.profile-link": vf.symlink_node(".profile")}}
    )
    parts, _ = _build_users(pkg, tmp_path, {"ops": {"create": True}})
    link = stat(parts / "ROOTFS.img", "/home/ops/.profile-link")
    assert link["type"] == "symlink" and link["uid"] == link["gid"] != 0
    out = debugfs(parts / "ROOTFS.img", "stat /home/ops/.profile-link")
    assert 'Fast link dest: ".profile"' in out


def test_keys_alone_leave_the_account_tables_untouched(vendor_package_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, report = _build_users(vendor_package_session, tmp_path, {"linaro": {"ssh_authorized_keys": [OPS_KEY]}})
    touched = {c["path"] for c in report["changes"]}
    assert "/home/linaro/.ssh/authorized_keys" in touched
    assert not touched & {"/etc/passwd", "/etc/group", "/etc/gshadow", "/etc/shadow"}, touched


def test_the_reset_machine_id_is_roots_and_read_only(make_vendor_package, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pkg = make_vendor_package(vendor_identity=True)
    parts, report = _build_users(pkg, tmp_path, {"linaro": {"lock": True}})
    links = [c for c in report["changes"] if c["type"] == "symlink" and "ssh-host-keys" in c["path"]]
    assert links, "the host key unit is enabled by a link"
    for link in links:  # made as systemctl enable makes it: root's
        assert stat(parts / "ROOTFS.img", link["path"])["uid"] == 0, link
    mid = stat(parts / "ROOTFS.img", "/etc/machine-id")
    assert (mid["type"], mid["mode"], mid["uid"], mid["gid"]) == ("regular", 0o444, 0, 0)
    assert cat(parts / "ROOTFS.img", "/etc/machine-id") == b""


def test_no_vendor_password_warning_when_the_images_sshd_takes_no_passwords(
    make_vendor_package, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """sshd_config itself says `PasswordAuthentication no` (after its Include): the vendor's
    public passwords cannot be used over SSH, so there is nothing to warn about; with `yes` the
    warning names the account."""
    warned = {}
    for value in ("no", "yes"):
        text = f"Include /etc/ssh/sshd_config.d/*.conf\nPasswordAuthentication {value}\n"
        pkg = make_vendor_package(extra_files={"ROOTFS": {"/etc/ssh/sshd_config": text}})
        recipe = write_recipe(tmp_path / value, pkg.dir, "pw", hostname="pw-box")
        res = cli(recipe, "-o", tmp_path / value / "out", "--cache-dir", tmp_path / value / "cache")
        assert res.returncode == 0, res.stderr
        warned[value] = "keeps the vendor's public password ('linaro')" in res.stderr
    assert warned == {"no": False, "yes": True}


def test_an_image_without_a_machine_id_is_left_without_one(vendor_package_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """No /etc/machine-id at all is also systemd's first boot: identity reset writes none."""
    assert "machine-id" not in debugfs(vendor_package_session.partition("ROOTFS").image, "ls -l /etc")
    parts, report = _build_users(vendor_package_session, tmp_path, {"linaro": {"lock": True}})
    assert not [c for c in report["changes"] if c["path"] == "/etc/machine-id"]
    assert "machine-id" not in debugfs(parts / "ROOTFS.img", "ls -l /etc")


def test_the_ntp_drop_in_and_its_folder_are_roots(vendor_package_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="ntp", ntp=["ntp.aliyun.com"])
    res = cli("build", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    parts = simulate(tmp_path / "out" / "ntp", tmp_path)
    folder = stat(parts / "ROOTFS.img", "/etc/systemd/timesyncd.conf.d")
    assert (folder["type"], folder["mode"], folder["uid"], folder["gid"]) == ("directory", 0o755, 0, 0)
    conf = cat(parts / "ROOTFS.img", "/etc/systemd/timesyncd.conf.d/50-airbox-build.conf").decode()
    assert "NTP=ntp.aliyun.com" in conf


def test_an_image_already_in_first_boot_state_keeps_its_empty_machine_id(
    make_vendor_package, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    pkg = make_vendor_package(extra_files={"ROOTFS": {"/etc/machine-id": vf.file_node(b"", 0o444)}})
    parts, report = _build_users(pkg, tmp_path, {"linaro": {"lock": True}})
    assert not [c for c in report["changes"] if c["path"] == "/etc/machine-id"]
    assert cat(parts / "ROOTFS.img", "/etc/machine-id") == b""


def test_localtime_is_roots_link_to_the_zone(vendor_package_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = write_recipe(tmp_path / "r", vendor_package_session.dir, name="tz", timezone="Asia/Shanghai")
    res = cli("build", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    parts = simulate(tmp_path / "out" / "tz", tmp_path)
    link = stat(parts / "ROOTFS.img", "/etc/localtime")
    assert (link["type"], link["uid"], link["gid"]) == ("symlink", 0, 0)
    assert "/usr/share/zoneinfo/Asia/Shanghai" in debugfs(parts / "ROOTFS.img", "stat /etc/localtime")
