"""Choosing the search's settings on held-out data: `aiayn evaluate evaluate.tune.enabled=true`.

The paper fixed its length penalty on the development set: "We used beam search with a beam size of 4 and length
penalty α = 0.6. These hyperparameters were chosen after experimentation on the development set" (section 6.1).
The best α depends on the model (a model trained for fewer updates ends its sentences earlier, and a larger α
lets longer hypotheses win), so, as tensor2tensor users do, every beam × α of a grid translates the tuning split,
each is scored, and the best setting by the chosen metric is the one the scored split is then translated with.
The tuning split must not be the scored one: a setting chosen on the test set would flatter its score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from modules.decoding import Decoding, translate_ids
from pipeline.progress import Progress
from pipeline.scores import score

METRICS = ("bleu", "chrf")  # what "best" maximizes


@dataclass(frozen=True)
class TuningResult:
    """Every setting's scores on the tuning split, in grid order, and the best setting."""

    split: str
    metric: str
    rows: list[dict[str, Any]]  # {"beam", "alpha", "bleu", "chrf", "length_ratio"} per setting
    best: Decoding

    def as_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "metric": self.metric,
            "best": {"beam": self.best.beam, "alpha": self.best.alpha},
            "grid": self.rows,
        }

    def table(self) -> str:
        """The grid as a fixed-width table, the best row marked."""
        lines = [f"  {'beam':>4} {'alpha':>6} {'BLEU':>7} {'chrF':>7} {'len ratio':>9}"]
        for row in self.rows:
            mark = "  <- best" if (row["beam"], row["alpha"]) == (self.best.beam, self.best.alpha) else ""
            lines.append(
                f"  {row['beam']:>4} {row['alpha']:>6.2f} {row['bleu']:>7.2f} {row['chrf']:>7.2f} "
                f"{row['length_ratio']:>9.3f}{mark}"
            )
        return "\n".join(lines)


def settings_grid(base: Decoding, beams: Sequence[int], alphas: Sequence[float]) -> list[Decoding]:
    """base with each beam × alpha (beam 1, greedy search, has no α: it is tried once), one hypothesis each."""
    grid: list[Decoding] = []
    for beam in beams:
        for alpha in [0.0] if beam == 1 else alphas:
            setting = replace(base, beam=int(beam), alpha=float(alpha), nbest=1)
            if setting not in grid:
                grid.append(setting)
    return grid


def tune_search(
    model: torch.nn.Module,
    sources: list[np.ndarray],
    references: list[str],
    decode: Callable[[list[list[int]]], list[str]],
    grid: list[Decoding],
    *,
    split: str,
    metric: str,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_tokens: int,
    device: torch.device,
    precision: str = "32-true",
) -> TuningResult:
    """Translate `sources` with every setting of `grid`, score each against `references` (sacrebleu BLEU and chrF),
    and pick the best by `metric` (the first in grid order among equals). decode: token ids -> text."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: use one of {', '.join(METRICS)}")
    rows: list[dict[str, Any]] = []
    with Progress(total=len(sources) * len(grid), desc=f"tune on {split}") as progress:
        for setting in grid:
            nbest = translate_ids(
                model,
                sources,
                setting.search(bos_id, eos_id),
                pad_id,
                eos_id,
                max_tokens,
                device,
                precision,
                progress=progress.update,
            )
            scores = score(decode([hyps[0].tokens for hyps in nbest]), references)
            rows.append(
                {
                    "beam": setting.beam,
                    "alpha": setting.alpha,
                    "bleu": round(scores["bleu"], 4),
                    "chrf": round(scores["chrf"], 4),
                    "length_ratio": round(scores["length_ratio"], 4),
                }
            )
    best_row = max(range(len(rows)), key=lambda i: (rows[i][metric], -i))
    return TuningResult(split, metric, rows, grid[best_row])
