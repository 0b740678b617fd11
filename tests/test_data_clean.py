"""data/clean.py's batched Cleaner against the steps written out one sentence at a time, straight from their
definitions (Moses remove-non-printing-char.perl and clean-corpus-n.perl, Python's unicodedata)."""

from __future__ import annotations

import unicodedata
from collections import Counter

import pytest

from data.clean import Cleaner

PAIRS = [
    ("A man rides a bike.", "Ein Mann fährt Fahrrad."),
    ("Ｆｕｌｌ ｗｉｄｔｈ ﬁne", "Volle Breite"),  # NFKC folds full-width letters and the ligature
    ("tab\there  and\u00a0nbsp ", " Tab und  Leerzeichen"),  # tabs, no-break space, runs, ends
    ("bell\x07 and\u200bzero-width", "Glocke"),  # Cc and Cf characters -> spaces
    ("", "leer"),  # empty source
    ("   ", "nur Leerzeichen"),  # whitespace only: empty after collapsing
    ("one", "eins zwei drei vier fünf sechs sieben acht neun zehn"),  # 10 words vs 1: ratio over 9
    ("one two", "eins zwei drei vier fünf sechs sieben acht neun zehn"),  # 5.0: kept
    (" ".join(["w"] * 201), " ".join(["w"] * 200)),  # a side over max_words=200
    ("A man rides a bike.", "Ein Mann fährt Fahrrad."),  # a duplicate of the first pair
    ("A  man rides a bike.", "Ein Mann fährt Fahrrad."),  # the same pair once collapsed
    ("Ein Hund.", "A dog."),
]


def reference(pairs, cfg):
    """One sentence at a time: text steps, then drop_empty, max_words, max_ratio, dedup, in that order."""
    changed, removed, seen, kept = Counter(), Counter(), set(), []

    def text(s):
        steps = [
            ("normalize", lambda t: unicodedata.normalize(cfg["normalize"], t) if cfg["normalize"] else t),
            ("strip_control", lambda t: "".join(" " if unicodedata.category(c)[0] == "C" else c for c in t)),
            ("collapse_whitespace", lambda t: " ".join(t.split())),
        ]
        for name, fn in steps:
            if cfg[name] if name != "normalize" else cfg["normalize"]:
                out = fn(s)
                changed[name] += out != s
                s = out
        return s

    for src, tgt in pairs:
        src, tgt = text(src), text(tgt)
        n_src, n_tgt = len(src.split()), len(tgt.split())
        if cfg["drop_empty"] and (not src or not tgt):
            removed["drop_empty"] += 1
        elif n_src > cfg["max_words"] or n_tgt > cfg["max_words"]:
            removed["max_words"] += 1
        elif n_src and n_tgt and (n_src / n_tgt > cfg["max_ratio"] or n_tgt / n_src > cfg["max_ratio"]):
            removed["max_ratio"] += 1
        elif cfg["dedup"] and (src, tgt) in seen:
            removed["dedup"] += 1
        else:
            seen.add((src, tgt))
            kept.append((src, tgt))
    return kept, {k: v for k, v in changed.items() if v}, dict(removed)


@pytest.mark.parametrize(
    "clean",
    [
        {"dedup": True},
        {"dedup": False, "normalize": None},
        {"collapse_whitespace": False, "strip_control": False, "normalize": "NFC"},
        {"drop_empty": False, "max_ratio": 4},
    ],
)
def test_batched_cleaner_equals_one_sentence_at_a_time(clean):
    cleaner = Cleaner(clean, filters=True)
    kept, changed, removed = reference(PAIRS, cleaner.cfg)
    # Two batches: de-duplication must reach across them too.
    first = cleaner([s for s, _ in PAIRS[:5]], [t for _, t in PAIRS[:5]], [None] * 5)
    second = cleaner([s for s, _ in PAIRS[5:]], [t for _, t in PAIRS[5:]], [None] * (len(PAIRS) - 5))
    assert list(zip(first[0] + second[0], first[1] + second[1], strict=True)) == kept
    assert cleaner.report() == {"changed": changed, "removed": removed}


def test_issues_are_counted_and_their_pairs_dropped():
    cleaner = Cleaner({"on_bad_line": "skip"}, filters=True)
    src, tgt = cleaner(["a", "b c", "d"], ["x", "y", "z"], [None, "invalid_utf8", None])
    assert (src, tgt) == (["a", "d"], ["x", "z"])
    assert cleaner.report()["removed"] == {"invalid_utf8": 1}
