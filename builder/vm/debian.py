"""Binary packages from a Debian archive, resolved the way apt does and verified end to end.

`InRelease` is checked with `gpgv` against the archive keyring; it gives the sha256 of each
suite's `Packages` index; the index gives the sha256 of each `.deb`. Both are then fetched
through the project's fetch layer (mirrors, cache by sha256, --offline, --input-dir). The last
verified `InRelease` of each suite is kept in the cache, so an offline run resolves what the
last online run resolved. Nothing is pinned to a URL that the archive's next point release
will remove (shared/BOOT-VM.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import re
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from builder.cache import read_json, write_atomic, write_json_atomic
from builder.errors import FetchError, ToolError
from builder.fetch import FetchOptions, fetch, rewrite_url
from builder.inputs import InputSpec
from builder.run import find_tool, run

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
HOST_SOURCES = (Path("/etc/apt/sources.list.d"), Path("/etc/apt/sources.list"))
KEYRING_HINT = (
    "install Debian's archive keyring (sudo apt-get install -y debian-archive-keyring gpgv), pass "
    "--keyring FILE, or give the kernel and initrd yourself with --kernel/--initrd"
)


@dataclass(frozen=True)
class Archive:
    """One `deb URI SUITE main` source."""

    uri: str  # ends without a slash
    suite: str
    component: str = "main"


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    arch: str
    filename: str  # pool/... relative to the archive URI
    sha256: str
    size: int
    depends: str
    archive: Archive

    @property
    def url(self) -> str:
        return f"{self.archive.uri}/{self.filename}"


# ----------------------------------------------------------------------------- sources


def host_archives(sources: Sequence[Path] = HOST_SOURCES) -> list[Archive]:
    """The Debian archives the host's apt uses (one-line and deb822 formats), `main` only."""
    found: list[Archive] = []
    files: list[Path] = []
    for s in sources:
        if s.is_dir():
            files += sorted(p for p in s.iterdir() if p.suffix in (".list", ".sources"))
        elif s.is_file():
            files.append(s)
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        entries = _deb822(text) if f.suffix == ".sources" else _one_line(text)
        for uris, suites, comps in entries:
            if "main" not in comps:
                continue
            for uri in uris:
                for suite in suites:
                    a = Archive(uri.rstrip("/"), suite)
                    if a not in found and _looks_debian(a):
                        found.append(a)
    return found


def _looks_debian(a: Archive) -> bool:
    # Ubuntu and third-party repositories have no linux-image-arm64 we could verify with Debian's key
    return "/debian" in a.uri and "ubuntu" not in a.uri


def _one_line(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        words = re.sub(r"\[[^\]]*\]", "", line).split()
        if len(words) >= 4:
            yield [words[1]], [words[2]], words[3:]


def _deb822(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        yield (
            fields.get("uris", "").split(),
            fields.get("suites", "").split(),
            fields.get("components", "").split(),
        )


# ----------------------------------------------------------------------------- versions


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_part(a: str, b: str) -> int:
    while a or b:
        na = re.match(r"[^0-9]*", a)[0]  # type: ignore[index]
        nb = re.match(r"[^0-9]*", b)[0]  # type: ignore[index]
        for i in range(max(len(na), len(nb))):
            ca = _order(na[i]) if i < len(na) else 0
            cb = _order(nb[i]) if i < len(nb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(na) :], b[len(nb) :]
        da = re.match(r"[0-9]*", a)[0]  # type: ignore[index]
        db = re.match(r"[0-9]*", b)[0]  # type: ignore[index]
        ia, ib = int(da or 0), int(db or 0)
        if ia != ib:
            return -1 if ia < ib else 1
        a, b = a[len(da) :], b[len(db) :]
    return 0


def compare_versions(a: str, b: str) -> int:
    """dpkg's version order (epoch, upstream, revision): -1, 0 or 1."""

    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        up, _, rev = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), up, rev

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)


# ----------------------------------------------------------------------------- index


