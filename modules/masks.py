"""Attention masks as additive biases (section 3.2.3).

"We implement this inside of scaled dot-product attention by masking out (setting to -inf) all values in the input
of the softmax which correspond to illegal connections."  We add a large negative number instead of -inf: the
softmax still gives those positions exactly zero weight, and a row with nothing to attend to stays finite.
"""

from __future__ import annotations

import torch

# exp(-1e9 - max) underflows to exactly 0 in float32, bfloat16 and float16 alike.
MASKED = -1e9


def padding_bias(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Bias that hides padding keys: (batch, 1, 1, key_len), 0 for real tokens and MASKED for padding."""
    # tokens: (batch, key_len)
    bias = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    bias = bias.masked_fill(tokens.eq(pad_id), MASKED)
    return bias[:, None, None, :]


def causal_bias(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bias that hides the future: (1, 1, length, length), MASKED above the diagonal.

    "We also modify the self-attention sub-layer in the decoder stack to prevent positions from attending to
    subsequent positions ... ensures that the predictions for position i can depend only on the known outputs at
    positions less than i." (section 3.1)
    """
    future = torch.ones(length, length, dtype=torch.bool, device=device).triu(diagonal=1)
    return torch.zeros(length, length, device=device).masked_fill(future, MASKED)[None, None]
