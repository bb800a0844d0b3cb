"""SpecAugment masking: bounds, padding untouched, determinism, purity."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usmqs.data.specaugment import spec_augment

MASK = -1234.5  # a value real features never take, so masked cells can be counted exactly


def _features(t, f, seed=0):
    return np.random.default_rng(seed).uniform(1.0, 2.0, size=(t, f)).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(1, 300),
    valid_frac=st.floats(0.0, 1.0),
    bins=st.integers(1, 100),
    freq_masks=st.integers(0, 3),
    freq_width=st.integers(0, 40),
    time_masks=st.integers(0, 4),
    ratio=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**32 - 1),
)
def test_masks_stay_within_bounds_and_valid_frames(total, valid_frac, bins, freq_masks, freq_width, time_masks, ratio, seed):
    valid = int(valid_frac * total)
    x = _features(total, bins)
    y = spec_augment(
        x, valid, np.random.default_rng(seed), freq_masks=freq_masks, freq_width=freq_width,
        time_masks=time_masks, time_width_ratio=ratio, mask_value=MASK,
    )
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(y[valid:], x[valid:])  # padding untouched
    masked = y[:valid] == MASK
    np.testing.assert_array_equal(y[:valid][~masked], x[:valid][~masked])  # only mask_value written
    if valid == 0:
        return
    full_rows = masked.all(axis=1)
    # A time mask masks whole rows; a frequency mask masks a whole (valid) column.
    full_cols = masked.all(axis=0)
    partial = masked & ~full_rows[:, None] & ~full_cols[None, :]
    assert not partial.any()
    assert full_cols.sum() <= freq_masks * min(freq_width, bins) or full_rows.all()
    assert full_rows.sum() <= time_masks * int(np.floor(ratio * valid)) or full_cols.all()


def test_deterministic_per_rng_and_pure():
    x = _features(200, 80)
    before = x.copy()
    a = spec_augment(x, 150, np.random.default_rng([7, 3]), mask_value=MASK)
    b = spec_augment(x, 150, np.random.default_rng([7, 3]), mask_value=MASK)
    c = spec_augment(x, 150, np.random.default_rng([7, 4]), mask_value=MASK)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(x, before)  # input not modified


def test_masks_do_mask_something_on_average():
    x = _features(400, 80)
    rng = np.random.default_rng(0)
    fractions = [(spec_augment(x, 400, rng, mask_value=MASK) == MASK).mean() for _ in range(50)]
    # Expected: 2 freq masks of mean width 13.5 of 80 channels, 2 time masks of mean
    # width 10 of 400 frames: about 30 % of cells, minus overlaps.
    assert 0.15 < np.mean(fractions) < 0.45


def test_adaptive_time_mask_count():
    x = _features(100, 10)
    # 0.02 masks per frame * 100 frames = 2 masks (cap 10) of up to 50 frames each.
    y = spec_augment(
        x, 100, np.random.default_rng(1), freq_masks=0, time_masks=10, time_width_ratio=0.5,
        time_masks_per_frame=0.02, mask_value=MASK,
    )
    assert (y == MASK).all(axis=1).sum() <= 2 * 50
    # Too few frames for a single adaptive mask: nothing masked.
    z = spec_augment(
        x, 40, np.random.default_rng(1), freq_masks=0, time_masks=10, time_width_ratio=0.5,
        time_masks_per_frame=0.02, mask_value=MASK,
    )
    np.testing.assert_array_equal(z, x)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        spec_augment(np.zeros((3,)), 3, np.random.default_rng(0))
    with pytest.raises(ValueError):
        spec_augment(np.zeros((3, 2)), 4, np.random.default_rng(0))
