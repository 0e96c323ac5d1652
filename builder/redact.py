"""Keep credentials out of everything airbox-build prints or writes about a build.

One helper, used at the few places output leaves the program: error messages
(AirboxError.render and the JSON `error` event), the Reporter's events, info lines and
warnings, log records (a logging.Filter on the CLI's handler), `--debug` tracebacks and the
build report. What it hides:

- the user-info part of a URL (``https://user:token@host/`` -> ``https://***@host/``);
- the values of query parameters that carry credentials (``?token=``, ``access_token=``,
  ``sig=``, ``X-Amz-Signature=``, ...), wherever such a parameter appears in the text;
- crypt(3) password hashes (``$6$salt$hash``, ``$y$...``, ``$2b$...``) -> ``$6$***``;
- the credential of an ``Authorization:`` header line.

The recipe, the lock file and the cache index keep the real URLs: they are inputs, and a
download needs them.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

MASK = "***"

# Query parameters whose value is a credential (compared case-insensitively).
SECRET_PARAMS = (
    "token", "access_token", "refresh_token", "id_token", "auth", "auth_token", "authorization",
    "api_key", "apikey", "api-key", "key", "secret", "client_secret", "password", "passwd", "pwd",
    "sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "x-goog-signature", "x-goog-credential", "private_token", "private-token", "session", "sessionid",
)  # fmt: skip

_SECRET_PARAM_SET = frozenset(SECRET_PARAMS)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s?#'\"<>]+@")
_PARAM = re.compile(r"(?i)([?&;](?:" + "|".join(re.escape(p) for p in SECRET_PARAMS) + r")=)[^&\s#'\"<>;]+")
# crypt(3): $id$[params$]salt$hash; the id list follows crypt(5) (and recipe.py's _CRYPT).
_CRYPT = re.compile(r"\$(1|2[abxy]|5|6|7|y|gy|sha1|md5)\$[A-Za-z0-9./=,+-]*\$[A-Za-z0-9./=+$-]{4,}")
_AUTH_HEADER = re.compile(r"(?i)\b(authorization:\s*(?:basic|bearer|token|digest)\s+)\S+")


def redact_url(url: str) -> str:
    """A URL with its user info and credential-carrying query values masked."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pieces = []
        for piece in query.split("&"):
            name, eq, value = piece.partition("=")
            if eq and value and name.lower() in _SECRET_PARAM_SET:
                piece = f"{name}={MASK}"
            pieces.append(piece)
        query = "&".join(pieces)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Any text with every credential this module knows masked (see the module docstring)."""
    if not text:
        return text
    if "@" in text:
        text = _USERINFO.sub(rf"\1{MASK}@", text)
    if "=" in text:
        text = _PARAM.sub(_mask_param, text)
    if "$" in text:
        text = _CRYPT.sub(rf"$\1${MASK}", text)
    if ":" in text:
        text = _AUTH_HEADER.sub(rf"\1{MASK}", text)
    return text


def _mask_param(m: re.Match[str]) -> str:
    # keep punctuation that ends the sentence around the URL ("...?token=abc: HTTP 404")
    value = m.group(0)[len(m.group(1)) :]
    trail = len(value) - len(value.rstrip(":.,)"))
    return m.group(1) + MASK + (value[len(value) - trail :] if trail else "")


def redact_data(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with every string redacted."""
    kind = type(value)  # exact types first: a build report has hundreds of thousands of values
    if kind is str:
        return redact_text(value)
    if kind is dict or isinstance(value, Mapping):
        return {k: redact_data(v) for k, v in value.items()}
    if kind is list or isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that masks credentials in every record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's problem, not ours
            return True
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True
