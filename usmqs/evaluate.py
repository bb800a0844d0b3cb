"""CTC decoders as free functions returning typed results, and WER/CER scoring.

Both decoders take one utterance's log-probabilities `[T, V]` (blank id 0) restricted to
its valid frames, and return token ids with blanks and repeats removed.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import pathlib

import jax
import jiwer
import numpy as np
from flax import nnx

from usmqs import distributed, run, storage
from usmqs.data import pipeline


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """A decoded token sequence and its log-probability under the CTC model."""

    tokens: tuple[int, ...]
    score: float


def ctc_greedy_search(log_probs: np.ndarray, blank_id: int = 0) -> Hypothesis:
    """Best path: argmax per frame, merge repeats, drop blanks. log_probs [T, V]."""
    best = np.argmax(log_probs, axis=-1)
    score = float(np.sum(np.max(log_probs, axis=-1)))
    tokens, prev = [], blank_id
    for t in best.tolist():
        if t != prev and t != blank_id:
            tokens.append(t)
        prev = t
    return Hypothesis(tuple(tokens), score)


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def ctc_prefix_beam_search(
    log_probs: np.ndarray,
    beam_size: int = 8,
    blank_id: int = 0,
    token_prune: float = -12.0,
) -> list[Hypothesis]:
    """CTC prefix beam search (Hannun et al. 2014), no language model.

    Each prefix keeps two log-scores: ending in blank (p_b) and ending in its last token
    (p_nb); a repeated token only extends the prefix when separated by a blank. Tokens
    with frame log-prob below `token_prune` are not expanded (the blank always is), which
    keeps the search linear in T on peaky CTC posteriors. Returns up to `beam_size`
    hypotheses, best first.
    """
    neg_inf = -math.inf
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, neg_inf)}
    for frame in log_probs:
        candidates = np.nonzero(frame >= token_prune)[0].tolist()
        if blank_id not in candidates:
            candidates.append(blank_id)
        nxt: dict[tuple[int, ...], list[float]] = collections.defaultdict(
            lambda: [neg_inf, neg_inf]
        )
        for prefix, (p_b, p_nb) in beams.items():
            p_total = _logaddexp(p_b, p_nb)
            last = prefix[-1] if prefix else None
            for tok in candidates:
                lp = float(frame[tok])
                if tok == blank_id:
                    entry = nxt[prefix]
                    entry[0] = _logaddexp(entry[0], p_total + lp)
                elif tok == last:
                    # Repeat without blank collapses into the same prefix ...
                    entry = nxt[prefix]
                    entry[1] = _logaddexp(entry[1], p_nb + lp)
                    # ... and with a blank in between it extends the prefix.
                    ext = nxt[prefix + (tok,)]
                    ext[1] = _logaddexp(ext[1], p_b + lp)
                else:
                    ext = nxt[prefix + (tok,)]
                    ext[1] = _logaddexp(ext[1], p_total + lp)
        ranked = sorted(nxt.items(), key=lambda kv: _logaddexp(*kv[1]), reverse=True)
        beams = {k: (v[0], v[1]) for k, v in ranked[:beam_size]}
    out = [Hypothesis(k, _logaddexp(*v)) for k, v in beams.items()]
    return sorted(out, key=lambda h: h.score, reverse=True)


def decode(log_probs: np.ndarray, *, decoder: str, beam_size: int = 8) -> tuple[int, ...]:
    """The best token sequence of one utterance's `log_probs [T, V]` (valid frames only)
    under `decoder`: "greedy" or "beam" (prefix beam search of `beam_size`)."""
    if decoder == "greedy":
        return ctc_greedy_search(log_probs).tokens
    if decoder == "beam":
        return ctc_prefix_beam_search(log_probs, beam_size=beam_size)[0].tokens
    raise ValueError(f"eval.decoder must be 'greedy' or 'beam', got {decoder!r}")


def decode_batch(
    log_probs: np.ndarray, out_mask: np.ndarray, *, decoder: str, beam_size: int = 8
) -> list[tuple[int, ...]]:
    """Decode every row of `log_probs [B, T, V]` over its valid frames `out_mask [B, T]`."""
    return [
        decode(lp[: int(m.sum())], decoder=decoder, beam_size=beam_size)
        for lp, m in zip(log_probs, out_mask)
    ]


def score(references: list[str], hypotheses: list[str]) -> dict:
    """WER and CER (fractions) over a corpus with jiwer; texts already normalized."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("nothing to score: no utterances")
    words = jiwer.process_words(references, hypotheses)
    chars = jiwer.process_characters(references, hypotheses)
    num_words = sum(len(r.split()) for r in references)
    return {
        "wer": float(words.wer),
        "cer": float(chars.cer),
        "num_utterances": len(references),
        "num_words": num_words,
        "substitutions": int(words.substitutions),
        "deletions": int(words.deletions),
        "insertions": int(words.insertions),
    }


# --------------------------------------------------------------------------- driver


SPLITS = {"eval": "", "dev": "_dev"}  # split -> suffix of its output files


