"""The CPU demo: a 4-layer, d=144 Conformer-CTC on the embedded synthetic corpus.

    usmqs train --config configs/tiny.py --workdir runs/tiny
    usmqs train --config configs/tiny.py:policy=int4+2:4 --workdir runs/tiny_q \
        --config.init_from=runs/tiny --config.train.num_steps=150

Recipe for under 10 minutes on 2 CPU cores, each choice measured on this corpus (test WER
after 1500 steps unless stated; README "Measured"):

* characters as output units: CTC leaves its all-blank plateau several times sooner
  than with 128 or 256 sentencepiece units (256 units: loss still at 2.3 per token
  after 1100 steps);
* 8000 training utterances (the corpus default) + SpecAugment (2 frequency masks of up
  to 15 bins, 2 time masks of up to 5 %): with 3000 and no SpecAugment the model
  memorised its training set (train WER 6 %, test 34 %); 8000 + SpecAugment: 23 %;
* no dropout, peak LR 3e-3 (2e-3 with dropout 0.1: 23 %; 3e-3, no dropout: 17 %; 4e-3
  over 2000 steps: 17 %): the model underfits (train WER = test WER), so regularising
  it further only slows it down;
* 2500 steps: test WER 7.4 %, CER 1.7 % (1500 steps: 17.4 %, 4.1 %); ~8 min of training
  on a quiet 2-core machine (5.2 steps/s). These were measured with the earlier, unpadded
  subsampler; with the padded one (ceil(T/4) frames) seeds 0 and 1 give 9.65 % and
  7.27 % against the earlier one's 7.43 % and 11.09 % (README "Measured"). A wider model does not help: d=192 with FFN
  768 gave 17.8 % at 1500 steps for 1.37x the step time;
* two length buckets (utterances are 0.7-3.9 s): two compiled train-step shapes.

Colon arguments: ``policy=NAME`` (default float); ``micro``: the test-sized model (2
layers, d=48, one length bucket) that the test suite trains.
"""

from usmqs.config import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, policy="float", micro=False)
    c = base_config("tiny")
    c.policy.name = args.policy
    c.model.dropout = 0.0
    c.model.attention_dropout = 0.0
    c.data.tokenizer_type = "char"
    c.data.spec_augment.enabled = True
    c.data.spec_augment.freq_width = 15
    c.data.bucket_boundaries = (250, 400)
    c.data.max_frames = 400
    c.train.num_steps = 2500
    c.train.warmup_steps = 200
    c.train.learning_rate = 3e-3
    if args.micro:
        # The test-sized model (2 layers, d=48) and one length bucket: one compiled
        # train step per run keeps the test suite fast.
        c.model.update(num_layers=2, model_dim=48, num_heads=2, ffn_dim=96, subsample_channels=16, conv_kernel_size=7)
        c.data.update(batch_size=8, vocab_size=40, bucket_boundaries=(450,), max_frames=450)
        c.train.warmup_steps = 2
        c.mesh.data = 1
    return c
