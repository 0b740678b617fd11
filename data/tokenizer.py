"""The shared source-target vocabulary of section 5.1.

"Sentences were encoded using byte-pair encoding [3], which has a shared source-target vocabulary of about
37000 tokens." We train ONE SentencePiece BPE model on the training text of both languages, so a word that
is spelled the same in English and German (names, numbers) gets the same ids on both sides; that is what
lets section 3.4 share one embedding matrix between encoder, decoder and the pre-softmax projection.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from itertools import islice, repeat
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data.atomic import write_bytes_atomic, write_text_atomic
from data.errors import NoTrainingTextError, VocabSizeError
from data.shards import token_dtype

# Fixed special ids, the same for every vocabulary size: padding is 0 so a freshly zeroed tensor is all
# padding, and the model/loss code can rely on these numbers.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Distinct words whose ids Tokenizer.encode keeps (about 40 MB per process at WMT's word lengths).
WORD_CACHE_SIZE = 1 << 18


def _lines_of(files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")


def train_sentencepiece(
    lines: Iterable[str] | Sequence[Path],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    sample_lines: int,
    seed: int = 1,
    num_threads: int | None = None,
) -> Path:
    """Train a BPE model on `lines` (sentences, or a list of Path to plain/.gz text files); returns the .model.

    Writes `<model_prefix>.model` and `<model_prefix>.vocab`, each whole or not at all (data/atomic.py). At WMT
    scale (9M lines counting both sides) reading everything would need GBs of RAM, so sentencepiece keeps a uniform
    random sample of `sample_lines` lines (reservoir sampling while it streams the iterator).

    The model is trained in memory (sentencepiece's model_writer) and written here: trained to files, sentencepiece
    stores the path it wrote them under in the model, so two preparations of the same text gave different bytes.
    The same text and settings now give the same spm.model, byte for byte (on machines with as many cores: the
    model records num_threads).
    """
    if isinstance(lines, (list, tuple)) and lines and all(isinstance(p, Path) for p in lines):
        lines = _lines_of(lines)
    model_prefix = Path(model_prefix)
    spm.set_random_generator_seed(seed)  # the sample and BPE ties depend on it: same text -> same model
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,  # in memory: no model_prefix, which would be stored in the model
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,  # keep every character of both alphabets (umlauts, ß, ...)
            input_sentence_size=sample_lines,
            shuffle_input_sentence=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=1,  # sentencepiece's INFO log is hundreds of lines; warnings still show
        )
    except RuntimeError as err:
        # sentencepiece's own words: "[!sentences_.empty()]" when every line was empty
        if "sentences_.empty()" in str(err):
            raise NoTrainingTextError(
                "no text to train the BPE model on: every line given is empty; point the data config at the text"
            ) from err
        # and: "Vocabulary size too high (8000). Please set it to a value <= 803."
        if "Vocabulary size too high" not in str(err):
            raise
        limit = re.search(r"<=\s*(\d+)", str(err))
        supported = f"at most {limit.group(1)}" if limit else "fewer"
        raise VocabSizeError(
            f"model.vocab_size={vocab_size} is more BPE tokens than the training text supports ({supported}); "
            "lower model.vocab_size (data.vocab_size follows it) or train on more text"
        ) from err
    model_path = model_prefix.with_name(model_prefix.name + ".model")
    # the vocabulary first: a run that finds the .model takes the training as done
    write_text_atomic(model_prefix.with_name(model_prefix.name + ".vocab"), vocab_text(model.getvalue()))
    write_bytes_atomic(model_path, model.getvalue())
    return model_path


def vocab_text(model: bytes) -> str:
    """The .vocab file sentencepiece writes beside a model it trains to files: a piece, a tab, its score per id."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))


class Tokenizer:
    """Text <-> token ids with the joint BPE model (section 5.1). encode adds no bos/eos: collation does."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"sentencepiece model not found: {self.model_path}; prepare the dataset first "
                "(TranslationDataModule.prepare_data or data.prepare_dataset)"
            )
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        self._word_ids: dict[str, bytes] = {}  # encode_flat's cache: a word -> its ids as id_dtype bytes

    def encode(self, texts: Iterable[str], num_threads: int | None = None) -> list[list[int]]:
        """Sentences -> lists of BPE ids (no bos/eos), sentencepiece on `num_threads` threads (default: all cores)."""
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads or os.cpu_count() or 1)

    @cached_property
    def id_dtype(self) -> np.dtype:
        """The dtype shards store ids in (data.shards.token_dtype): uint16 up to 65,536 ids."""
        return token_dtype(self.vocab_size)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Sentences -> (every sentence's ids one after the other, (N,) ids per sentence), on one thread, through a
        cache of each word's ids. The same ids as `encode`; what each worker of `aiayn prepare` runs.

        BPE merges never cross a word boundary: sentencepiece (split_by_whitespace, its default and ours) encodes a
        sentence as each word's pieces, every word with its "▁" prefix, one after the other. So a word's ids can be
        looked up instead of re-encoded, and text is mostly the same few hundred thousand words. The cache holds
        each word's ids as the bytes of an id_dtype array, so a batch's ids are one bytes.join of its words'
        entries: no Python int per token. Words not seen yet are encoded in one sentencepiece call; the cache keeps
        the first WORD_CACHE_SIZE distinct words, so its memory is bounded (~40 MB at WMT's word lengths).
        A cache hit costs a dict lookup instead of a BPE encoding plus a list of Python ints to convert, which is
        why this beats sentencepiece's own batch call, more threads included (tests/test_tokenizer.py checks that
        the ids are the same on the whole corpora folder).
        """
        texts = list(texts)
        words = " ".join(texts).split(" ")  # a sentence of k spaces has k + 1 words ("" between double spaces)
        words_per_text = np.fromiter(map(str.count, texts, repeat(" ")), np.int64, len(texts)) + 1
        known = self._word_ids
        entries = list(map(known.get, words))  # None where the cache lacks the word
        if None in entries:
            new = list({words[i] for i, entry in enumerate(entries) if entry is None})
            encoded = self.sp.encode(new, out_type=int, num_threads=1)
            table = {w: np.array(ids, dtype=self.id_dtype).tobytes() for w, ids in zip(new, encoded, strict=True)}
            entries = [table[w] if entry is None else entry for w, entry in zip(words, entries, strict=True)]
            known.update(islice(table.items(), max(WORD_CACHE_SIZE - len(known), 0)))
        ids = np.frombuffer(b"".join(entries), dtype=self.id_dtype)
        ids_per_word = np.fromiter(map(len, entries), np.int64, len(entries)) // self.id_dtype.itemsize
        first_word = np.zeros(len(texts), dtype=np.int64)
        np.cumsum(words_per_text[:-1], out=first_word[1:])
        lengths = np.add.reduceat(ids_per_word, first_word) if texts else np.zeros(0, dtype=np.int64)
        return ids, lengths

    def decode(self, batch: Iterable[Iterable[int]]) -> list[str]:
        """Id sequences (lists, arrays or tensor rows) -> sentences.

        A model's output row looks like [bos] w1 w2 ... [eos] [pad] [pad]: everything from the first eos on is
        dropped, as are pad and bos ids, and the remaining pieces are joined back into text.
        """
        specials = (self.pad_id, self.bos_id)
        texts = []
        for row in batch:
            row = row.tolist() if hasattr(row, "tolist") else list(row)
            ids = []
            for i in row:
                if i == self.eos_id:
                    break
                if i not in specials:
                    ids.append(int(i))
            texts.append(self.sp.decode(ids))
        return texts

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Ids -> their BPE pieces, one per id ('▁A', '▁man', 'n', ...; '▁' marks a word start): the axis labels
        of attention maps. The special ids read <bos>, <eos>, <pad>, <unk> (SentencePiece's own '<s>', '</s>'
        are less telling)."""
        specials = {self.bos_id: "<bos>", self.eos_id: "<eos>", self.pad_id: "<pad>", self.unk_id: "<unk>"}
        return [specials.get(int(i)) or self.sp.id_to_piece(int(i)) for i in ids]

    @cached_property
    def sha256(self) -> str:
        """Fingerprint of the model file: a checkpoint records it, so ids are never read with another vocab."""
        return hashlib.sha256(self.model_path.read_bytes()).hexdigest()
