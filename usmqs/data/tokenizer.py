"""Sentencepiece tokenizer for CTC targets.

Id layout (fixed, the CTC head relies on it): ``0 = <blank>`` (sentencepiece's pad piece,
reused as the CTC blank; never produced by ``encode``), ``1 = <unk>``, then the learned
pieces. There are no BOS/EOS ids. The output layer has ``vocab_size`` classes.

Training uses the ``identity`` normalization rule so that ``decode(encode(x)) == x`` for any
text made only of known characters and single spaces (no leading/trailing space), which
is what :func:`usmqs.data.text.normalize_text` produces; the pipeline normalizes, the
tokenizer never rewrites text. ``character_coverage=1.0``: every character of the
training text gets a piece, so only characters never seen in training map to ``<unk>``;
:meth:`Tokenizer.unknown_chars` finds them before they become silent ``<unk>`` targets.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm

BLANK_ID = 0
UNK_ID = 1
MODEL_TYPES = ("unigram", "bpe", "char")


class Tokenizer:
    """Text <-> ids over a sentencepiece model with ``blank_id == 0`` and ``unk_id == 1``."""

    blank_id: int = BLANK_ID
    unk_id: int = UNK_ID

    def __init__(self, model_bytes: bytes):
        self._model_bytes = bytes(model_bytes)
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        if self._sp.pad_id() != BLANK_ID or self._sp.unk_id() != UNK_ID:
            raise ValueError(
                f"sentencepiece model has pad_id={self._sp.pad_id()} unk_id={self._sp.unk_id()}; "
                f"usmqs needs pad (CTC blank) = {BLANK_ID} and unk = {UNK_ID}: "
                "train it with Tokenizer.train"
            )
        self._char_known: dict[str, bool] = {}

    # -- construction -------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        out_prefix: str | os.PathLike,
        vocab_size: int,
        model_type: str = "unigram",
    ) -> Tokenizer:
        """Trains on ``texts`` (already normalized) and writes ``{out_prefix}.model``.

        The model bytes depend only on the texts and the arguments, not on ``out_prefix``.

        ``vocab_size`` counts ``<blank>`` and ``<unk>`` and is a soft limit
        (``hard_vocab_limit=False``): a small corpus may yield fewer pieces, so size the
        output layer with :attr:`vocab_size` of the result, not the request. It must be at
        least the number of distinct training characters + 3 (ValueError otherwise). For
        ``model_type="char"`` it is ignored: the vocabulary is exactly the training
        characters.
        Training is single-threaded over all sentences in order, hence deterministic.
        """
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("cannot train a tokenizer on no text")
        # Every character must get a piece, else it silently becomes <unk>: the vocabulary
        # needs the characters, the word-boundary piece and <blank>, <unk>.
        needed = len(set("".join(texts)) - {" "}) + 3
        if model_type == "char":
            vocab_size = needed  # exactly the training characters
        elif vocab_size < needed:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the {needed - 3} characters of the "
                f"training text + 3 (word boundary, <blank>, <unk>): use at least {needed}"
            )
        out_prefix = os.fspath(out_prefix)
        os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
        # Trained in memory: with model_prefix the output path would be recorded in the
        # model, and the same tokenizer trained in two workdirs would differ in its bytes
        # (and so in every cache key derived from them).
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_writer=model,
                vocab_size=int(vocab_size),
                model_type=model_type,
                pad_id=BLANK_ID,
                pad_piece="<blank>",
                unk_id=UNK_ID,
                unk_piece="<unk>",
                bos_id=-1,
                eos_id=-1,
                character_coverage=1.0,
                normalization_rule_name="identity",
                byte_fallback=False,
                hard_vocab_limit=False,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(
                f"sentencepiece training failed (vocab_size={vocab_size}, {model_type}): {e}"
            ) from e
        tokenizer = cls(model.getvalue())
        tokenizer.save(out_prefix + ".model")
        return tokenizer

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a ``.model`` file written by :meth:`train` (or :meth:`save`)."""
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: str | os.PathLike) -> None:
        """Writes the serialized sentencepiece model (atomically)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self._model_bytes)
        os.replace(tmp, path)

    @property
    def model_bytes(self) -> bytes:
        """The serialized model: what a cache key of tokenized data must depend on."""
        return self._model_bytes

    # Pickling sends the model bytes, so worker processes can rebuild the processor.
    def __getstate__(self):
        return {"model_bytes": self._model_bytes}

    def __setstate__(self, state):
        self.__init__(state["model_bytes"])

    # -- use ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids including ``<blank>`` (0) and ``<unk>`` (1)."""
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no blank, no BOS/EOS); unknown characters become ``unk_id``."""
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; blanks (0) are dropped. Does not collapse CTC repeats."""
        return self._sp.decode([int(i) for i in ids if int(i) != BLANK_ID])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def unknown_chars(self, text: str) -> list[str]:
        """Distinct characters of ``text`` (in order of appearance) that would map to
        ``<unk>``. Spaces are word boundaries, never unknown."""
        unknown = []
        for ch in dict.fromkeys(text):
            if ch == " ":
                continue
            known = self._char_known.get(ch)
            if known is None:
                known = UNK_ID not in self._sp.encode(ch, out_type=int)
                self._char_known[ch] = known
            if not known:
                unknown.append(ch)
        return unknown

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
