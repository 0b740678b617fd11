"""From source token ids to hypotheses, the one decoding path of validation samples, `aiayn evaluate`, `translate`,
`attention` and the benchmarks: the search of section 6.1 (beam search with a length penalty, or greedy search),
sources grouped into batches by length, each padded and ended with <eos> as in training."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from modules.beam import Hypothesis, beam_search
from modules.search import greedy_search
from modules.transformer import Transformer

# (model, src (batch, src_len)) -> each sentence's hypotheses, best first
Search = Callable[[Transformer, torch.Tensor], list[list[Hypothesis]]]


@dataclass(frozen=True)
class Decoding:
    """How to search: "beam search with a beam size of 4 and length penalty α = 0.6 ... maximum output length during
    inference to input length + 50" (section 6.1; modules/beam.py). beam 1 is greedy search, which does not score its
    output (its hypotheses' score and log_prob are NaN). nbest: hypotheses kept per sentence (<= beam).

    Invalid settings raise ValueError("<field>=<value>: ..."); callers put their config section in front.
    """

    beam: int = 4
    alpha: float = 0.6
    nbest: int = 1
    max_extra: int = 50

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise ValueError(f"beam={self.beam}: the beam size must be at least 1 (1 is greedy search)")
        if not 1 <= self.nbest <= self.beam:
            raise ValueError(f"nbest={self.nbest}: must be between 1 and the beam size, {self.beam}")
        if self.alpha < 0:
            raise ValueError(f"alpha={self.alpha}: the length penalty's α must be >= 0 (the paper: 0.6)")

    def search(self, bos_id: int, eos_id: int) -> Search:
        """The search for a vocabulary's <bos> and <eos>."""
        return partial(self._search, bos_id=bos_id, eos_id=eos_id)

    def _search(self, model: Transformer, src: torch.Tensor, bos_id: int, eos_id: int) -> list[list[Hypothesis]]:
        if self.beam == 1:
            tokens = greedy_search(model, src, bos_id, eos_id, max_extra=self.max_extra)
            return [[Hypothesis(t, math.nan, math.nan)] for t in tokens]
        return beam_search(
            model,
            src,
            bos_id,
            eos_id,
            beam_size=self.beam,
            alpha=self.alpha,
            max_extra=self.max_extra,
            nbest=self.nbest,
        )

    def describe(self) -> dict[str, Any]:
        """The settings as eval-<split>.json records them."""
        if self.beam == 1:
            return {"search": "greedy", "max_extra": self.max_extra}
        return {
            "search": "beam",
            "beam": self.beam,
            "alpha": self.alpha,
            "max_extra": self.max_extra,
            "nbest": self.nbest,
        }


def describe_search(decoding: dict[str, Any]) -> str:
    """A Decoding.describe() in words: greedy search, or beam search (beam 4, α 0.6)."""
    if decoding["search"] == "greedy":
        return "greedy search"
    return f"beam search (beam {decoding['beam']}, α {decoding['alpha']})"


def length_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Sentence indices grouped by source length (longest first), each batch at most max_tokens padded tokens
    (at least one sentence), so little of each batch is padding."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])  # the batch's first sentence is its longest
        size = max(1, max_tokens // max(longest, 1))
        batches.append(order[start : start + size])
        start += size
    return batches


def translate_ids(
    model: Transformer,
    sources: Sequence[Sequence[int] | np.ndarray],
    search: Search,
    pad_id: int,
    eos_id: int,
    max_tokens: int,
    device: torch.device | str,
    precision: str = "32-true",
    progress: Callable[[int], None] | None = None,
) -> list[list[Hypothesis]]:
    """Decode every source (ids without <eos>) in length-sorted batches of at most max_tokens padded tokens; each
    sentence's hypotheses (best first) come back in input order.

    precision "bf16-mixed" runs the model under bf16 autocast, as training does (the search's log-softmax and scores
    stay float32); "32-true": float32 throughout. progress, if given, is called with each batch's number of
    sentences once the batch is decoded (pipeline/progress.py's Progress.update).
    """
    if precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"decoding precision must be 32-true or bf16-mixed, got {precision!r} (evaluate.precision)")
    device = torch.device(device)
    lengths = np.array([len(s) + 1 for s in sources])  # + eos
    hyps: list[list[Hypothesis]] = [[] for _ in sources]
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    for batch in length_batches(lengths, max_tokens):
        src = torch.full((len(batch), int(lengths[batch].max())), pad_id, dtype=torch.long)  # (batch, src_len)
        for row, i in enumerate(batch):
            src[row, : lengths[i] - 1] = torch.from_numpy(np.asarray(sources[i], dtype=np.int64))
            src[row, lengths[i] - 1] = eos_id
        with bf16:
            results = search(model, src.to(device))
        for i, hyp in zip(batch, results, strict=True):
            hyps[i] = hyp
        if progress is not None:
            progress(len(batch))
    return hyps
