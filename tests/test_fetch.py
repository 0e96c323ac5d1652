"""The fetcher against a real HTTP(S) server on 127.0.0.1: resume, retry, verification, cache,
offline, input dirs, mirrors, lock files, split inputs, killed and concurrent processes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from httpserver import LocalHTTPServer

from builder.cache import Cache, PartialState, default_cache_dir
from builder.errors import FetchError, RecipeError
from builder.fetch import (
    ChecksumError,
    FetchOptions,
    cache_list,
    cache_prune,
    fetch,
    head_size,
    lock_inputs,
    rewrite_url,
)
from builder.inputs import InputSpec
from builder.lockfile import (
    Lock,
    LockEntry,
    apply_lock,
    lock_path_for,
    read_lock,
    write_lock,
)

REPO = Path(__file__).resolve().parents[1]


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def pinned(url: str, data: bytes, **extra: Any) -> InputSpec:
    return InputSpec(url=url, sha256=sha256(data), size=len(data), where="recipe.yaml:3 base", **extra)


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer() as s:
        yield s


@pytest.fixture
def tls_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer(tls=True) as s:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(s.ca_file))
        yield s


@pytest.fixture
def events() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def opts(tmp_path: Path, events: list[dict[str, Any]]) -> FetchOptions:
    return FetchOptions(
        cache_dir=tmp_path / "cache",
        progress=False,
        retries=3,
        timeout=5.0,
        backoff=0.01,
        on_event=events.append,
    )


def blobs_in(cache_dir: Path) -> list[Path]:
    return [e.path for e in cache_list(cache_dir) if not e.partial]


def partials_in(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "partial").glob("*.part"))


# ---------------------------------------------------------------------------- downloads


def test_download_is_verified_cached_and_a_hit_costs_no_network(
    server: LocalHTTPServer,
    opts: FetchOptions,
    events: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = blob(300_000, 1)
    server.add("/img.bin", data)
    spec = pinned(server.url("/img.bin"), data)

    with caplog.at_level(logging.INFO, logger="airbox-build"):
        first = fetch(spec, opts)
    assert f"downloading {spec.url} (293.0 KiB)" in caplog.text  # the quiet lines without a TTY
    assert first.source == "download"
    assert first.path.read_bytes() == data
    assert (first.sha256, first.md5, first.size) == (sha256(data), md5(data), len(data))
    assert first.path == opts.cache_dir / "sha256" / sha256(data)[:2] / sha256(data)
    meta = json.loads((first.path.parent / f"{sha256(data)}.json").read_text())
    assert meta["urls"] == [spec.url] and meta["md5"] == md5(data) and meta["size"] == len(data)
    assert partials_in(opts.cache_dir) == []
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"

    second = fetch(spec, opts)
    assert second.source == "cache" and second.path == first.path
    assert len(server.gets("/img.bin")) == 1  # the hit did not touch the network


def test_resume_after_a_dropped_connection(server: LocalHTTPServer, opts: FetchOptions) -> None:
    data = blob(1_000_000, 2)
    resource = server.add("/img.bin", data, drop_after=300_000)
    fetched = fetch(pinned(server.url("/img.bin"), data), opts)
    assert fetched.path.read_bytes() == data
    first, second = server.gets("/img.bin")
    assert (first.status, first.sent) == (200, 300_000)
    assert second.range == "bytes=300000-" and second.status == 206
    assert second.headers["If-Range"] == resource.etag  # resumes only if the file is unchanged
    assert second.sent == len(data) - 300_000


def test_a_link_that_keeps_dropping_but_progresses_is_not_given_up(
    server: LocalHTTPServer, opts: FetchOptions
) -> None:
    data = blob(400_000, 36)
    server.add("/img.bin", data, drop_after=50_000, drop_times=6)
    fetched = fetch(pinned(server.url("/img.bin"), data), replace(opts, retries=2))
    assert fetched.path.read_bytes() == data
    assert [r.range for r in server.gets("/img.bin")] == [None] + [
        f"bytes={n * 50_000}-" for n in range(1, 7)
    ]


def test_restart_when_the_server_ignores_range(server: LocalHTTPServer, opts: FetchOptions) -> None:
    data = blob(400_000, 3)
    server.add("/img.bin", data, drop_after=100_000, ranges=False)
    fetched = fetch(pinned(server.url("/img.bin"), data), opts)
    assert fetched.path.read_bytes() == data
    _, second = server.gets("/img.bin")
    assert second.range == "bytes=100000-" and second.status == 200 and second.sent == len(data)


def test_if_range_restarts_when_the_file_changed_on_the_server(
    server: LocalHTTPServer, opts: FetchOptions
) -> None:
    old, new = blob(400_000, 4), blob(400_000, 5)
    server.add("/img.bin", old, drop_after=150_000, drop_times=5)
    with pytest.raises(FetchError, match="failed after 0 retries"):
        fetch(pinned(server.url("/img.bin"), old), replace(opts, retries=0))
    assert [p.stat().st_size for p in partials_in(opts.cache_dir)] == [150_000]

    server.set("/img.bin", data=new, etag='"v2"', last_modified="Tue, 01 Oct 2024 00:00:00 GMT", drop_times=0)
    fetched = fetch(pinned(server.url("/img.bin"), new), opts)
    assert fetched.path.read_bytes() == new
    resumed = server.gets("/img.bin")[-1]
    assert resumed.range == "bytes=150000-" and resumed.headers["If-Range"] != '"v2"'
    assert resumed.status == 200  # the server sent the new file whole instead of a wrong tail


def test_a_complete_partial_is_committed_after_a_416(server: LocalHTTPServer, opts: FetchOptions) -> None:
    data = blob(200_000, 6)
    resource = server.add("/img.bin", data)
    # As if a process had been killed after the last byte but before the commit.
    cache = Cache(opts.cache_dir)
    key = cache.partial_key(server.url("/img.bin"))
    cache.partial_path(key).parent.mkdir(parents=True)
    cache.partial_path(key).write_bytes(data)
    cache.write_partial_state(key, PartialState(url=server.url("/img.bin"), etag=resource.etag))
    fetched = fetch(pinned(server.url("/img.bin"), data), opts)
    assert fetched.path.read_bytes() == data and fetched.source == "download"
    (only,) = server.gets("/img.bin")
    assert only.range == f"bytes={len(data)}-" and only.status == 416 and only.sent == 0


def test_retry_after_500_then_200(
    server: LocalHTTPServer, opts: FetchOptions, events: list[dict[str, Any]]
) -> None:
    data = blob(50_000, 7)
    server.add("/img.bin", data, fail_times=2)
    fetched = fetch(pinned(server.url("/img.bin"), data), opts)
    assert fetched.path.read_bytes() == data
    assert [r.status for r in server.gets("/img.bin")] == [500, 500, 200]
    assert sum("HTTP 500" in e.get("message", "") for e in events if e["event"] == "warning") == 2


def test_gives_up_after_the_retries(server: LocalHTTPServer, opts: FetchOptions) -> None:
    data = blob(50_000, 8)
    server.add("/img.bin", data, fail_times=100, fail_status=503)
    with pytest.raises(FetchError) as err:
        fetch(pinned(server.url("/img.bin"), data), replace(opts, retries=2))
    assert "HTTP 503" in err.value.message and server.url("/img.bin") in err.value.message
    assert err.value.where == "recipe.yaml:3 base"
    assert len(server.gets("/img.bin")) == 3
    assert blobs_in(opts.cache_dir) == []


def test_connection_refused_is_retried_then_reported(opts: FetchOptions) -> None:
    with LocalHTTPServer() as gone:
        url = gone.url("/img.bin")
    data = b"x" * 10
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="failed after 2 retries"):
        fetch(pinned(url, data), replace(opts, retries=2))
    assert time.monotonic() - t0 < 5


def test_redirects_are_followed(server: LocalHTTPServer, opts: FetchOptions) -> None:
    data = blob(80_000, 9)
    server.add("/new/img.bin", data)
    server.add("/old/img.bin", b"", redirect_to="/new/img.bin")
    fetched = fetch(pinned(server.url("/old/img.bin"), data), opts)
    assert fetched.path.read_bytes() == data
    assert [r.status for r in server.gets("/old/img.bin")] == [302]
    assert [r.status for r in server.gets("/new/img.bin")] == [200]


def test_404_names_the_url_and_suggests_a_mirror(server: LocalHTTPServer, opts: FetchOptions) -> None:
    with pytest.raises(FetchError) as err:
        fetch(pinned(server.url("/nope.bin"), b"x"), opts)
    assert "404" in err.value.message and server.url("/nope.bin") in err.value.message
    assert "mirror" in (err.value.hint or "")
    assert len(server.gets("/nope.bin")) == 1  # a 404 is not retried
    assert partials_in(opts.cache_dir) == []
    with pytest.raises(FetchError, match="unsupported URL scheme 'ftp'") as err:
        fetch(InputSpec(url="ftp://host/x", sha256="0" * 64, where="r.yaml:4 base"), opts)
    assert err.value.where == "r.yaml:4 base"


# ---------------------------------------------------------------------------- verification


def test_checksum_mismatch_moves_the_bad_file_aside(server: LocalHTTPServer, opts: FetchOptions) -> None:
    good, evil = blob(120_000, 10), blob(120_000, 11)
    server.add("/img.bin", good, wrong_bytes=evil)
    spec = replace(pinned(server.url("/img.bin"), good), md5=md5(good))
    with pytest.raises(ChecksumError) as err:
        fetch(spec, opts)
    e = err.value
    assert e.url == spec.url and spec.url in e.message
    assert e.expected == {"sha256": sha256(good), "md5": md5(good)}
    assert e.actual == {"sha256": sha256(evil), "md5": md5(evil)}
    assert e.moved_to is not None and e.moved_to.parent == opts.cache_dir / "bad"
    assert e.moved_to.read_bytes() == evil and str(e.moved_to) in (e.hint or "")
    assert blobs_in(opts.cache_dir) == [] and partials_in(opts.cache_dir) == []
    # nothing unverified is used later either, even offline
    with pytest.raises(FetchError, match="--offline"):
        fetch(spec, replace(opts, offline=True))


def test_size_mismatch_fails_before_the_body(server: LocalHTTPServer, opts: FetchOptions) -> None:
    data = blob(2_000_000, 12)
    server.add("/img.bin", data, delay=0.01)  # 16 KiB per 10 ms: reading it all would take > 1 s
    spec = replace(pinned(server.url("/img.bin"), data), size=len(data) - 1)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as err:
        fetch(spec, opts)
    assert time.monotonic() - t0 < 0.8
    assert f"announces {len(data)} bytes, expected {len(data) - 1}" in err.value.message
    assert blobs_in(opts.cache_dir) == [] and partials_in(opts.cache_dir) == []


def test_md5_only_pin_warns_and_suggests_lock(
    server: LocalHTTPServer,
    opts: FetchOptions,
    events: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = blob(60_000, 13)
    server.add("/img.bin", data)
    spec = InputSpec(url=server.url("/img.bin"), md5=md5(data), name="base")
    with caplog.at_level(logging.WARNING, logger="airbox-build"):
        fetched = fetch(spec, opts)
    assert fetched.path.read_bytes() == data and fetched.sha256 == sha256(data)
    warnings = [e for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and "md5 only" in warnings[0]["message"]
    assert "airbox-build lock" in warnings[0]["message"] and warnings[0]["input"] == "base"
    assert any("airbox-build lock" in r.getMessage() for r in caplog.records)
    again = fetch(spec, opts)
    assert again.source == "cache" and len(server.gets("/img.bin")) == 1


def test_md5_mismatch_is_caught(server: LocalHTTPServer, opts: FetchOptions) -> None:
    data = blob(60_000, 14)
    server.add("/img.bin", data)
    with pytest.raises(ChecksumError) as err:
        fetch(InputSpec(url=server.url("/img.bin"), md5="0" * 32), opts)
    assert err.value.actual == {"md5": md5(data)}


def test_unpinned_plain_http_is_refused(server: LocalHTTPServer, opts: FetchOptions) -> None:
    server.add("/img.bin", b"data")
    with pytest.raises(FetchError, match="plain http without a checksum"):
        fetch(InputSpec(url=server.url("/img.bin")), opts)
    assert server.gets("/img.bin") == []


def test_unpinned_https_is_allowed_with_a_warning_and_tls_is_verified(
    tls_server: LocalHTTPServer,
    opts: FetchOptions,
    events: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = blob(70_000, 15)
    tls_server.add("/tool.tgz", data)
    spec = InputSpec(url=tls_server.url("/tool.tgz"))
    fetched = fetch(spec, opts)
    assert fetched.path.read_bytes() == data
    assert any("no checksum" in e["message"] for e in events if e["event"] == "warning")
    assert fetch(spec, opts).source == "cache"  # found by its URL
    (entry,) = lock_inputs([spec], opts).entries
    assert (entry.url, entry.size, entry.sha256) == (spec.url, len(data), sha256(data))

    monkeypatch.delenv("REQUESTS_CA_BUNDLE")  # now the self-signed certificate is not trusted
    tls_server.add("/other.tgz", data)
    with pytest.raises(FetchError, match="TLS verification failed"):
        fetch(InputSpec(url=tls_server.url("/other.tgz")), opts)


def test_unpinned_is_refused_with_locked(tls_server: LocalHTTPServer, opts: FetchOptions) -> None:
    tls_server.add("/tool.tgz", b"data")
    with pytest.raises(FetchError) as err:
        fetch(InputSpec(url=tls_server.url("/tool.tgz"), md5=md5(b"data")), replace(opts, locked=True))
    assert "not pinned by sha256" in err.value.message and "airbox-build lock" in (err.value.hint or "")
    assert tls_server.requests() == []


# ---------------------------------------------------------------------------- offline, input dirs


def test_offline_hit_and_miss(server: LocalHTTPServer, opts: FetchOptions) -> None:
    data, other = blob(40_000, 16), blob(40_000, 17)
    server.add("/img.bin", data)
    server.add("/missing.bin", other)
    fetch(pinned(server.url("/img.bin"), data), opts)
    server.clear_log()

    offline = replace(opts, offline=True)
    hit = fetch(pinned(server.url("/img.bin"), data), offline)
    assert hit.source == "cache" and hit.path.read_bytes() == data
    with pytest.raises(FetchError) as err:
        fetch(pinned(server.url("/missing.bin"), other), offline)
    assert "--offline" in err.value.message and server.url("/missing.bin") in err.value.message
    assert "--input-dir" in (err.value.hint or "") and "without --offline" in (err.value.hint or "")
    assert server.requests() == []


def test_input_dir_matches_by_checksum_whatever_the_name(
    server: LocalHTTPServer, opts: FetchOptions, tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    data = blob(90_000, 18)
    drop = tmp_path / "downloads"
    (drop / "from-cloud-drive").mkdir(parents=True)
    (drop / "img.bin").write_bytes(blob(90_000, 19))  # the URL's name, the wrong bytes
    (drop / "from-cloud-drive" / "renamed (1).bin").write_bytes(data)
    (drop / "small.bin").write_bytes(b"x")
    spec = pinned(server.url("/img.bin"), data)
    fetched = fetch(spec, replace(opts, input_dirs=(drop,), offline=True))
    assert fetched.source == "input-dir"
    assert fetched.path == drop / "from-cloud-drive" / "renamed (1).bin"
    assert fetched.sha256 == sha256(data)
    assert any("not its checksum" in e["message"] for e in events if e["event"] == "warning")
    assert server.requests() == []
    # The digest of the 90 KB file is remembered while the file is unchanged.
    memo = list((opts.cache_dir / "stat").glob("*.json"))
    assert any(json.loads(m.read_text())["sha256"] == sha256(data) for m in memo)


def test_local_paths_are_verified_in_place(opts: FetchOptions, tmp_path: Path) -> None:
    data = blob(30_000, 20)
    folder = tmp_path / "vendor-package"
    folder.mkdir()
    image = tmp_path / "sdcard.img"
    image.write_bytes(data)

    as_dir = fetch(InputSpec(path=folder), opts)
    assert (as_dir.path, as_dir.sha256, as_dir.source) == (folder, None, "local")
    as_file = fetch(InputSpec(path=image, sha256=sha256(data)), opts)
    assert (as_file.path, as_file.sha256, as_file.size) == (image, sha256(data), len(data))
    by_url = fetch(InputSpec(url=image.as_uri(), sha256=sha256(data)), opts)
    assert by_url.path == image and by_url.url == image.as_uri()
    plain = fetch(InputSpec(url=str(image), md5=md5(data)), opts)
    assert plain.path == image

    with pytest.raises(ChecksumError) as err:
        fetch(InputSpec(path=image, sha256="0" * 64, where="r.yaml:2 base"), opts)
    assert err.value.moved_to is None and image.read_bytes() == data  # the user's file stays
    assert err.value.where == "r.yaml:2 base"
    with pytest.raises(FetchError, match="does not exist"):
        fetch(InputSpec(path=tmp_path / "nope.img"), opts)


# ---------------------------------------------------------------------------- mirrors


def test_mirrors_rewrite_prefixes_and_keep_the_original_url(
    server: LocalHTTPServer, opts: FetchOptions
) -> None:
    data = blob(50_000, 21)
    server.add("/gh/radxa/tool/releases/tool.tgz", data)
    original = "https://github.invalid/radxa/tool/releases/tool.tgz"
    mirrors = (
        ("https://elsewhere.invalid/", "https://nowhere.invalid/"),
        ("https://github.invalid/", server.url("/gh/")),
    )
    fetched = fetch(pinned(original, data), replace(opts, mirrors=mirrors))
    assert fetched.path.read_bytes() == data and fetched.url == original
    assert len(server.gets("/gh/radxa/tool/releases/tool.tgz")) == 1
    meta = json.loads((fetched.path.parent / f"{sha256(data)}.json").read_text())
    assert meta["urls"] == [original]
    assert rewrite_url("https://a/x", (("https://a/", "B/"), ("https://a/", "C/"))) == "B/x"


# ---------------------------------------------------------------------------- split inputs


def test_split_input_is_concatenated_and_verified_as_a_whole(
    server: LocalHTTPServer, opts: FetchOptions
) -> None:
    parts = [blob(70_000, 22), blob(70_000, 23), blob(1_234, 24)]
    whole = b"".join(parts)
    for i, p in enumerate(parts):
        server.add(f"/model.bin.{i}", p)
    urls = tuple(server.url(f"/model.bin.{i}") for i in range(3))
    spec = InputSpec(parts=urls, sha256=sha256(whole), size=len(whole), where="app.yaml:9 models[0]")
    fetched = fetch(spec, opts)
    assert fetched.path.read_bytes() == whole and fetched.size == len(whole)
    assert [p.sha256 for p in fetched.parts] == [sha256(p) for p in parts]
    assert fetch(spec, replace(opts, offline=True)).source == "cache"

    # The whole is content-addressed: the same pins are a hit whatever the parts. In a fresh cache,
    # parts in the wrong order are assembled and caught.
    swapped = replace(spec, parts=(urls[1], urls[0], urls[2]))
    assert fetch(swapped, opts).source == "cache"
    with pytest.raises(ChecksumError) as err:
        fetch(swapped, replace(opts, cache_dir=opts.cache_dir.with_name("fresh")))
    assert err.value.expected["sha256"] == sha256(whole)
    assert (
        err.value.moved_to is not None and err.value.moved_to.read_bytes() == parts[1] + parts[0] + parts[2]
    )

    with pytest.raises(FetchError, match="add up to"):
        fetch(replace(spec, parts=urls[:2], sha256="1" * 64), opts)


# ---------------------------------------------------------------------------- lock files


def test_lock_pins_everything_and_locked_builds_use_it(
    server: LocalHTTPServer, opts: FetchOptions, tmp_path: Path
) -> None:
    base, part0, part1 = blob(80_000, 25), blob(50_000, 26), blob(5_000, 27)
    server.add("/base.img", base)
    server.add("/m.0", part0)
    server.add("/m.1", part1)
    recipe = tmp_path / "airbox.yaml"
    recipe.write_text("name: x\n")
    specs = [
        InputSpec(url=server.url("/base.img"), md5=md5(base), name="base"),  # vendor: md5 only
        InputSpec(parts=(server.url("/m.0"), server.url("/m.1")), md5=md5(part0 + part1)),
        InputSpec(path=tmp_path),  # local: not locked
    ]
    lock = lock_inputs(specs, opts)
    write_lock(lock_path_for(recipe), lock)
    assert lock_path_for(recipe) == tmp_path / "airbox.yaml.lock"
    text = lock_path_for(recipe).read_text()
    assert yaml.safe_load(text)["inputs"][0] == {
        "url": server.url("/base.img"),
        "size": len(base),
        "sha256": sha256(base),
        "md5": md5(base),
    }
    loaded = read_lock(lock_path_for(recipe))
    assert loaded == lock
    split = loaded.entries[1]
    assert [(p.url, p.size, p.sha256) for p in split.parts] == [
        (server.url("/m.0"), len(part0), sha256(part0)),
        (server.url("/m.1"), len(part1), sha256(part1)),
    ]
    assert (split.size, split.sha256) == (len(part0 + part1), sha256(part0 + part1))

    # A second lock of a fully pinned recipe costs no network.
    server.clear_log()
    assert lock_inputs(specs, opts, existing=loaded) == loaded
    assert server.requests() == []

    # --locked with the lock: the unpinned recipe entries are pinned by the lock; fresh cache.
    locked = replace(opts, cache_dir=tmp_path / "cache2", lock=loaded, locked=True)
    assert fetch(InputSpec(url=server.url("/base.img")), locked).path.read_bytes() == base
    assert fetch(InputSpec(parts=split.key), locked).path.read_bytes() == part0 + part1
    with pytest.raises(FetchError, match="not pinned by sha256"):
        fetch(InputSpec(url=server.url("/other.img"), md5="0" * 32), locked)
    with pytest.raises(FetchError, match="disagrees"):
        fetch(InputSpec(url=server.url("/base.img"), sha256="0" * 64), locked)


def test_a_lock_that_pins_other_bytes_fails_the_build(server: LocalHTTPServer, opts: FetchOptions) -> None:
    data = blob(20_000, 28)
    server.add("/img.bin", data)
    lock = Lock((LockEntry(url=server.url("/img.bin"), size=len(data), sha256="a" * 64),))
    with pytest.raises(ChecksumError) as err:
        fetch(InputSpec(url=server.url("/img.bin")), replace(opts, lock=lock, locked=True))
    assert err.value.expected == {"sha256": "a" * 64} and err.value.actual == {"sha256": sha256(data)}


def test_apply_lock_fills_in_pins_and_the_recipe_wins_on_conflict(caplog: pytest.LogCaptureFixture) -> None:
    lock = Lock((LockEntry(url="https://x/a", size=3, sha256="b" * 64, md5="c" * 32),))
    assert apply_lock(InputSpec(url="https://x/a"), lock) == InputSpec(
        url="https://x/a", size=3, sha256="b" * 64, md5="c" * 32
    )
    assert apply_lock(InputSpec(url="https://x/other"), lock) == InputSpec(url="https://x/other")
    with caplog.at_level(logging.WARNING):
        kept = apply_lock(InputSpec(url="https://x/a", size=4), lock)
    assert kept.size == 4 and kept.sha256 is None and "airbox-build lock" in caplog.text
    with pytest.raises(FetchError, match="size: recipe 4, lock 3"):
        apply_lock(InputSpec(url="https://x/a", size=4), lock, strict=True)


def test_bad_lock_files_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml.lock"
    bad.write_text("version: 1\ninputs:\n- url: https://x/a\n  size: 3\n  sha256: nothex\n")
    with pytest.raises(RecipeError) as err:
        read_lock(bad)
    assert err.value.where == f"{bad}: inputs[0].sha256"
    bad.write_text(
        "version: 1\ninputs:\n- url: https://x/a\n  size: 3\n  sha256: " + "a" * 64 + "\n  sha: 1\n"
    )
    with pytest.raises(RecipeError, match="unknown key"):
        read_lock(bad)
    bad.write_text("version: 2\ninputs: []\n")
    with pytest.raises(RecipeError, match="unsupported version"):
        read_lock(bad)


# ---------------------------------------------------------------------------- sizes, cache admin


def test_head_size(server: LocalHTTPServer, opts: FetchOptions, tmp_path: Path) -> None:
    data = blob(12_345, 29)
    server.add("/img.bin", data)
    server.add("/old.bin", b"", redirect_to="/img.bin")
    server.add("/nohead.bin", data, head_allowed=False)
    assert head_size(InputSpec(url=server.url("/old.bin"), md5="0" * 32), opts) == len(data)
    assert head_size(InputSpec(url=server.url("/nohead.bin")), opts) == len(data)
    assert [r.range for r in server.gets("/nohead.bin")] == ["bytes=0-0"]
    server.clear_log()
    assert head_size(InputSpec(url=server.url("/img.bin"), size=7), opts) == 7
    assert head_size(InputSpec(url=server.url("/img.bin")), replace(opts, offline=True)) is None
    parts = InputSpec(parts=(server.url("/img.bin"), server.url("/img.bin")))
    assert head_size(parts, replace(opts, offline=True)) is None
    assert server.requests() == []
    assert head_size(parts, opts) == 2 * len(data)
    (tmp_path / "f").write_bytes(data)
    assert head_size(InputSpec(path=tmp_path / "f"), opts) == len(data)
    assert head_size(InputSpec(url=server.url("/missing")), opts) is None


def test_cache_list_and_prune(server: LocalHTTPServer, opts: FetchOptions) -> None:
    old, new = blob(10_000, 30), blob(20_000, 31)
    server.add("/old.bin", old)
    server.add("/new.bin", new)
    fetch(pinned(server.url("/old.bin"), old), opts)
    fetch(pinned(server.url("/new.bin"), new), opts)
    server.add("/partial.bin", blob(100_000, 32), drop_after=1_000, drop_times=10)
    with pytest.raises(FetchError):
        fetch(pinned(server.url("/partial.bin"), blob(100_000, 32)), replace(opts, retries=0))

    entries = cache_list(opts.cache_dir)
    complete = {e.sha256: e for e in entries if not e.partial}
    assert set(complete) == {sha256(old), sha256(new)}
    assert complete[sha256(old)].urls == (server.url("/old.bin"),) and complete[sha256(old)].size == 10_000
    (partial,) = [e for e in entries if e.partial]
    assert partial.size == 1_000 and partial.urls == (server.url("/partial.bin"),)

    # Make `old` look unused for 10 days.
    meta_path = Cache(opts.cache_dir).meta_path(sha256(old))
    meta = json.loads(meta_path.read_text())
    meta["last_used"] = time.time() - 10 * 86400
    meta_path.write_text(json.dumps(meta))
    os.utime(partial.path, (time.time() - 10 * 86400,) * 2)

    result = cache_prune(opts.cache_dir, timedelta(days=7))
    assert (result.files, result.bytes) == (2, 10_000 + 1_000)
    assert [e.sha256 for e in cache_list(opts.cache_dir)] == [sha256(new)]
    # The pruned input is downloaded again (its md5 and URL indexes went with it).
    server.clear_log()
    assert fetch(pinned(server.url("/old.bin"), old), opts).source == "download"
    assert cache_prune(opts.cache_dir, None).files == 2
    assert cache_list(opts.cache_dir) == []


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIRBOX_BUILD_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("AIRBOX_BUILD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert default_cache_dir() == tmp_path / "xdg" / "airbox-build"


def test_progress_bar_on_request(
    server: LocalHTTPServer, opts: FetchOptions, capsys: pytest.CaptureFixture[str]
) -> None:
    data = blob(100_000, 33)
    server.add("/img.bin", data)
    fetch(pinned(server.url("/img.bin"), data, name="base"), replace(opts, progress=True))
    err = capsys.readouterr().err
    assert "base" in err and "97.7k" in err  # tqdm's byte count (KiB) on stderr


# ---------------------------------------------------------------------------- other processes

FETCH_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from builder.fetch import FetchOptions, fetch
    from builder.inputs import InputSpec

    url, digest, size, cache = sys.argv[1:5]
    spec = InputSpec(url=url, sha256=digest, size=int(size))
    got = fetch(spec, FetchOptions(cache_dir=Path(cache), progress=False, backoff=0.01))
    print(got.path, got.source, flush=True)
    """
)


