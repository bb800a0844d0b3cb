"""``data.features_on_device``: the steps featurize audio batches and give what the
host-feature path gives (logits of the same audio, a training that learns), from a
cache of audio instead of features."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from conftest import tiny_config
from usmqs import evaluate, run, train
from usmqs.data import pipeline


@pytest.fixture(scope="module")
def both(small_corpus, tmp_path_factory):
    """The micro config (no SpecAugment), its tokenizer, and the train split of the small
    corpus prepared both ways (features / audio)."""
    cfg = tiny_config(small_corpus, steps=4)
    cfg.data.spec_augment.enabled = False
    workdir = tmp_path_factory.mktemp("devfeat")
    tok = run.load_or_train_tokenizer(cfg, workdir, cfg.data.train_manifest)
    cache = run.cache_dir(cfg, workdir)
    splits = {
        audio: pipeline.prepare_split(cfg.data.train_manifest, tok, cfg.data, cache, train=True, store_audio=audio)
        for audio in (False, True)
    }
    return cfg, tok, splits


def _device_config(cfg):
    c = cfg.copy_and_resolve_references()
    c.data.features_on_device = True
    return c


def test_the_audio_cache_holds_flac_and_its_size_is_reported(both):
    _, _, splits = both
    size = {a: sum(pathlib.Path(p).stat().st_size for p in s.paths) for a, s in splits.items()}
    seconds = sum(m["num_samples"] for m in splits[True].metadata) / 16000
    pcm = 2 * 16000 * seconds
    print(f"cache bytes/s of audio: features {size[False] / seconds:.0f}, audio {size[True] / seconds:.0f} "
          f"(ratio {size[True] / size[False]:.2f}; raw 16-bit PCM {pcm / seconds:.0f})")
    # FLAC saves on 16-bit PCM; against float16 log-mel (80 bins: 16 kB/s) it is larger.
    assert size[True] < 0.8 * pcm


def test_a_device_batch_gives_the_host_logits(both):
    cfg, tok, splits = both
    dcfg = _device_config(cfg)
    setup = run.build(cfg, tok.vocab_size)
    state = setup.init_fn(jax.random.PRNGKey(0))
    out = {}
    for audio, c in ((False, cfg), (True, dcfg)):
        batch = next(iter(pipeline.eval_batches(splits[audio], c.data)))
        step = evaluate.make_eval_step(setup, c)
        keys = [k for k, _ in run.batch_layout(c, labels=False)]
        log_probs, out_mask = step(state.params, state.rest, *(batch[k] for k in keys))
        out[audio] = np.asarray(log_probs), np.asarray(out_mask), batch["example_index"]
    (host, host_mask, host_rows), (dev, dev_mask, dev_rows) = out[False], out[True]
    np.testing.assert_array_equal(host_rows, dev_rows)
    np.testing.assert_array_equal(host_mask, dev_mask)
    diff = np.abs(host - dev)[host_mask].max()
    print(f"max |log-prob host - device| = {diff:.2e}")
    assert diff < 2e-2


def test_a_run_with_features_on_device_learns_and_evaluates(both, tmp_path):
    """`train_and_evaluate` end to end on audio batches, SpecAugment in the step."""
    cfg, _, _ = both
    dcfg = _device_config(cfg)
    dcfg.data.spec_augment.enabled = True  # masks drawn in the step, new ones every step
    dcfg.train.update(num_steps=8, checkpoint_every=8, learning_rate=3e-3)
    metrics = train.train_and_evaluate(dcfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == [2, 4, 6, 8] and not any(r["skipped"] for r in rows)
    assert losses[-1] < 0.8 * losses[0], losses
    assert metrics["num_utterances"] == 24 and 0.0 <= metrics["cer"]
