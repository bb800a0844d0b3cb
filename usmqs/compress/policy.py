"""Compression policy: an ordered list of frozen rules keyed by module-path regex.

Placeholder interface (to be completed by the compression core).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightSpec:
    """What one layer's weight becomes (resolved from the first matching rule)."""

    weight_bits: int | None = None
    nm: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Policy:
    rules: tuple = ()

    def resolve(self, path: str) -> WeightSpec | None:
        return None
