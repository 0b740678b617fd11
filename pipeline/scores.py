"""Scores of translations against references: corpus BLEU and chrF with sacrebleu's defaults, and their signatures
(the paper's own tokenized BLEU is pipeline/paper_bleu.py)."""

from __future__ import annotations

from typing import Any


def score(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF with sacrebleu's defaults (13a tokenization for BLEU), with their signatures, and BLEU's
    length ratio (hypothesis / reference 13a tokens) and brevity penalty: a search that ends sentences too early
    shows there first."""
    from sacrebleu.metrics import BLEU, CHRF

    result: dict[str, Any] = {"signatures": {}}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        value = metric.corpus_score(hyps, [refs])
        result[name] = value.score
        result[f"{name}_text"] = str(value)  # e.g. "BLEU = 27.30 59.1/33.2/... (BP = 1.000 ...)"
        result["signatures"][name] = str(metric.get_signature())
        if name == "bleu":
            result["length_ratio"] = value.sys_len / value.ref_len if value.ref_len else 0.0
            result["brevity_penalty"] = value.bp
    return result
