"""Label-smoothed cross-entropy (section 5.4, "Label Smoothing")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LabelSmoothedCrossEntropy(nn.Module):
    """Cross-entropy against a smoothed target q = (1 - ε_ls)·onehot(y) + ε_ls / V  (Szegedy et al., 2016).

    "During training, we employed label smoothing of value ε_ls = 0.1. This hurts perplexity, as the model learns
    to be more unsure, but improves accuracy and BLEU score." Expanding the cross-entropy of q against p gives
        loss = (1 - ε_ls)·(-log p_y) + ε_ls·mean_v(-log p_v),
    which is what is computed here (and what torch's `cross_entropy(label_smoothing=ε)` computes).
    Padding positions contribute nothing. Returns *sums* over tokens so the caller can normalize by the number
    of target tokens in the whole update, however many micro-batches and ranks it spans.

    This is the loss as written. The device kernels (modules/kernels.py) compute the same two sums from the decoder's
    output and the projection weight without the float32 (tokens x vocab) log-probabilities (modules/fused_loss.py).
    """

    def __init__(self, epsilon: float, pad_id: int) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.pad_id = pad_id

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: (batch, tgt_len, vocab); target: (batch, tgt_len).

        Returns (smoothed loss summed over real tokens, negative log-likelihood summed over real tokens); the
        second gives perplexity, which label smoothing would otherwise distort.
        """
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (batch, tgt_len, vocab), float32 even under bf16
        nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (batch, tgt_len)
        uniform = -log_probs.mean(dim=-1)  # (batch, tgt_len): cross-entropy against the uniform distribution
        real = target.ne(self.pad_id)
        nll = nll.masked_fill(~real, 0.0).sum()
        uniform = uniform.masked_fill(~real, 0.0).sum()
        return (1.0 - self.epsilon) * nll + self.epsilon * uniform, nll

    def from_hidden(
        self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of the logits hidden Wᵀ (the pre-softmax linear transformation, section 3.4): hidden (batch,
        tgt_len, d_model), weight (vocab, d_model). The plain kernels' projected loss."""
        return self(F.linear(hidden, weight), target)