def start_fetcher(url: str, data: bytes, cache_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", FETCH_SCRIPT, url, sha256(data), str(len(data)), str(cache_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_killed_process_leaves_only_a_partial_and_the_next_run_resumes(
    server: LocalHTTPServer, opts: FetchOptions
) -> None:
    data = blob(2_000_000, 34)
    server.add("/img.bin", data, delay=0.01)  # ~1.6 MB/s
    proc = start_fetcher(server.url("/img.bin"), data, opts.cache_dir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        parts = partials_in(opts.cache_dir)
        if parts and parts[0].stat().st_size >= 300_000:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    (part,) = partials_in(opts.cache_dir)
    kept = part.stat().st_size
    assert 300_000 <= kept < len(data) and part.read_bytes() == data[:kept]
    assert blobs_in(opts.cache_dir) == [] and not list((opts.cache_dir / "sha256").rglob("*"))

    server.set("/img.bin", delay=0.0)
    fetched = fetch(pinned(server.url("/img.bin"), data), opts)
    assert fetched.path.read_bytes() == data and fetched.source == "download"
    # the killed client's own GET (sent=0 from the server's view) may be logged after the resume
    resumed = [g for g in server.gets("/img.bin") if g.range == f"bytes={kept}-"]
    assert len(resumed) == 1, server.gets("/img.bin")
    assert resumed[0].status == 206 and resumed[0].sent == len(data) - kept
    assert partials_in(opts.cache_dir) == []


def test_two_processes_share_one_download(server: LocalHTTPServer, opts: FetchOptions) -> None:
    data = blob(1_500_000, 35)
    server.add("/img.bin", data, delay=0.005)
    procs = [start_fetcher(server.url("/img.bin"), data, opts.cache_dir) for _ in range(2)]
    outputs = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    paths = {out.split()[0] for out, _ in outputs}
    sources = sorted(out.split()[1] for out, _ in outputs)
    assert sources == ["cache", "download"]
    (path,) = paths
    assert Path(path).read_bytes() == data
    gets = server.gets("/img.bin")
    assert len(gets) == 1 and gets[0].range is None and gets[0].sent == len(data)
    assert sum(r.sent for r in gets) == len(data)


def test_prune_removes_the_work_of_a_killed_pip_download(tmp_path: Path) -> None:
    """A pip download killed midway leaves cache/partial/pip-<pid>-<n>/: prune removes it, unless
    its process still runs."""
    cache = tmp_path / "cache"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = cache / "partial" / f"pip-{dead.pid}-123" / "wheels"
    killed.mkdir(parents=True)
    (killed / "x-1.0-py3-none-any.whl.part").write_bytes(b"w" * 5000)
    running = cache / "partial" / f"pip-{os.getpid()}-456" / "wheels"
    running.mkdir(parents=True)
    result = cache_prune(cache, timedelta(days=7))
    assert (result.files, result.bytes) == (1, 5000)
    assert not killed.parent.exists() and running.exists()
