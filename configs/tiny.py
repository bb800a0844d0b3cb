"""The CPU demo: a 4-layer, d=144 Conformer-CTC on the embedded synthetic corpus.

    usmqs train --config configs/tiny.py --workdir runs/tiny
    usmqs train --config configs/tiny.py:policy=int4+2:4 --workdir runs/tiny_q \
        --config.init_from=runs/tiny --config.train.num_steps=400

Recipe choices for a few minutes on 2 CPU cores: characters as output units (CTC leaves
its all-blank plateau several times sooner than with 128 or 256 sentencepiece units on
this corpus), and no SpecAugment (the corpus is already augmented when synthesized: speed,
noise, reverb, gain); both cut the steps to a given WER by more than half here.
"""

from usmqs.config import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    c = base_config("tiny")
    c.policy.name = args.get("policy", "float")
    c.data.tokenizer_type = "char"
    c.data.spec_augment.enabled = False
    c.train.num_steps = 1500
    c.train.warmup_steps = 200
    return c
