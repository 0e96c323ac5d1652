"""What a box is, read over SSH before anything is written to it: the bundle it runs, where the
update folder lives (partition, free space, writable), its partition table, what of an earlier
bundle is already in the folder."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from builder.customise.bundleid import BUNDLE_ID_PATH, parse
from builder.errors import PackageError
from builder.manifest import parse_md5
from builder.package.gpt import Gpt, decode_gpt
from builder.package.partxml import GPT_BLOB_SIZE
from builder.push.ssh import SSH_FAILED, BoxError, Ssh, explain_ssh_failure

PARTIAL = ".partial"  # files on their way, resumed from their size

# $1: the update folder. Every line is `@key value`; nothing here writes to the box.
PROBE = r"""
dir=$1
echo "@uid $(id -u)"
echo "@boot_id $(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"
[ -r __ID__ ] && echo "@id $(tr -d '\n' < __ID__)"
d=$dir
while [ ! -d "$d" ]; do d=$(dirname "$d"); done
echo "@existing $(cd "$d" && pwd -P)"
if [ -w "$d" ]; then echo "@writable yes"; else echo "@writable no"; fi
echo "@statfs $(stat -f -c '%a %S' "$d")"
while read -r src mnt fstype opts rest; do echo "@mount $src $mnt $fstype $opts"; done < /proc/mounts
if [ -d "$dir" ]; then
  for f in "$dir"/* "$dir"/__PARTIAL__/*; do
    [ -f "$f" ] && echo "@file $(stat -c %s "$f") ${f#"$dir"/}"
  done
  [ -f "$dir/md5.txt" ] && sed 's/^/@md5 /' "$dir/md5.txt"
fi
true
""".replace("__ID__", BUNDLE_ID_PATH).replace("__PARTIAL__", PARTIAL)

# $1: the partition's device name (e.g. mmcblk0p7). Its number, its disk and the disk's GPT.
DISK = r"""
part=$1
sys=/sys/class/block/$part
[ -r "$sys/partition" ] || { echo "@error no $sys/partition"; exit 0; }
echo "@number $(cat "$sys/partition")"
disk=$(basename "$(dirname "$(cd "$sys" && pwd -P)")")
if [ ! -e "/dev/$disk" ]; then
  case $part in *[0-9]p[0-9]*) disk=${part%p*} ;; *) disk=$(echo "$part" | sed 's/[0-9]*$//') ;; esac
fi
echo "@disk $disk"
if [ -r "/dev/$disk" ]; then rd=""; elif [ "$(id -u)" != 0 ]; then rd="sudo -n"; else rd=""; fi
$rd dd if="/dev/$disk" bs=512 count=34 2>/dev/null | od -An -v -tx1 | tr -d ' \n' | sed 's/^/@gpt /'
echo
"""


@dataclass
class BoxFacts:
    uid: int
    boot_id: str
    bundle_id: dict[str, object] | None
    folder: str  # the update folder, as given
    existing: str  # its nearest existing folder (resolved)
    writable: bool
    free_bytes: int
    device: str  # e.g. /dev/mmcblk0p7
    mount_point: str
    fstype: str
    read_only: bool
    files: dict[str, int] = field(default_factory=dict)  # name (or .partial/name) -> size
    md5: dict[str, str] = field(default_factory=dict)  # what the folder's md5.txt claims
    number: int = 0  # GPT number of the partition that holds the folder
    disk: str = ""
    gpt: Gpt | None = None

    @property
    def running(self) -> str | None:
        return str(self.bundle_id["bundle"]) if self.bundle_id else None


def _lines(out: bytes) -> list[tuple[str, str]]:
    pairs = []
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("@"):
            key, _, value = line[1:].partition(" ")
            pairs.append((key, value))
    return pairs


def run_checked(ssh: Ssh, script: str, *args: str, what: str, timeout: float = 120) -> bytes:
    proc = ssh.run(script, *args, timeout=timeout)
    if proc.returncode == SSH_FAILED:
        raise explain_ssh_failure(ssh.target, proc.stderr, ssh.known_hosts)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise BoxError(
            f"box {ssh.target.label}: {what} failed (exit {proc.returncode}): "
            f"{err[-1] if err else 'no message'}",
            hint="log in to the box and run it by hand to see why",
        )
    return proc.stdout


def probe(ssh: Ssh, folder: str) -> BoxFacts:
    pairs = _lines(run_checked(ssh, PROBE, folder, what="reading the box"))
    one = {k: v for k, v in pairs}
    mounts = [v.split(" ") for k, v in pairs if k == "mount"]
    try:
        avail, bsize = (int(x) for x in one["statfs"].split())
        uid = int(one["uid"])
    except (KeyError, ValueError):
        raise BoxError(
            f"box {ssh.target.label}: cannot read the free space of {folder} "
            f"({one.get('statfs', 'no answer')})",
            hint="the box needs a POSIX shell with `stat -f` (coreutils or busybox)",
        ) from None
    existing = one.get("existing", "/")
    mount = _mount_of(existing, mounts)
    if mount is None:
        raise BoxError(f"box {ssh.target.label}: no mount holds {existing} (/proc/mounts)")
    src, mnt, fstype, opts = mount
    files = {}
    for k, v in pairs:
        if k == "file":
            size, _, name = v.partition(" ")
            files[name] = int(size)
    md5_text = "".join(v + "\n" for k, v in pairs if k == "md5")
    try:
        md5 = dict(parse_md5(md5_text)) if md5_text else {}
    except PackageError:
        md5 = {}  # a damaged md5.txt of an earlier bundle: nothing is reused on its word
    facts = BoxFacts(
        uid=uid,
        boot_id=one.get("boot_id", ""),
        bundle_id=parse(one["id"]) if "id" in one else None,
        folder=folder,
        existing=existing,
        writable=one.get("writable") == "yes",
        free_bytes=avail * bsize,
        device=src,
        mount_point=mnt,
        fstype=fstype,
        read_only="ro" in opts.split(","),
        files=files,
        md5=md5,
    )
    return facts


def _mount_of(path: str, mounts: list[list[str]]) -> list[str] | None:
    best = None
    for m in mounts:
        if len(m) < 4:
            continue
        point = m[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/") or point == "/"
        if inside and (best is None or len(point) >= len(best[1])):
            best = [m[0], point, m[2], m[3]]
    return best


def read_disk(ssh: Ssh, facts: BoxFacts) -> None:
    """The GPT number of the folder's partition, its disk, and the disk's primary GPT."""
    label = ssh.target.label
    if not facts.device.startswith("/dev/"):
        raise BoxError(
            f"box {label}: {facts.folder} is on {facts.device} ({facts.fstype}), not on a partition of the "
            "eMMC: U-Boot cannot read an update from there",
            hint="choose a folder on the eMMC's DATA partition with --dir (default /data/ota)",
        )
    pairs = dict(_lines(run_checked(ssh, DISK, posixpath.basename(facts.device), what="reading the disk")))
    if "error" in pairs or "number" not in pairs:
        raise BoxError(
            f"box {label}: cannot tell which partition {facts.device} is ({pairs.get('error', 'no answer')})"
        )
    facts.number = int(pairs["number"])
    facts.disk = pairs.get("disk", "")
    blob = bytes.fromhex(pairs.get("gpt", ""))
    if len(blob) != GPT_BLOB_SIZE:
        raise BoxError(
            f"box {label}: cannot read the partition table of /dev/{facts.disk} ({len(blob)} bytes read)",
            hint="log in as root, or as a user who may run `sudo -n dd` without a password",
        )
    try:
        facts.gpt = decode_gpt(blob, f"/dev/{facts.disk} of {label}")
    except PackageError as e:
        raise BoxError(
            f"box {label}: /dev/{facts.disk} has no partition table this tool can read: {e.message}",
            hint="this box was not installed from an AirBox package: update it with a card",
        ) from None


def layout_differences(box: Gpt, bundle: Gpt) -> list[str]:
    """How the box's table differs from the bundle's. The box's last partition may be larger: its
    first boot grows it to the end of the eMMC (FORMAT.md section 5)."""
    diffs = []
    mine = {e.slot: e for e in box.entries}
    theirs = {e.slot: e for e in bundle.entries}
    last = max(theirs) if theirs else -1
    for slot in sorted(set(mine) | set(theirs)):
        a, b = mine.get(slot), theirs.get(slot)
        if a is None or b is None:
            diffs.append(f"p{slot + 1}: {'only on the box' if b is None else 'only in the bundle'}")
            continue
        if a.name != b.name:
            diffs.append(f"p{slot + 1}: named {a.name} on the box, {b.name} in the bundle")
        if a.first_lba != b.first_lba:
            diffs.append(
                f"p{slot + 1} ({b.name}): starts at sector {a.first_lba} on the box, "
                f"{b.first_lba} in the bundle"
            )
        grown = slot == last and a.last_lba >= b.last_lba
        if a.last_lba != b.last_lba and not grown:
            diffs.append(
                f"p{slot + 1} ({b.name}): {a.size_sectors} sectors on the box, {b.size_sectors} in the bundle"
            )
    return diffs
