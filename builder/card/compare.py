"""Comparing any card (folder, mounted card, card image) with a bundle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from builder.card.bundle import MISMATCH_CAUSES, Bundle, _expected_digests, is_bundle_file

# --------------------------------------------------------------------------------------------
# Comparing any card (folder, mounted card, card image) with a bundle


@dataclass(frozen=True)
class Difference:
    file: str
    message: str


def compare_with_bundle(
    names: Sequence[str],
    size_of: Callable[[str], int],
    digest_of: Callable[[str], str],
    bundle: Bundle,
) -> list[Difference]:
    """Every way the card's files differ from the bundle: missing, extra, other size, other bytes."""
    out = []
    card = set(names)
    expected = _expected_digests(bundle, bundle.order())
    for n in bundle.order():
        if n not in card:
            out.append(Difference(n, "missing on the card"))
    for n in sorted(card - set(bundle.sizes)):
        if is_bundle_file(n):
            out.append(
                Difference(
                    n,
                    "on the card but not in the bundle: a file of an older bundle "
                    "(airbox-build write removes it)",
                )
            )
        else:
            out.append(Difference(n, "on the card but not part of the bundle (remove it)"))
    for n in bundle.order():
        if n not in card:
            continue
        size = size_of(n)
        if size != bundle.sizes[n]:
            out.append(Difference(n, f"{size} bytes on the card, {bundle.sizes[n]} in the bundle"))
            continue
        try:
            digest = digest_of(n)
        except OSError as e:
            out.append(Difference(n, f"cannot read it from the card: {e.strerror or e}"))
            continue
        if digest != expected[n]:
            out.append(Difference(n, "different bytes on the card (sha256 mismatch): " + MISMATCH_CAUSES))
    return out