def split_manifest(config, split: str, manifest: str | None = None) -> tuple[str, str]:
    """The manifest of ``split`` ("eval": the test split, "dev") and its output files'
    suffix (``eval{suffix}.json``). An explicit ``manifest`` stands in for the split's."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if manifest is None:
        manifest = run.resolve_manifests(config)[split]
        if manifest is None:
            raise ValueError(f"no {split} split: set data.{split}_manifest")
    return manifest, SPLITS[split]


def decodes_dev(config) -> bool:
    """Whether runs of `config` decode a dev split after training (``eval.dev`` and a
    dev manifest: configured, or the embedded corpus', which always has one). Reads the
    config only: the corpus is resolved (synthesized) when the split is decoded."""
    d = config.data
    embedded = not (d.train_manifest and d.eval_manifest)
    return config.eval.dev and bool(d.dev_manifest or embedded)


def summary_line(metrics: dict, what: str = "") -> str:
    """``eval (what): WER ...  CER ...  (N utterances, W words)``."""
    return (
        f"eval{f' ({what})' if what else ''}: "
        f"WER {metrics['wer'] * 100:.2f}%  CER {metrics['cer'] * 100:.2f}%  "
        f"({metrics['num_utterances']} utterances, {metrics['num_words']} words)"
    )


def write_results(workdir, metrics: dict, rows: list[dict], *, suffix: str = "") -> None:
    """`predictions{suffix}.jsonl` (rows: audio_filepath, text, pred_text), then
    `eval{suffix}.json`, each replaced atomically (`storage.write_text_atomic`): a failed
    write (a full disk: `storage.WriteError` naming the file) leaves the previous file."""
    workdir = pathlib.Path(workdir)
    predictions = "".join(json.dumps(row) + "\n" for row in rows)
    storage.write_text_atomic(workdir / f"predictions{suffix}.jsonl", predictions, "the predictions")
    scores = json.dumps(metrics, indent=2) + "\n"
    storage.write_text_atomic(workdir / f"eval{suffix}.json", scores, "the evaluation scores")


def run_decoding(log_prob_fn, split, data_cfg, tokenizer, eval_cfg) -> tuple[dict, list[dict]]:
    """Decode every example of a prepared split with `log_prob_fn(features, mask)`, or
    `log_prob_fn(audio, num_samples)` for a split that stores audio (`make_eval_step`
    with ``audio=True``)."""
    preds: dict[int, str] = {}
    keys = [k for k, _ in run.batch_layout(None, labels=False, audio=split.stores_audio)]
    for batch in pipeline.eval_batches(split, data_cfg):
        log_probs, out_mask = log_prob_fn(*(batch[k] for k in keys))
        log_probs, out_mask = np.asarray(log_probs), np.asarray(out_mask)
        hyps = decode_batch(log_probs, out_mask, decoder=eval_cfg.decoder, beam_size=eval_cfg.beam_size)
        for idx, toks in zip(batch["example_index"].tolist(), hyps):
            if idx >= 0:
                preds[idx] = tokenizer.decode(list(toks))
    meta = split.metadata
    rows = [
        {"audio_filepath": m["audio_filepath"], "text": m["text"], "pred_text": preds[i]}
        for i, m in enumerate(meta)
    ]
    metrics = score([r["text"] for r in rows], [r["pred_text"] for r in rows])
    metrics["decoder"] = eval_cfg.decoder
    metrics["skipped"] = dict(split.skipped)
    return metrics, rows


def make_eval_step(setup: run.Setup, config, *, audio: bool | None = None) -> run.InMesh:
    """`eval_step(params, rest, features, feature_mask)` -> (log-probs [B, T', V], out_mask
    [B, T']), jitted, replicated outputs (every process decodes on the host). With `audio`
    (None = ``data.features_on_device``) it is `eval_step(params, rest, audio,
    num_samples)` and computes the features itself (`run.model_inputs`, no SpecAugment)."""
    graphdef = setup.graphdef
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    keys = [k for k, _ in run.batch_layout(config, labels=False, audio=audio)]

    @functools.partial(jax.jit, out_shardings=replicated)
    def eval_step(params, rest, inputs, lengths):
        features, feature_mask = run.model_inputs(config, dict(zip(keys, (inputs, lengths))))
        model = nnx.merge(graphdef, params, rest)
        logits, out_mask = model(features, feature_mask, rng=None)
        return jax.nn.log_softmax(logits.astype(np.float32), axis=-1), out_mask

    return run.InMesh(eval_step, setup.mesh, config.mesh.rules)


def evaluate_workdir(
    config, workdir, *, state=None, setup=None, eval_step=None, manifest: str | None = None,
    split: str = "eval",
) -> dict:
    """Decode a split (the eval manifest, or "dev") with the run's latest checkpoint (or
    `state`); write eval.json and predictions.jsonl (eval_dev.json, ... for the dev split).
    A caller decoding several splits passes its `setup` and one `eval_step`
    (`make_eval_step`), so the model is traced once."""
    distributed.maybe_initialize(config)  # a no-op when already joined (or one process)
    workdir = pathlib.Path(workdir)
    tokenizer = run.load_tokenizer(workdir)
    with distributed.primary_first("eval_manifest"):  # may synthesize the embedded corpus
        manifest, suffix = split_manifest(config, split, manifest)
    prepared = run.prepare_split(config, workdir, manifest, tokenizer, train=False)
    if setup is None:
        setup = run.build(config, tokenizer.vocab_size)
    if state is None:
        state = run.restore_latest(workdir, setup)
    eval_step = eval_step or make_eval_step(setup, config)
    fn = lambda f, m: eval_step(state.params, state.rest, f, m)
    metrics, rows = run_decoding(fn, prepared, config.data, tokenizer, config.eval)
    metrics["step"] = int(jax.device_get(state.step))
    if jax.process_index() == 0:  # every process decodes; one writes
        write_results(workdir, metrics, rows, suffix=suffix)
    print(summary_line(metrics, "" if split == "eval" else split), flush=True)
    return metrics
