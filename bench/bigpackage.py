"""A realistic, full-scale vendor package for the benchmark, built with the vendor's own tools.

The miniature fixture (tests/vendor_fixture.py) re-implements the vendor packer at toy
scale, holding every file in memory. This module reuses its pieces (script text, GPT,
mkimage, md5.txt, the fixture trees that hold /etc/passwd, fstab, netplan...) and adds
what a real package has: the vendor's partition sizes and 98 MiB chunks, and gigabytes of
real files. File contents come from the build machine's /usr (hard-linked into the
staging folder, never modified) and from deterministic incompressible "model" blobs.

The ext4 images are made exactly as bm_make_package.sh makes them: `mkfs.ext4` at the
full partition size (Ubuntu 20.04's feature set), filled, `e2fsck -f -p`, `resize2fs -M`.
The chunks are cut with the vendor's chunk size and compressed by `gzip FILE` (level 6,
name and mtime in the header), two at a time to save wall time (gzip's bytes do not
depend on that).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tests import vendor_fixture as vf

GiB = 1 << 30
MiB = 1 << 20
VENDOR_CHUNK_SECTORS = 200704  # 98 MiB, every public revision of bm_make_package.sh

# The AirBox partition32G.xml (FORMAT.md section 4).
AIRBOX_LAYOUT: tuple[vf.PartSpec, ...] = (
    vf.PartSpec("BOOT", 131072, False, vf.FMT_FAT),
    vf.PartSpec("RECOVERY", 3145728, False, vf.FMT_EXT4),
    vf.PartSpec("MISC", 10240, False, vf.FMT_RAW),
    vf.PartSpec("ROOTFS", 3145728, True, vf.FMT_EXT4),
    vf.PartSpec("ROOTFS_RW", 6291456, False, vf.FMT_EXT4),
    vf.PartSpec("OPT", 2097152, False, vf.FMT_EXT4),
    vf.PartSpec("DATA", 4194304, False, vf.FMT_EXT4),
)
AIRBOX_DISK_KB = 20971520


@dataclass(frozen=True)
class Size:
    """How much real content goes where (bytes of file data, before ext4 overhead)."""

    name: str
    rootfs_usr: int  # files sampled from the host's /usr into ROOTFS /usr
    data_models: int  # incompressible model blobs in DATA /models
    data_files: int  # host /usr/share files in DATA /media (docs, text, images)
    opt_libs: int  # host shared libraries in OPT /sophon
    recovery_blob: int  # the recovery kernel+initramfs stand-in
    payload_code: int  # the app payload: code copied from the host's python libraries
    payload_models: int  # the app payload: incompressible model weights


SIZES = {
    "full": Size(
        "full", 2 * GiB + 256 * MiB, 640 * MiB, 420 * MiB, 220 * MiB, 40 * MiB, 150 * MiB, 350 * MiB
    ),
    # the same recipe payload as "full": only the package differs, so peak RSS can be compared
    "small": Size("small", 512 * MiB, 160 * MiB, 100 * MiB, 60 * MiB, 16 * MiB, 150 * MiB, 350 * MiB),
}


# ----------------------------------------------------------------------------- content


def blob_chunks(tag: str, size: int) -> Iterator[bytes]:
    """Deterministic incompressible bytes (like quantised model weights), in 8 MiB pieces."""
    k = 0
    while size > 0:
        n = min(size, 8 * MiB)
        yield hashlib.shake_256(f"{tag}:{k}".encode()).digest(n)
        size -= n
        k += 1


def write_blob(dest: Path, tag: str, size: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        for piece in blob_chunks(tag, size):
            f.write(piece)


def host_files(
    top: Path, budget: int, *, seed: str, max_file: int = 64 * MiB, strict: bool = True
) -> list[tuple[Path, int]]:
    """A deterministic sample of the regular files under `top`, taking about `budget` bytes on ext4.

    Files are taken in the order of a hash of their path, so the sample is spread over the
    whole tree (binaries, libraries, python, docs) rather than the first folders alphabetically.
    """
    found: list[tuple[bytes, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            if not (0 < st.st_size <= max_file) or not os.path.isfile(p) or os.path.islink(p):
                continue
            key = hashlib.sha1(f"{seed}:{p}".encode()).digest()
            found.append((key, p, st.st_size))
    found.sort()
    out, total = [], 0
    for _key, p, size in found:
        if total >= budget:
            break
        if not os.access(p, os.R_OK):
            continue
        out.append((p, size))
        total += -(-size // 4096) * 4096  # what it takes in the image: whole 4 KiB blocks
    if strict and total < budget * 0.9:
        raise SystemExit(f"{top} holds only {total} bytes of files, the benchmark needs {budget}")
    return sorted(out)


def link_into(stage: Path, files: Sequence[tuple[Path, int]], strip: Path, under: str) -> int:
    """Hard-link (or copy) host files into stage/<under>/<path below strip>; returns bytes placed."""
    root = stage.resolve()
    placed = 0
    for src, size in files:
        dest = stage / under.strip("/") / src.relative_to(strip)
        if os.path.lexists(dest):
            continue  # the fixture tree already has this path (e.g. /usr/lib/os-release)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not str(dest.parent.resolve()).startswith(str(root)):
            continue  # a parent is a symlink leading out of the stage
        try:
            os.link(src, dest)
        except OSError:
            shutil.copy2(src, dest)
        placed += size
    return placed


# ----------------------------------------------------------------------------- images


def make_ext4_from_stage(
    image: Path,
    size_bytes: int,
    tree: vf.Tree,
    stage: Path,
    *,
    index: int,
    label: str,
    opts: vf.PackageOptions,
) -> None:
    """mkfs.ext4 -d at full partition size, the fixture tree's owners/modes, e2fsck -f -p, resize2fs -M."""
    work = stage.parent
    conf = work / "mke2fs.conf"
    conf.write_text(vf.MKE2FS_CONF)
    env = vf.tool_env(opts, MKE2FS_CONFIG=str(conf))
    rng = __import__("random").Random(f"fs:{opts.seed}:{index}:{label}")
    fs_uuid, hash_seed = vf._guid(rng), vf._guid(rng)
    with open(image, "wb") as f:
        f.truncate(size_bytes)
    vf.sh(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-T", "default", "-U", str(fs_uuid),
         "-E", f"hash_seed={hash_seed},root_owner=0:0,no_copy_xattrs", "-d", stage, image],
        env,
    )  # fmt: skip
    script = work / f"debugfs-{image.stem}.cmd"
    script.write_text(vf._debugfs_script(tree, opts.epoch))
    out = vf.sh(["debugfs", "-w", "-f", script, image], env)
    errors = [ln for ln in out.stderr.decode().splitlines() if not ln.startswith("debugfs ")]
    if errors:
        raise vf.FixtureError(f"debugfs on {image.name}: {errors[:5]}")
    vf.sh(["e2fsck", "-f", "-p", image], env)
    vf.sh(["resize2fs", "-M", image], env)


