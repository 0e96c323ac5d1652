"""The vendor's way to the same customised package, step by step, with the vendor's tools.

bm_make_package.sh builds every partition image (mkfs.ext4 at the partition size, mount,
untar, umount, `e2fsck -f -p`, `resize2fs -M`), then for every partition cuts the image with
`dd bs=512 skip=.. count=200704`, runs `gzip FILE` on each piece one after another, writes
each script with mkimage, and `md5sum * > md5.txt` closes the set. Someone customising a
vendor package by hand does the same after joining the chunks back into images:

1. join    every partition: `gzip -dc <label>.1-of-M.gz ... <label>.M-of-M.gz > <label>.img`
2. edit    the partitions the recipe changes: `resize2fs` up to the partition size (the vendor's
           mkfs size), copy the files in, `e2fsck -f -p`, `resize2fs -M`. A mount and `cp -a`
           needs root; the same writes go through one `debugfs -w` script instead (one process,
           the cheapest rootless equivalent: it favours the baseline, if anything)
3. split   every partition with the vendor's `dd bs=512` command
4. gzip    every chunk, sequentially, `gzip FILE` (level 6)
5. scripts regenerated with mkimage (boot_emmc-*.scr), the GPT re-gzipped, other files copied
6. md5     `md5sum * > md5.txt`

Each step is timed on its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.workload import Edit
from tests import vendor_fixture as vf

SECTOR = 512
VENDOR_CHUNK_SECTORS = 200704  # CHUNK_SIZE in bm_make_package.sh
_CHUNK = re.compile(r"^(?P<name>.+)\.(?P<k>\d+)-of-(?P<m>\d+)\.gz$")


@dataclass
class BaselineResult:
    seconds: dict[str, float] = field(default_factory=dict)
    output_bytes: int = 0
    chunks: int = 0

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _sh(
    cmd: Sequence[str | Path], cwd: Path | None = None, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("GZIP",)}
    env["LC_ALL"] = "C"
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        check=False,
        **kw,
    )  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr.decode()[-800:]}"
        )
    return proc


def _chunks_of(package: Path) -> dict[str, list[str]]:
    """Chunk files per lower-case partition name, in order (what `ls <name>.*-of-*.gz` shows)."""
    found: dict[str, list[tuple[int, str]]] = {}
    for p in package.iterdir():
        m = _CHUNK.match(p.name)
        if m:
            found.setdefault(m["name"], []).append((int(m["k"]), p.name))
    return {name: [f for _, f in sorted(files)] for name, files in found.items()}


def _debugfs_script(edits: Sequence[Edit], text_dir: Path) -> str:
    """cd into each parent, then mkdir/write by bare name (debugfs 1.45 links names literally)."""
    lines: list[str] = []
    for k, e in enumerate(edits):
        parent, name = e.path.rsplit("/", 1)
        lines.append(f'cd "{parent or "/"}"')
        if e.kind == "dir":
            lines.append(f'mkdir "{name}"')
            type_bits = 0o040000
        else:
            src = e.src
            if src is None:
                src = text_dir / f"{k}.txt"
                src.write_text(e.text or "")
            lines.append(f'rm "{name}"')  # replace an existing file (an error when there is none: fine)
            lines.append(f'write "{src}" "{name}"')
            type_bits = 0o100000
        lines += [
            f'sif "{name}" mode 0{type_bits | e.mode:o}',
            f'sif "{name}" uid {e.uid}',
            f'sif "{name}" gid {e.gid}',
        ]
    return "\n".join(lines) + "\n"


def _edit_image(image: Path, size_bytes: int, edits: Sequence[Edit], work: Path) -> None:
    try:
        _sh(["resize2fs", image, f"{size_bytes // 1024}K"])
    except RuntimeError:  # "Please run 'e2fsck -f' first"
        _sh(["e2fsck", "-f", "-p", image])
        _sh(["resize2fs", image, f"{size_bytes // 1024}K"])
    text_dir = work / f"text-{image.stem}"
    text_dir.mkdir()
    script = work / f"edit-{image.stem}.debugfs"
    script.write_text(_debugfs_script(edits, text_dir))
    _sh(["debugfs", "-w", "-f", script, image])
    _sh(["e2fsck", "-f", "-p", image])
    _sh(["resize2fs", "-M", image])
    # resize2fs -M shrinks the file system, not the file: cut the file as the vendor's dd would read it
    info = _sh(["dumpe2fs", "-h", image]).stdout.decode()
    blocks = int(re.search(r"Block count:\s+(\d+)", info)[1])  # type: ignore[index]
    bsize = int(re.search(r"Block size:\s+(\d+)", info)[1])  # type: ignore[index]
    os.truncate(image, blocks * bsize)


def run_baseline(package: Path, out: Path, work: Path, edits: Sequence[Edit]) -> BaselineResult:
    """Produce the customised file set in `out` the vendor's way; `work` holds the images."""
    res = BaselineResult()
    for d in (out, work):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    xml = (package / "partition32G.xml").read_text()
    layout = _layout(xml)
    chunks = _chunks_of(package)

    t = time.perf_counter()
    images: dict[str, Path] = {}
    for spec in layout:
        files = chunks.get(spec.name)
        if not files:
            continue
        image = work / f"{spec.name}.img"
        with open(image, "wb") as f:
            subprocess.run(["gzip", "-dc", *files], cwd=package, stdout=f, check=True)
        images[spec.name] = image
    res.seconds["join"] = time.perf_counter() - t

    t = time.perf_counter()
    by_part: dict[str, list[Edit]] = {}
    for e in edits:
        by_part.setdefault(e.partition.lower(), []).append(e)
    for name, part_edits in by_part.items():
        spec = next(s for s in layout if s.name == name)
        _edit_image(images[name], spec.size_kb * 1024, part_edits, work)
    res.seconds["edit"] = time.perf_counter() - t

    t = time.perf_counter()
    cut: dict[str, list[tuple[str, int, int]]] = {}
    for spec in layout:
        if spec.name in images:
            cut[spec.name] = _dd_split(images[spec.name], out, spec.name)
            images[spec.name].unlink()
    res.seconds["split (dd bs=512)"] = time.perf_counter() - t

    t = time.perf_counter()
    for pieces in cut.values():
        for fname, _, _ in pieces:
            _sh(["gzip", fname], cwd=out)
            res.chunks += 1
    res.seconds["gzip -6 (sequential)"] = time.perf_counter() - t

    t = time.perf_counter()
    _scripts(package, out, layout, cut)
    res.seconds["scripts"] = time.perf_counter() - t

    t = time.perf_counter()
    names = sorted(p.name for p in out.iterdir())
    (out / "md5.txt").write_bytes(_sh(["md5sum", "--", *names], cwd=out).stdout)
    res.seconds["md5sum"] = time.perf_counter() - t
    res.output_bytes = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(work, ignore_errors=True)
    return res


