"""Model presets: `get_preset(name)` -> the model ConfigDict that `ConformerCTC` takes.

| preset      | layers | D    | heads | ffn  | conv K | mel | source                                  |
|-------------|--------|------|-------|------|--------|-----|-----------------------------------------|
| tiny        | 4      | 144  | 4     | 576  | 15     | 80  | CPU demo (2 cores), not from a paper    |
| conformer_s | 16     | 144  | 4     | 576  | 32     | 80  | Gulati et al. 2020, Table 1 (S)         |
| conformer_m | 16     | 256  | 4     | 1024 | 32     | 80  | Gulati et al. 2020, Table 1 (M)         |
| usm_600m    | 24     | 1024 | 8     | 4096 | 5      | 128 | Zhang et al. 2023 (USM), 600M encoder   |
| usm_2b      | 32     | 1536 | 16    | 6144 | 5      | 128 | Zhang et al. 2023 (USM), 2B encoder     |

Sources:
  * Gulati et al., "Conformer: Convolution-augmented Transformer for Speech Recognition",
    Interspeech 2020, arXiv:2005.08100, Table 1: S = 16 layers, D 144, 4 heads, conv kernel
    32; M = 16 layers, D 256, 4 heads, conv kernel 32; FFN expansion 4 (Section 2.3);
    dropout 0.1. Table 1's 10.3M / 30.7M include the LSTM decoder (S: 320, M: 640 units);
    the encoders here are ~9M / ~27M plus the CTC head.
  * Zhang et al., "Google USM: Scaling Automatic Speech Recognition Beyond 100 Languages",
    arXiv:2303.01037: Conformer encoders of 600M (24 layers, D 1024, 8 heads) and 2B
    (32 layers, D 1536, 16 heads), 128-dim log-mel input, 4x time reduction. FFN = 4D and
    conv kernel 5 follow w2v-BERT XL (Chung et al. 2021, arXiv:2108.06209), the
    architecture USM's 600M model inherits; the subsampling width (128 channels) is our
    choice, not a published number. These give 0.6B / 1.8B parameters, matching the names.

USM was trained with batch-norm in the conv module; here it is LayerNorm everywhere (see
`ConformerConfig.conv_norm`) so padding and batch composition cannot change an output.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("tiny", "conformer_s", "conformer_m", "usm_600m", "usm_2b")

_COMMON = dict(
    dropout=0.1,
    attention_dropout=0.1,
    max_rel_pos=0,
    dtype="float32",
    remat=False,
    conv_norm="layer_norm",
)

_SHAPES = {
    # Sized so forward+backward of batch 16 x ~250 frames is ~0.2 s on 2 CPU cores; 32
    # subsampling channels, not 64: the second 3x3 conv then costs a quarter (step -21 %).
    "tiny": dict(num_layers=4, model_dim=144, num_heads=4, ffn_dim=576, conv_kernel_size=15,
                 subsample_channels=32, num_mel_bins=80),
    "conformer_s": dict(num_layers=16, model_dim=144, num_heads=4, ffn_dim=576,
                        conv_kernel_size=32, subsample_channels=144, num_mel_bins=80),
    "conformer_m": dict(num_layers=16, model_dim=256, num_heads=4, ffn_dim=1024,
                        conv_kernel_size=32, subsample_channels=256, num_mel_bins=80),
    "usm_600m": dict(num_layers=24, model_dim=1024, num_heads=8, ffn_dim=4096,
                     conv_kernel_size=5, subsample_channels=128, num_mel_bins=128,
                     dtype="bfloat16", remat=True),
    "usm_2b": dict(num_layers=32, model_dim=1536, num_heads=16, ffn_dim=6144,
                   conv_kernel_size=5, subsample_channels=128, num_mel_bins=128,
                   dtype="bfloat16", remat=True),
}


def get_preset(name: str) -> ml_collections.ConfigDict:
    """A fresh, unlocked model ConfigDict for preset `name` (one of `PRESETS`).

    Fields: num_layers, model_dim, num_heads, ffn_dim, conv_kernel_size,
    subsample_channels, num_mel_bins, dropout, attention_dropout, max_rel_pos, dtype,
    remat, conv_norm (see `usmqs.models.conformer.ConformerConfig`).
    """
    if name not in _SHAPES:
        raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
    return ml_collections.ConfigDict({**_COMMON, **_SHAPES[name]})
