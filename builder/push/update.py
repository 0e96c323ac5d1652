"""One box: check it, send what it lacks (resumable), verify on the box, arm the vendor's update,
wait for it to come back on the new bundle.

Order of safety: nothing is written before every check passed; the update is armed only when
every file is on the box and `md5sum -c md5.txt` passes there; the box's own `local_update.sh`
(from the bundle) arms it, as the vendor does. See docs/OTA.md.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from builder.customise.bundleid import BUNDLE_ID_PATH
from builder.customise.bundleid import parse as parse_bundle_id
from builder.errors import AirboxError
from builder.events import checkpoint
from builder.manifest import MD5_NAME
from builder.ota import OtaPlan, ota_plan, update_files
from builder.package.source import open_package
from builder.push.box import PARTIAL, BoxFacts, layout_differences, probe, read_disk, run_checked
from builder.push.bundle import UPDATE_SCRIPT, LocalBundle
from builder.push.ssh import SSH_FAILED, BoxError, Ssh, explain_ssh_failure
from builder.units import format_size

Status = Callable[..., None]  # status(state, **details): checking, sending, verifying, ...


@dataclass(frozen=True)
class PushOptions:
    folder: str = "/data/ota"
    margin: int = 64 << 20
    timeout: float = 1800.0  # for the box to come back after arming the update
    arm: bool = True  # False: stage and verify only
    force: bool = False  # also a box that already runs the bundle
    trust_new_key: bool = False  # a box back with new host keys: accept them once to confirm the bundle
    poll: float = 3.0


@dataclass
class Outcome:
    state: str  # done, already, staged
    message: str
    sent: int = 0
    reused: int = 0
    new_host_keys: tuple[str, ...] = ()  # known_hosts lines, when the box came back with new keys


@dataclass(frozen=True)
class _File:
    name: str
    size: int
    md5: str
    data: bytes | None  # the update's own version of the file (builder.ota), else the card's file
    path: Path


def update_box(bundle: LocalBundle, ssh: Ssh, opts: PushOptions, status: Status) -> Outcome:
    label = ssh.target.label
    status("checking")
    facts = probe(ssh, opts.folder)
    if bundle.bundle_id and facts.running == bundle.bundle_id and not opts.force:
        return Outcome("already", f"already runs bundle {bundle.bundle_id[:12]}")
    _check_target(facts, label)
    read_disk(ssh, facts)
    assert facts.gpt is not None
    diffs = layout_differences(facts.gpt, bundle.plan.gpt)
    if diffs:
        raise BoxError(
            f"box {label}: its partition table differs from the bundle's ({'; '.join(diffs[:3])}): an update "
            "in the field does not rewrite the table",
            hint="write the bundle to a TF card (airbox-build write) and flash the box from it",
        )
    if UPDATE_SCRIPT not in bundle.sizes:
        raise BoxError(
            f"the bundle has no {UPDATE_SCRIPT}: how this package arms an update on the box is not known",
            where=str(bundle.card),
            hint="build from a vendor package that ships local_update.sh, or flash the box from a card",
        )
    try:
        update = ota_plan(bundle.plan, facts.number)
    except AirboxError as e:
        raise BoxError(f"box {label}: {e.message}", where=e.where, hint=e.hint) from None
    files = _files(bundle, update)
    sends, copies, keep = _transfer_plan(files, facts)
    need = sum(f.size - facts.files.get(f"{PARTIAL}/{f.name}", 0) for f in sends) + sum(
        f.size for f, _ in copies
    )
    if need + opts.margin > facts.free_bytes:
        raise BoxError(
            f"box {label}: {opts.folder} ({facts.device}) has {format_size(facts.free_bytes)} free; "
            f"the update needs {format_size(need)} plus a margin of {format_size(opts.margin)}",
            hint=f"free space on the box's {facts.mount_point} (an old bundle in another folder?), or choose "
            "another folder on the eMMC with --dir",
        )
    total = sum(f.size for f in sends)
    status("sending", sent=0, total=total)
    _prepare(ssh, opts.folder, copies, sends)
    sent = _send(ssh, opts.folder, sends, facts, lambda n: status("sending", sent=n, total=total))
    status("verifying")
    _install(ssh, opts.folder, [f.name for f in files])
    bad = _md5_check(ssh, opts.folder)
    if bad:  # a file the box had that is not what its md5.txt claimed: send it once more
        again = [f for f in files if f.name in bad]
        run_checked(ssh, _rm_script(again), opts.folder, what="removing damaged files")
        _prepare(ssh, opts.folder, [])
        sent += _send(ssh, opts.folder, again, None, lambda n: status("sending", sent=n, total=total))
        _install(ssh, opts.folder, [f.name for f in files])
        bad = _md5_check(ssh, opts.folder)
        if bad:
            raise BoxError(
                f"box {label}: md5 mismatch on the box after sending again: {', '.join(sorted(bad)[:5])}",
                hint="the box's storage may be failing: run `md5sum -c md5.txt` in "
                f"{opts.folder} on the box, and check dmesg",
            )
    done = Outcome("staged", f"bundle verified on the box in {opts.folder}", sent, len(keep) + len(copies))
    if not opts.arm:
        return done
    status("arming")
    before = facts.boot_id
    _arm(ssh, opts.folder)
    status("rebooting")
    _reboot_if_still_up(ssh, before)
    return _wait_back(ssh, bundle, before, opts, status, done)


def _check_target(facts: BoxFacts, label: str) -> None:
    if facts.read_only:
        raise BoxError(
            f"box {label}: {facts.mount_point} ({facts.device}) is mounted read-only",
            hint="choose a folder on a writable eMMC partition with --dir (default /data/ota)",
        )
    if not facts.writable:
        raise BoxError(
            f"box {label}: {facts.existing} is not writable for this user",
            hint="log in as a user who owns the folder (on the AirBox /data belongs to linaro), or as root",
        )


def _files(bundle: LocalBundle, update: OtaPlan) -> list[_File]:
    with (
        tempfile.TemporaryDirectory(prefix="airbox-push-") as tmp,
        open_package(bundle.card, Path(tmp)) as files,
    ):
        changed = update_files(files, bundle.plan, update)
    out = []
    for name in bundle.files():
        data = changed.get(name)
        if data is not None:
            out.append(_File(name, len(data), hashlib.md5(data).hexdigest(), data, bundle.card / name))
        else:
            out.append(_File(name, bundle.sizes[name], bundle.md5.get(name, ""), None, bundle.card / name))
    return out


def _transfer_plan(
    files: list[_File], facts: BoxFacts
) -> tuple[list[_File], list[tuple[_File, str]], list[_File]]:
    """(to send, to copy on the box from another file, already in place): by md5 and size."""
    by_md5 = {(facts.md5[n], facts.files[n]): n for n in facts.files if n in facts.md5 and "/" not in n}
    sends, copies, keep = [], [], []
    for f in files:
        if f.name != MD5_NAME and facts.md5.get(f.name) == f.md5 and facts.files.get(f.name) == f.size:
            keep.append(f)
        elif f.name != MD5_NAME and (f.md5, f.size) in by_md5:
            copies.append((f, by_md5[(f.md5, f.size)]))
        else:
            sends.append(f)
    return sends, copies, keep


def _prepare(
    ssh: Ssh, folder: str, copies: list[tuple[_File, str]], sends: list[_File] | None = None
) -> None:
    """The .partial folder with only what is on its way: a leftover of another bundle's killed
    transfer would otherwise be moved over a file that is already right."""
    lines = ["set -e", 'mkdir -p "$1/' + PARTIAL + '"', 'cd "$1"']
    if sends is not None:
        wanted = " ".join(shlex.quote(f.name) for f in sends)
        lines.append(
            f'for f in {PARTIAL}/*; do [ -f "$f" ] || continue; n=${{f#{PARTIAL}/}}; '
            f'case " {wanted} " in *" $n "*) ;; *) rm -f "$f" ;; esac; done'
        )
    for f, src in copies:
        dst = shlex.quote(f"{PARTIAL}/{f.name}")
        lines.append(f"rm -f {dst}; ln {shlex.quote(src)} {dst} 2>/dev/null || cp {shlex.quote(src)} {dst}")
    run_checked(ssh, "\n".join(lines) + "\n", folder, what=f"preparing {folder}")


def _send(
    ssh: Ssh, folder: str, sends: list[_File], facts: BoxFacts | None, progress: Callable[[int], None]
) -> int:
    """Append what each file lacks to its .partial copy (a killed transfer resumes from there),
    then check the copy's md5 on the box. Returns the bytes that went over the wire."""
    done = 0
    transferred = 0
    for f in sends:
        remote = f"{folder}/{PARTIAL}/{f.name}"
        have = facts.files.get(f"{PARTIAL}/{f.name}", 0) if facts is not None else 0
        if have > f.size:
            run_checked(ssh, 'rm -f "$1"\n', remote, what="dropping an oversized partial file")
            have = 0
        done += have
        progress(done)
        src = _open(f)
        with src:
            src.seek(have)
            base = done

            def sent(n: int, base: int = base) -> None:
                progress(base + n)

            proc = ssh.append(src, remote, f.size, sent)
        if proc.returncode == SSH_FAILED:
            raise explain_ssh_failure(ssh.target, proc.stderr, ssh.known_hosts)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            raise BoxError(f"box {ssh.target.label}: writing {remote} failed: {err or proc.returncode}")
        done += f.size - have
        transferred += f.size - have
        checkpoint(f"push:sent:{sends.index(f) + 1}")  # a transfer killed here resumes
    if sends:
        names = " ".join(shlex.quote(f.name) for f in sends)
        out = run_checked(
            ssh, f'cd "$1/{PARTIAL}" && md5sum {names}\n', folder, what="checking what was sent"
        )
        got = {
            line.split()[1].lstrip("*"): line.split()[0] for line in out.decode().splitlines() if line.strip()
        }
        wrong = [f.name for f in sends if got.get(f.name) != f.md5]
        if wrong:
            run_checked(
                ssh, _rm_script([f for f in sends if f.name in wrong], PARTIAL), folder, what="cleanup"
            )
            raise BoxError(
                f"box {ssh.target.label}: md5 mismatch after the transfer of {', '.join(wrong[:5])}",
                hint="run push again: the damaged files are sent anew (a flaky link or a failing disk)",
            )
    return transferred


