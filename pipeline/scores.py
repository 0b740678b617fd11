"""Scores of translations against references: corpus BLEU and chrF with sacrebleu's defaults, and their signatures
(the paper's own tokenized BLEU is pipeline/paper_bleu.py)."""

from __future__ import annotations

from typing import Any


def score(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF with sacrebleu's defaults (13a tokenization for BLEU), with their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    result: dict[str, Any] = {"signatures": {}}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        value = metric.corpus_score(hyps, [refs])
        result[name] = value.score
        result[f"{name}_text"] = str(value)  # e.g. "BLEU = 27.30 59.1/33.2/... (BP = 1.000 ...)"
        result["signatures"][name] = str(metric.get_signature())
    return result
