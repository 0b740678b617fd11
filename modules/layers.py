"""One encoder layer and one decoder layer (section 3.1), with their residual connections (section 5.4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from modules.attention import MultiHeadAttention
from modules.config import TransformerConfig
from modules.dropout import Dropout
from modules.feedforward import PositionwiseFeedForward

if TYPE_CHECKING:
    from modules.kernels import Kernels


class ResidualConnection(nn.Module):
    """LayerNorm(x + Dropout(Sublayer(x)))  (sections 3.1 and 5.4), or its pre-LN variant.

    "We apply dropout to the output of each sub-layer, before it is added to the sub-layer input and normalized."
    With norm='pre' the order becomes x + Dropout(Sublayer(LayerNorm(x))), which trains without warmup but is not
    what the paper did.
    """

    def __init__(self, d_model: int, dropout: float, norm: str, kernels: Kernels) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout, kernels)
        self.pre_norm = norm == "pre"

    def forward(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention then a position-wise feed-forward network, each wrapped in a residual connection."""

    def __init__(self, cfg: TransformerConfig, kernels: Kernels) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.d_k, cfg.d_v, kernels)
        self.ffn = PositionwiseFeedForward(cfg.d_model, cfg.d_ff)
        self.attn_residual = ResidualConnection(cfg.d_model, cfg.dropout, cfg.norm, kernels)
        self.ffn_residual = ResidualConnection(cfg.d_model, cfg.dropout, cfg.norm, kernels)

    def forward(self, x: torch.Tensor, src_bias: torch.Tensor) -> torch.Tensor:
        # x: (batch, src_len, d_model); src_bias: (batch, 1, 1, src_len) hides source padding
        x = self.attn_residual(x, lambda h: self.self_attn(h, h, src_bias))
        return self.ffn_residual(x, self.ffn)


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention, then the feed-forward network (section 3.1)."""

    def __init__(self, cfg: TransformerConfig, kernels: Kernels) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.d_k, cfg.d_v, kernels)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.d_k, cfg.d_v, kernels)
        self.ffn = PositionwiseFeedForward(cfg.d_model, cfg.d_ff)
        self.self_residual = ResidualConnection(cfg.d_model, cfg.dropout, cfg.norm, kernels)
        self.cross_residual = ResidualConnection(cfg.d_model, cfg.dropout, cfg.norm, kernels)
        self.ffn_residual = ResidualConnection(cfg.d_model, cfg.dropout, cfg.norm, kernels)

    def forward(
        self,
        y: torch.Tensor,
        memory: torch.Tensor,
        self_bias: torch.Tensor | None,
        src_bias: torch.Tensor,
        cache: dict[str, dict[str, torch.Tensor]] | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        # y: (batch, tgt_len, d_model); memory: (batch, src_len, d_model)
        # Masked self-attention: causal (a whole sequence), or self_bias (1, 1, tgt_len, past + tgt_len) for new
        # positions after cached ones, or neither for one new position after cached ones.
        self_cache = cache["self"] if cache is not None else None
        cross_cache = cache["cross"] if cache is not None else None
        y = self.self_residual(y, lambda h: self.self_attn(h, h, self_bias, cache=self_cache, causal=causal))
        y = self.cross_residual(y, lambda h: self.cross_attn(h, memory, src_bias, cache=cross_cache, static_kv=True))
        return self.ffn_residual(y, self.ffn)
