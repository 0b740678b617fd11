"""Position-wise feed-forward network (section 3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2  (Eq. 2).

    "This consists of two linear transformations with a ReLU activation in between ... the inner-layer has
    dimensionality d_ff = 2048." Applied to each position separately and identically.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, len, d_model) -> (batch, len, d_ff) -> (batch, len, d_model)
        return self.w_2(F.relu(self.w_1(x)))
