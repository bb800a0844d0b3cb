"""The compression study on LibriSpeech: Conformer-CTC (M by default) on one accelerator.

    usmqs import-librispeech /data/LibriSpeech /data/ls        # one manifest per split
    usmqs study --workdir runs/study_ls \
        --config configs/study_librispeech.py:train=/data/ls/train-clean-100.jsonl,eval=/data/ls/test-clean.jsonl,dev=/data/ls/dev-clean.jsonl

Colon arguments (comma-separated): ``train=MANIFEST``, ``eval=MANIFEST`` (the reported
split), ``dev=MANIFEST`` (optional: the split to choose recipes on, decoded beside it)
(or ``--config.data.train_manifest=`` / ``eval_manifest=`` / ``dev_manifest=``);
``preset=conformer_m`` (default) or ``conformer_s``; ``settings=A/B/...`` (policy NAMEs,
'/'-separated; default the paper's ten). For train-960, concatenate the three training
manifests (their audio paths are absolute): ``cat /data/ls/train-*.jsonl > train-960.jsonl``.

Expected cost (an estimate from FLOPs, not yet measured): 40k float steps + 11 x 10k
fine-tuning steps (ten settings + the float control) = 150k steps of batch 64 at up to
17 s; Conformer-M is ~27M parameters, ~4 TFLOP per step, about 0.1 s per step on one
H100 in float32, so ~4-6 h of training, plus 22 evaluations of test-clean and of
dev-clean (~1 min each) and a one-off feature extraction (float16 log-mel: ~6 GB for
train-clean-100, ~55 GB for train-960). Conformer-S is about a third of that. Everything resumes: rerun the same
command after an interruption.
"""

from usmqs.config import base_config, parse_arg, study_config


def get_config(arg=None):
    args = parse_arg(arg, preset="conformer_m", train="", eval="", dev="", settings="")
    c = base_config(args.preset)
    c.policy.name = "float"
    c.data.train_manifest = args.train
    c.data.eval_manifest = args.eval
    c.data.dev_manifest = args.dev
    c.data.num_mel_bins = 80
    c.data.vocab_size = 256
    c.data.batch_size = 64
    # Padded lengths (10 ms frames): four compiled train-step shapes. Training
    # utterances over 17 s (a few % of LibriSpeech) are skipped; eval keeps them all.
    c.data.bucket_boundaries = (600, 1000, 1300, 1700)
    c.data.max_frames = 1700
    c.data.num_workers = 8

    c.train.num_steps = 40_000
    c.train.learning_rate = 1.5e-3
    c.train.warmup_steps = 5_000
    c.train.log_every = 100
    c.train.checkpoint_every = 2_000

    c.study = study_config()
    c.study.finetune_steps = 10_000
    c.study.finetune.learning_rate = 3e-4
    c.study.finetune.warmup_steps = 500
    if args.settings:
        c.study.settings = tuple(s for s in args.settings.split("/") if s)
    return c
