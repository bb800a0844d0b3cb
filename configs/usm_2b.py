"""USM 2B (32 Conformer layers, D=1536, ~1.8B parameters) on a TPU v5e pod slice.

Fully sharded (ZeRO-3 style: weights, AdamW moments and N:M masks split over `fsdp`, each
layer's weights all-gathered inside the scan), bf16 compute, rematerialized blocks. A v5e
chip has 16 GiB of HBM; 16 utterances of up to 16 s per chip compile to ~6 GiB per device
on the CPU estimate (`usmqs compile`), which leaves room for the TPU's own layouts.

Check the memory and the sharding ahead of time, on a laptop, without weights:

    usmqs compile --config configs/usm_2b.py:policy=int4+2:4 --mesh fsdp=64 --fake-devices 64

Train on a v5e-64 (16 hosts x 4 chips; see launch/README.md), QAT from a float run:

    TPU_NAME=usm ACCELERATOR_TYPE=v5litepod-64 launch/tpu_vm.sh run -- \\
      usmqs train --config configs/usm_2b.py:policy=int4+2:4 \\
        --workdir /gcs/$BUCKET/runs/usm_2b_int4_2of4 \\
        --config.init_from=/gcs/$BUCKET/runs/usm_2b_float \\
        --config.data.train_manifest=/gcs/$BUCKET/data/train.jsonl \\
        --config.data.eval_manifest=/gcs/$BUCKET/data/test.jsonl

Colon arguments (comma separated):
  policy=NAME   compression setting (`usmqs.compress.policy` names; default float)
  devices=N     chips the run uses (default 64): the global batch is 16 per chip
"""

from usmqs.config import base_config, parse_arg

PER_DEVICE_BATCH = 16  # utterances per chip and step


def get_config(arg=None):
    args = parse_arg(arg, policy="float", devices=64)
    devices = args.devices
    c = base_config("usm_2b")
    c.policy.name = args.policy

    c.data.num_mel_bins = c.model.num_mel_bins  # 128, USM's front end
    c.data.vocab_size = 1024
    c.data.batch_size = PER_DEVICE_BATCH * devices  # global; each host loads its share
    c.data.bucket_boundaries = (400, 800, 1200, 1600)  # up to 16 s; 4 compiled shapes
    c.data.max_frames = 1600
    c.data.num_workers = 8  # feature extraction processes per host

    # Fine-tuning a pre-trained encoder: small peak rate, short warm-up.
    c.train.num_steps = 20_000
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 1000
    c.train.end_lr_ratio = 0.1
    c.train.weight_decay = 1e-2
    c.train.grad_clip = 1.0
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3

    # All chips in one fsdp axis: at 64 chips each holds 1/64 of weights, moments, masks.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
