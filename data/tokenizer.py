"""The shared source-target vocabulary of section 5.1.

"Sentences were encoded using byte-pair encoding [3], which has a shared source-target vocabulary of about
37000 tokens." We train ONE SentencePiece BPE model on the training text of both languages, so a word that
is spelled the same in English and German (names, numbers) gets the same ids on both sides; that is what
lets section 3.4 share one embedding matrix between encoder, decoder and the pre-softmax projection.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from collections import ChainMap
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from itertools import chain, islice
from pathlib import Path

import sentencepiece as spm

from data.errors import VocabSizeError

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

    Writes `<model_prefix>.model` and `<model_prefix>.vocab`. At WMT scale (9M lines counting both sides)
    reading everything would need GBs of RAM, so sentencepiece keeps a uniform random sample of
    `sample_lines` lines (reservoir sampling while it streams the iterator).
    """
    if isinstance(lines, (list, tuple)) and lines and all(isinstance(p, Path) for p in lines):
        lines = _lines_of(lines)
    model_prefix = Path(model_prefix)
    spm.set_random_generator_seed(seed)  # the sample and BPE ties depend on it: same text -> same model
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(model_prefix),
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
        # sentencepiece's own words: "Vocabulary size too high (8000). Please set it to a value <= 803."
        if "Vocabulary size too high" not in str(err):
            raise
        limit = re.search(r"<=\s*(\d+)", str(err))
        supported = f"at most {limit.group(1)}" if limit else "fewer"
        raise VocabSizeError(
            f"model.vocab_size={vocab_size} is more BPE tokens than the training text supports ({supported}); "
            "lower model.vocab_size (data.vocab_size follows it) or train on more text"
        ) from err
    return model_prefix.with_name(model_prefix.name + ".model")


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
        self._word_ids: dict[str, list[int]] = {}  # encode's cache: a word -> its ids

    def encode(self, texts: Iterable[str], num_threads: int | None = None) -> list[list[int]]:
        """Sentences -> lists of BPE ids (no bos/eos); on one thread through a cache of each word's ids.

        BPE merges never cross a word boundary: sentencepiece (split_by_whitespace, its default and ours) encodes a
        sentence as each word's pieces, every word with its "▁" prefix, one after the other. So a word's ids can be
        looked up instead of re-encoded, and text is mostly the same few hundred thousand words: on 100k WMT news
        pairs, 3.0M words of which 162k distinct, encoding went from 2.96 s (sentencepiece, one thread) to 1.12 s
        with a warm cache, 1.60 s cold, with identical ids (tests/test_tokenizer.py compares them on the corpora).
        Words not seen yet are encoded in one batched sentencepiece call; the cache keeps the first WORD_CACHE_SIZE
        distinct words, so its memory is bounded. The cache runs on one thread: it is the path of `num_threads=1`,
        what each worker of prepare's process pool asks for. With more threads (default: all cores) sentencepiece
        encodes whole sentences in parallel, which was faster for a single 100k-pair shard (3.0 s, against 3.7 s
        through the cache).
        """
        threads = num_threads or os.cpu_count() or 1
        if threads > 1:
            return self.sp.encode(list(texts), out_type=int, num_threads=threads)
        split = [text.split(" ") for text in texts]
        known = self._word_ids
        new = list({word for words in split for word in words if word not in known})
        lookup = known.__getitem__
        if new:
            encoded = dict(zip(new, self.sp.encode(new, out_type=int, num_threads=1), strict=True))
            room = WORD_CACHE_SIZE - len(known)
            if room >= len(encoded):
                known.update(encoded)
            else:  # full: keep what fits, look the rest up in this batch's own table
                known.update(islice(encoded.items(), max(room, 0)))
                lookup = ChainMap(known, encoded).__getitem__
        return [list(chain.from_iterable(map(lookup, words))) for words in split]

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
