"""Model-level N:M mask updates: every SparsityMask of an NNX model, on its schedule.

Use inside the jitted train step, before the forward pass, with the step counter as a
traced value:

    model = nnx.merge(graphdef, params, rest)
    masks.update_masks(model, state.step)          # mutates the SparsityMask variables
    _, _, rest = nnx.split(model, nnx.Param, ...)   # carries the new masks out

or on an nnx.jit-ed model directly. Each mask is recomputed only at its layer's schedule
points (one `lax.cond` per mask variable, see `ops.mask_update`); between them it is
carried over unchanged. Masks are computed from the dense master kernel, so the step that
prunes sees the weights before its own optimizer update.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
from flax import nnx

from usmqs.compress import ops
from usmqs.compress.layers import SparsityMask, _Compressible


def masked_layers(model: nnx.Module) -> Iterator[tuple[tuple, _Compressible]]:
    """(module path, layer) for every Dense/Conv of `model` that owns a SparsityMask."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, _Compressible) and module.mask is not None:
            yield path, module


def _new_mask(layer: _Compressible, step, force: bool) -> jax.Array:
    kernel = layer.kernel[...]
    # Scan over layers stacks kernels on leading axes; the spec describes one layer.
    layer_axes = kernel.ndim - len(layer.kernel_shape)
    keep_n = None if layer.setting is None else layer.setting[...][..., 1]
    return ops.mask_update(
        kernel, layer.mask[...], layer.spec, step,
        contract_axes=layer.contract_axes, layer_axes=layer_axes, force=force, keep_n=keep_n,
    )


def update_masks(model: nnx.Module, step, *, force: bool = False) -> nnx.State:
    """Update every SparsityMask of `model` in place for train step `step`; return them.

    Args:
      model: an NNX model (inside nnx.jit, or merged inside jax.jit, or eager).
      step: int or traced int scalar; each mask follows its own WeightSpec.mask_schedule.
      force: recompute every mask now at its final N:M pattern, ignoring schedules
        (post-training pruning, evaluation/export of a model that never trained).

    Returns:
      nnx.state(model, SparsityMask) after the update.
    """
    for _, layer in masked_layers(model):
        layer.mask[...] = _new_mask(layer, step, force)
    return nnx.state(model, SparsityMask)
