"""CTC decoders, scoring, and the files a decoding writes."""

import itertools
import json
import math
import re

import numpy as np
import pytest

from conftest import disk_full_for, listing
from usmqs import evaluate, storage


def _log_probs(probs):
    return np.log(np.asarray(probs, dtype=np.float64))


def test_greedy_merges_repeats_and_drops_blanks():
    # frames: a a _ a b b _  -> "a a b"
    ids = [1, 1, 0, 1, 2, 2, 0]
    lp = np.full((len(ids), 3), -10.0)
    lp[np.arange(len(ids)), ids] = 0.0
    assert evaluate.ctc_greedy_search(lp).tokens == (1, 1, 2)


def _brute_force_best(log_probs):
    """Most probable label sequence by summing every alignment (tiny T, V only)."""
    T, V = log_probs.shape
    totals = {}
    for path in itertools.product(range(V), repeat=T):
        out, prev = [], 0
        for t in path:
            if t != prev and t != 0:
                out.append(t)
            prev = t
        lp = sum(log_probs[i, t] for i, t in enumerate(path))
        key = tuple(out)
        totals[key] = np.logaddexp(totals.get(key, -np.inf), lp)
    best = max(totals, key=totals.get)
    return best, totals[best]


def test_prefix_beam_matches_exhaustive_search():
    rng = np.random.default_rng(0)
    for _ in range(5):
        probs = rng.dirichlet(np.ones(3) * 0.7, size=5)
        lp = _log_probs(probs)
        best, best_lp = _brute_force_best(lp)
        hyp = evaluate.ctc_prefix_beam_search(lp, beam_size=50, token_prune=-math.inf)[0]
        assert hyp.tokens == best
        assert hyp.score == pytest.approx(best_lp, abs=1e-9)


def test_beam_can_beat_greedy():
    # Greedy picks blank twice (0.6 each) -> "", but "a" has 1 - 0.6*0.6 = 0.64.
    lp = _log_probs([[0.6, 0.4], [0.6, 0.4]])
    assert evaluate.ctc_greedy_search(lp).tokens == ()
    assert evaluate.ctc_prefix_beam_search(lp, beam_size=4)[0].tokens == (1,)


def test_decode_batch_respects_valid_frames():
    lp = np.full((1, 4, 3), -10.0)
    lp[0, [0, 1, 2, 3], [1, 0, 2, 2]] = 0.0
    mask = np.array([[True, True, False, False]])
    assert evaluate.decode_batch(lp, mask, decoder="greedy") == [(1,)]
    with pytest.raises(ValueError, match="decoder"):
        evaluate.decode_batch(lp, mask, decoder="viterbi")


def test_score_counts_words_and_chars():
    m = evaluate.score(["call mom now", "play jazz"], ["call tom now", "play jazz"])
    assert m["wer"] == pytest.approx(1 / 5)
    assert m["num_words"] == 5 and m["num_utterances"] == 2
    assert m["substitutions"] == 1
    assert m["cer"] == pytest.approx(1 / len("call mom now" + "play jazz"), rel=0.2)
    with pytest.raises(ValueError):
        evaluate.score([], [])


@pytest.mark.parametrize("name", ["predictions.jsonl", "eval.json"])
def test_results_written_on_a_full_disk_keep_the_previous_file(tmp_path, monkeypatch, name):
    row = {"audio_filepath": "a.wav", "text": "call mom", "pred_text": "call tom"}
    evaluate.write_results(tmp_path, {"wer": 0.5}, [row])
    before = {f: (tmp_path / f).read_text() for f in ("eval.json", "predictions.jsonl")}
    disk_full_for(monkeypatch, name)
    path = re.escape(str(tmp_path / name))
    with pytest.raises(storage.WriteError, match=f"cannot write .* to {path}: no space left on device"):
        evaluate.write_results(tmp_path, {"wer": 0.0}, [{**row, "pred_text": "call mom"}])
    assert (tmp_path / name).read_text() == before[name]
    if name == "predictions.jsonl":  # written first: eval.json is not written after it fails
        assert (tmp_path / "eval.json").read_text() == before["eval.json"]
    assert listing(tmp_path) == ["eval.json", "predictions.jsonl"]
    monkeypatch.undo()
    evaluate.write_results(tmp_path, {"wer": 0.0}, [row, row], suffix="_dev")
    assert json.loads((tmp_path / "eval_dev.json").read_text()) == {"wer": 0.0}
    assert [json.loads(line) for line in (tmp_path / "predictions_dev.jsonl").read_text().splitlines()] == [row, row]