def _open(f: _File) -> BinaryIO:
    return io.BytesIO(f.data) if f.data is not None else open(f.path, "rb")


def _rm_script(files: list[_File], sub: str = "") -> str:
    names = " ".join(shlex.quote(posixpath.join(sub, f.name) if sub else f.name) for f in files)
    return f'cd "$1" && rm -f {names}\n'


def _install(ssh: Ssh, folder: str, names: list[str]) -> None:
    """Move what was sent into place, md5.txt last; drop files no longer in the bundle."""
    keep = " ".join(shlex.quote(n) for n in names)
    script = f"""set -e
cd "$1"
for f in {PARTIAL}/*; do
  [ -f "$f" ] || continue
  n=${{f#{PARTIAL}/}}
  [ "$n" = {MD5_NAME} ] || mv -f "$f" "$n"
done
[ -f {PARTIAL}/{MD5_NAME} ] && mv -f {PARTIAL}/{MD5_NAME} {MD5_NAME}
for f in *; do
  [ -f "$f" ] || continue
  case " {keep} " in *" $f "*) ;; *) rm -f "$f" ;; esac
done
rmdir {PARTIAL} 2>/dev/null || true
sync
"""
    run_checked(ssh, script, folder, what=f"installing the files in {folder}", timeout=600)


