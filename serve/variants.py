"""A/B routing: which model variant answers a request, and which variants see a shadow copy of it.

Variants are weighted (`champion` 90, `challenger` 10); a client that sends a client id header always lands on
the same variant (its id is hashed onto [0, 1) and the weights cut that interval), so one user never flips between
models mid-session. A variant configured as `shadow` answers nobody: it receives a copy of every request so its
predictions can be logged and compared, while another variant's answer is returned.

No I/O, no model, no web framework: the specs are what the VARIANTS setting holds (serve.settings).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class VariantSpec(BaseModel):
    """One entry of the VARIANTS setting."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_uri: str = Field(description="what this variant serves: a .onnx path or an MLflow models:/ URI")
    weight: Annotated[float, Field(ge=0, description="share of answered traffic, relative to the other variants")] = 1.0
    shadow: Annotated[bool, Field(description="score a copy of every request, answer none")] = False


@dataclass(frozen=True)
class Assignment:
    answer: str  # the variant whose prediction is returned (and named in the response)
    shadows: tuple[str, ...]  # variants that also score the request, off the response path


class VariantRouter:
    """Assigns each request to one answering variant, sticky per client id, plus every shadow variant."""

    def __init__(self, variants: Mapping[str, VariantSpec], seed: int | None = None) -> None:
        answering = {name: spec for name, spec in variants.items() if not spec.shadow}
        if sum(spec.weight for spec in answering.values()) <= 0:
            raise ValueError("at least one variant must answer (not shadow) with a weight above 0")
        self.shadows = tuple(name for name, spec in variants.items() if spec.shadow)
        total = sum(spec.weight for spec in answering.values())
        self._names = list(answering)
        self._bounds: list[float] = []
        cumulative = 0.0
        for spec in answering.values():
            cumulative += spec.weight / total
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