def stage_partition(label: str, size: Size, stage: Path, opts: vf.PackageOptions) -> vf.Tree:
    """Lay the partition's files out in `stage`; returns the fixture tree (for owners and modes)."""
    spec = next(p for p in opts.layout if p.label == label)
    tree = vf.partition_tree(spec, opts)
    vf._stage_tree(tree, stage)
    usr = Path("/usr")
    if label == "ROOTFS":
        link_into(stage, host_files(usr, size.rootfs_usr, seed="rootfs"), usr, "/usr")
    elif label == "DATA":
        share = usr / "share"
        link_into(stage, host_files(share, size.data_files, seed="data"), share, "/media/share")
        for k, part in enumerate(_split_sizes(size.data_models, 8)):
            write_blob(stage / "models" / f"model-{k}.bmodel", f"data-model-{k}", part)
    elif label == "OPT":
        lib = usr / "lib"
        libs = [f for f in host_files(lib, size.opt_libs * 4, seed="opt") if ".so" in f[0].name]
        link_into(stage, _take(libs, size.opt_libs), lib, "/sophon/libsophon-0.5.1/lib")
    elif label == "RECOVERY":
        write_blob(stage / "recovery-initrd.img", "recovery", size.recovery_blob)
    return tree


def _split_sizes(total: int, parts: int) -> list[int]:
    """Uneven but deterministic file sizes adding up to total (model files differ in size)."""
    weights = [k + 1 for k in range(parts)]
    sizes = [total * w // sum(weights) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def _take(files: Sequence[tuple[Path, int]], budget: int) -> list[tuple[Path, int]]:
    out, total = [], 0
    for f in files:
        if total >= budget:
            break
        out.append(f)
        total += f[1]
    return out


def build_image(
    spec: vf.PartSpec, index: int, size: Size, opts: vf.PackageOptions, images: Path, work: Path
) -> Path:
    image = images / f"{spec.name}.img"
    full = spec.size_kb * 1024
    if spec.fmt == vf.FMT_EXT4:
        stage = work / f"stage-{spec.name}"
        tree = stage_partition(spec.label, size, stage, opts)
        make_ext4_from_stage(image, full, tree, stage, index=index, label=spec.label, opts=opts)
        shutil.rmtree(stage)
    elif spec.fmt == vf.FMT_FAT:
        rng = __import__("random").Random(f"fs:{opts.seed}:{index}:{spec.label}")
        vf.make_fat(image, full, vf.partition_tree(spec, opts), volume_id=rng.getrandbits(32), opts=opts)
    else:
        vf.make_raw(image, full, None)
    return image


# ----------------------------------------------------------------------------- the packer


def gzip_parallel(folder: Path, names: Sequence[str], opts: vf.PackageOptions, jobs: int = 2) -> None:
    """`gzip FILE` for every chunk (the vendor's bytes), `jobs` gzip processes at a time."""
    for n in names:
        os.utime(folder / n, (opts.epoch, opts.epoch))
    env = vf.tool_env(opts)
    groups = [list(names[k::jobs]) for k in range(jobs)]
    procs = [subprocess.Popen(["gzip", *g], cwd=folder, env=env) for g in groups if g]
    if any(p.wait() != 0 for p in procs):
        raise vf.FixtureError("gzip failed while packing the benchmark package")


def build_big_package(root: Path, size: Size, *, log: bool = True) -> vf.MiniPackage:
    """The vendor file set in root/sdcard (root/images is removed once chunks are cut)."""
    opts = replace(
        vf.PackageOptions(),
        layout=AIRBOX_LAYOUT,
        disk_kb=AIRBOX_DISK_KB,
        chunk_sectors=VENDOR_CHUNK_SECTORS,
    )
    vf._validate(opts)
    folder, images, work = root / "sdcard", root / "images", root / "work"
    for d in (folder, images, work):
        d.mkdir(parents=True, exist_ok=False)
    (folder / "partition32G.xml").write_text(vf.render_xml(opts.layout, opts.disk_kb))
    vf.write_script(folder, "boot", vf.top_script(opts), opts)
    vf._copy_bootloader_files(folder, opts)
    vf.write_script(folder, "boot_spif", vf.spif_script(opts), opts)
    emmc = vf.emmc_header() + vf.emmc_entry("mmc gpt file", "gpt")
    gpt = vf.encode_gpt(opts.layout, opts.disk_kb, opts.seed)
    (folder / "gpt").write_bytes(gpt)
    vf.gzip_files(folder, ["gpt"], opts)
    vf.write_script(
        folder, "boot_emmc-gpt", vf.gpt_script_header() + vf.chunk_block("gpt.gz", len(gpt), 0), opts
    )
    built = []
    offsets = vf.partition_offsets(opts.layout)
    for index, (spec, offset) in enumerate(zip(opts.layout, offsets, strict=True)):
        if log:
            print(f"  package: {spec.label} image", flush=True)
        image = build_image(spec, index, size, opts, images, work)
        chunks = vf.split_image(image, folder, spec.name, opts.chunk_sectors)
        image.unlink()
        if log:
            print(f"  package: {spec.label} gzip -6 of {len(chunks)} chunk(s)", flush=True)
        gzip_parallel(folder, [c[0] for c in chunks], opts)
        lines = vf.partition_script_header(index, spec.name)
        for fname, nbytes, rel in chunks:
            lines += vf.chunk_block(f"{fname}.gz", nbytes, offset + rel)
        vf.write_script(folder, f"boot_emmc-{spec.name}", lines, opts)
        emmc += vf.emmc_entry(f"Partition {index} ({spec.name})", spec.name)
        built.append(
            vf.BuiltPartition(
                index, spec.label, spec.fmt, spec.readonly, offset, spec.size_sectors, None,
                tuple(f"{c[0]}.gz" for c in chunks), tuple(c[1] for c in chunks),
            )
        )  # fmt: skip
    vf.write_script(folder, "boot_emmc", emmc + vf.emmc_done(), opts)
    vf._pin_mtimes(folder, opts.epoch)
    vf.write_md5(folder, opts)
    shutil.rmtree(work)
    shutil.rmtree(images)
    return vf.MiniPackage(
        folder, folder / "partition32G.xml", tuple(built), opts.chunk_sectors, gpt, opts.disk_kb, opts
    )


def build_payload(dest: Path, size: Size) -> Path:
    """The 500 MiB app payload laid out like the device (dest/data/app/...): code + model weights."""
    app = dest / "data" / "app"
    placed = 0
    for top in _code_dirs():
        files = host_files(top, size.payload_code - placed, seed="payload", max_file=16 * MiB, strict=False)
        placed += link_into(app / "code" / top.name, files, top, "")
        if placed >= size.payload_code * 0.9:
            break
    for k, part in enumerate(_split_sizes(size.payload_models, 4)):
        write_blob(app / "models" / f"detector-{k}.bmodel", f"payload-model-{k}", part)
    (app / "config.json").write_text('{"models": "models/", "threads": 4}\n')
    return dest


def _code_dirs() -> list[Path]:
    """Where the build machine keeps Python code: its site-packages, its stdlib, /usr/lib/python3*."""
    paths = sysconfig.get_paths()
    found = [Path(paths["purelib"]), Path(paths["stdlib"]), *sorted(Path("/usr/lib").glob("python3*"))]
    return [p for p in dict.fromkeys(found) if p.is_dir()]