def _md5_check(ssh: Ssh, folder: str) -> set[str]:
    proc = ssh.run(f'cd "$1" && md5sum -c {MD5_NAME}\n', folder, timeout=1800)
    if proc.returncode == SSH_FAILED:
        raise explain_ssh_failure(ssh.target, proc.stderr, ssh.known_hosts)
    bad = set()
    for line in proc.stdout.decode(errors="replace").splitlines():
        name, _, verdict = line.rpartition(": ")
        if verdict.strip() != "OK" and name:
            bad.add(name)
    if proc.returncode != 0 and not bad:
        raise BoxError(
            f"box {ssh.target.label}: `md5sum -c {MD5_NAME}` failed in {folder}: "
            f"{proc.stderr.decode(errors='replace').strip()[-200:]}"
        )
    return bad


ARM = f"""cd "$1" || exit 97
run() {{ if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }}
if command -v bash >/dev/null 2>&1; then sh=bash; else sh=sh; fi
run $sh ./{UPDATE_SCRIPT} "$1/{MD5_NAME}"
"""


def _arm(ssh: Ssh, folder: str) -> None:
    proc = ssh.run(ARM, folder, timeout=900)
    if proc.returncode in (0, SSH_FAILED):
        return  # armed; an ssh that ends with the connection (255) is the box going down
    text = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
    raise BoxError(
        f"box {ssh.target.label}: {UPDATE_SCRIPT} failed (exit {proc.returncode}): "
        f"{text[-1] if text else ''}",
        hint=f"nothing was armed; the bundle stays in {folder}: log in and run it by hand to see why "
        "(it needs root: the login user must be root or may run sudo without a password)",
    )


