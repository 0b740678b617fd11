"""Greedy decoding with the incremental key/value cache (section 6.1 uses beam search, modules/beam.py; greedy is
beam 1)."""

from __future__ import annotations

import torch

from modules.transformer import Transformer


@torch.no_grad()
def greedy_search(
    model: Transformer,
    src: torch.Tensor,
    bos_id: int,
    eos_id: int,
    max_extra: int = 50,
    use_cache: bool = True,
) -> list[list[int]]:
    """Translate a batch by taking the most probable token at each step.

    src: (batch, src_len) right-padded. Each sentence stops at <eos> or after (its source length + max_extra)
    tokens ("maximum output length ... input length + 50", section 6.1), <eos> included: the last one allowed is
    <eos>. Returns token ids without bos/eos. use_cache=False runs the decoder over the whole prefix at every step
    instead of feeding it the newest token (same output; it measures what the cache saves).
    """
    batch = src.size(0)
    memory, src_bias = model.encode(src)  # (batch, src_len, d_model)
    src_lengths = src.ne(model.cfg.pad_id).sum(dim=1)  # (batch,)
    limits = src_lengths + max_extra
    cache = model.new_cache() if use_cache else None
    prefix = torch.full((batch, 1), bos_id, dtype=torch.long, device=src.device)  # (batch, step + 1), <bos> first
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    outputs: list[torch.Tensor] = []
    for step in range(int(limits.max())):
        if cache is not None:  # only the newest token: earlier positions' keys/values are cached
            logits = model.decode(prefix[:, -1:], memory, src_bias, cache, start=step)[:, -1]  # (batch, vocab)
        else:
            logits = model.decode(prefix, memory, src_bias)[:, -1]
        next_token = logits.argmax(dim=-1)
        next_token = torch.where(step + 1 >= limits, torch.full_like(next_token, eos_id), next_token)
        next_token = next_token.masked_fill(finished, eos_id)
        outputs.append(next_token)
        finished |= next_token.eq(eos_id)
        if bool(finished.all()):
            break
        prefix = torch.cat([prefix, next_token[:, None]], dim=1)
    hyps = torch.stack(outputs, dim=1).tolist()  # (batch, out_len)
    return [h[: h.index(eos_id)] if eos_id in h else h for h in hyps]
