"""Weight compression numerics: N:M masks, fake quantization, straight-through gradients.

Placeholder interface (to be completed): `compressed_weight(w, None, None, ...)` is w.
"""

from __future__ import annotations

import jax

from usmqs.compress.policy import WeightSpec


def compressed_weight(
    w: jax.Array,
    mask: jax.Array | None,
    spec: WeightSpec | None,
    *,
    contract_axes: tuple[int, ...],
) -> jax.Array:
    """W_eff = fake_quant(mask ⊙ W) with STE gradients; `w` itself when spec is None."""
    if spec is None:
        return w
    raise NotImplementedError("compression numerics are not implemented yet")
