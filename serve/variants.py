"""A/B routing: which model variant answers a request, and which variants see a shadow copy of it.

Variants are weighted (`champion=90,challenger=10`); a client that sends a client id header always lands on the
same variant (its id is hashed onto [0, 1) and the weights cut that interval), so one user never flips between
models mid-session. A variant configured as `shadow` answers nobody: it receives a copy of every request so its
predictions can be logged and compared, while another variant's answer is returned.

Pure logic: no I/O, no model, no web framework.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

SHADOW = "shadow"


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float  # share of answered traffic; 0 for a shadow variant
    shadow: bool = False


@dataclass(frozen=True)
class Assignment:
    answer: str  # the variant whose prediction is returned (and named in the response)
    shadows: tuple[str, ...]  # variants that also score the request, off the response path


def parse_variants(spec: str) -> list[Variant]:
    """Parse `champion=90,challenger=10` or `champion=100,challenger=shadow` (weights need not sum to 100)."""
    variants = []
    for part in filter(None, (piece.strip() for piece in spec.split(","))):
        name, separator, value = (text.strip() for text in part.partition("="))
        if not separator or not name or not value:
            raise ValueError(f"variant {part!r}: expected name=weight or name=shadow")
        if value == SHADOW:
            variants.append(Variant(name, 0.0, shadow=True))
            continue
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"variant {name!r}: weight {value!r} is not a number (or 'shadow')") from None
        variants.append(Variant(name, weight))
    return variants


class VariantRouter:
    """Assigns each request to one answering variant, sticky per client id, plus every shadow variant."""

    def __init__(self, variants: Sequence[Variant], seed: int | None = None) -> None:
        names = [variant.name for variant in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique: {names}")
        answering = [variant for variant in variants if not variant.shadow]
        if any(variant.weight < 0 for variant in answering) or sum(v.weight for v in answering) <= 0:
            raise ValueError("variant weights must be >= 0, with at least one answering variant above 0")
        self.variants = tuple(variants)
        self.shadows = tuple(variant.name for variant in variants if variant.shadow)
        total = sum(variant.weight for variant in answering)
        self._names = [variant.name for variant in answering]
        self._bounds: list[float] = []
        cumulative = 0.0
        for variant in answering:
            cumulative += variant.weight / total
            self._bounds.append(cumulative)
        self._random = random.Random(seed)

    def assign(self, client_id: str | None = None) -> Assignment:
        """The variant that answers this client (random per request without a client id) and the shadows."""
        point = self._random.random() if not client_id else _unit_interval(client_id)
        for name, bound in zip(self._names, self._bounds, strict=True):
            if point < bound:
                return Assignment(name, self.shadows)
        return Assignment(self._names[-1], self.shadows)  # point at the rounding edge of the last bound

    def shares(self) -> dict[str, float]:
        """The expected share of answered traffic per variant (shadows: 0)."""
        lower, shares = 0.0, {}
        for name, bound in zip(self._names, self._bounds, strict=True):
            shares[name], lower = bound - lower, bound
        return shares | {name: 0.0 for name in self.shadows}


def _unit_interval(client_id: str) -> float:
    """A stable, uniform point in [0, 1) for a client id (sha256, so it does not change between processes)."""
    digest = hashlib.sha256(client_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
