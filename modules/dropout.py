"""Dropout, as section 5.4 ("Residual Dropout") applies it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from modules.kernels import Kernels


class Dropout(nn.Module):
    """Dropout (Srivastava et al., 2014): in training, zero each element with probability P_drop and scale the
    survivors by 1 / (1 - P_drop), so that an activation's expectation is unchanged and inference needs no
    rescaling. "For the base model, we use a rate of P_drop = 0.1."

    The mask is drawn by `kernels.dropout` (the device's, modules/kernels.py).
    """

    def __init__(self, p: float, kernels: Kernels) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return self.kernels.dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
