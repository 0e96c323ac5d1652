"""A miniature bundle for the card tests, built once where the build's tools are (Linux) and
carried to the Windows and macOS runners as a CI artifact (.github/workflows/card.yml).

    python tests/card_bundle.py OUT     # writes OUT/<name>/ (card/, SHA256SUMS, report)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vendor_fixture as vf
from buildhelp import run_build, write_recipe

TOOLS = ("mke2fs", "debugfs", "e2fsck", "resize2fs", "mkfs.fat", "mcopy", "mkimage")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None and not Path("/sbin", t).exists()]


def build_bundle(out: Path) -> Path:
    """The default miniature vendor package with a small recipe: OUT/card-os/."""
    with tempfile.TemporaryDirectory(prefix="card-bundle-") as tmp:
        work = Path(tmp)
        pkg = vf.build_package(work / "vendor")
        files = [{"path": "/etc/motd", "content": "card test\n"}]
        recipe = write_recipe(work / "recipe", pkg.dir, name="card-os", hostname="card-os", files=files)
        result = run_build(recipe, work / "out", work / "cache")
        out.mkdir(parents=True, exist_ok=True)
        dest = out / result.out_dir.name
        shutil.copytree(result.out_dir, dest)
    return dest


if __name__ == "__main__":
    print(build_bundle(Path(sys.argv[1])))
