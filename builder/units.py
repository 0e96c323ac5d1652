"""Byte sizes as people write them: ``12GiB``, ``512M``, ``1.5GiB``, or a plain number of bytes.

Units are binary and case-insensitive: K/KiB = 2**10, M/MiB = 2**20, G/GiB = 2**30,
T/TiB = 2**40, P/PiB = 2**50, and B (or nothing) = bytes. ``12G`` therefore means 12 GiB.
``KB``/``MB``/``GB``/``TB`` are refused: half the world reads them as powers of 1000 and
the other half as powers of 1024, and a partition size must not depend on which half wrote it.
A fractional value is rounded down to whole bytes (``0.5K`` = 512, ``1.1GiB`` = 1181116006).
"""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tib": 2**40,
    "p": 2**50,
    "pib": 2**50,
}
_AMBIGUOUS = {"kb": "KiB", "mb": "MiB", "gb": "GiB", "tb": "TiB", "pb": "PiB"}
_SIZE = re.compile(r"\s*(?P<number>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)\s*")


def parse_size(value: object) -> int:
    """Return a size in whole bytes; raise ValueError with a readable message on anything else.

    ``value`` is an int (bytes) or a string such as ``"12GiB"``. Booleans, floats,
    negative numbers and junk are refused.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"a size must be a number of bytes or a string like 12GiB, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative ({value})")
        return value
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"a size cannot be negative ({value!r})")
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{value!r} is not a size; write e.g. 4096, 512MiB or 12GiB")
    unit = match["unit"].lower()
    if unit in _AMBIGUOUS:
        number = match["number"]
        raise ValueError(
            f"{value!r} is ambiguous (powers of 1000 or 1024?); write {number}{_AMBIGUOUS[unit]} "
            f"for binary units, or the exact number of bytes"
        )
    if unit not in _UNITS:
        raise ValueError(
            f"unknown size unit {match['unit']!r} in {value!r}; use B, KiB, MiB, GiB, TiB or PiB"
        )
    return int(Fraction(match["number"]) * _UNITS[unit])


def format_size(size: int) -> str:
    """A short human form of a byte count: ``12 GiB``, ``1.5 MiB``, ``4096 B``."""
    for unit, factor in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"