def _reboot_if_still_up(ssh: Ssh, boot_id: str) -> None:
    """The vendor's helper may leave the reboot to its caller: if the box is still up after a short
    while, reboot it (the update is armed)."""
    time.sleep(2)
    proc = ssh.run("cat /proc/sys/kernel/random/boot_id\n", timeout=15, multiplex=False)
    if proc.returncode == 0 and proc.stdout.decode().strip() == boot_id:
        ssh.run('if [ "$(id -u)" = 0 ]; then reboot; else sudo -n reboot; fi\n', timeout=30, multiplex=False)


def _wait_back(
    ssh: Ssh, bundle: LocalBundle, before: str, opts: PushOptions, status: Status, staged: Outcome
) -> Outcome:
    deadline = time.monotonic() + opts.timeout
    went_down = False
    last = "no answer yet"
    while time.monotonic() < deadline:
        proc = ssh.run(
            f"cat /proc/sys/kernel/random/boot_id; echo; cat {BUNDLE_ID_PATH} 2>/dev/null\n",
            timeout=20,
            multiplex=False,
        )
        if proc.returncode == SSH_FAILED:
            err = explain_ssh_failure(ssh.target, proc.stderr, ssh.known_hosts)
            if "host key" in err.message and opts.trust_new_key and ssh.new_keys is None:
                ssh.trust_new_key()
                continue
            if "host key" in err.message:
                raise BoxError(
                    err.message + " after the update",
                    hint="a bundle with identity.ssh_host_keys: regenerate gives the box new keys at its "
                    "first boot: check the new key on its console, or push with --trust-new-host-key to "
                    "accept it once (it is printed); fleets updated in the field want per-device keys",
                )
            went_down = True
            last = err.message
        elif proc.returncode == 0:
            boot_id, _, rest = proc.stdout.decode(errors="replace").partition("\n")
            if boot_id.strip() != before:
                doc = parse_bundle_id(rest.strip())
                running = str(doc["bundle"]) if doc else None
                if bundle.bundle_id is None or running == bundle.bundle_id:
                    status("back", bundle=running)
                    message = f"back on bundle {running[:12]}" if running else "back (the bundle has no id)"
                    new_keys = ssh.new_key_lines()
                    if new_keys:
                        message += f"; its new host key(s), accepted once: {'; '.join(new_keys)}"
                    return Outcome("done", message, staged.sent, staged.reused, tuple(new_keys))
                raise BoxError(
                    f"box {ssh.target.label}: came back, but runs bundle {running or 'unknown'}, not "
                    f"{bundle.bundle_id}: the update did not apply",
                    hint="the box's serial console shows why; the bundle is still in "
                    f"{opts.folder}: run push again to retry",
                )
            last = "still up on the same boot"
        status("rebooting", detail="down" if went_down else "up")
        time.sleep(opts.poll)
    raise BoxError(
        f"box {ssh.target.label}: not back on the new bundle within {opts.timeout:.0f} s ({last})",
        hint="the flash of a full image takes minutes: look at the box (serial console, LEDs); run push "
        "again with a longer --timeout once it is up, it only confirms then",
    )
