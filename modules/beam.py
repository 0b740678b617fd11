"""Beam search with a length penalty (section 6.1), on the incremental key/value cache.

"We used beam search with a beam size of 4 and length penalty α = 0.6" (section 6.1), the length penalty of
GNMT (Wu et al., 2016, the paper's reference [38]):

    lp(Y) = ((5 + |Y|) / 6)^α,     s(Y, X) = log P(Y | X) / lp(Y)

|Y| counts the output tokens including the final <eos>, whose probability is part of log P(Y | X). (GNMT also has a
coverage penalty; the paper does not mention one, and tensor2tensor, the paper's code, leaves it out.)

The search, per sentence, with K = beam_size:
- A hypothesis is complete when it ends in <eos>. Outputs are at most L = (source length, its <eos> included) +
  max_extra tokens, <eos> included ("maximum output length during inference to input length + 50", section 6.1):
  at the L-th token only <eos> is allowed. This is greedy_search's rule too, and beam 1 at α = 0 is greedy search.
- Each step extends every live hypothesis by every token. Of the K best extensions (by log-probability: they all
  have the same length, so that is also the order of their scores), those ending in <eos> are finished; the K best
  extensions that do not end in <eos> stay live. At the first step all beams would be the same <bos>: only one is
  expanded, so no hypothesis is found twice.
- The nbest best finished hypotheses are kept. A sentence is done when no live hypothesis can beat its nbest-th
  finished one any more: log-probabilities only decrease as tokens are added and lp only grows with length
  (α >= 0), so the best a live hypothesis can still reach is log P(prefix) / lp(L) (tensor2tensor's bound; not
  fairseq's shortcut of stopping at K finished hypotheses, which may stop before the best one is found).
The batch stops when every sentence is done; done sentences leave the batch so later steps do not compute them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modules.transformer import Transformer

NEG_INF = float("-inf")


@dataclass
class Hypothesis:
    """One output sentence of beam search."""

    tokens: list[int]
    """Token ids, without <bos> and <eos>."""

    score: float
    """log P(Y | X) / lp(Y): what beam search ranks by."""

    log_prob: float
    """log P(Y | X), the final <eos> included."""


def length_penalty(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """lp(Y) = ((5 + |Y|) / 6)^α  (GNMT's length penalty, section 6.1: α = 0.6). 1 for one token or for α = 0."""
    return ((5.0 + length) / 6.0) ** alpha


TOP_K_BLOCK = 64  # vocabulary entries per block in top_k


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of scores (rows, vocab) and their columns, largest first, as
    `scores.topk(k, dim=1)` gives them (among equal scores, which column comes first may differ).

    The k largest of a row lie in the k blocks of TOP_K_BLOCK columns with the largest maxima (any other block's
    maximum is below k entries of those), so only those blocks are searched: one maximum per block over the row,
    then a top-k over k blocks: fewer candidates to order than the whole vocabulary.
    """
    rows, vocab = scores.shape
    n_blocks = vocab // TOP_K_BLOCK
    if n_blocks < 2 * k:  # too few blocks to leave most of them out
        return scores.topk(k, dim=1)
    blocked = scores[:, : n_blocks * TOP_K_BLOCK].view(rows, n_blocks, TOP_K_BLOCK)
    maxima = blocked.amax(dim=2)  # (rows, n_blocks)
    if n_blocks * TOP_K_BLOCK < vocab:  # the last, shorter block
        maxima = torch.cat([maxima, scores[:, n_blocks * TOP_K_BLOCK :].amax(dim=1, keepdim=True)], dim=1)
    best = maxima.topk(k, dim=1).indices  # (rows, k) the blocks holding the k largest
    columns = (best[:, :, None] * TOP_K_BLOCK + torch.arange(TOP_K_BLOCK, device=scores.device)).flatten(1)
    candidates = scores.gather(1, columns.clamp(max=vocab - 1))  # (rows, k * TOP_K_BLOCK)
    if n_blocks * TOP_K_BLOCK < vocab:  # the short last block's columns past the vocabulary are no candidates
        candidates = candidates.masked_fill(columns >= vocab, float("-inf"))
    values, positions = candidates.topk(k, dim=1)  # (rows, k)
    return values, columns.gather(1, positions)


@torch.no_grad()
def beam_search(
    model: Transformer,
    src: torch.Tensor,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_extra: int = 50,
    nbest: int = 1,
    use_cache: bool = True,
) -> list[list[Hypothesis]]:
    """Translate a batch: for each sentence, its `nbest` best hypotheses, best first (see the module docstring).

    src: (batch, src_len) right-padded with model.cfg.pad_id. The encoder runs once; with use_cache the decoder
    gets only each step's newest token, its self-attention keys/values of earlier steps come from the cache
    (reordered as beams are pruned) and the encoder-decoder keys/values are computed once per sentence and shared
    by its beams. use_cache=False runs the decoder over every whole prefix at each step instead: the same
    hypotheses, to measure what the cache saves.
    """
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"beam_search: need 1 <= nbest <= beam_size, got nbest={nbest}, beam_size={beam_size}")
    if alpha < 0:
        raise ValueError(f"beam_search: alpha must be >= 0 (the stopping bound assumes it), got {alpha}")
    device, vocab, pad_id = src.device, model.cfg.vocab_size, model.cfg.pad_id
    batch = src.size(0)
    memory, src_bias = model.encode(src)  # (batch, src_len, d_model), (batch, 1, 1, src_len)
    limits = src.ne(pad_id).sum(dim=1) + max_extra  # (batch,) L: longest output, <eos> included
    max_len = int(limits.max())
    best_lp = length_penalty(limits.float(), alpha)  # (batch,) lp(L): the largest penalty a hypothesis can reach
    is_eos = torch.arange(vocab, device=device).eq(eos_id)  # (vocab,)

    # Live hypotheses: `beams` per active sentence (1 at the first step), stored as rows sentence * beams + beam of
    # the decoder's input and self-attention cache; memory, src_bias and the encoder-decoder cache have one row per
    # active sentence. A live row whose log-prob is -inf is an empty slot.
    beams = 1
    ids = torch.arange(batch, device=device)  # (active,) each active sentence's index in src
    live_tokens = torch.empty(batch, 1, 0, dtype=torch.long, device=device)  # (active, beams, step), no <bos>
    live_lp = torch.zeros(batch, 1, device=device)  # (active, beams) log P(prefix | X)
    # Finished hypotheses: the nbest best of each active sentence, best first; a -inf score is an empty slot.
    fin_tokens = torch.full((batch, nbest, max_len), pad_id, dtype=torch.long, device=device)  # without <eos>
    fin_len = torch.zeros(batch, nbest, dtype=torch.long, device=device)
    fin_lp = torch.full((batch, nbest), NEG_INF, device=device)
    fin_score = torch.full((batch, nbest), NEG_INF, device=device)
    results: list[list[Hypothesis] | None] = [None] * batch
    cache = model.new_cache() if use_cache else None

    for step in range(max_len):
        active = ids.numel()
        # 1. log P(next token | prefix, X) for every live row.
        if cache is not None:  # feed only the newest token (<bos> at the first step)
            newest = live_tokens[:, :, -1:] if step else torch.full((active, 1, 1), bos_id, device=device)
            logits = model.decode(newest.reshape(active * beams, 1), memory, src_bias, cache, start=step)
        else:  # the whole prefix, <bos> y_1 .. y_step
            bos = torch.full((active * beams, 1), bos_id, dtype=torch.long, device=device)
            logits = model.decode(torch.cat([bos, live_tokens.reshape(active * beams, step)], 1), memory, src_bias)
        token_lp = F.log_softmax(logits[:, -1], dim=-1, dtype=torch.float32)  # (active * beams, vocab), float32
        # At its sentence's length limit a hypothesis can only end.
        at_limit = step + 1 >= limits  # (active,)
        if bool(at_limit.any()):
            token_lp = token_lp.masked_fill(at_limit.repeat_interleave(beams)[:, None] & ~is_eos, NEG_INF)
        width = min(beam_size, beams * vocab)

        # One topk serves steps 2 and 3: each beam has a single <eos> extension, so at most `beams` <= K of the 2K
        # best end, and the K best that do not end are among them (one topk instead of two). The 2K best
        # extensions of a sentence are among the 2K best tokens of each of its beams: those are found first, row by
        # row, so the prefix log-probs are added to 2K entries per beam, not to the whole vocabulary.
        per_row = min(2 * width, vocab)
        row_lp, row_token = top_k(token_lp, per_row)  # (active * beams, per_row)
        ext_lp = (live_lp.view(-1, 1) + row_lp).view(active, beams * per_row)  # log P of those extensions
        cand_lp, cand_pos = ext_lp.topk(min(2 * width, beams * per_row), dim=1)  # (active, 2K) best first
        # as an index into (beams x vocab): the beam it extends * vocab + its token
        cand_idx = cand_pos.div(per_row, rounding_mode="floor") * vocab + row_token.view(active, -1).gather(1, cand_pos)

        # 2. Of the K best extensions, those ending in <eos> are finished: merged with the finished ones, the
        #    nbest best (by score) kept. Extensions of one step share one length, hence one lp.
        top_lp, top_idx = cand_lp[:, :width], cand_idx[:, :width]  # (active, width)
        ends = top_idx.remainder(vocab).eq(eos_id)
        new_score = torch.where(ends, top_lp / length_penalty(step + 1, alpha), NEG_INF)  # (active, width)
        new_tokens = live_tokens.gather(1, top_idx.div(vocab, rounding_mode="floor")[:, :, None].expand(-1, -1, step))
        new_tokens = F.pad(new_tokens, (0, max_len - step), value=pad_id)  # (active, width, max_len)
        fin_score, keep = torch.cat([fin_score, new_score], 1).topk(nbest, dim=1)  # (active, nbest)
        fin_lp = torch.cat([fin_lp, top_lp], 1).gather(1, keep)
        fin_len = torch.cat([fin_len, torch.full_like(top_lp, step, dtype=torch.long)], 1).gather(1, keep)
        fin_tokens = torch.cat([fin_tokens, new_tokens], 1).gather(1, keep[:, :, None].expand(-1, -1, max_len))

        # 3. The K best extensions that do not end stay live: the first K candidates not ending in <eos> (a stable
        #    sort of the candidates by "ends" keeps their best-first order).
        cand_ends = cand_idx.remainder(vocab).eq(eos_id)  # (active, 2K)
        order = cand_ends.to(torch.uint8).sort(dim=1, stable=True).indices[:, :width]  # (active, width)
        # (with fewer than K that do not end, as at a first step with vocab <= K, the rest are empty -inf slots)
        live_lp, live_idx = cand_lp.masked_fill(cand_ends, NEG_INF).gather(1, order), cand_idx.gather(1, order)
        parent = live_idx.div(vocab, rounding_mode="floor")  # (active, width) the beam each one extends
        parent_tokens = live_tokens.gather(1, parent[:, :, None].expand(-1, -1, step))
        live_tokens = torch.cat([parent_tokens, live_idx.remainder(vocab)[:, :, None]], 2)  # (active, width, step+1)

        # 4. Done: no live hypothesis can beat the nbest-th finished one (live_lp is sorted, best first).
        done = live_lp[:, 0] / best_lp <= fin_score[:, -1]  # (active,)
        if bool(done.any()):
            for row in done.nonzero().flatten().tolist():  # bookkeeping, once per sentence
                results[int(ids[row])] = [
                    Hypothesis(fin_tokens[row, j, : fin_len[row, j]].tolist(), float(fin_score[row, j]), float(lp))
                    for j, lp in enumerate(fin_lp[row].tolist())
                    if fin_score[row, j] > NEG_INF
                ]
            kept = (~done).nonzero().flatten()  # (active',)
            if kept.numel() == 0:
                break
            ids, limits, best_lp = ids[kept], limits[kept], best_lp[kept]
            live_tokens, live_lp, parent = live_tokens[kept], live_lp[kept], parent[kept]
            fin_tokens, fin_len, fin_lp, fin_score = fin_tokens[kept], fin_len[kept], fin_lp[kept], fin_score[kept]
        else:
            kept = None

        # 5. The decoder's rows for the next step: row (sentence, beam) continues its parent's row.
        rows = (torch.arange(active, device=device) if kept is None else kept)[:, None] * beams + parent
        rows = rows.flatten()  # (active' * width,)
        # The encoder side is the same for all beams of a sentence: memory, its padding bias and the cached
        # encoder-decoder keys/values keep one row per active sentence, which the beams' rows share (see
        # MultiHeadAttention), so only a done sentence leaving changes them.
        if kept is not None:
            memory, src_bias = memory.index_select(0, kept), src_bias.index_select(0, kept)
        if cache is not None:
            Transformer.reorder_cache(cache, rows, ("self",))
            if kept is not None:
                Transformer.reorder_cache(cache, kept, ("cross",))
        beams = width

    assert all(r is not None for r in results), "beam_search: a sentence was never finished"
    return results  # type: ignore[return-value]
