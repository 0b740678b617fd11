"""Tokenizer.encode_flat, which looks words up in a cache, against sentencepiece encoding whole sentences."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from data import tokenizer as tokenizer_module
from data.tokenizer import Tokenizer, train_sentencepiece

ODD = [
    "",
    " ",
    "  two  spaces  and\ttab ",
    " leading and trailing ",
    "non\u00a0breaking\u00a0space",
    "zero\u200bwidth",
    "ﬁ ligature and ｆｕｌｌ width",
    "e\u0301 combining accent",
    "Zahlen 1234567 und 3.14",
    "unbekannt: ☃ ✈ 漢字",
]


@pytest.fixture(scope="module")
def corpus(corpora_dir: Path) -> list[str]:
    """Every sentence of Multi30k train and of the WMT news sets, both sides (about 160k)."""
    lines = []
    for path in sorted((corpora_dir / "multi30k").glob("train.*.gz")) + sorted(
        (corpora_dir / "wmt_news_extra").glob("*.gz")
    ):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines += [line.rstrip("\n") for line in f]
    return lines


@pytest.fixture(scope="module")
def model(corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(corpus, tmp_path_factory.mktemp("spm") / "spm", 4000, sample_lines=40_000)


def flat(batches: list[tuple[np.ndarray, np.ndarray]]) -> list[list[int]]:
    """encode_flat's (ids, lengths) of consecutive batches -> one list of ids per sentence."""
    out = []
    for ids, lengths in batches:
        assert ids.dtype == np.uint16 and lengths.dtype == np.int64 and lengths.sum() == len(ids)
        out += [part.tolist() for part in np.split(ids, np.cumsum(lengths)[:-1])] if len(lengths) else []
    return out


def test_cached_encoding_equals_sentencepiece_on_the_corpora(corpus: list[str], model: Path) -> None:
    """Word by word through the cache, every sentence of the corpora and some odd ones (whitespace runs, tabs,
    no-break and zero-width spaces, NFKC-folded characters, unknown characters) gets sentencepiece's ids."""
    tokenizer = Tokenizer(model)
    sentences = corpus + ODD
    expected = tokenizer.sp.encode(sentences, out_type=int)
    got = flat(tokenizer.encode_flat(sentences[start : start + 10_000]) for start in range(0, len(sentences), 10_000))
    assert got == expected
    assert 0 < len(tokenizer._word_ids) < sum(len(s.split(" ")) for s in sentences) // 5  # mostly lookups
    assert flat([tokenizer.encode_flat(ODD[:1])]) == [[]] and flat([tokenizer.encode_flat([])]) == []


def test_a_full_cache_stays_bounded_and_correct(corpus: list[str], model: Path, monkeypatch) -> None:
    """With room for 1,000 words the cache keeps the first 1,000 and the others are still encoded right."""
    monkeypatch.setattr(tokenizer_module, "WORD_CACHE_SIZE", 1000)
    tokenizer = Tokenizer(model)
    sentences = corpus[:20_000]
    got = flat(tokenizer.encode_flat(sentences[start : start + 3000]) for start in range(0, len(sentences), 3000))
    assert got == tokenizer.sp.encode(sentences, out_type=int)
    assert len(tokenizer._word_ids) == 1000
    assert tokenizer.encode(sentences[:100]) == tokenizer.sp.encode(sentences[:100], out_type=int)  # all threads
