"""Turning a batch of encoded pairs into the padded tensors the Transformer consumes (sections 3.1, 3.2.3).

The decoder is trained with teacher forcing: at position t it sees the target tokens before t and predicts
token t. So the target appears twice, shifted by one ("the output embeddings are offset by one position",
section 3.1):
    tgt_in  = [bos] y1 y2 ... yn        what the decoder reads
    tgt_out =  y1   y2 ... yn [eos]     what it must predict
and the source ends with eos so the encoder sees where the sentence stops. Padding goes on the right with
pad_id; the model masks it out in attention and the loss ignores it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def collate_pairs(
    pairs: Sequence[tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]],
    pad_id: int,
    bos_id: int,
    eos_id: int,
) -> dict[str, torch.Tensor | int]:
    """[(src ids, tgt ids), ...] -> {"src": (B, S), "tgt_in": (B, T), "tgt_out": (B, T), token counts}.

    S = longest source + 1 (eos), T = longest target + 1 (bos or eos). n_src_tokens / n_tgt_tokens count the
    non-pad positions of src and tgt_out: the loss is averaged over n_tgt_tokens, and tokens/s is measured
    with them.
    """
    src_len = [len(s) for s, _ in pairs]
    tgt_len = [len(t) for _, t in pairs]
    B, S, T = len(pairs), max(src_len) + 1, max(tgt_len) + 1
    src = np.full((B, S), pad_id, dtype=np.int64)
    tgt_in = np.full((B, T), pad_id, dtype=np.int64)
    tgt_out = np.full((B, T), pad_id, dtype=np.int64)
    for b, (s, t) in enumerate(pairs):
        n, m = src_len[b], tgt_len[b]
        src[b, :n], src[b, n] = s, eos_id  # x1 .. xn eos pad ...
        tgt_in[b, 0], tgt_in[b, 1 : m + 1] = bos_id, t  # bos y1 .. ym pad ...
        tgt_out[b, :m], tgt_out[b, m] = t, eos_id  # y1 .. ym eos pad ...
    return {
        "src": torch.from_numpy(src),  # (B, S)
        "tgt_in": torch.from_numpy(tgt_in),  # (B, T)
        "tgt_out": torch.from_numpy(tgt_out),  # (B, T)
        "n_src_tokens": sum(src_len) + B,  # + one eos per sentence
        "n_tgt_tokens": sum(tgt_len) + B,
    }
