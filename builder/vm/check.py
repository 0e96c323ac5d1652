"""`boot --check`: the running box, checked against its recipe and build report, row by row.

Everything is read through the check agent (builder.vm.agent) as root, except what must be seen
from outside: SSH logins with the recipe's keys, the password methods sshd offers, the app ports.
Those go through QEMU's forwards on 127.0.0.1 with the box's host keys pinned (known_hosts
recorded through the agent: never StrictHostKeyChecking=no).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.customise.bundleid import BUNDLE_ID_PATH
from builder.customise.bundleid import parse as parse_bundle_id
from builder.recipe.system import VENDOR_PASSWORDS
from builder.vm.agent import UNIT_NAME, Agent

OK, FAIL, WARN, KNOWN = "ok", "FAIL", "warn", "known"
# the name boot/known_hosts holds the box's keys under: the forwarded port changes every boot
HOST_ALIAS = "airbox-vm"
SSHD_CONF = re.compile(r"^\s*PasswordAuthentication\s+(yes|no)\b", re.I | re.M)


@dataclass
class Row:
    check: str
    status: str
    detail: str

    def as_event(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.lower(), "detail": self.detail}


@dataclass
class Expect:
    """What the bundle says the box must be: from the recipe and the build report."""

    hostname: str | None = None
    addresses: dict[str, tuple[str, ...]] = field(default_factory=dict)  # interface -> CIDRs
    gateways: dict[str, str] = field(default_factory=dict)
    routes: dict[str, tuple[tuple[str, str | None], ...]] = field(default_factory=dict)  # (to, via)
    nameservers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    users: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> authorized keys
    password_auth: bool | None = None  # what the recipe's sshd config says, if it says
    units: tuple[str, ...] = ()  # units the recipe adds/enables (apps' included)
    disabled: tuple[str, ...] = ()
    ports: dict[str, int] = field(default_factory=dict)  # app -> guest port
    files: tuple[dict[str, Any], ...] = ()  # report changes: files written (not app trees)
    removed: tuple[str, ...] = ()
    ssh_host_keys: str | None = None  # the recipe's identity mode; None: no recipe to say
    machine_id: str | None = None
    host_keys: tuple[str, ...] = ()  # `type base64` the bundle's known_hosts pins (per-device)
    locked: tuple[str, ...] = ()  # accounts the recipe locks
    timezone: str | None = None
    locale: str | None = None
    ntp: tuple[str, ...] = ()
    bundle_id: str | None = None  # what /etc/airbox-build.json must name (the build report's)


def expectations(recipe: Any, report: Mapping[str, Any], host_keys: Sequence[str] = ()) -> Expect:
    e = Expect()
    e.host_keys = tuple(host_keys)
    if recipe is not None:
        e.hostname = recipe.hostname
        e.ssh_host_keys, e.machine_id = recipe.identity.ssh_host_keys, recipe.identity.machine_id
        e.locked = tuple(u.name for u in recipe.users if u.lock)
        e.timezone = recipe.timezone.value if recipe.timezone else None
        e.locale = recipe.locale.value if recipe.locale else None
        e.ntp = recipe.ntp.servers if recipe.ntp else ()
        if recipe.ssh is not None and recipe.ssh.password_authentication is not None:
            e.password_auth = recipe.ssh.password_authentication
        if recipe.network is not None:
            for i in (*recipe.network.ethernets, *recipe.network.bonds):
                if i.addresses:
                    e.addresses[i.name] = tuple(i.addresses)
                if i.gateway4:
                    e.gateways[i.name] = i.gateway4
                if i.routes:
                    e.routes[i.name] = tuple((r.to, r.via) for r in i.routes)
                if i.nameservers is not None and i.nameservers.addresses:
                    e.nameservers[i.name] = tuple(i.nameservers.addresses)
        e.users = {u.name: tuple(u.ssh_authorized_keys) for u in recipe.users}
        for f in recipe.files:
            if f.path.startswith("/etc/ssh/") and f.content:
                m = SSHD_CONF.search(f.content)
                if m:
                    e.password_auth = m[1].lower() == "yes"
        e.units = tuple(recipe.services.enable)
        e.disabled = tuple(recipe.services.disable)
    bid = report.get("bundle_id")
    e.bundle_id = str(bid["bundle"]) if isinstance(bid, dict) and bid.get("bundle") else None
    apps = report.get("apps", [])
    e.units += tuple(a["unit"] for a in apps if a.get("unit") and a["unit"] not in e.units)
    e.ports = {a["name"]: a["port"] for a in apps if a.get("port")}
    e.files = tuple(
        c
        for c in report.get("changes", [])
        if c.get("type") == "file"
        and c.get("sha256")
        and c["action"] in ("added", "changed")
        and " apps." not in c.get("origin", "")
        and not _made_on_first_boot(c)
    )
    written = {
        c["device_path"] for c in report.get("changes", []) if c["action"].startswith(("added", "changed"))
    }
    e.removed = tuple(
        sorted(
            {
                c["device_path"]
                for c in report.get("changes", [])
                if c["action"] == "removed" and not _made_on_first_boot(c)
            }
            - written
        )
    )
    return e


def _made_on_first_boot(change: Mapping[str, Any]) -> bool:
    """What identity empties or removes so that the box makes its own: machine-id, host keys."""
    if "identity" not in change.get("origin", ""):
        return False
    path = change["device_path"]
    return bool(path == "/etc/machine-id") or (
        change["action"] == "removed" and path.startswith("/etc/ssh/ssh_host_")
    )


def q(s: str) -> str:
    return shlex.quote(s)


class Checker:
    def __init__(
        self,
        agent: Agent,
        expect: Expect,
        *,
        ssh_port: int,
        forwards: Mapping[int, int],
        known_hosts: Path,
        identities: Sequence[Path],
        baseline: Mapping[str, Any] | None,
        ro_part: int,
        rw_part: int,
        on_row: Callable[[Row], None],
    ) -> None:
        self.agent = agent
        self.e = expect
        self.ssh_port = ssh_port
        self.forwards = forwards
        self.known_hosts = known_hosts
        self.identities = list(identities)
        self.baseline = baseline
        self.ro_part, self.rw_part = ro_part, rw_part
        self.on_row = on_row
        self.rows: list[Row] = []

    def row(self, check: str, status: str, detail: str) -> None:
        r = Row(check, status, detail)
        self.rows.append(r)
        self.on_row(r)

    def sh(self, script: str, timeout: float = 60) -> tuple[int, str]:
        r = self.agent.run(script, timeout=timeout)
        return r.rc, r.out.strip()

    # ------------------------------------------------------------------ the whole run

    def boot_state(self, label: str) -> None:
        _, state = self.sh("systemctl is-system-running --wait", timeout=300)
        _, failed_text = self.sh("systemctl list-units --state=failed --no-legend --plain | awk '{print $1}'")
        failed = [
            u
            for u in failed_text.split()
            if u.endswith((".service", ".mount", ".socket", ".timer", ".target", ".path", ".swap", ".device"))
        ]
        known = set(self.baseline.get("failed", [])) if self.baseline is not None else None
        new = [u for u in failed if known is None or u not in known]
        for u in failed:
            if known is not None and u in known:
                self.row(
                    f"{label}: unit {u}", KNOWN, "failed, as it does when the vendor package boots in the VM"
                )
            else:
                _, tail = self.sh(f"journalctl -b -u {q(u)} -n 8 --no-pager -o cat")
                why = "" if known is not None else " (no vendor baseline to compare with)"
                self.row(f"{label}: unit {u}", FAIL, f"failed{why}: {tail[-600:]}")
        status = OK if state in ("running", "degraded") and not new else FAIL
        self.row(
            f"{label}: system",
            status,
            f"systemctl is-system-running: {state}" + (f"; failed: {', '.join(failed)}" if failed else ""),
        )

    def first_boot(self) -> dict[str, str]:
        self.boot_state("boot 1")
        ident = self.identity()
        self.bundle_id()
        self.hostname()
        self.mounts()
        self.network()
        self.files()
        self.units("boot 1")
        self.ssh()
        self.users()
        self.vendor_passwords()
        self.settings()
        self.ports()
        return ident

    def second_boot(self, before: Mapping[str, str]) -> None:
        self.boot_state("boot 2")
        after = self.identity(record=False)
        for what in ("host keys", "machine-id"):
            same = after.get(what) == before.get(what)
            self.row(
                f"boot 2: {what}",
                OK if same else FAIL,
                "unchanged after the reboot" if same else "changed after the reboot: they must be made once",
            )
        self.units("boot 2")

    # ------------------------------------------------------------------ single checks

    def identity(self, record: bool = True) -> dict[str, str]:
        _, keys = self.sh("cat /etc/ssh/ssh_host_*_key.pub 2>/dev/null | sort")
        _, mid = self.sh("cat /etc/machine-id 2>/dev/null")
        out = {"host keys": keys, "machine-id": mid}
        if record:
            lines = [f"{HOST_ALIAS} {' '.join(k.split()[:2])}" for k in keys.splitlines() if k]
            self.known_hosts.write_text("\n".join(lines) + "\n")
            self._identity_rows(keys, mid)
        return out

    def _identity_rows(self, keys: str, mid: str) -> None:
        base = self.baseline or {}
        vendor_keys = base.get("host keys")
        lines = set(keys.splitlines())
        box = {" ".join(k.split()[:2]) for k in lines if k}
        shared = vendor_keys is not None and bool(lines & set(vendor_keys.splitlines()))
        fresh = "not the vendor's" if vendor_keys is not None else "(no vendor baseline to compare with)"
        if self.e.host_keys:  # per-device: exactly the keys the bundle's known_hosts pins
            same = box == set(self.e.host_keys)
            self.row(
                "ssh host keys",
                OK if same else FAIL,
                f"{len(box)} key(s), the ones the bundle's known_hosts pins"
                if same
                else f"the box holds other keys than the bundle's known_hosts ({len(box)} on the box)",
            )
        elif not keys:
            self.row(
                "ssh host keys", FAIL if self.e.ssh_host_keys == "regenerate" else WARN, "none on the box"
            )
        elif shared:
            asked = self.e.ssh_host_keys in ("regenerate", "per-device")
            self.row(
                "ssh host keys",
                FAIL if asked else WARN,
                "the vendor's: every box from this bundle shares them"
                + (f" (the recipe says {self.e.ssh_host_keys})" if asked else ""),
            )
        else:
            self.row("ssh host keys", OK, f"{len(box)} key(s), {fresh}")
        same_id = base.get("machine-id") is not None and base.get("machine-id") == mid
        reset = self.e.machine_id == "reset"
        if not mid:
            self.row("machine-id", FAIL if reset else WARN, "empty after boot: systemd did not make one")
        elif same_id:
            self.row(
                "machine-id",
                FAIL if reset else WARN,
                "the vendor's: every box from this bundle shares it"
                + (" (the recipe says reset)" if reset else ""),
            )
        else:
            self.row("machine-id", OK, "set, not the vendor's" if "machine-id" in base else "set")

    def settings(self) -> None:
        """timezone, locale and NTP servers as the box's own tools report them."""
        if self.e.timezone:
            _, link = self.sh("readlink /etc/localtime; date +%Z")
            ok = link.splitlines()[:1] == [f"/usr/share/zoneinfo/{self.e.timezone}"]
            self.row("timezone", OK if ok else FAIL, f"{' '.join(link.split())} (recipe: {self.e.timezone})")
        if self.e.locale:
            _, out = self.sh('. /etc/default/locale; echo "$LANG"; LANG="$LANG" locale 2>&1 >/dev/null')
            got = out.splitlines()
            ok = got[:1] == [self.e.locale] and len(got) == 1
            self.row("locale", OK if ok else FAIL, f"LANG={' / '.join(got)} (recipe: {self.e.locale})")
        if self.e.ntp:
            _, out = self.sh("systemd-analyze cat-config systemd/timesyncd.conf 2>/dev/null | grep '^NTP='")
            want = f"NTP={' '.join(self.e.ntp)}"
            self.row(
                "ntp", OK if want in out.splitlines() else FAIL, f"{out or 'no NTP= line'} (recipe: {want})"
            )

    def vendor_passwords(self) -> None:
        """Log in over SSH with each vendor account's public password: refused where it must be."""
        for user, password in VENDOR_PASSWORDS.items():
            rc, _ = self.sh(f"getent passwd {q(user)}")
            if rc != 0:
                continue
            must_refuse = user in self.e.locked or self.e.password_auth is False
            rc, out = self._password_login(user, password)
            logged_in = rc == 0 and out.splitlines()[-1:] == [user]
            if logged_in:
                self.row(
                    f"user {user}: vendor password",
                    FAIL if must_refuse else WARN,
                    f"logs in over SSH with the public password {password!r}"
                    + (" although the recipe locks it or turns passwords off" if must_refuse else ""),
                )
            elif "Permission denied" in out:
                self.row(f"user {user}: vendor password", OK, "the public password is refused")
            else:
                self.row(f"user {user}: vendor password", FAIL, f"could not try it: {out[-200:]}")

    def _password_login(self, user: str, password: str) -> tuple[int, str]:
        askpass = self.known_hosts.with_name("askpass.sh")
        askpass.write_text(f"#!/bin/sh\necho {q(password)}\n")
        askpass.chmod(0o700)
        env = {"SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
        try:
            return self._ssh(
                user,
                ["-o", "BatchMode=no", "-o", "PreferredAuthentications=password,keyboard-interactive",
                 "-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1"],
                env=env,
            )  # fmt: skip
        finally:
            askpass.unlink(missing_ok=True)

    def bundle_id(self) -> None:
        if self.e.bundle_id is None:
            return
        _, text = self.sh(f"cat {BUNDLE_ID_PATH} 2>/dev/null")
        doc = parse_bundle_id(text)
        running = str(doc["bundle"]) if doc else "none"
        status = OK if running == self.e.bundle_id else FAIL
        self.row("bundle id", status, f"{running[:12]} in {BUNDLE_ID_PATH} (build: {self.e.bundle_id[:12]})")

    def hostname(self) -> None:
        if self.e.hostname is None:
            return
        _, got = self.sh("hostname")
        self.row("hostname", OK if got == self.e.hostname else FAIL, f"{got} (recipe: {self.e.hostname})")

    def mounts(self) -> None:
        _, root = self.sh("findmnt -n -o FSTYPE,OPTIONS /")
        opts = root.split()[-1].split(",") if root else []
        want = [
            "lowerdir=/media/root-ro",
            "upperdir=/media/root-rw/overlay",
            "workdir=/media/root-rw/overlay-workdir",
        ]
        is_overlay = root.startswith("overlay") and all(w in opts for w in want)
        _, src = self.sh("findmnt -n -o SOURCE /media/root-ro; findmnt -n -o SOURCE /media/root-rw")
        srcs = src.split()
        want_src = [f"/dev/mmcblk0p{self.ro_part}", f"/dev/mmcblk0p{self.rw_part}"]
        wrc, werr = self.sh("f=/var/tmp/.airbox-check.$$; touch $f && rm -f $f")
        good = is_overlay and srcs == want_src and "rw" in opts and wrc == 0
        detail = (
            f"overlay of {want_src[0]} (ro) and {want_src[1]}, writable"
            if good
            else f"/ is {root or 'unknown'}; lower/upper from {srcs}; write test: {werr or 'ok'}"
            + (
                "; read-only: ROOTFS_RW may have no room for the overlay's work folder"
                if "ro" in opts
                else ""
            )
        )
        self.row("root filesystem", OK if good else FAIL, detail)
        _, fstab = self.sh("cat /etc/fstab")
        for line in fstab.splitlines():
            f = line.split()
            if len(f) < 4 or f[0].startswith("#") or not f[0].startswith("/dev/mmcblk0p"):
                continue
            if f[1] in ("/", "/media/root-ro", "/media/root-rw") or "noauto" in f[3].split(","):
                continue
            _, got = self.sh(f"findmnt -n -o SOURCE {q(f[1])}")
            self.row(
                f"mount {f[1]}",
                OK if got == f[0] else FAIL,
                f"{f[0]}"
                if got == f[0]
                else f"expected {f[0]} (the box's /etc/fstab), found {got or 'nothing'}",
            )

    def _retry(self, fn: Callable[[], tuple[bool, str]], seconds: float = 30) -> tuple[bool, str]:
        deadline = time.monotonic() + seconds
        while True:
            ok, detail = fn()
            if ok or time.monotonic() > deadline:
                return ok, detail
            time.sleep(2)

    def network(self) -> None:
        for ifc, addrs in sorted(self.e.addresses.items()):

            def probe(ifc: str = ifc, addrs: tuple[str, ...] = addrs) -> tuple[bool, str]:
                _, out = self.sh(f"ip -o addr show dev {q(ifc)} 2>&1")
                have = set(re.findall(r"inet6? (\S+)", out))
                missing = [a for a in addrs if a not in have]
                return not missing, (
                    f"{', '.join(addrs)}"
                    if not missing
                    else f"missing {', '.join(missing)}; has {', '.join(sorted(have)) or 'no address'}"
                )

            ok, detail = self._retry(probe)
            if not ok:
                # netplan's own verdict names a file it rejects; networkd's state says the rest
                _, gen = self.sh("netplan generate 2>&1 | tail -4")
                _, st = self.sh(f"networkctl status {q(ifc)} --no-pager 2>&1 | head -6")
                detail += (f"; netplan: {gen[-400:]}" if gen else "") + f"; networkd: {st[-300:]}"
            self.row(f"address {ifc}", OK if ok else FAIL, detail)
        for ifc, gw in sorted(self.e.gateways.items()):
            _, out = self.sh(f"ip route show default dev {q(ifc)}")
            self.row(
                f"gateway {ifc}", OK if f"via {gw}" in out else FAIL, out or f"no default route via {gw}"
            )
        for ifc, routes in sorted(self.e.routes.items()):
            _, out = self.sh(f"ip route show dev {q(ifc)}; ip -6 route show dev {q(ifc)}")
            table = [" ".join(line.split()) for line in out.splitlines()]
            missing = [
                f"{to}" + (f" via {via}" if via else "")
                for to, via in routes
                if not any(
                    line.startswith(to + " ") and (via is None or f" via {via}" in f" {line}")
                    for line in table
                )
            ]
            self.row(
                f"routes {ifc}",
                FAIL if missing else OK,
                f"missing {', '.join(missing)}; has: {'; '.join(table) or 'none'}"
                if missing
                else f"{len(routes)} route(s) as the recipe says",
            )
        for ifc, ns in sorted(self.e.nameservers.items()):

            def probe_dns(ifc: str = ifc, ns: tuple[str, ...] = ns) -> tuple[bool, str]:
                _, out = self.sh(
                    f"resolvectl dns {q(ifc)} 2>/dev/null || networkctl status {q(ifc)} --no-pager"
                )
                missing = [n for n in ns if n not in out]
                return not missing, ", ".join(
                    ns
                ) if not missing else f"missing {', '.join(missing)}: {out[-200:]}"

            ok, detail = self._retry(probe_dns, 15)
            self.row(f"nameservers {ifc}", OK if ok else FAIL, detail)

    def files(self) -> None:
        if not self.e.files:
            return
        paths = [c["device_path"] for c in self.e.files]
        _, out = self.sh(
            "for p in "
            + " ".join(q(p) for p in paths)
            + '; do if [ -f "$p" ]; then echo "$(sha256sum < "$p" | cut -d\' \' -f1) '
            '$(stat -c \'%a %u:%g\' "$p") $p"; else echo "- - - $p"; fi; done',
            timeout=300,
        )
        seen = {}
        for line in out.splitlines():
            f = line.split(" ", 3)
            if len(f) == 4:
                seen[f[3]] = f[:3]
        bad = []
        for c in self.e.files:
            got = seen.get(c["device_path"])
            want = [c["sha256"], f"{int(c['mode'], 8):o}" if c.get("mode") else "", c.get("owner") or ""]
            if got is None or got[0] != want[0]:
                bad.append(
                    f"{c['device_path']}: {'missing' if got is None or got[0] == '-' else 'other content'}"
                )
            elif (want[1] and got[1] != want[1]) or (want[2] and got[2] != want[2]):
                bad.append(f"{c['device_path']}: mode/owner {got[1]} {got[2]}, built {want[1]} {want[2]}")
        for p in self.e.removed:
            rc, _ = self.sh(f"test -e {q(p)} -o -L {q(p)}")
            if rc == 0:
                bad.append(f"{p}: still there (the recipe removes it)")
        self.row(
            "files as built",
            FAIL if bad else OK,
            "; ".join(bad[:8])
            if bad
            else f"{len(self.e.files)} file(s): content, mode and owner as built"
            + (f", {len(self.e.removed)} removal(s)" if self.e.removed else ""),
        )

    def units(self, label: str) -> None:
        for u in self.e.units:

            def probe(u: str = u) -> tuple[bool, str]:
                _, out = self.sh(f"systemctl show -p ActiveState,SubState,Result,Type {q(u)}")
                props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
                oneshot_done = props.get("Type") == "oneshot" and props.get("Result") == "success"
                ok = props.get("ActiveState") == "active" or oneshot_done
                return (
                    ok,
                    f"{props.get('ActiveState')} ({props.get('SubState')}, result {props.get('Result')})",
                )

            ok, detail = self._retry(probe, 20)
            if not ok:
                _, tail = self.sh(f"journalctl -b -u {q(u)} -n 8 --no-pager -o cat")
                detail += f": {tail[-600:]}"
            self.row(f"{label}: unit {u}", OK if ok else FAIL, detail)
        if label == "boot 1":
            for u in self.e.disabled:
                _, st = self.sh(f"systemctl is-enabled {q(u)} 2>&1")
                self.row(
                    f"unit {u} disabled", OK if st in ("disabled", "masked") or "not" in st else FAIL, st
                )

    # ------------------------------------------------------------------ from outside

    def _ssh(
        self,
        user: str,
        extra: Iterable[str],
        cmd: str = "id -un",
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
    ) -> tuple[int, str]:
        extra = list(extra)
        batch = [] if any(x.startswith("BatchMode=") for x in extra) else ["-o", "BatchMode=yes"]
        args = [
            "ssh", "-p", str(self.ssh_port), "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"HostKeyAlias={HOST_ALIAS}",
            *batch, "-o", "ConnectTimeout=20", "-F", "/dev/null", *extra,
            f"{user}@127.0.0.1", cmd,
        ]  # fmt: skip
        try:
            p = subprocess.run(
                args,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env} if env else None,
                start_new_session=env is not None,  # no terminal: ssh asks SSH_ASKPASS
            )
        except subprocess.TimeoutExpired:
            return 255, "ssh timed out"
        return p.returncode, (p.stdout + p.stderr).strip()

    def ssh(self) -> None:
        _, active = self.sh("systemctl is-active ssh.service sshd.service 2>/dev/null | head -1")
        trc, tout = self.sh("sshd -t 2>&1 || /usr/sbin/sshd -t 2>&1")
        if trc != 0 or active != "active":
            _, tail = self.sh("journalctl -b -u ssh.service -n 6 --no-pager -o cat")
            self.row("sshd", FAIL, f"{active}; sshd -t: {tout or 'ok'}; {tail[-400:]}")
            return
        self.row("sshd", OK, "active; sshd -t accepts the configuration")
        user = next(iter(self.e.users), "root")
        _, out = self._ssh(user, ["-v", "-o", "PreferredAuthentications=none"], "true")
        m = re.search(r"Authentications that can continue: (\S+)", out)
        if "Host key verification failed" in out or "REMOTE HOST IDENTIFICATION" in out:
            self.row("ssh host key", FAIL, "the box presents a key other than the one it holds")
            return
        if m is None:
            self.row("ssh reachable", FAIL, out[-400:])
            return
        methods = m[1].split(",")
        offered = "password" in methods or "keyboard-interactive" in methods
        _, eff = self.sh(
            f"sshd -T -C user={q(user)},host=check,addr=10.0.2.2 2>/dev/null "
            "| grep -i '^passwordauthentication'"
        )
        detail = f"offers {','.join(methods)}; {eff or 'sshd -T: ?'}"
        if self.e.password_auth is False:
            self.row(
                "ssh password login",
                FAIL if offered else OK,
                ("offered, but the recipe turns it off: " if offered else "refused, as the recipe says: ")
                + detail,
            )
        else:
            self.row(
                "ssh password login",
                WARN if offered else OK,
                ("offered: " if offered else "refused: ") + detail,
            )

    def users(self) -> None:
        pubs = {self._pubkey(i): i for i in self.identities}
        for name, keys in sorted(self.e.users.items()):
            rc, pw = self.sh(f"getent passwd {q(name)}")
            if rc != 0:
                self.row(f"user {name}", FAIL, "not in the box's passwd")
                continue
            f = pw.split(":")
            _, groups = self.sh(f"id -nG {q(name)}")
            self.row(f"user {name}", OK, f"uid {f[2]}, home {f[5]}, shell {f[6]}, groups {groups}")
            if not keys:
                continue
            home = f[5]
            ak = f"{home}/.ssh/authorized_keys"
            _, st = self.sh(
                f"stat -c '%n %U %a' {q(home)} {q(home + '/.ssh')} {q(ak)} 2>&1; cat {q(ak)} 2>/dev/null"
            )
            problems = []
            lines = st.splitlines()
            for line in lines[:3]:
                p = line.split()
                if len(p) == 3 and p[1] not in (name, "root"):
                    problems.append(f"{p[0]} is owned by {p[1]} (sshd's StrictModes refuses keys for {name})")
                elif len(p) == 3 and int(p[2], 8) & 0o022:
                    problems.append(f"{p[0]} is writable by group/others ({p[2]}): sshd refuses it")
                elif len(p) == 3 and p[0] == ak and p[1] != name:
                    problems.append(f"{ak} is owned by {p[1]}, not {name}")
            content = "\n".join(lines[3:])
            for k in keys:
                if " ".join(k.split()[:2]) not in content:
                    problems.append(f"key {k.split()[-1]} is not in {ak}")
            self.row(
                f"user {name}: authorized_keys",
                FAIL if problems else OK,
                "; ".join(problems) if problems else f"{len(keys)} key(s), owner and modes as sshd wants",
            )
            for k in keys:
                ident = pubs.get(" ".join(k.split()[:2]))
                comment = k.split()[-1] if len(k.split()) > 2 else ""
                label = f"user {name}: login with {k.split()[0]} {comment}".rstrip()
                if ident is None:
                    self.row(label, WARN, "not tried: no private key for it (pass --identity FILE)")
                    continue
                rc, out = self._ssh(
                    name,
                    [
                        "-i",
                        str(ident),
                        "-o",
                        "IdentitiesOnly=yes",
                        "-o",
                        "PreferredAuthentications=publickey",
                    ],
                )
                ok = rc == 0 and out.splitlines()[-1:] == [name]
                self.row(label, OK if ok else FAIL, "logged in" if ok else f"refused: {out[-300:]}")

    @staticmethod
    def _pubkey(identity: Path) -> str:
        p = subprocess.run(
            ["ssh-keygen", "-y", "-f", str(identity)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        return " ".join(p.stdout.split()[:2])

    def ports(self) -> None:
        for app, port in sorted(self.e.ports.items()):
            host = self.forwards.get(port)
            if host is None:
                continue

            def probe(host: int = host) -> tuple[bool, str]:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{host}/", timeout=10) as r:
                        return True, f"HTTP {r.status}"
                except urllib.error.HTTPError as e:
                    return True, f"HTTP {e.code}"
                except OSError as e:
                    return False, f"no answer ({e})"

            ok, detail = self._retry(probe, 30)
            self.row(
                f"app {app}: port {port}", OK if ok else FAIL, detail + f" (forwarded to 127.0.0.1:{host})"
            )


def baseline_facts(agent: Agent) -> dict[str, Any]:
    """What the unmodified vendor package does in the VM: failed units, host keys, machine-id."""
    agent.run("systemctl is-system-running --wait", timeout=300)
    failed = agent.run(
        "systemctl list-units --state=failed --no-legend --plain | awk '{print $1}'"
    ).out.split()
    keys = agent.run("cat /etc/ssh/ssh_host_*_key.pub 2>/dev/null | sort").out.strip()
    mid = agent.run("cat /etc/machine-id 2>/dev/null").out.strip()
    return {"failed": sorted(u for u in failed if u != UNIT_NAME), "host keys": keys, "machine-id": mid}
