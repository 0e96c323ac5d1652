"""Make the miniature app the offline demo preinstalls, deterministically.

`python recipes/demo/make_demo_app.py` writes recipes/demo/app/: a source tarball laid out
like SD-lcm-tpu, a ControlNet-style model file, a model archive split into two parts (as the
vendor ships models), two wheels (one pure, one cp38 manylinux2014_aarch64) and a hashed lock
for them, then prints the pins for recipes/demo.yaml. The outputs are committed; this script
documents how they were made and re-makes them byte for byte.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "app"
MTIME = 1717660800  # 2024-06-06
AARCH64 = "cp38-cp38-manylinux_2_17_aarch64.manylinux2014_aarch64"


def _blob(tag: str, size: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{tag}:{counter}".encode()).digest()
        counter += 1
    return out[:size]


def _tar_gz(members: dict[str, tuple[bytes | None, int]]) -> bytes:
    """Deterministic .tar.gz: sorted members, fixed times and owners; None content = directory."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            data, mode = members[name]
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 1000, 1000, "", ""
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def source_tarball() -> bytes:
    top = "SD-demo-0123456789abcdef/"
    gr = (
        "# A stand-in for SD-lcm-tpu's gr.py: lists its models and serves that list over HTTP on\n"
        "# 0.0.0.0:8999 (as gradio serves the web UI there) until it is stopped.\n"
        "import http.server\n"
        "import os\n"
        "\n"
        "MODELS = {d: sorted(os.listdir('./models/' + d)) for d in ('basic', 'controlnet')}\n"
        "print(MODELS, flush=True)\n"
        "\n"
        "\n"
        "class Page(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = (repr(MODELS) + '\\n').encode()\n"
        "        self.send_response(200)\n"
        "        self.send_header('Content-Type', 'text/plain; charset=utf-8')\n"
        "        self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "\n"
        "\n"
        "port = int(os.environ.get('PORT', '8999'))\n"
        "http.server.ThreadingHTTPServer(('0.0.0.0', port), Page).serve_forever()\n"
    )
    run = (
        "export PYTHONPATH=$PYTHONPATH:/opt/sophon/sophon-opencv-latest/opencv-python/\n"
        "export LD_LIBRARY_PATH=/opt/sophon/libsophon-current/lib:$LD_LIBRARY_PATH\n"
        "python3 gr.py\n"
    )
    return _tar_gz(
        {
            top: (None, 0o775),
            top + "gr.py": (gr.encode(), 0o664),
            top + "run.sh": (run.encode(), 0o775),
            top + "sd/": (None, 0o775),
            top + "sd/libuntpu_arm.so": (b"\x7fELF\x02\x01\x01" + _blob("untpu", 3000), 0o775),
            top + "README.md": (b"# SD demo app\n", 0o664),
        }
    )


def model_archive() -> bytes:
    folder = "DemoModel/"
    files = {folder: (None, 0o755)}
    for part in ("text", "unet_multisize", "vd_multisize", "ve_multisize"):
        files[f"{folder}sdv15_{part}.bmodel"] = (_blob(part, 40_000), 0o644)
    return _tar_gz(files)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel(name: str, version: str, tag: str, files: dict[str, bytes]) -> tuple[str, bytes]:
    dist = f"{name}-{version}"
    members = dict(files)
    members[f"{dist}.dist-info/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    pure = tag.endswith("-none-any")
    members[f"{dist}.dist-info/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: airbox-build-demo\nRoot-Is-Purelib: {str(pure).lower()}\nTag: {tag}\n"
    ).encode()
    rows = [[m, _record_hash(d), str(len(d))] for m, d in members.items()]
    rows.append([f"{dist}.dist-info/RECORD", "", ""])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    members[f"{dist}.dist-info/RECORD"] = text.getvalue().encode()
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            info = zipfile.ZipInfo(member, date_time=(2024, 6, 6, 0, 0, 0))
            info.create_system = 3
            mode = 0o755 if member.endswith(".so") else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return f"{dist}-{tag}.whl", raw.getvalue()


def main() -> int:
    (OUT / "wheels").mkdir(parents=True, exist_ok=True)
    written: dict[str, bytes] = {}
    written["sd-demo-src.tar.gz"] = source_tarball()
    written["canny_demo.bmodel"] = _blob("canny", 20_000)
    archive = model_archive()
    half = len(archive) // 2
    written["DemoModel.tar.gz.aa"] = archive[:half]
    written["DemoModel.tar.gz.ab"] = archive[half:]
    pure_name, pure = wheel("tinypure", "1.0", "py3-none-any", {"tinypure/__init__.py": b"VALUE = 42\n"})
    native_name, native = wheel(
        "tinynative",
        "2.1",
        AARCH64,
        {
            "tinynative/__init__.py": b"from ._core import *\n",
            "tinynative/_core.cpython-38-aarch64-linux-gnu.so": b"\x7fELF\x02\x01\x01" + _blob("core", 500),
        },
    )
    written[f"wheels/{pure_name}"] = pure
    written[f"wheels/{native_name}"] = native
    lock = "# The demo app's Python dependencies, hashed for the target (made by make_demo_app.py)\n"
    for name, version, data in (("tinynative", "2.1", native), ("tinypure", "1.0", pure)):
        lock += f"{name}=={version} \\\n    --hash=sha256:{hashlib.sha256(data).hexdigest()}\n"
    written["demo-app.lock"] = lock.encode()
    for rel, data in written.items():
        (OUT / rel).write_bytes(data)
    print("source sha256:", hashlib.sha256(written["sd-demo-src.tar.gz"]).hexdigest())
    print("canny sha256: ", hashlib.sha256(written["canny_demo.bmodel"]).hexdigest())
    print("model md5:    ", hashlib.md5(archive).hexdigest(), "(of the joined parts)")
    print("model sha256: ", hashlib.sha256(archive).hexdigest(), "(of the joined parts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
