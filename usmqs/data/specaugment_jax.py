"""SpecAugment masking in jax.numpy, batched and jittable: the twin of
`usmqs.data.specaugment` for features computed inside the step (``data.features_on_device``).

Per row b of ``features [B, T, F]`` with ``V = num_valid[b]`` real frames, the masks of
the host version, drawn with the same distributions:

* ``freq_masks`` times: width ``f ~ U{0..min(freq_width, F)}``, start
  ``f0 ~ U{0..F - f}``; ``x[:V, f0:f0+f] = mask_value``.
* ``n_t`` of ``time_masks`` candidate masks are applied (``n_t = time_masks``, or
  ``min(time_masks, floor(time_masks_per_frame * V))`` when adaptive): width
  ``t ~ U{0..floor(time_width_ratio * V)}``, start ``t0 ~ U{0..V - t}``;
  ``x[t0:t0+t, :] = mask_value``.

Rows ``>= V`` are never touched. What differs from the host: the random stream (JAX's
threefry keys, one per row from ``jax.random.split(rng, B)``, instead of numpy's
``default_rng([seed, 1, step, row])``), so the same example gets other masks than on the
host, with the same distribution; and ``floor(ratio * V)`` is computed in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _row(x, valid, key, *, freq_masks, freq_width, time_masks, time_width_ratio, time_masks_per_frame, mask_value):
    total, bins = x.shape
    kfw, kfs, ktw, kts = jax.random.split(key, 4)
    max_f = min(int(freq_width), bins)
    f_width = jax.random.randint(kfw, (freq_masks,), 0, max_f + 1)
    f_start = jax.random.randint(kfs, (freq_masks,), 0, bins - f_width + 1)
    f = jnp.arange(bins)[:, None]
    freq_hit = jnp.any((f >= f_start) & (f < f_start + f_width), axis=-1)  # [F]

    v = valid.astype(jnp.int32)
    vf = v.astype(jnp.float32)
    num_time = jnp.int32(time_masks)
    if time_masks_per_frame > 0:
        num_time = jnp.minimum(num_time, jnp.floor(time_masks_per_frame * vf).astype(jnp.int32))
    max_t = jnp.floor(time_width_ratio * vf).astype(jnp.int32)
    t_width = jax.random.randint(ktw, (time_masks,), 0, max_t + 1)
    t_start = jax.random.randint(kts, (time_masks,), 0, v - t_width + 1)
    active = jnp.arange(time_masks) < num_time
    t = jnp.arange(total)[:, None]
    time_hit = jnp.any(active & (t >= t_start) & (t < t_start + t_width), axis=-1)  # [T]

    in_valid = jnp.arange(total) < v
    hit = time_hit[:, None] | (freq_hit[None, :] & in_valid[:, None])
    return jnp.where(hit, jnp.asarray(mask_value, x.dtype), x)


def spec_augment(
    features: jax.Array,
    num_valid: jax.Array,
    rng: jax.Array,
    *,
    freq_masks: int,
    freq_width: int,
    time_masks: int,
    time_width_ratio: float,
    time_masks_per_frame: float,
    mask_value: float = 0.0,
) -> jax.Array:
    """Masked ``features [B, T, F]`` (same dtype); ``num_valid [B]`` real frames per row,
    ``rng`` a JAX key (split into one key per row). The settings are those of
    `usmqs.data.specaugment.spec_augment` (whose defaults are the project's), as
    `usmqs.data.pipeline.spec_augment_settings` gives them for a data config."""
    row = functools.partial(
        _row, freq_masks=freq_masks, freq_width=freq_width, time_masks=time_masks,
        time_width_ratio=time_width_ratio, time_masks_per_frame=time_masks_per_frame,
        mask_value=mask_value,
    )
    keys = jax.random.split(rng, features.shape[0])
    return jax.vmap(row)(features, num_valid, keys)
