"""Scaled dot-product attention (Eq. 1) and multi-head attention (section 3.2.2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from modules.masks import causal_bias

if TYPE_CHECKING:
    from modules.kernels import Kernels


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    softmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V  (Eq. 1).

    q: (batch, heads, q_len, d_k); k: (batch, heads, k_len, d_k); v: (batch, heads, k_len, d_v);
    bias: additive mask broadcastable to (batch, heads, q_len, k_len) (see masks.py); causal: also hide each query's
    future keys (q_len == k_len). softmax: the softmax over the keys (default softmax_float32).
    Returns the output (batch, heads, q_len, d_v) and the attention weights (batch, heads, q_len, k_len).
    """
    d_k = q.size(-1)
    # "To counteract this effect, we scale the dot products by 1/√d_k": scaling q first is cheaper than
    # scaling the (q_len x k_len) scores, and identical.
    scores = (q * (1.0 / math.sqrt(d_k))) @ k.transpose(-2, -1)  # (batch, heads, q_len, k_len)
    if causal:
        scores = scores + causal_bias(scores.size(-1), scores.device)
    if bias is not None:
        scores = scores + bias
    weights = (softmax or softmax_float32)(scores).to(v.dtype)
    return weights @ v, weights  # (batch, heads, q_len, d_v)


def softmax_float32(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the keys (last dimension), computed in float32 even under bf16 autocast: its sums are where low
    precision hurts."""
    return F.softmax(scores, dim=-1, dtype=torch.float32)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    Section 3.2.2. The h per-head projections are stored side by side in one matrix each (W^Q: d_model -> h·d_k,
    W^K: d_model -> h·d_k, W^V: d_model -> h·d_v), which is the same parameters as h separate ones, computed in one
    matmul. d_k and d_v are independent, as in Table 3 rows (A) and (B).

    Incremental decoding: pass a `cache` dict. For self-attention (`static_kv=False`) the new keys/values are
    appended to the cached ones; for encoder-decoder attention (`static_kv=True`) they are computed from the
    encoder output once and reused at every step. The memory may have fewer rows than the query: with g times as
    many query rows, each g consecutive ones attend over the same memory row (beam search's g beams of a sentence
    share its encoder output, which is then neither copied per beam nor reordered with them).

    Eq. 1 itself is computed by `kernels.attention` (the device's, modules/kernels.py), or as written when the
    weights are kept for attention maps.
    """

    def __init__(self, d_model: int, n_heads: int, d_k: int, d_v: int, kernels: Kernels) -> None:
        super().__init__()
        self.n_heads, self.d_k, self.d_v = n_heads, d_k, d_v
        self.kernels = kernels
        self.w_q = nn.Linear(d_model, n_heads * d_k)
        self.w_k = nn.Linear(d_model, n_heads * d_k)
        self.w_v = nn.Linear(d_model, n_heads * d_v)
        self.w_o = nn.Linear(n_heads * d_v, d_model)
        # The last attention weights, kept only when `keep_weights` is set (attention maps).
        self.keep_weights = False
        self.last_weights: torch.Tensor | None = None

    def _project_qkv(
        self, query: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q W^Q, K W^K and V W^V with as few matmuls as the inputs allow, split into heads.

        Self-attention projects one tensor three times, encoder-decoder attention projects the memory twice: the
        weights are concatenated and each input is multiplied once (one matmul instead of three, or of two), and
        under autocast each input is cast once. Same parameters, same values as the separate projections.
        """
        hk, hv = self.n_heads * self.d_k, self.n_heads * self.d_v
        if memory is query:
            weight = torch.cat([self.w_q.weight, self.w_k.weight, self.w_v.weight])  # (2·hk + hv, d_model)
            bias = torch.cat([self.w_q.bias, self.w_k.bias, self.w_v.bias])
            q, k, v = F.linear(query, weight, bias).split([hk, hk, hv], dim=-1)
        else:
            q = self.w_q(query)
            weight = torch.cat([self.w_k.weight, self.w_v.weight])  # (hk + hv, d_model)
            k, v = F.linear(memory, weight, torch.cat([self.w_k.bias, self.w_v.bias])).split([hk, hv], dim=-1)
        # (batch, heads, len, d_k or d_v)
        return self._split_heads(q, self.d_k), self._split_heads(k, self.d_k), self._split_heads(v, self.d_v)

    def _split_heads(self, x: torch.Tensor, d_head: int) -> torch.Tensor:
        # (batch, len, heads·d_head) -> (batch, heads, len, d_head)
        batch, length, _ = x.shape
        return x.unflatten(-1, (self.n_heads, d_head)).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor,
        bias: torch.Tensor | None = None,
        cache: dict[str, torch.Tensor] | None = None,
        static_kv: bool = False,
        causal: bool = False,
    ) -> torch.Tensor:
        """query: (batch, q_len, d_model) attends over memory: (batch, k_len, d_model).

        Self-attention passes the same tensor twice; encoder-decoder attention passes the encoder output as
        memory ("the queries come from the previous decoder layer, and the memory keys and values come from
        the output of the encoder", section 3.2.3). bias: an additive mask (masks.py); causal: query i sees keys
        up to i only (the decoder's self-attention over a whole sequence).
        """
        if cache is None:  # training, or a whole sequence at once
            q, k, v = self._project_qkv(query, memory)
        else:  # incremental decoding: one new position at a time
            q = self._split_heads(self.w_q(query), self.d_k)  # (batch, heads, q_len, d_k)
            if static_kv and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k = self._split_heads(self.w_k(memory), self.d_k)  # (batch, heads, k_len, d_k)
                v = self._split_heads(self.w_v(memory), self.d_v)  # (batch, heads, k_len, d_v)
                if static_kv:  # reused at every step: laid out once as the matmuls read them, not at each step
                    k, v = k.contiguous(), v.contiguous()
                elif "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v

        groups = q.size(0) // k.size(0)
        if groups > 1:  # (batch·g, heads, q_len, d_k) -> (batch, heads, g·q_len, d_k): g rows share one k, v
            q = q.unflatten(0, (k.size(0), groups)).transpose(1, 2).flatten(2, 3)
        if self.keep_weights:  # attention maps: Eq. 1 as written, with its weights
            out, weights = scaled_dot_product_attention(q, k, v, bias, causal)  # (batch, heads, q_len, d_v)
            self.last_weights = _ungroup(weights.detach(), groups)  # (batch·g, heads, q_len, k_len)
        else:
            out = self.kernels.attention(q, k, v, bias, causal)  # (batch, heads, q_len, d_v)
        out = _ungroup(out, groups)  # (batch·g, heads, q_len, d_v)
        batch, _, q_len, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.d_v)  # Concat(head_1..head_h)
        return self.w_o(out)  # (batch, q_len, d_model)


def _ungroup(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, heads, g·q_len, x) -> (batch·g, heads, q_len, x): undoes the grouping of query rows that share one
    memory row (see MultiHeadAttention)."""
    if groups == 1:
        return t
    return t.unflatten(2, (groups, -1)).transpose(1, 2).flatten(0, 1)
