"""An app's Python environment, made offline for the target without running anything of it.

Three steps, each usable on its own:

1. ``resolve_lock`` (``airbox-build lock``): ``uv pip compile`` resolves the app's requirements
   for the target (e.g. cp38 on manylinux2014_aarch64), wheels only, with every file's sha256.
   pip cannot do this from an x86 host: it evaluates environment markers for the host
   (pypa/pip#11664). The lock is refused if it pins opencv-python (see FORBIDDEN).
2. ``download_wheels``: the target's wheel of every pin, by hash. Wheels live in the fetch cache
   (content-addressed by sha256, published with the URL key ``wheel:<file name>``), so a second
   build needs no network; a wheel found in an ``--input-dir`` with a pinned hash is used in place.
   Missing ones are downloaded by the host's pip (``python -m pip download --no-deps
   --require-hashes --only-binary=:all: --platform ... --python-version ... --implementation cp
   --abi cp38``) from a requirements file this module writes from the parsed lock, so no option
   in the lock (``--index-url``, ``-e``, ...) reaches pip. Every file is then checked: a wheel
   (not an sdist), its hash pinned, its tags runnable by the target.
3. ``install_wheels``: unpacks the wheels into ``<app>/<target>`` as ``pip install --target``
   lays them out, but by this module: each wheel is a zip, every file is checked against the
   wheel's RECORD hash while it is written, names are checked like any archive's, nothing is
   compiled (no .pyc), no entry-point wrapper or ``.data/scripts`` file is written (they would
   carry the build host's interpreter path in their shebang: that is the "delete bin/" step),
   and each dist-info gets a RECORD of what was installed. Modes: 0755 when the zip marks a
   file executable, else 0644.

Why not ``pip install --target --platform ...``: pip would not check RECORD hashes, would write
host-shebang scripts to delete afterwards, and its output (RECORD, INSTALLER, file order) depends
on the host's pip version. Neither way runs code from the wheels.

Tags a target accepts (``Target``): the python tag ``cp38`` (with abi ``cp38`` or ``none``),
``cp3X`` with ``abi3`` for X <= 8, ``py3``/``py3X`` (X <= 8)/``py2.py3`` with abi ``none``;
the platform ``any``, ``manylinux2014_<arch>`` (glibc 2.17) or ``manylinux_2_N_<arch>`` with
2.N <= the target's glibc (Ubuntu 20.04: 2.31). ``linux_<arch>`` is refused (built for one
machine, not portable), as is every other architecture.
"""

from builder.customise.pyenv.download import PipIndex, Wheel, download_wheels, pip_download_command
from builder.customise.pyenv.estimate import PythonEstimate, estimate_python_tree
from builder.customise.pyenv.install import (
    InstallResult,
    TreeSize,
    install_wheels,
    tree_size,
    wheels_install_size,
)
from builder.customise.pyenv.lock import FORBIDDEN, Pin, parse_lock
from builder.customise.pyenv.resolve import resolve_lock
from builder.customise.pyenv.wheeltags import Target, WheelName, parse_wheel_filename, tag_problem

__all__ = [
    "FORBIDDEN",
    "InstallResult",
    "Pin",
    "PipIndex",
    "PythonEstimate",
    "Target",
    "TreeSize",
    "Wheel",
    "WheelName",
    "download_wheels",
    "estimate_python_tree",
    "install_wheels",
    "parse_lock",
    "parse_wheel_filename",
    "pip_download_command",
    "resolve_lock",
    "tag_problem",
    "tree_size",
    "wheels_install_size",
]
