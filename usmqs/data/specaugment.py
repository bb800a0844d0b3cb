"""SpecAugment (Park et al., 2019) frequency and time masking, as a pure numpy function.

Only masking is implemented (no time warping: it brings little for Conformers and is
expensive on the host). For features ``x [T, F]`` of which the first ``V = num_valid_frames``
rows are real frames and the rest padding:

* ``freq_masks`` times: width ``f ~ U{0, ..., min(freq_width, F)}``, start
  ``f0 ~ U{0, ..., F - f}``; ``x[:V, f0:f0+f] = mask_value``.
* ``n_t`` times, ``n_t = time_masks`` or, when ``time_masks_per_frame > 0`` (adaptive
  multiplicity), ``n_t = min(time_masks, floor(time_masks_per_frame * V))``: width
  ``t ~ U{0, ..., floor(time_width_ratio * V)}`` (adaptive size, ``p * V`` in the paper),
  start ``t0 ~ U{0, ..., V - t}``; ``x[t0:t0+t, :] = mask_value``.

Masks may overlap, so at most ``freq_masks * min(freq_width, F)`` channels and
``n_t * floor(time_width_ratio * V)`` frames are masked. Rows ``>= V`` are never touched.
The result depends only on the inputs and the state of ``rng``: seed it per example, e.g.
``np.random.default_rng([seed, step, row])``.

``mask_value`` defaults to 0.0 (NeMo/lingvo practice on log-mel features; with
per-feature normalized inputs 0 is the mean, as in the paper).
"""

from __future__ import annotations

import numpy as np


def spec_augment(
    features: np.ndarray,
    num_valid_frames: int,
    rng: np.random.Generator,
    *,
    freq_masks: int = 2,
    freq_width: int = 27,
    time_masks: int = 2,
    time_width_ratio: float = 0.05,
    time_masks_per_frame: float = 0.0,
    mask_value: float = 0.0,
) -> np.ndarray:
    """Returns a masked copy of ``features [T, F]``; the input is not modified.

    Args:
      features: ``[T, F]`` log-mel frames (any float dtype; returned in the same dtype).
      num_valid_frames: ``V``, the number of leading real frames; rows ``V..T-1`` are
        padding and are returned unchanged.
      rng: numpy Generator, the only source of randomness.
      freq_masks: number of frequency masks.
      freq_width: maximum frequency-mask width ``F'`` in channels (inclusive).
      time_masks: number of time masks (the cap when adaptive).
      time_width_ratio: maximum time-mask width as a fraction of ``V``.
      time_masks_per_frame: if > 0, adaptive multiplicity ``floor(ratio * V)`` capped by
        ``time_masks``.
      mask_value: value written into masked cells.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [T, F], got shape {features.shape}")
    total, num_bins = features.shape
    valid = int(num_valid_frames)
    if not 0 <= valid <= total:
        raise ValueError(f"num_valid_frames={valid} outside [0, {total}]")
    out = np.array(features, copy=True)
    if valid == 0:
        return out
    max_f = min(int(freq_width), num_bins)
    for _ in range(int(freq_masks)):
        width = int(rng.integers(0, max_f + 1))
        start = int(rng.integers(0, num_bins - width + 1))
        out[:valid, start : start + width] = mask_value
    num_time = int(time_masks)
    if time_masks_per_frame > 0:
        num_time = min(num_time, int(np.floor(time_masks_per_frame * valid)))
    max_t = int(np.floor(time_width_ratio * valid))
    for _ in range(num_time):
        width = int(rng.integers(0, max_t + 1))
        start = int(rng.integers(0, valid - width + 1))
        out[start : start + width, :] = mask_value
    return out