class DebianIndex:
    """Packages of one architecture across archives, verified from each suite's InRelease."""

    def __init__(
        self,
        archives: Sequence[Archive],
        arch: str,
        opts: FetchOptions,
        *,
        keyring: Path | None = None,
    ) -> None:
        if not archives:
            raise FetchError(
                "no Debian archive to resolve the VM kernel from (none in the host's apt sources)",
                hint="pass --debian-archive URL (e.g. a Debian mirror's /debian) or --kernel/--initrd",
            )
        self.archives = list(archives)
        self.arch = arch
        self.opts = opts
        self.keyring = keyring or DEFAULT_KEYRING
        self._packages: dict[str, list[DebPackage]] | None = None
        self._releases: dict[Archive, str] = {}

    # -- InRelease

    def _release_cache(self, a: Archive) -> Path:
        key = hashlib.sha256(f"{a.uri} {a.suite}".encode()).hexdigest()[:16]
        return self.opts.cache_dir / "debian" / f"{key}-{a.suite}.InRelease"

    def release(self, a: Archive) -> str:
        """The verified clear-signed Release text of a suite (fresh online, the last one offline)."""
        kept = self._release_cache(a)
        if self.opts.offline:
            if not kept.exists():
                raise FetchError(
                    f"offline, and {a.uri} {a.suite} was never resolved on this machine",
                    hint="run the same command once online, or give --kernel/--initrd",
                )
            return self._verified(kept.read_bytes(), a)
        if a in self._releases:
            return self._releases[a]
        url = rewrite_url(f"{a.uri}/dists/{a.suite}/InRelease", self.opts.mirrors)
        try:
            resp = requests.get(url, timeout=self.opts.timeout)
        except requests.RequestException as e:
            if kept.exists():
                return self._verified(kept.read_bytes(), a)
            raise FetchError(f"cannot reach {url}: {e}", hint="check the network or use a mirror") from e
        if resp.status_code != 200:
            raise FetchError(f"{url}: HTTP {resp.status_code}", hint="check the archive URL and suite")
        text = self._verified(resp.content, a)
        self._releases[a] = text
        write_atomic(kept, resp.content)
        return text

    def _verified(self, signed: bytes, a: Archive) -> str:
        if find_tool("gpgv") is None:
            raise ToolError("missing system tool: gpgv (package gpgv)", hint=KEYRING_HINT)
        if not self.keyring.is_file():
            raise FetchError(f"archive keyring {self.keyring} not found", hint=KEYRING_HINT)
        with tempfile.TemporaryDirectory(prefix="airbox-gpgv-") as tmp:
            out = Path(tmp) / "Release"
            proc = run(
                ["gpgv", "--keyring", self.keyring, "--output", out, "-"],
                input=signed,
                check=False,
            )
            if proc.returncode != 0:
                raise FetchError(
                    f"the InRelease of {a.uri} {a.suite} is not signed by a key in {self.keyring}",
                    hint="the mirror may be tampered with or stale; try another mirror, or pass --keyring",
                )
            return out.read_text(errors="replace")

    # -- Packages

    def _index_spec(self, a: Archive, release: str) -> InputSpec:
        want = {f"{a.component}/binary-{self.arch}/Packages.xz", f"{a.component}/binary-{self.arch}/Packages"}
        in_sha = False
        best: tuple[str, str, int] | None = None
        for line in release.splitlines():
            if not line.startswith(" "):
                in_sha = line.strip() == "SHA256:"
                continue
            if not in_sha:
                continue
            f = line.split()
            if len(f) == 3 and f[2] in want and (best is None or f[2].endswith(".xz")):
                best = (f[2], f[0], int(f[1]))
        if best is None:
            raise FetchError(
                f"{a.uri} {a.suite}: its Release lists no {a.component}/binary-{self.arch}/Packages",
                hint=f"that suite has no {self.arch} packages; check the archive",
            )
        name, sha, size = best
        return InputSpec(
            url=f"{a.uri}/dists/{a.suite}/{name}",
            sha256=sha,
            size=size,
            where=f"{a.uri} {a.suite}",
            name=f"Packages ({a.suite})",
        )

    def newest_many(self, names: Sequence[str]) -> dict[str, DebPackage]:
        """The newest of each package, remembered per set of verified InRelease files (parsing a
        Packages index takes half a minute; the same InRelease gives the same answer)."""
        releases = [self.release(a) for a in self.archives]
        h = hashlib.sha256(json.dumps([self.arch, sorted(names)]).encode())
        for a, r in zip(self.archives, releases, strict=True):
            h.update(f"{a.uri} {a.suite} {a.component}\n".encode() + r.encode())
        memo = self.opts.cache_dir / "debian" / f"resolved-{h.hexdigest()[:24]}.json"
        raw = read_json(memo)
        if raw is not None:
            return {n: DebPackage(**{**d, "archive": Archive(**d["archive"])}) for n, d in raw.items()}
        out = {n: self.newest(n) for n in names}
        write_json_atomic(memo, {n: asdict(p) for n, p in out.items()})  # two runs may resolve at once
        return out

    def packages(self) -> dict[str, list[DebPackage]]:
        if self._packages is None:
            table: dict[str, list[DebPackage]] = {}
            for a in self.archives:
                spec = self._index_spec(a, self.release(a))
                path = fetch(spec, self.opts).path
                raw = path.read_bytes()
                text = (lzma.decompress(raw) if spec.url and spec.url.endswith(".xz") else raw).decode(
                    errors="replace"
                )
                for pkg in _parse_packages(text, a):
                    table.setdefault(pkg.name, []).append(pkg)
            self._packages = table
        return self._packages

    def newest(self, name: str) -> DebPackage:
        cands = self.packages().get(name, [])
        if not cands:
            raise FetchError(
                f"package {name} ({self.arch}) is in none of: "
                + ", ".join(f"{a.uri} {a.suite}" for a in self.archives),
                hint="check the archive and suite, or give --kernel/--initrd",
            )
        best = cands[0]
        for c in cands[1:]:
            if compare_versions(c.version, best.version) > 0:
                best = c
        return best

    def fetch_deb(self, pkg: DebPackage) -> Path:
        spec = InputSpec(url=pkg.url, sha256=pkg.sha256, size=pkg.size, where=pkg.name, name=pkg.name)
        return fetch(spec, self.opts).path


