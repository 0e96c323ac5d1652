"""`airbox-build push`: boxes updated over SSH, against a real sshd whose sessions run in a box
folder (tests/sshbox.py). The bundle's local_update.sh is the fixture's recorder: it checks
md5.txt like the vendor's, records its call and arms the miniature bootloader (`reboot`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sshbox
import vendor_fixture as vf
from buildhelp import cli, run_build, write_recipe
from faultkit import stalled, start_cli

from builder.build import BuildResult

REASON = sshbox.usable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> vf.MiniPackage:
    pkg = vf.build_package(tmp_path_factory.mktemp("vendor-ota"), local_update=True)
    (pkg.dir / "local_update.sh").write_text(sshbox.RECORDER)
    vf.write_md5(pkg.dir, pkg.options)
    return pkg


def _build(pkg: vf.MiniPackage, tmp: Path, hostname: str, **more: object) -> BuildResult:
    recipe = write_recipe(tmp / f"r-{hostname}", pkg.dir, name="fieldbox", hostname=hostname, **more)
    return run_build(recipe, tmp / f"out-{hostname}", tmp / "cache")


@pytest.fixture
def boxes(tmp_path: Path, package: vf.MiniPackage) -> Iterator[list[sshbox.SshBox]]:
    made: list[sshbox.SshBox] = []
    yield made  # the tests add boxes with _box(made, ...); all are stopped here
    for b in made:
        b.stop()


def _box(made: list[sshbox.SshBox], tmp: Path, gpt: bytes, key: Path | None = None) -> sshbox.SshBox:
    box = sshbox.make_box(tmp / f"box{len(made)}", gpt, client_key=key)
    made.append(box)
    return box


def _expect_next(box: sshbox.SshBox, res: BuildResult) -> None:
    """What the new ROOTFS will hold: the miniature bootloader installs it on `reboot`."""
    doc = res.report["bundle_id"]
    (box.root / "var/lib/next-airbox-build.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _push(
    res: BuildResult | Path, *hosts: str, box: sshbox.SshBox, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    bundle = res.out_dir if isinstance(res, BuildResult) else res
    return cli(
        "--json", "push", bundle, *hosts, "--known-hosts", box.known_hosts, "-i", box.identity,
        "--timeout", "30", *args,
    )  # fmt: skip


def _events(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _result(out: str) -> dict[str, object]:
    return next(e for e in _events(out) if e.get("event") == "result")


def test_push_updates_a_box_and_confirms_the_bundle_id(
    package: vf.MiniPackage, boxes: list[sshbox.SshBox], tmp_path: Path
) -> None:
    res = _build(package, tmp_path, "field-1")
    box = _box(boxes, tmp_path, package.gpt_bytes)
    _expect_next(box, res)
    before = sshbox.boot_id(box)
    run = _push(res, box.address, box=box, args=("--yes",))
    assert run.returncode == 0, run.stdout + run.stderr
    states = [e["state"] for e in _events(run.stdout) if e.get("event") == "push"]
    for state in ("checking", "sending", "verifying", "arming", "rebooting", "back", "done"):
        assert state in states, states
    assert states.index("verifying") < states.index("arming")  # never armed before verified
    # the vendor helper ran once, from the folder, with md5.txt; the box rebooted onto the bundle
    (call,) = box.calls()
    assert call.endswith("/data/ota/md5.txt /data/ota")
    assert json.loads(box.running() or "{}")["bundle"] == res.report["bundle_id"]["bundle"]
    assert sshbox.boot_id(box) != before
    # every file of the bundle is there; the partition that holds it is taken out of the update
    on_box = {p.name for p in box.ota.iterdir()}
    assert on_box == {p.name for p in res.card.iterdir()}
    for p in res.card.iterdir():
        if p.name not in (
            "boot_emmc-data.scr",
            "boot_emmc-data.cmd",
            "boot_emmc-gpt.scr",
            "boot_emmc-gpt.cmd",
            "md5.txt",
        ):
            assert (box.ota / p.name).read_bytes() == p.read_bytes(), p.name
    assert "data.1-of-" not in (box.ota / "boot_emmc-data.cmd").read_text()
    assert subprocess.run(["md5sum", "-c", "--quiet", "md5.txt"], cwd=box.ota).returncode == 0

    # a rerun skips the box: it already runs the bundle
    again = _push(res, box.address, box=box, args=("--yes",))
    assert again.returncode == 0, again.stderr
    assert _result(again.stdout)["boxes"][0]["state"] == "already"  # type: ignore[index]
    assert len(box.calls()) == 1


def test_a_new_bundle_reuses_what_the_box_has_and_a_damaged_file_is_sent_again(
    package: vf.MiniPackage, boxes: list[sshbox.SshBox], tmp_path: Path
) -> None:
    first = _build(package, tmp_path, "field-1")
    box = _box(boxes, tmp_path, package.gpt_bytes)
    run = _push(first, box.address, box=box, args=("--stage-only",))
    assert run.returncode == 0, run.stdout + run.stderr
    total = sum(p.stat().st_size for p in first.card.iterdir())
    sent_first = _result(run.stdout)["boxes"][0]["sent"]  # type: ignore[index]
    assert sent_first >= total * 0.9 and box.calls() == []  # staged only: nothing armed

    second = _build(package, tmp_path, "field-2")
    run = _push(second, box.address, box=box, args=("--stage-only",))
    assert run.returncode == 0, run.stdout + run.stderr
    sent = _result(run.stdout)["boxes"][0]["sent"]  # type: ignore[index]
    changed = sum(
        p.stat().st_size
        for p in second.card.iterdir()
        if not (first.card / p.name).exists() or (first.card / p.name).read_bytes() != p.read_bytes()
    )
    assert 0 < sent < total / 2 and sent <= changed + (4 << 10), (sent, changed, total)
    print(f"\nsecond bundle: sent {sent} of {total} bytes ({changed} bytes of changed files)")

    # a file on the box that is not what its md5.txt says: md5sum -c finds it, it is sent again
    chunk = sorted(box.ota.glob("rootfs.*-of-*.gz"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    _expect_next(box, second)
    run = _push(second, box.address, box=box, args=("--yes",))
    assert run.returncode == 0, run.stdout + run.stderr
    assert chunk.read_bytes() == (second.card / chunk.name).read_bytes()
    assert json.loads(box.running() or "{}")["bundle"] == second.report["bundle_id"]["bundle"]


def test_a_killed_transfer_resumes(
    package: vf.MiniPackage, boxes: list[sshbox.SshBox], tmp_path: Path
) -> None:
    res = _build(package, tmp_path, "field-1")
    box = _box(boxes, tmp_path, package.gpt_bytes)
    args = [sys.executable, "-m", "builder.cli", "--json", "push", str(res.out_dir), box.address,
            "--known-hosts", str(box.known_hosts), "-i", str(box.identity), "--stage-only"]  # fmt: skip
    build = start_cli(args, dict(os.environ), stall_at="push:sent:3")
    build.wait_for(stalled, timeout=60)
    build.signal(signal.SIGKILL)
    build.proc.wait()
    sshbox.end_ssh_masters(build.proc.pid)  # what the killed push left: its connection master
    partial = sorted((box.ota / ".partial").iterdir())
    assert len(partial) >= 3 and not (box.ota / "md5.txt").exists()  # nothing installed yet
    # and one more file half sent, as a transfer killed inside it leaves it
    big = max(res.card.iterdir(), key=lambda p: p.stat().st_size)
    (box.ota / ".partial" / big.name).write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    already = sum(p.stat().st_size for p in (box.ota / ".partial").iterdir())
    (box.ota / ".partial" / "from-another-bundle.gz").write_bytes(b"left over")  # never installed

    run = _push(res, box.address, box=box, args=("--stage-only",))
    assert run.returncode == 0, run.stdout + run.stderr
    total = sum(p.stat().st_size for p in res.card.iterdir())
    sent_now = _result(run.stdout)["boxes"][0]["sent"]  # type: ignore[index]
    assert sent_now <= total - already + (64 << 10)  # what was there is not sent again
    assert subprocess.run(["md5sum", "-c", "--quiet", "md5.txt"], cwd=box.ota).returncode == 0
    assert (box.ota / big.name).read_bytes() == big.read_bytes()
    assert not (box.ota / "from-another-bundle.gz").exists() and not (box.ota / ".partial").exists()


def test_refusals_name_the_box_and_write_nothing(
    package: vf.MiniPackage, boxes: list[sshbox.SshBox], tmp_path: Path
) -> None:
    res = _build(package, tmp_path, "field-1")
    box = _box(boxes, tmp_path, package.gpt_bytes)

    run = _push(res, box.address, box=box, args=("--yes", "--margin", "1P"))
    assert run.returncode == 1
    failure = _result(run.stdout)["boxes"][0]  # type: ignore[index]
    assert f"127.0.0.1:{box.port}" in failure["message"] and "free" in failure["message"]
    assert "--dir" in failure["hint"]

    stranger = tmp_path / "other_known_hosts"
    other = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    stranger.write_text(f"[127.0.0.1]:{box.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    run = cli(
        "--json",
        "push",
        res.out_dir,
        box.address,
        "--known-hosts",
        stranger,
        "-i",
        box.identity,
        "--yes",
    )
    assert run.returncode == 1
    msg = _result(run.stdout)["boxes"][0]["message"]  # type: ignore[index]
    assert "host key" in msg, msg

    (box.root / "proc/mounts").write_text(
        (box.root / "proc/mounts").read_text().replace("/data ext4 rw,", "/data ext4 ro,")
    )
    run = _push(res, box.address, box=box, args=("--yes",))
    assert run.returncode == 1 and "read-only" in _result(run.stdout)["boxes"][0]["message"]  # type: ignore[index]
    assert not box.ota.exists() and box.calls() == []

    run = _push(res, box.address, box=box)  # no --yes, not a terminal: refused before anything
    assert run.returncode == 1 and "--yes" in run.stdout + run.stderr

    box.stop()  # the box is off the network
    run = _push(res, box.address, box=box, args=("--yes",))
    failure = _result(run.stdout)["boxes"][0]  # type: ignore[index]
    assert run.returncode == 1 and "cannot reach it over SSH" in failure["message"]
    assert f"127.0.0.1:{box.port}" in failure["message"] and "powered" in failure["hint"]


def test_a_fleet_of_three_with_one_failing_box(
    package: vf.MiniPackage, boxes: list[sshbox.SshBox], tmp_path: Path
) -> None:
    res = _build(package, tmp_path, "field-1")
    first = _box(boxes, tmp_path, package.gpt_bytes)
    good = [first, _box(boxes, tmp_path, package.gpt_bytes, first.identity)]
    # the third box has another partition table: an update in the field cannot fix that
    other = bytearray(package.gpt_bytes)
    other[512 * 2 + 56 : 512 * 2 + 58] = "X".encode("utf-16-le")  # the first partition's name
    import zlib

    entries = bytes(other[1024 : 1024 + 128 * 128])
    other[512 + 88 : 512 + 92] = zlib.crc32(entries).to_bytes(4, "little")
    other[512 + 16 : 512 + 20] = bytes(4)
    other[512 + 16 : 512 + 20] = zlib.crc32(bytes(other[512 : 512 + 92])).to_bytes(4, "little")
    bad = _box(boxes, tmp_path, bytes(other), first.identity)
    for b in good:
        _expect_next(b, res)
    known = tmp_path / "fleet_known_hosts"
    known.write_text("".join(b.known_hosts.read_text() for b in (*good, bad)))
    run = cli(
        "--json", "push", res.out_dir, *(b.address for b in (*good, bad)), "--known-hosts", known,
        "-i", good[0].identity, "--yes", "--jobs", "3", "--timeout", "30",
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    result = _result(run.stdout)
    states = {b["box"]: (b["state"], b["message"]) for b in result["boxes"]}  # type: ignore[union-attr]
    assert states[f"root@127.0.0.1:{bad.port}"][0] == "failed"
    assert "partition table" in states[f"root@127.0.0.1:{bad.port}"][1]
    for b in good:
        assert states[f"root@127.0.0.1:{b.port}"][0] == "done", states
        assert json.loads(b.running() or "{}")["bundle"] == res.report["bundle_id"]["bundle"]
    assert bad.calls() == [] and not bad.ota.exists()
    assert "1 of 3 box(es) failed" in run.stdout + run.stderr


def test_a_box_back_with_new_host_keys_is_refused_unless_trusted_once(
    package: vf.MiniPackage, boxes: list[sshbox.SshBox], tmp_path: Path
) -> None:
    """identity: regenerate gives the box new keys at its first boot after the update."""
    res = _build(package, tmp_path, "field-1")
    for trust, box in (
        (False, _box(boxes, tmp_path, package.gpt_bytes)),
        (True, _box(boxes, tmp_path, package.gpt_bytes)),
    ):
        _expect_next(box, res)
        done = threading.Event()

        def reflash(box: sshbox.SshBox = box, done: threading.Event = done) -> None:
            while not (box.root / "var/lib/armed").exists():  # the vendor helper armed the update
                time.sleep(0.05)
            box.reboot_with_new_host_key()
            done.set()

        watcher = threading.Thread(target=reflash, daemon=True)
        watcher.start()
        run = _push(res, box.address, box=box, args=("--yes", *(("--trust-new-host-key",) if trust else ())))
        watcher.join(timeout=30)
        assert done.is_set()
        result = _result(run.stdout)["boxes"][0]  # type: ignore[index]
        if not trust:
            assert run.returncode == 1 and result["state"] == "failed"
            assert "host key" in result["message"] and "--trust-new-host-key" in result["hint"]
        else:
            assert run.returncode == 0, run.stdout + run.stderr
            assert result["state"] == "done" and "new host key" in result["message"]
            new_pub = (box.config.parent / "host_ed25519.pub").read_text().split()[1]
            assert new_pub in result["message"]
        assert box.known_hosts.read_text().count("ssh-ed25519") == 1  # no known_hosts file touched
