"""Secrets never leave the build: password hashes, URL credentials and tokens are masked in every
message, event, log line and report, while the build still uses them."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import vendor_fixture as vf
from buildhelp import cli, write_recipe
from httpserver import LocalHTTPServer

from builder.errors import FetchError
from builder.events import Reporter
from builder.redact import MASK, RedactingFilter, redact_data, redact_text, redact_url

PASSWORD = "S3kr1t-Pa55"  # URL user info
TOKEN = "tok-9f8e7d6c5b4a"  # ?token=
SIG = "sig-0a1b2c3d4e5f"  # &sig=
AMZ = "amzsig-77aa88bb99"  # ?X-Amz-Signature= (through a mirror)
HASH = "$6$pepper77$" + "Zq9" * 28 + "xy"  # the recipe's password_hash (86 characters after the salt)
OLD_HASH_PART = (
    "fixture1$G7c2B0NfzTnY0o9tq9bS6wz5m4W0cM2cQbq8lq5Y1eA0pXl9a0Ck3pS1r0n7Hq8Qv2s1l0c9eW8Z0aTq3f1b0."
)
SECRETS = (PASSWORD, TOKEN, SIG, AMZ, "pepper77$", HASH[12:40], OLD_HASH_PART[:30])
MOTD = b"motd served with a login\n"
BLOB = b"blob behind a signed URL\n"


# ---------------------------------------------------------------------------------------------
# The helper


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("https://bob:hunter2@example.com/a.tgz", "hunter2"),
        ("https://ghp_abcdef123456@github.com/o/r.git", "ghp_abcdef123456"),
        ("https://h/x?token=abc123&x=1", "abc123"),
        ("https://h/x?a=1&access_token=zzz999", "zzz999"),
        ("GET /x?X-Amz-Signature=deadbeef&X-Amz-Date=2024 HTTP/1.1", "deadbeef"),
        ("https://h/x?sig=Qw%3D%3D&se=2030", "Qw%3D%3D"),
        ("linaro:$6$salt$abcdefghijABCDEFGHIJ0123456789./:18900:0:99999:7:::", "abcdefghijABCDEFGHIJ"),
        ("root:$y$j9T$saltsaltsalt$hashhashhashhash:1:0", "hashhashhashhash"),
        ("u:$2b$12$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234:1", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        ("Authorization: Bearer eyJhbGciOi.payload.sig", "eyJhbGciOi"),
        ("fetching http://u:p4ss@h:8/x?token=t0k: HTTP 404", "p4ss"),
    ],
)
def test_redact_text_masks_credentials(text: str, secret: str) -> None:
    shown = redact_text(text)
    assert secret not in shown and MASK in shown


@pytest.mark.parametrize(
    "text",
    [
        "https://mirrors.tuna.tsinghua.edu.cn/ubuntu-ports/dists/focal/Release",
        "https://h/x?version=2&key_id=",
        "echo $1 $2; price $5",
        "sha256 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        "boot_emmc-rootfs.scr:41: overlap with the previous chunk",
    ],
)
def test_redact_text_leaves_ordinary_text_alone(text: str) -> None:
    assert redact_text(text) == text


def test_redact_url_keeps_everything_else() -> None:
    url = "https://u:p@h.example:8443/a/b.tgz?x=1&token=abc&y=2#frag"
    assert redact_url(url) == "https://***@h.example:8443/a/b.tgz?x=1&token=***&y=2#frag"
    assert redact_url("https://h/x.tgz") == "https://h/x.tgz"
    assert redact_text("fetching https://u:p@h/x: HTTP 404") == "fetching https://***@h/x: HTTP 404"


def test_every_output_chokepoint_masks(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"https://bob:{PASSWORD}@h/x?token={TOKEN}"
    err = FetchError(f"{url}: HTTP 404", where=f"r.yaml:3 files[0] ({url})", hint=f"check {url}")
    assert PASSWORD not in err.render() and TOKEN not in str(err)
    assert all(PASSWORD not in (v or "") for v in err.public().values())
    assert err.message.startswith("https://bob:")  # the error itself keeps what the code needs
    reporter = Reporter(json_mode=True)
    reporter.warn(f"retrying {url}")
    reporter.info(f"using {HASH}")
    reporter.event("fetch-done", url=url, nested={"list": [url]})
    out = capsys.readouterr().out
    assert PASSWORD not in out and TOKEN not in out and HASH not in out
    assert all(PASSWORD not in w for w in reporter.warnings)
    record = logging.LogRecord("airbox-build", logging.INFO, __file__, 1, "downloading %s", (url,), None)
    assert RedactingFilter().filter(record) and PASSWORD not in record.getMessage()
    assert redact_data({"a": [url, 3, None], "b": {"c": url}})["b"]["c"].startswith("https://***@")


# ---------------------------------------------------------------------------------------------
# End to end


def secrets_recipe(srv: LocalHTTPServer, folder: Path, base: Path, motd_sha: str) -> Path:
    motd_url = srv.url(f"/motd?token={TOKEN}&sig={SIG}").replace("http://", f"http://bob:{PASSWORD}@")
    return write_recipe(
        folder,
        base,
        name="secret",
        users={"linaro": {"password_hash": HASH}},
        files=[
            {"path": "/etc/motd", "url": motd_url, "sha256": motd_sha},
            {
                "path": "/etc/blob",
                "url": f"https://downloads.invalid/blob?X-Amz-Signature={AMZ}",
                "sha256": hashlib.sha256(BLOB).hexdigest(),
            },
        ],
        mirrors={
            "https://downloads.invalid/": srv.url("/mirror/").replace("http://", f"http://bob:{PASSWORD}@")
        },
    )


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into {where}"


@pytest.fixture
def server():  # type: ignore[no-untyped-def]
    with LocalHTTPServer() as srv:
        # the server insists on the credentials: the build really uses them
        srv.add("/motd", MOTD, auth=f"bob:{PASSWORD}", query=f"token={TOKEN}&sig={SIG}")
        srv.add("/mirror/blob", BLOB, auth=f"bob:{PASSWORD}", query=f"X-Amz-Signature={AMZ}")
        yield srv


def test_build_uses_secrets_but_never_shows_them(
    server: LocalHTTPServer, vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = secrets_recipe(
        server, tmp_path / "r", vendor_package_session.dir, hashlib.sha256(MOTD).hexdigest()
    )
    out, cache = tmp_path / "out", tmp_path / "cache"
    res = cli("--json", "--debug", "build", recipe, "-o", out, "--cache-dir", cache)
    assert res.returncode == 0, res.stderr
    assert [r.status for r in server.gets("/motd")] == [200]  # with the login and the token
    assert [r.status for r in server.gets("/mirror/blob")] == [200]
    assert "DEBUG: run:" in res.stderr and "GET /motd?token=***&sig=***" in res.stderr  # --debug logs
    assert "/motd?token=***&sig=***" in res.stdout  # the fetch events
    bundle = out / "secret"
    report_text = (bundle / "build-report.json").read_text()
    for where, text in (
        ("stdout", res.stdout),
        ("stderr", res.stderr),
        ("build-report.json", report_text),
        ("SHA256SUMS", (bundle / "SHA256SUMS").read_text()),
    ):
        assert_no_secret(where, text)
    report = json.loads(report_text)
    shadow = next(c for c in report["changes"] if c["path"] == "/etc/shadow")
    assert shadow["action"] == "changed" and "redacted" in shadow["diff"] and len(shadow["sha256"]) == 64
    motd = next(c for c in report["changes"] if c["path"] == "/etc/motd")
    assert motd["sha256"] == hashlib.sha256(MOTD).hexdigest()
    listing = cli("cache", "list", "--cache-dir", cache)
    assert listing.returncode == 0 and "/motd?token=***" in listing.stdout
    assert_no_secret("cache list", listing.stdout)


def test_failing_build_names_the_input_without_its_secrets(
    server: LocalHTTPServer, vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = secrets_recipe(server, tmp_path / "r", vendor_package_session.dir, "0" * 64)
    res = cli("--json", "--debug", "build", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "c")
    assert res.returncode == 1
    assert "checksum mismatch for http://***@127.0.0.1:" in res.stderr
    assert "Traceback" in res.stderr  # --debug: the traceback is shown, masked too
    error = json.loads(res.stdout.splitlines()[-1])
    assert error["event"] == "error" and "token=***" in error["message"]
    assert_no_secret("stderr", res.stderr)
    assert_no_secret("stdout", res.stdout)
    # and a download that is refused (401: no login) says so without the token
    server.set("/motd", auth="bob:other")
    res = cli("build", recipe, "-o", tmp_path / "out", "--cache-dir", tmp_path / "c2")
    assert res.returncode == 1 and "HTTP 401" in res.stderr
    assert_no_secret("stderr", res.stderr)


def test_a_non_string_password_hash_is_not_echoed(
    vendor_package_session: vf.MiniPackage, tmp_path: Path
) -> None:
    recipe = tmp_path / "r.yaml"
    base = vendor_package_session.dir
    recipe.write_text(f"name: x\nbase: {{path: {base}}}\nusers:\n  linaro: {{password_hash: 31337421}}\n")
    res = cli("build", recipe, "-o", tmp_path / "out")
    assert res.returncode == 1 and "password_hash must be a quoted crypt(3) hash" in res.stderr
    assert "31337421" not in res.stderr
