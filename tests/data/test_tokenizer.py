"""Tokenizer: golden ids, round trips, CTC id layout, unknown-character detection."""

import pickle

import pytest

from usmqs.data.tokenizer import Tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "the early bird catches the worm",
    "all that glitters is not gold",
    "actions speak louder than words",
    "where there is smoke there is fire",
    "the pen is mightier than the sword",
    "birds of a feather flock together",
] * 3
SENTENCES = ["the quick brown fox", "birds of a feather", "time is gold"]

# Goldens for sentencepiece 0.2.x, trained on CORPUS with Tokenizer.train defaults. A
# change here means every tokenized cache and every trained output layer changes meaning.
GOLDEN = {
    ("unigram", 48): [
        [4, 2, 43, 23, 18, 13, 14, 2, 47, 22, 5, 40, 6, 15, 5, 44],
        [28, 3, 36, 39, 17, 15, 26, 20, 41, 21],
        [2, 16, 9, 7, 10, 3, 30, 5, 8, 19],
    ],
    ("bpe", 48): [
        [5, 21, 45, 41, 26, 19, 15, 25, 28, 37, 30, 11, 28, 46],
        [15, 26, 8, 27, 21, 28, 34, 10, 11, 13, 2, 4],
        [21, 9, 36, 22, 12, 21, 35, 28, 31, 32],
    ],
    ("char", 0): [
        [2, 4, 5, 3, 2, 26, 22, 7, 14, 19, 2, 20, 6, 9, 18, 11, 2, 15, 9, 27],
        [2, 20, 7, 6, 13, 8, 2, 9, 15, 2, 10, 2, 15, 3, 10, 4, 5, 3, 6],
        [2, 4, 7, 17, 3, 2, 7, 8, 2, 16, 9, 12, 13],
    ],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    return {key: Tokenizer.train(CORPUS, d / key[0], key[1], model_type=key[0]) for key in GOLDEN}


@pytest.mark.parametrize("key", list(GOLDEN))
def test_golden_ids(trained, key):
    tok = trained[key]
    assert [tok.encode(s) for s in SENTENCES] == GOLDEN[key]


@pytest.mark.parametrize("key", list(GOLDEN))
def test_ctc_id_layout(trained, key):
    tok = trained[key]
    assert tok.blank_id == 0 and tok.unk_id == 1
    assert tok.id_to_piece(0) == "<blank>" and tok.id_to_piece(1) == "<unk>"
    ids = [i for s in CORPUS for i in tok.encode(s)]
    assert 0 not in ids and 1 not in ids  # neither blank nor unk ever encoded from known text
    assert max(ids) < tok.vocab_size


def test_vocab_sizes(trained):
    assert trained["unigram", 48].vocab_size == 48
    assert trained["bpe", 48].vocab_size == 48
    assert trained["char", 0].vocab_size == 26 + 3  # 26 letters, word boundary, blank, unk


@pytest.mark.parametrize("key", list(GOLDEN))
def test_round_trip(trained, key):
    tok = trained[key]
    for s in CORPUS[:8] + SENTENCES + ["zebra", "a"]:
        assert tok.decode(tok.encode(s)) == s
    # Blanks are dropped by decode (CTC repeats are the decoder's business).
    ids = tok.encode("the dog")
    assert tok.decode([0, *ids[:1], 0, *ids[1:], 0]) == "the dog"


def test_unknown_characters(trained):
    tok = trained["unigram", 48]
    assert tok.unknown_chars("the quick brown fox") == []
    assert not tok.unknown_chars("the quick brown fox")
    # '7' and "'" never occur in the training text; 'q' does.
    assert tok.unknown_chars("quick 7 don't 77") == ["7", "'"]
    assert tok.unknown_chars("quick 7")
    assert tok.unk_id in tok.encode("quick 7")
    assert tok.unknown_chars("€ 漢") == ["€", "漢"]


def test_save_load_and_pickle(trained, tmp_path):
    tok = trained["bpe", 48]
    tok.save(tmp_path / "copy.model")
    for other in (Tokenizer.load(tmp_path / "copy.model"), pickle.loads(pickle.dumps(tok))):
        assert other.model_bytes == tok.model_bytes
        assert [other.encode(s) for s in SENTENCES] == GOLDEN["bpe", 48]


def test_training_is_deterministic(trained, tmp_path):
    again = Tokenizer.train(CORPUS, tmp_path / "again", 48, model_type="unigram")
    assert again.model_bytes == trained["unigram", 48].model_bytes


def test_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="at least 29"):
        Tokenizer.train(CORPUS, tmp_path / "small", 20, model_type="unigram")
    with pytest.raises(ValueError, match="model_type"):
        Tokenizer.train(CORPUS, tmp_path / "x", 48, model_type="wordpiece")
    with pytest.raises(ValueError, match="no text"):
        Tokenizer.train(["", ""], tmp_path / "y", 48)


def test_rejects_a_model_without_the_ctc_layout(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "plain"), vocab_size=40, minloglevel=2
    )
    with pytest.raises(ValueError, match="pad"):
        Tokenizer.load(tmp_path / "plain.model")
