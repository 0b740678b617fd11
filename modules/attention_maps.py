"""The attention weights softmax(Q Kᵀ / √d_k) of Eq. 1, read out of a model for a (source, target) pair.

Every MultiHeadAttention keeps its last weights when its `keep_weights` flag is set (modules/attention.py). Here
the flag is set on all of them for one teacher-forced forward pass, the weights are collected by kind and layer,
and the flags are put back: nothing in the model's computation changes, it is only watched.

The three kinds of attention of section 3.2.3:
    encoder_self   (batch, heads, src_len, src_len)  each source position over the source
    decoder_self   (batch, heads, tgt_len, tgt_len)  each target position over itself and earlier ones (masked)
    cross          (batch, heads, tgt_len, src_len)  encoder-decoder attention: target queries, source keys
Rows are queries, columns keys. The target side is the decoder's input, <bos> y_1 .. y_n: row i is the position
that predicts y_{i+1} (section 3.1: "the output embeddings are offset by one position").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from modules.attention import MultiHeadAttention
from modules.transformer import Transformer

KINDS = ("encoder_self", "decoder_self", "cross")

# {kind: [one tensor per layer, first layer first]}
AttentionMaps = dict[str, list[torch.Tensor]]


def attention_modules(model: Transformer) -> dict[str, list[MultiHeadAttention]]:
    """The model's MultiHeadAttention modules by kind, in layer order."""
    return {
        "encoder_self": [layer.self_attn for layer in model.encoder.layers],
        "decoder_self": [layer.self_attn for layer in model.decoder.layers],
        "cross": [layer.cross_attn for layer in model.decoder.layers],
    }


@contextmanager
def keeping_attention_weights(model: Transformer) -> Iterator[dict[str, list[MultiHeadAttention]]]:
    """Within the block every attention module keeps its last weights (`last_weights`); afterwards each module's
    `keep_weights` and `last_weights` are what they were before, even if the block raised."""
    modules = attention_modules(model)
    saved = [(m, m.keep_weights, m.last_weights) for kind in KINDS for m in modules[kind]]
    try:
        for m, _, _ in saved:
            m.keep_weights, m.last_weights = True, None
        yield modules
    finally:
        for m, keep, last in saved:
            m.keep_weights, m.last_weights = keep, last


@torch.no_grad()
def collect_attention(model: Transformer, src: torch.Tensor, tgt_in: torch.Tensor) -> AttentionMaps:
    """The attention weights of one teacher-forced forward pass, by kind and layer, as float32 on the CPU.

    src: (batch, src_len) source ids ending with <eos>, right-padded; tgt_in: (batch, tgt_len) = <bos> y_1 .. y_n,
    right-padded. Runs in eval mode (no dropout: the weights are the ones inference uses) and restores the
    model's mode. Padded key positions get weight exactly 0 (modules/masks.py), and so do future positions in
    decoder self-attention.
    """
    was_training = model.training
    model.eval()
    try:
        with keeping_attention_weights(model) as modules:
            model(src, tgt_in)
            # Under bf16 the weights are bf16; float32 for plotting and saving.
            return {kind: [m.last_weights.float().cpu() for m in modules[kind]] for kind in KINDS}
    finally:
        model.train(was_training)


def pair_attention(model: Transformer, src_ids: list[int], tgt_in_ids: list[int]) -> AttentionMaps:
    """collect_attention for one pair given as id lists (no padding): each map (heads, q_len, k_len)."""
    device = next(model.parameters()).device
    src = torch.tensor([src_ids], dtype=torch.long, device=device)  # (1, src_len)
    tgt_in = torch.tensor([tgt_in_ids], dtype=torch.long, device=device)  # (1, tgt_len)
    maps = collect_attention(model, src, tgt_in)
    return {kind: [w[0] for w in layers] for kind, layers in maps.items()}