def _layout(xml: str) -> list[vf.PartSpec]:
    out = []
    for m in re.finditer(r'label="([^"]+)"\s+size_in_kb="(\d+)"\s+readonly="(\w+)"\s+format="(\d)"', xml):
        out.append(vf.PartSpec(m[1], int(m[2]), m[3] == "true", int(m[4])))
    return out


def _dd_split(image: Path, out: Path, name: str) -> list[tuple[str, int, int]]:
    """split_and_compress_img: dd status=none bs=512 skip=<offset> count=<chunk sectors>."""
    size = image.stat().st_size
    sectors = -(-size // SECTOR)
    chunk = VENDOR_CHUNK_SECTORS
    limit = -(-sectors // chunk)
    pieces = []
    offset, count = 0, 1
    while sectors > 0:
        n = min(chunk, sectors)
        fname = f"{name}.{count}-of-{limit}"
        _sh(
            [
                "dd",
                "status=none",
                f"if={image}",
                f"of={out / fname}",
                f"bs={SECTOR}",
                f"skip={offset}",
                f"count={n}",
            ]
        )
        pieces.append((fname, (out / fname).stat().st_size, offset))
        offset += n
        sectors -= n
        count += 1
    return pieces


def _scripts(
    package: Path, out: Path, layout: Sequence[vf.PartSpec], cut: dict[str, list[tuple[str, int, int]]]
) -> None:
    """The scripts and the small files, as the packer writes them (mkimage for each script)."""
    opts = vf.PackageOptions(layout=tuple(layout))
    for name in (
        "fip.bin",
        "spi_flash.bin",
        "spi_flash_bm1684.bin",
        "spi_flash_bm1684x.bin",
        "BOOT",
        "partition32G.xml",
    ):
        if (package / name).exists():
            shutil.copy2(package / name, out / name)
    vf.write_script(out, "boot", vf.top_script(opts), opts)
    vf.write_script(out, "boot_spif", vf.spif_script(opts), opts)
    with open(out / "gpt", "wb") as f:
        subprocess.run(["gzip", "-dc", package / "gpt.gz"], stdout=f, check=True)
    _sh(["gzip", "gpt"], cwd=out)
    emmc = vf.emmc_header() + vf.emmc_entry("mmc gpt file", "gpt")
    vf.write_script(out, "boot_emmc-gpt", vf.gpt_script_header() + vf.chunk_block("gpt.gz", 17408, 0), opts)
    offsets = vf.partition_offsets(layout)
    for index, (spec, offset) in enumerate(zip(layout, offsets, strict=True)):
        if spec.name not in cut:
            continue
        lines = vf.partition_script_header(index, spec.name)
        for fname, nbytes, rel in cut[spec.name]:
            lines += vf.chunk_block(f"{fname}.gz", nbytes, offset + rel)
        vf.write_script(out, f"boot_emmc-{spec.name}", lines, opts)
        emmc += vf.emmc_entry(f"Partition {index} ({spec.name})", spec.name)
    vf.write_script(out, "boot_emmc", emmc + vf.emmc_done(), opts)
