"""Cleaning a parallel corpus before BPE, one small function per step, each on by config (`data.clean`) and counted.

Text steps change a sentence and are applied to every split (they cannot misalign a reference, and sentencepiece
normalizes NFKC and collapses spaces itself anyway, so they do not change what a model sees on valid/test):
    normalize            Unicode normalization form: NFKC, NFC or null
    strip_control        control/format characters -> space (Moses remove-non-printing-char.perl: s/\\p{C}/ /g)
    collapse_whitespace  runs of whitespace -> one space, none at either end

Pair filters remove a pair and are applied to the TRAINING split only: valid/test keep every line, so pair i is
still line i of the reference that BLEU is computed against:
    drop_empty  a side is empty
    max_words   a side has more whitespace-separated words        (Moses clean-corpus-n.perl, its "max")
    max_ratio   one side has over max_ratio times the words of the other (Moses clean-corpus-n.perl -ratio, default 9)
    dedup       the same (source, target) pair was already kept

Unusable lines found while reading (invalid UTF-8, a line over 1 MiB, a missing column or field) fail the run
with on_bad_line=error, or are skipped and counted with on_bad_line=skip (train only; see data/corpus.py).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from functools import partial
from itertools import repeat
from operator import ne
from typing import Any

import numpy as np

from data.errors import SourceConfigError

DEFAULTS: dict[str, Any] = {
    "normalize": "NFKC",
    "strip_control": True,
    "collapse_whitespace": True,
    "drop_empty": True,
    "max_words": 200,
    "max_ratio": 9.0,
    "dedup": False,
    "on_bad_line": "error",
}
NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD")
FILTERS = ("drop_empty", "max_words", "max_ratio", "dedup")  # pair filters, in the order they are tried


def resolve_clean_config(clean: dict[str, Any] | None) -> dict[str, Any]:
    """data.clean with defaults filled in; an unknown key or value fails naming data.clean.<key>."""
    clean = dict(clean or {})
    unknown = sorted(set(clean) - set(DEFAULTS))
    if unknown:
        raise SourceConfigError(
            f"unknown key(s) {', '.join('data.clean.' + k for k in unknown)}; known: {sorted(DEFAULTS)}"
        )
    cfg = {**DEFAULTS, **clean}
    if cfg["normalize"] is not None and cfg["normalize"] not in NORMAL_FORMS:
        raise SourceConfigError(f"data.clean.normalize={cfg['normalize']!r}: use one of {NORMAL_FORMS} or null")
    if cfg["on_bad_line"] not in ("error", "skip"):
        raise SourceConfigError(f"data.clean.on_bad_line={cfg['on_bad_line']!r}: use 'error' or 'skip'")
    return cfg


def strip_control(text: str) -> str:
    """Every character of Unicode category C* (control, format, private use, unassigned) -> a space.

    Mimics Moses' remove-non-printing-char.perl. str.isprintable() is a fast C check; most lines pass it.
    """
    if text.isprintable():
        return text
    return "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)


def collapse_whitespace(text: str) -> str:
    """Runs of any Unicode whitespace (tabs, no-break spaces, ...) -> one space; none at either end."""
    return " ".join(text.split())


def too_many_words(src_words: np.ndarray, tgt_words: np.ndarray, max_words: int) -> np.ndarray:
    """Moses clean-corpus-n.perl's max: a side with more than max_words whitespace tokens (per pair)."""
    return (src_words > max_words) | (tgt_words > max_words)


def bad_ratio(src_words: np.ndarray, tgt_words: np.ndarray, max_ratio: float) -> np.ndarray:
    """Moses clean-corpus-n.perl's -ratio: one side over max_ratio times as many words as the other (per pair).

    Like Moses, the ratio is over whitespace tokens and only tested when both sides are non-empty.
    """
    both = (src_words > 0) & (tgt_words > 0)
    src, tgt = np.maximum(src_words, 1), np.maximum(tgt_words, 1)  # no division by zero where `both` is False
    return both & ((src / tgt > max_ratio) | (tgt / src > max_ratio))


def pair_hash(src: str, tgt: str) -> int:
    """An 8-byte hash of a pair for de-duplication (a collision, ~1 in 10^11 at 4.5M pairs, drops one pair)."""
    return int.from_bytes(hashlib.blake2b(f"{src}\t{tgt}".encode(), digest_size=8).digest(), "little")


