"""The CPU demo: a ~4-layer Conformer-CTC on the embedded synthetic corpus.

    usmqs train --config configs/tiny.py --workdir runs/tiny
    usmqs train --config configs/tiny.py:policy=int4+2:4 --workdir runs/tiny_q \
        --config.init_from=runs/tiny --config.train.num_steps=250
"""

from usmqs.config import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    c = base_config("tiny")
    c.policy.name = args.get("policy", "float")
    return c
