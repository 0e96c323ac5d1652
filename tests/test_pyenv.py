"""The offline Python environment: hashed locks, the target's wheels, installation without running code.

Wheels are built here (real zip files with METADATA, WHEEL and a RECORD of sha256 hashes) and
served by a real PEP 503 simple index on 127.0.0.1 (http.server with a directory per project),
so the real pip downloads them. Slow tests use the real PyPI.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import os
import re
import shutil
import stat
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder.cache import Cache
from builder.customise.pyenv import (
    FORBIDDEN,
    PipIndex,
    Target,
    download_wheels,
    estimate_python_tree,
    install_wheels,
    parse_lock,
    parse_wheel_filename,
    pip_download_command,
    resolve_lock,
    tag_problem,
    tree_size,
    wheels_install_size,
)
from builder.errors import BuildError, FetchError, RecipeError
from builder.fetch import FetchOptions

PLATFORM = "manylinux2014_aarch64"
AARCH64 = "cp38-cp38-manylinux_2_17_aarch64.manylinux2014_aarch64"
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- building wheels


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_wheel(
    out: Path,
    name: str,
    version: str,
    tag: str,
    files: dict[str, bytes],
    *,
    executable: tuple[str, ...] = (),
    requires: tuple[str, ...] = (),
    bad_record: dict[str, str] | None = None,
    raw_members: dict[str, tuple[int, bytes]] | None = None,
) -> Path:
    """A real wheel: `files` are member paths (``.data/...`` ones under <name>-<version>.data)."""
    dist = f"{name.replace('-', '_')}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    pure = tag.endswith("-none-any")
    members = {
        **{(f"{dist}{m}" if m.startswith(".data/") else m): data for m, data in files.items()},
        f"{dist}.dist-info/METADATA": metadata.encode(),
        f"{dist}.dist-info/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: {str(pure).lower()}\nTag: {tag}\n"
        ).encode(),
    }
    rows = [[m, (bad_record or {}).get(m, record_hash(d)), str(len(d))] for m, d in members.items()]
    rows.append([f"{dist}.dist-info/RECORD", "", ""])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    members[f"{dist}.dist-info/RECORD"] = text.getvalue().encode()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            info = zipfile.ZipInfo(member, date_time=(2024, 1, 1, 0, 0, 0))
            info.create_system = 3
            mode = 0o755 if any(member.endswith(e) for e in executable) else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            zf.writestr(info, data)
        for member, (mode, data) in (raw_members or {}).items():
            info = zipfile.ZipInfo(member, date_time=(2024, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def pure_wheel(out: Path, **kw: object) -> Path:
    return build_wheel(
        out,
        "tinypure",
        "1.0",
        "py3-none-any",
        {"tinypure/__init__.py": b"VALUE = 42\n", "tinypure/data/table.txt": b"a,b\n1,2\n"},
        **kw,  # type: ignore[arg-type]
    )


def native_wheel(out: Path, tag: str = AARCH64, **kw: object) -> Path:
    return build_wheel(
        out,
        "tinynative",
        "2.1",
        tag,
        {
            "tinynative/__init__.py": b"from ._core import *\n",
            "tinynative/_core.cpython-38-aarch64-linux-gnu.so": b"\x7fELF\x02\x01\x01" + bytes(200),
            ".data/scripts/tinynative-cli": b"#!python\nprint('cli')\n",
            ".data/data/share/tinynative/doc.txt": b"documentation\n",
            ".data/headers/tinynative.h": b"int f(void);\n",
        },
        executable=(".so", "-cli"),
        **kw,  # type: ignore[arg-type]
    )


def lock_for(path: Path, wheels: dict[str, tuple[str, list[Path]]]) -> Path:
    """A hashed lock: {name: (version, [files whose hashes are allowed])}, continuation lines."""
    lines = ["# a test lock\n"]
    for name, (version, files) in wheels.items():
        hashes = " \\\n".join(f"    --hash=sha256:{sha256_of(f)}" for f in files)
        lines.append(f"{name}=={version} \\\n{hashes}\n    # via -r req.in\n")
    path.write_text("".join(lines))
    return path


# ---------------------------------------------------------------------------- a local simple index


@dataclass
class SimpleIndex:
    root: Path
    url: str
    requests: list[str]

    def publish(self, *files: Path) -> None:
        """Copy files under /files and (re)write each project's PEP 503 page."""
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, self.root / "files" / f.name)
        projects: dict[str, list[Path]] = {}
        for f in sorted((self.root / "files").iterdir()):
            project = re.sub(r"[-_.]+", "-", f.name.split("-")[0]).lower()
            projects.setdefault(project, []).append(f)
        for project, project_files in projects.items():
            page = self.root / "simple" / project
            page.mkdir(parents=True, exist_ok=True)
            anchors = "".join(
                f'<a href="../../files/{f.name}#sha256={sha256_of(f)}">{f.name}</a><br>\n'
                for f in project_files
            )
            (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{anchors}</body></html>\n")

    @property
    def simple(self) -> str:
        return self.url + "simple/"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[SimpleIndex]:
    root = tmp_path / "index"
    root.mkdir()
    seen: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            seen.append(f"{self.command} {self.path}")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield SimpleIndex(root, f"http://127.0.0.1:{httpd.server_address[1]}/", seen)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def isolated_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user pip.conf or PIP_* variable can send pip elsewhere; uv keeps its cache here."""
    for key in list(os.environ):
        if key.startswith(("PIP_", "UV_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    monkeypatch.setenv("UV_NO_CONFIG", "1")


def options(tmp_path: Path, **kw: object) -> FetchOptions:
    return FetchOptions(cache_dir=tmp_path / "cache", **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the lock


def test_parse_lock_reads_pins_hashes_and_continuations(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# header\n"
        "Foo_Bar[extra]==1.0 \\\n    --hash=sha256:" + "a" * 64 + " \\\n    --hash=sha256:" + "B" * 64 + "\n"
        "    # via -r req.in\n"
        "\n"
        "baz==2.0.post1 --hash=sha256:" + "c" * 64 + "  # trailing comment\n"
    )
    pins = parse_lock(lock)
    assert [(p.name, p.key, p.version, p.line) for p in pins] == [
        ("Foo_Bar", "foo-bar", "1.0", 2),
        ("baz", "baz", "2.0.post1", 7),
    ]
    assert pins[0].hashes == ("a" * 64, "b" * 64)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("--index-url https://evil.example/simple\n", "option --index-url"),
        ("-r other.txt\n", "option -r"),
        ("-e git+https://x/y.git#egg=y\n", "option -e"),
        ("foo==1.0 ; python_version < '3.9' --hash=sha256:" + "a" * 64 + "\n", "markers"),
        ("foo>=1.0 --hash=sha256:" + "a" * 64 + "\n", "not an exact pin"),
        ("foo @ https://x/foo-1.0-py3-none-any.whl\n", "not an exact pin"),
        ("foo==1.0\n", "no --hash=sha256"),
        ("foo==1.0 --hash=md5:" + "a" * 32 + "\n", "no --hash=sha256"),
        (
            "foo==1.0 --hash=sha256:" + "a" * 64 + "\nFOO==1.1 --hash=sha256:" + "b" * 64 + "\n",
            "pinned twice",
        ),
        ("opencv-python==4.10.0.84 --hash=sha256:" + "a" * 64 + "\n", "sophon-opencv"),
        ("OpenCV_Python_Headless==4.10.0.84 --hash=sha256:" + "a" * 64 + "\n", "sophon-opencv"),
        ("# nothing\n", "pins nothing"),
    ],
)
def test_parse_lock_refuses(tmp_path: Path, text: str, fragment: str) -> None:
    lock = tmp_path / "bad.lock"
    lock.write_text(text)
    with pytest.raises(RecipeError) as caught:
        parse_lock(lock)
    assert fragment in str(caught.value)
    assert str(lock) in str(caught.value)


def test_the_shipped_lock_matches_the_reference() -> None:
    ours = parse_lock(REPO / "recipes" / "sd-lcm-tpu.lock")
    assert len(ours) == 84
    assert not {p.key for p in ours} & FORBIDDEN
    versions = {p.key: p.version for p in ours}
    assert versions["torch"] == "2.2.0" and versions["gradio"] == "4.19.2" and versions["pillow"] == "10.4.0"
    # the project's reference lock (shared/data), kept in the repository so every clone checks it
    theirs = parse_lock(REPO / "tests" / "data" / "sd-lcm-tpu.lock.reference")
    assert {(p.key, p.version, p.hashes) for p in ours} == {(p.key, p.version, p.hashes) for p in theirs}


# ---------------------------------------------------------------------------- tags


@pytest.mark.parametrize(
    ("filename", "problem"),
    [
        ("torch-2.2.0-cp38-cp38-manylinux2014_aarch64.whl", None),
        (f"numpy-1.24.4-{AARCH64}.whl", None),
        ("x-1-cp38-cp38-manylinux_2_31_aarch64.whl", None),
        ("x-1-cp36-abi3-manylinux2014_aarch64.whl", None),
        ("x-1-cp38-abi3-manylinux_2_28_aarch64.whl", None),
        ("x-1-py3-none-any.whl", None),
        ("x-1-py2.py3-none-any.whl", None),
        ("x-1-py38-none-any.whl", None),
        ("x-1-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.whl", None),
        ("x-1-1build-py3-none-any.whl", None),
        ("x-1-cp38-cp38-manylinux2014_x86_64.whl", "not aarch64"),
        ("x-1-cp38-cp38-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "not aarch64"),
        ("x-1-cp38-cp38-linux_aarch64.whl", "not a portable manylinux"),
        ("x-1-cp38-cp38-manylinux_2_35_aarch64.whl", "needs glibc 2.35"),
        ("x-1-cp38-cp38-musllinux_1_1_aarch64.whl", "not glibc Linux"),
        ("x-1-cp38-cp38-macosx_11_0_arm64.whl", "macosx_11_0_arm64"),
        ("x-1-cp38-cp38-win_amd64.whl", "win_amd64"),
        ("x-1-cp39-cp39-manylinux2014_aarch64.whl", "not CPython 3.8"),
        ("x-1-cp311-abi3-manylinux2014_aarch64.whl", "not CPython 3.8"),
        ("x-1-py39-none-any.whl", "not CPython 3.8"),
        ("x-1-pp38-pypy38_pp73-manylinux2014_aarch64.whl", "not CPython 3.8"),
    ],
)
def test_tags_for_the_airbox(filename: str, problem: str | None) -> None:
    found = tag_problem(parse_wheel_filename(filename), Target("3.8.10", PLATFORM))
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_not_a_wheel_name() -> None:
    with pytest.raises(ValueError):
        parse_wheel_filename("tinypure-1.0.tar.gz")
    with pytest.raises(ValueError):
        parse_wheel_filename("broken.whl")


# ---------------------------------------------------------------------------- download and install


def test_download_install_then_offline_from_the_cache(tmp_path: Path, index: SimpleIndex) -> None:
    built = tmp_path / "built"
    pure = pure_wheel(built)
    native = native_wheel(built)
    decoy = native_wheel(built / "x86", tag="cp38-cp38-manylinux_2_17_x86_64.manylinux2014_x86_64")
    index.publish(pure, native, decoy)
    # Like uv's locks, the lock allows every file of the release (the x86 one too).
    lock = lock_for(
        tmp_path / "app.lock", {"tinypure": ("1.0", [pure]), "tinynative": ("2.1", [native, decoy])}
    )
    opts = options(tmp_path)

    wheels = download_wheels(lock, PLATFORM, "3.8", tmp_path / "wh1", opts, index=PipIndex(index.simple))
    assert [w.filename for w in wheels] == [native.name, pure.name]
    assert {w.source for w in wheels} == {"download"}
    assert [w.sha256 for w in wheels] == [sha256_of(native), sha256_of(pure)]
    assert all((tmp_path / "wh1" / w.filename).read_bytes() == w.path.read_bytes() for w in wheels)
    assert any("/files/" + native.name in r for r in index.requests)
    assert not any(decoy.name in r for r in index.requests)
    assert {e.urls for e in Cache(opts.cache_dir).entries()} == {
        (f"wheel:{native.name}",),
        (f"wheel:{pure.name}",),
    }

    # Second build: no network at all, the same wheels.
    index.requests.clear()
    offline = replace(opts, offline=True)
    again = download_wheels(
        lock, PLATFORM, "3.8", tmp_path / "wh2", offline, index=PipIndex("http://127.0.0.1:9/")
    )
    assert [(w.filename, w.sha256, w.source) for w in again] == [
        (w.filename, w.sha256, "cache") for w in wheels
    ]
    assert index.requests == []

    target = tmp_path / "app" / ".pydeps"
    result = install_wheels(again, target, target=Target("3.8", PLATFORM))
    assert [(d.name, d.version) for d in result.dists] == [("tinynative", "2.1"), ("tinypure", "1.0")]
    assert (target / "tinypure" / "__init__.py").read_bytes() == b"VALUE = 42\n"
    assert (target / "tinypure" / "data" / "table.txt").exists()
    so = target / "tinynative" / "_core.cpython-38-aarch64-linux-gnu.so"
    assert so.read_bytes().startswith(b"\x7fELF")
    assert stat.S_IMODE(so.stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "tinypure" / "__init__.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((target / "tinypure").stat().st_mode) == 0o755
    assert (target / "share" / "tinynative" / "doc.txt").read_text() == "documentation\n"
    assert (target / "include" / "tinynative" / "tinynative.h").exists()
    assert not (target / "bin").exists()
    assert result.skipped == (f"{native.name}: tinynative-2.1.data/scripts/tinynative-cli",)
    assert not list(target.rglob("*.pyc")) and not list(target.rglob("__pycache__"))
    assert not list(target.rglob("*.airbox-tmp"))

    # The metadata reads back like any installed distribution, and RECORD lists what is there.
    dists = {d.metadata["Name"]: d for d in importlib.metadata.distributions(path=[str(target)])}
    assert sorted(dists) == ["tinynative", "tinypure"]
    assert dists["tinynative"].read_text("INSTALLER") == "airbox-build\n"
    recorded = {str(f) for f in dists["tinynative"].files or []}
    assert "tinynative/_core.cpython-38-aarch64-linux-gnu.so" in recorded
    assert "share/tinynative/doc.txt" in recorded
    assert not any("scripts" in f for f in recorded)
    for f in dists["tinynative"].files or []:
        if f.hash is not None:
            data = (target / str(f)).read_bytes()
            assert (
                base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode() == f.hash.value
            )

    # The size the budget uses, before and after unpacking.
    size = tree_size(target)
    assert size.files == result.files
    estimate = wheels_install_size(again)
    assert (estimate.files, estimate.dirs, estimate.disk_bytes) == (size.files, size.dirs, size.disk_bytes)
    assert size.bytes == sum(f.stat().st_size for f in target.rglob("*") if f.is_file())


def test_install_is_deterministic(tmp_path: Path) -> None:
    wheels = [pure_wheel(tmp_path / "w"), native_wheel(tmp_path / "w")]

    def snapshot(root: Path) -> list[tuple[str, int, bytes]]:
        return [
            (str(p.relative_to(root)), p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))
        ]

    old = os.umask(0o077)
    try:
        install_wheels(wheels, tmp_path / "a")
    finally:
        os.umask(old)
    install_wheels(list(reversed(wheels)), tmp_path / "b")
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")


def test_wheel_from_an_input_dir_needs_no_index(tmp_path: Path) -> None:
    wheel = pure_wheel(tmp_path / "downloads" / "sub")
    lock = lock_for(tmp_path / "app.lock", {"tinypure": ("1.0", [wheel])})
    opts = options(tmp_path, offline=True, input_dirs=(tmp_path / "downloads",))
    [got] = download_wheels(lock, PLATFORM, "3.8", tmp_path / "wh", opts)
    assert got.source == "input-dir" and got.sha256 == sha256_of(wheel)


def test_offline_without_the_wheels_says_what_is_missing(tmp_path: Path) -> None:
    wheel = pure_wheel(tmp_path / "w")
    lock = lock_for(tmp_path / "app.lock", {"tinypure": ("1.0", [wheel])})
    with pytest.raises(FetchError) as caught:
        download_wheels(lock, PLATFORM, "3.8", tmp_path / "wh", options(tmp_path, offline=True))
    assert "tinypure==1.0" in str(caught.value) and "--input-dir" in (caught.value.hint or "")


def test_sdist_only_is_refused(tmp_path: Path, index: SimpleIndex) -> None:
    sdist = tmp_path / "built" / "tinysrc-1.0.tar.gz"
    sdist.parent.mkdir()
    sdist.write_bytes(b"\x1f\x8b" + bytes(100))
    index.publish(sdist)
    lock = lock_for(tmp_path / "app.lock", {"tinysrc": ("1.0", [sdist])})
    with pytest.raises(FetchError) as caught:
        download_wheels(
            lock, PLATFORM, "3.8", tmp_path / "wh", options(tmp_path), index=PipIndex(index.simple)
        )
    assert "no wheel of tinysrc==1.0" in str(caught.value)
    assert "source distribution" in str(caught.value)
    assert not any(r.endswith(".tar.gz") for r in index.requests if r.startswith("GET /files"))
    with pytest.raises(BuildError) as caught_install:
        install_wheels([sdist], tmp_path / "target")
    assert "not a wheel" in str(caught_install.value)


def test_x86_only_is_refused(tmp_path: Path, index: SimpleIndex) -> None:
    x86 = native_wheel(tmp_path / "built", tag="cp38-cp38-manylinux2014_x86_64")
    index.publish(x86)
    lock = lock_for(tmp_path / "app.lock", {"tinynative": ("2.1", [x86])})
    with pytest.raises(FetchError) as caught:
        download_wheels(
            lock, PLATFORM, "3.8", tmp_path / "wh", options(tmp_path), index=PipIndex(index.simple)
        )
    assert "no wheel of tinynative==2.1 for cp38 manylinux2014_aarch64" in str(caught.value)
    with pytest.raises(BuildError) as caught_install:
        install_wheels([x86], tmp_path / "target", target=Target("3.8", PLATFORM))
    assert "manylinux2014_x86_64, not aarch64" in str(caught_install.value)
    assert not (tmp_path / "target").exists()


def test_x86_wheel_in_the_cache_is_not_used(tmp_path: Path) -> None:
    """A wheel the cache holds for another target (its hash is in the lock) is never picked."""
    x86 = native_wheel(tmp_path / "built", tag="cp38-cp38-manylinux2014_x86_64")
    lock = lock_for(tmp_path / "app.lock", {"tinynative": ("2.1", [x86])})
    opts = options(tmp_path, input_dirs=(tmp_path / "built",), offline=True)
    with pytest.raises(FetchError, match="not in the cache"):
        download_wheels(lock, PLATFORM, "3.8", tmp_path / "wh", opts)


def test_opencv_is_refused_everywhere(tmp_path: Path) -> None:
    cv = build_wheel(tmp_path / "w", "opencv-python", "4.10.0.84", AARCH64, {"cv2/__init__.py": b""})
    lock = lock_for(tmp_path / "app.lock", {"opencv-python": ("4.10.0.84", [cv])})
    with pytest.raises(RecipeError, match="sophon-opencv"):
        download_wheels(lock, PLATFORM, "3.8", tmp_path / "wh", options(tmp_path, offline=True))
    with pytest.raises(BuildError, match="sophon-opencv"):
        install_wheels([cv], tmp_path / "target")


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("bad-record", "does not match its RECORD"),
        ("unlisted", "is not listed with a hash in its RECORD"),
        ("traversal", "outside its folder"),
        ("absolute", "outside its folder"),
        ("symlink", "is a symlink"),
    ],
)
def test_damaged_wheels_are_refused(tmp_path: Path, kind: str, fragment: str) -> None:
    raw: dict[str, tuple[int, bytes]] = {}
    bad_record = None
    if kind == "bad-record":
        bad_record = {"tinypure/__init__.py": record_hash(b"something else")}
    elif kind == "unlisted":
        raw = {"tinypure/extra.py": (stat.S_IFREG | 0o644, b"print('not in RECORD')\n")}
    elif kind == "traversal":
        raw = {"../../evil.py": (stat.S_IFREG | 0o644, b"x")}
    elif kind == "absolute":
        raw = {"/tmp/evil.py": (stat.S_IFREG | 0o644, b"x")}
    else:
        raw = {"tinypure/link": (stat.S_IFLNK | 0o777, b"/etc/passwd")}
    wheel = pure_wheel(tmp_path / "w", bad_record=bad_record, raw_members=raw)
    target = tmp_path / "target"
    with pytest.raises(BuildError) as caught:
        install_wheels([wheel], target)
    assert fragment in str(caught.value) and wheel.name in str(caught.value)
    if kind == "bad-record":
        assert not (target / "tinypure" / "__init__.py").exists()
    assert not (tmp_path / "evil.py").exists() and not Path("/tmp/evil.py").exists()


def test_two_wheels_writing_one_path(tmp_path: Path) -> None:
    a = build_wheel(tmp_path / "w", "nsa", "1", "py3-none-any", {"ns/__init__.py": b"", "ns/a.py": b"a"})
    b = build_wheel(tmp_path / "w", "nsb", "1", "py3-none-any", {"ns/__init__.py": b"", "ns/b.py": b"b"})
    c = build_wheel(tmp_path / "w", "nsc", "1", "py3-none-any", {"ns/__init__.py": b"# other\n"})
    install_wheels([a, b], tmp_path / "ok")  # the same bytes: fine
    assert sorted(p.name for p in (tmp_path / "ok" / "ns").iterdir()) == ["__init__.py", "a.py", "b.py"]
    with pytest.raises(BuildError, match=r"both install ns/__init__\.py"):
        install_wheels([a, c], tmp_path / "conflict")


def test_pip_command_honours_mirrors_and_versions(tmp_path: Path) -> None:
    req, out = tmp_path / "r.txt", tmp_path / "d"
    mirrors = (("https://pypi.org/", "https://pypi.tuna.tsinghua.edu.cn/"),)
    cmd = pip_download_command(req, out, Target("3.8", PLATFORM), PipIndex(), mirrors)
    assert cmd[cmd.index("--index-url") + 1] == "https://pypi.tuna.tsinghua.edu.cn/simple/"
    assert "--ignore-requires-python" in cmd
    for flag, value in (("--platform", PLATFORM), ("--abi", "cp38"), ("--implementation", "cp")):
        assert cmd[cmd.index(flag) + 1] == value
    assert {"--no-deps", "--require-hashes", "--only-binary=:all:"} <= set(cmd)
    full = pip_download_command(req, out, Target("3.8.10", PLATFORM), PipIndex("https://mirror/simple"))
    assert "--ignore-requires-python" not in full
    assert full[full.index("--python-version") + 1] == "3.8.10"
    assert full[full.index("--index-url") + 1] == "https://mirror/simple"


def test_estimate_from_the_index_then_exact_from_the_cache(tmp_path: Path, index: SimpleIndex) -> None:
    pure, native = pure_wheel(tmp_path / "built"), native_wheel(tmp_path / "built")
    index.publish(pure, native)
    lock = lock_for(tmp_path / "app.lock", {"tinypure": ("1.0", [pure]), "tinynative": ("2.1", [native])})
    opts, pip_index = options(tmp_path), PipIndex(index.simple)
    before = estimate_python_tree(lock, PLATFORM, "3.8", opts, index=pip_index)
    assert not before.exact and before.unknown == ()
    assert before.bytes >= pure.stat().st_size + native.stat().st_size
    offline = estimate_python_tree(lock, PLATFORM, "3.8", replace(opts, offline=True))
    assert offline.unknown == ("tinypure==1.0", "tinynative==2.1") and offline.bytes == 0

    wheels = download_wheels(lock, PLATFORM, "3.8", tmp_path / "wh", opts, index=pip_index)
    after = estimate_python_tree(lock, PLATFORM, "3.8", replace(opts, offline=True))
    assert after.exact
    install_wheels(wheels, tmp_path / "t")
    assert after.bytes == tree_size(tmp_path / "t").disk_bytes


def test_resolve_lock_with_uv(tmp_path: Path, index: SimpleIndex) -> None:
    built = tmp_path / "built"
    dep = native_wheel(built)
    dep_x86 = native_wheel(built / "x86", tag="cp38-cp38-manylinux2014_x86_64")
    top = build_wheel(
        built, "tinytop", "3.0", "py3-none-any", {"tinytop/__init__.py": b""}, requires=("tinynative",)
    )
    index.publish(dep, dep_x86, top)
    req = tmp_path / "app.in"
    req.write_text("tinytop==3.0\n")
    out = tmp_path / "app.lock"
    pins = resolve_lock(req, out, "3.8.10", PLATFORM, None, index=PipIndex(index.simple))
    assert {(p.key, p.version) for p in pins} == {("tinytop", "3.0"), ("tinynative", "2.1")}
    assert out.read_text().startswith("# Python lock for manylinux2014_aarch64, CPython 3.8.10")
    assert "uv pip compile app.in --python-platform aarch64-manylinux2014" in out.read_text()
    native_pin = next(p for p in pins if p.key == "tinynative")
    assert sha256_of(dep) in native_pin.hashes
    assert parse_lock(out) == pins


def test_resolve_lock_refuses_opencv_and_keeps_the_old_lock(tmp_path: Path, index: SimpleIndex) -> None:
    built = tmp_path / "built"
    cv = build_wheel(built, "opencv-python", "4.10.0.84", AARCH64, {"cv2/__init__.py": b""})
    top = build_wheel(
        built, "tinytop", "3.0", "py3-none-any", {"tinytop/__init__.py": b""}, requires=("opencv-python",)
    )
    index.publish(cv, top)
    req = tmp_path / "app.in"
    req.write_text("tinytop==3.0\n")
    out = tmp_path / "app.lock"
    out.write_text("old lock\n")
    with pytest.raises(RecipeError, match="sophon-opencv"):
        resolve_lock(req, out, "3.8.10", PLATFORM, None, index=PipIndex(index.simple))
    assert out.read_text() == "old lock\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".app.lock")) == []


# ---------------------------------------------------------------------------- the real PyPI


REAL_PINS = ("tqdm", "lark", "pillow")


def real_lock_subset(tmp_path: Path) -> Path:
    pins = {p.key: p for p in parse_lock(REPO / "recipes" / "sd-lcm-tpu.lock")}
    out = tmp_path / "subset.lock"
    out.write_text("".join(pins[name].requirement_line() + "\n" for name in REAL_PINS))
    return out


@pytest.mark.slow
def test_real_pypi_wheels_are_aarch64_cp38(tmp_path: Path) -> None:
    lock = real_lock_subset(tmp_path)
    opts = options(tmp_path)
    target = Target("3.8.10", PLATFORM)
    wheels = download_wheels(lock, PLATFORM, "3.8.10", tmp_path / "wh", opts)
    names = {w.name.name: w for w in wheels}
    assert sorted(names) == sorted(REAL_PINS)
    for wheel in wheels:
        assert tag_problem(wheel.name, target) is None
    assert (
        names["pillow"].filename == "pillow-10.4.0-cp38-cp38-manylinux_2_17_aarch64.manylinux2014_aarch64.whl"
    )
    assert names["tqdm"].name.platforms == ("any",)
    result = install_wheels(wheels, tmp_path / "t", target=target)
    libs = list((tmp_path / "t" / "PIL").glob("_imaging.cpython-38-aarch64-linux-gnu.so"))
    assert len(libs) == 1 and libs[0].read_bytes()[:4] == b"\x7fELF"
    assert libs[0].read_bytes()[18] == 0xB7  # e_machine EM_AARCH64
    # tqdm's console script is an entry point: no wrapper (with a host shebang) is generated.
    assert "console_scripts" in next((tmp_path / "t").glob("tqdm-*.dist-info/entry_points.txt")).read_text()
    assert not (tmp_path / "t" / "bin").exists() and result.skipped == ()
    again = download_wheels(lock, PLATFORM, "3.8.10", tmp_path / "wh2", replace(opts, offline=True))
    assert {w.source for w in again} == {"cache"}


@pytest.mark.slow
def test_real_lock_resolves_to_the_shipped_pins(tmp_path: Path) -> None:
    req = tmp_path / "sd-lcm-tpu.in"
    shutil.copyfile(REPO / "recipes" / "sd-lcm-tpu.in", req)
    pins = resolve_lock(req, tmp_path / "sd-lcm-tpu.lock", "3.8.10", PLATFORM, "2024-08-15")
    shipped = parse_lock(REPO / "recipes" / "sd-lcm-tpu.lock")
    assert {(p.key, p.version, p.hashes) for p in pins} == {(p.key, p.version, p.hashes) for p in shipped}
    estimate = estimate_python_tree(tmp_path / "sd-lcm-tpu.lock", PLATFORM, "3.8.10", options(tmp_path))
    assert estimate.unknown == () and 700 * 2**20 < estimate.bytes < 1400 * 2**20