class Cleaner:
    """Applies data.clean to batches of pairs and counts what every step changed or removed.

    counts["changed"][step]: sentences a text step altered; counts["removed"][step]: pairs a filter dropped.
    De-duplication keeps one Python int per kept pair in a set: about 70 bytes each, ~320 MB for WMT's 4.5M.
    """

    def __init__(self, clean_cfg: dict[str, Any], filters: bool):
        self.cfg, self.filters = resolve_clean_config(clean_cfg), filters
        self.changed: Counter[str] = Counter()
        self.removed: Counter[str] = Counter()
        self._seen: set[int] = set()

    def text(self, s: str) -> str:
        """One sentence through the text steps."""
        return self.texts([s])[0]

    def texts(self, batch: list[str]) -> list[str]:
        """A batch of sentences through the text steps, in order, each step over the whole batch in one C-level
        pass (map, str methods): a sentence costs about a microsecond, so per-sentence Python calls would cost
        as much as BPE-encoding it. Counts per step the sentences it changed."""
        cfg = self.cfg
        if cfg["normalize"]:  # NFKC folds e.g. full-width letters and ligatures into their plain forms
            batch = self._count("normalize", batch, list(map(partial(unicodedata.normalize, cfg["normalize"]), batch)))
        if cfg["strip_control"] and not "".join(batch).isprintable():  # most batches are all printable
            batch = self._count("strip_control", batch, [t if t.isprintable() else strip_control(t) for t in batch])
        if cfg["collapse_whitespace"]:
            # str.split + join per sentence, in C, rather than regex passes over the batch joined by newlines,
            # which would replace every single space with itself: the cheaper way to the same text.
            batch = self._count("collapse_whitespace", batch, list(map(collapse_whitespace, batch)))
        return batch

    def _count(self, step: str, before: list[str], after: list[str]) -> list[str]:
        changed = sum(map(ne, before, after))
        if changed:
            self.changed[step] += changed
        return after

    def word_counts(self, batch: list[str], lengths: np.ndarray) -> np.ndarray:
        """Whitespace-separated words per sentence (lengths: its characters); after collapse_whitespace a
        sentence's words are its spaces plus one."""
        if self.cfg["collapse_whitespace"]:
            spaces = np.fromiter(map(str.count, batch, repeat(" ")), dtype=np.int64, count=len(batch))
            return np.where(lengths > 0, spaces + 1, 0)
        return np.fromiter((len(t.split()) for t in batch), dtype=np.int64, count=len(batch))

    def reject(self, src: list[str], tgt: list[str]) -> np.ndarray:
        """Per (already cleaned) pair of the batch, the index in FILTERS of the first filter that removes it, or -1
        to keep it. Filters are tried in FILTERS' order, as Moses' clean-corpus-n.perl would, dedup last."""
        cfg = self.cfg
        fate = np.full(len(src), -1, dtype=np.int64)

        def apply(name: str, removed: np.ndarray) -> None:
            fate[(fate < 0) & removed] = FILTERS.index(name)

        src_chars, tgt_chars = (np.fromiter(map(len, side), dtype=np.int64, count=len(side)) for side in (src, tgt))
        if cfg["drop_empty"]:
            apply("drop_empty", (src_chars == 0) | (tgt_chars == 0))
        n_src, n_tgt = self.word_counts(src, src_chars), self.word_counts(tgt, tgt_chars)
        if cfg["max_words"]:
            apply("max_words", too_many_words(n_src, n_tgt, cfg["max_words"]))
        if cfg["max_ratio"]:
            apply("max_ratio", bad_ratio(n_src, n_tgt, cfg["max_ratio"]))
        if cfg["dedup"]:  # in order: the first of two equal pairs is kept, also within a batch
            for i in np.flatnonzero(fate < 0).tolist():
                key = pair_hash(src[i], tgt[i])
                if key in self._seen:
                    fate[i] = FILTERS.index("dedup")
                else:
                    self._seen.add(key)
        return fate

    def __call__(self, src: list[str], tgt: list[str], issues: list[str | None]) -> tuple[list[str], list[str]]:
        """One batch -> the kept, cleaned (source, target) sentences. Pairs with a read issue are skipped."""
        if any(issue is not None for issue in issues):  # only with on_bad_line=skip (error mode already raised)
            self.removed.update(issue for issue in issues if issue is not None)
            ok = [i for i, issue in enumerate(issues) if issue is None]
            src, tgt = [src[i] for i in ok], [tgt[i] for i in ok]
        src, tgt = self.texts(src), self.texts(tgt)
        if not self.filters:
            return src, tgt
        fate = self.reject(src, tgt)
        for index, count in zip(*np.unique(fate[fate >= 0], return_counts=True), strict=True):
            self.removed[FILTERS[index]] += int(count)
        kept = np.flatnonzero(fate < 0).tolist()
        if len(kept) == len(src):
            return src, tgt
        return [src[i] for i in kept], [tgt[i] for i in kept]

    def report(self) -> dict[str, dict[str, int]]:
        return {"changed": dict(self.changed), "removed": dict(self.removed)}

    def take_report(self) -> dict[str, dict[str, int]]:
        """The counts since the last call (e.g. of one shard), then zero them. The dedup memory is kept."""
        report = self.report()
        self.changed, self.removed = Counter(), Counter()
        return report