def _parse_packages(text: str, a: Archive) -> Iterator[DebPackage]:
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1].isspace() or ":" not in line:
                continue
            k, v = line.split(":", 1)
            fields[k] = v.strip()
        if {"Package", "Version", "Filename", "SHA256", "Size"} <= fields.keys():
            yield DebPackage(
                fields["Package"],
                fields["Version"],
                fields.get("Architecture", ""),
                fields["Filename"],
                fields["SHA256"],
                int(fields["Size"]),
                fields.get("Depends", ""),
                a,
            )


def depends_names(depends: str) -> list[str]:
    """The first alternative of each dependency, without versions."""
    out = []
    for dep in depends.split(","):
        first = dep.split("|")[0].strip()
        name = re.split(r"[\s(:]", first, maxsplit=1)[0]
        if name:
            out.append(name)
    return out


# ----------------------------------------------------------------------------- .deb


def deb_data(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), opened for reading."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise FetchError(f"{deb} is not a Debian package (no ar header)")
        while True:
            head = f.read(60)
            if len(head) < 60:
                break
            name = head[:16].decode().strip().rstrip("/")
            size = int(head[48:58].decode().strip())
            if name.startswith("data.tar"):
                data = f.read(size)
                if name.endswith(".zst"):
                    return _zstd_tar(data, deb)
                return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
            f.seek(size + (size & 1), 1)
    raise FetchError(f"{deb} has no data.tar member")


def _zstd_tar(data: bytes, deb: Path) -> tarfile.TarFile:
    if find_tool("zstd") is None:
        raise ToolError(f"{deb.name} is zstd-compressed: missing zstd", hint="sudo apt-get install -y zstd")
    raw = run(["zstd", "-dc"], input=data).stdout
    return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
