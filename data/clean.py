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
from typing import Any

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


def normalize(text: str, form: str | None) -> str:
    """Unicode normalization (NFKC folds e.g. full-width letters and ligatures into their plain forms)."""
    return unicodedata.normalize(form, text) if form else text


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


def too_many_words(src_words: int, tgt_words: int, max_words: int) -> bool:
    """Moses clean-corpus-n.perl's max: a side with more than max_words whitespace tokens."""
    return src_words > max_words or tgt_words > max_words


def bad_ratio(src_words: int, tgt_words: int, max_ratio: float) -> bool:
    """Moses clean-corpus-n.perl's -ratio: one side over max_ratio times as many words as the other.

    Like Moses, the ratio is over whitespace tokens and only tested when both sides are non-empty.
    """
    if not src_words or not tgt_words:
        return False
    return src_words / tgt_words > max_ratio or tgt_words / src_words > max_ratio


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
        cfg = self.cfg
        for step, fn, on in (
            ("normalize", lambda t: normalize(t, cfg["normalize"]), cfg["normalize"]),
            ("strip_control", strip_control, cfg["strip_control"]),
            ("collapse_whitespace", collapse_whitespace, cfg["collapse_whitespace"]),
        ):
            if on:
                out = fn(s)
                if out != s:
                    self.changed[step] += 1
                    s = out
        return s

    def reject(self, src: str, tgt: str) -> str | None:
        """The filter that removes this (already cleaned) pair, or None to keep it."""
        cfg = self.cfg
        if cfg["drop_empty"] and (not src or not tgt):
            return "drop_empty"
        n_src, n_tgt = len(src.split()), len(tgt.split())
        if cfg["max_words"] and too_many_words(n_src, n_tgt, cfg["max_words"]):
            return "max_words"
        if cfg["max_ratio"] and bad_ratio(n_src, n_tgt, cfg["max_ratio"]):
            return "max_ratio"
        if cfg["dedup"]:
            key = pair_hash(src, tgt)
            if key in self._seen:
                return "dedup"
            self._seen.add(key)
        return None

    def __call__(self, src: list[str], tgt: list[str], issues: list[str | None]) -> tuple[list[str], list[str]]:
        """One batch -> the kept, cleaned (source, target) sentences. Pairs with a read issue are skipped."""
        out_src, out_tgt = [], []
        for s, t, issue in zip(src, tgt, issues, strict=True):
            if issue is not None:  # only reached with on_bad_line=skip (or error mode already raised)
                self.removed[issue] += 1
                continue
            s, t = self.text(s), self.text(t)
            if self.filters and (step := self.reject(s, t)):
                self.removed[step] += 1
                continue
            out_src.append(s)
            out_tgt.append(t)
        return out_src, out_tgt

    def report(self) -> dict[str, dict[str, int]]:
        return {"changed": dict(self.changed), "removed": dict(self.removed)}

    def take_report(self) -> dict[str, dict[str, int]]:
        """The counts since the last call (e.g. of one shard), then zero them. The dedup memory is kept."""
        report = self.report()
        self.changed, self.removed = Counter(), Counter()
        return report
