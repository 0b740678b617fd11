"""Embeddings (section 3.4) and positional encodings (section 3.5, Table 3 row E)."""

from __future__ import annotations

import math

import torch
from torch import nn


class ScaledEmbedding(nn.Module):
    """Learned token embeddings multiplied by √d_model (section 3.4).

    "In the embedding layers, we multiply those weights by √d_model." With weights drawn from N(0, d_model^-1/2)
    the scaled embeddings have unit variance, the same scale as the positional encodings added to them.
    """

    def __init__(self, vocab_size: int, d_model: int, pad_id: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.pad_id = pad_id
        self.scale = math.sqrt(d_model)
        nn.init.normal_(self.weight, mean=0.0, std=d_model**-0.5)
        with torch.no_grad():
            self.weight[pad_id].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # (batch, len) -> (batch, len, d_model)
        return nn.functional.embedding(tokens, self.weight, padding_idx=self.pad_id) * self.scale


def sinusoid_table(n_positions: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    Section 3.5. Returns (n_positions, d_model): sines on even dimensions, cosines on odd ones.
    """
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (pos, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (d_model/2,)
    angle = position / torch.pow(10000.0, two_i / d_model)  # (pos, d_model/2)
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal positions (section 3.5): no parameters, extends to any length."""

    def __init__(self, d_model: int, max_positions: int) -> None:
        super().__init__()
        self.d_model = d_model
        # Not saved in checkpoints: it is a function of the shape, not a learned value.
        self.register_buffer("table", sinusoid_table(max_positions, d_model), persistent=False)

    def forward(self, length: int, start: int = 0) -> torch.Tensor:
        """Encodings of positions start .. start+length-1: (1, length, d_model)."""
        if start + length > self.table.size(0):  # longer than ever seen: grow the table
            self.table = sinusoid_table(2 * (start + length), self.d_model).to(self.table.device)
        return self.table[start : start + length][None]


class LearnedPositionalEmbedding(nn.Module):
    """Learned positional embeddings, Table 3 row (E): "nearly identical results" to the sinusoids."""

    def __init__(self, d_model: int, max_positions: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_positions, d_model)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=d_model**-0.5)

    def forward(self, length: int, start: int = 0) -> torch.Tensor:
        if start + length > self.embedding.num_embeddings:
            raise ValueError(
                f"sequence of {start + length} positions exceeds model.max_positions="
                f"{self.embedding.num_embeddings} of the learned positional embedding; raise model.max_positions"
            )
        positions = torch.arange(start, start + length, device=self.embedding.weight.device)
        return self.embedding(positions)[None]  # (1, length, d_model)
