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

    `fused=True` computes the same numbers with `FusedLabelSmoothedCrossEntropy` below, which never stores the
    (tokens x vocab) float32 log-probabilities: the largest tensor of a small model's step.
    """

    def __init__(self, epsilon: float, pad_id: int, fused: bool = False) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.pad_id = pad_id
        self.fused = fused

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: (batch, tgt_len, vocab); target: (batch, tgt_len).

        Returns (smoothed loss summed over real tokens, negative log-likelihood summed over real tokens); the
        second gives perplexity, which label smoothing would otherwise distort.
        """
        if self.fused:
            return FusedLabelSmoothedCrossEntropy.apply(logits, target, self.epsilon, self.pad_id)
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (batch, tgt_len, vocab), float32 even under bf16
        nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (batch, tgt_len)
        uniform = -log_probs.mean(dim=-1)  # (batch, tgt_len): cross-entropy against the uniform distribution
        real = target.ne(self.pad_id)
        nll = nll.masked_fill(~real, 0.0).sum()
        uniform = uniform.masked_fill(~real, 0.0).sum()
        return (1.0 - self.epsilon) * nll + self.epsilon * uniform, nll


class FusedLabelSmoothedCrossEntropy(torch.autograd.Function):
    """The same loss written in terms of the logits z of each real target token, over row chunks:

        -log p_v = lse(z) - z_v, with lse(z) = log Σ_v exp(z_v), so
        loss     = lse(z) - (1 - ε)·z_y - ε·mean_v(z_v)
        ∂loss/∂z = softmax(z) - (1 - ε)·onehot(y) - ε / V

    Forward keeps only lse per token; backward recomputes softmax from the saved logits. Each chunk of rows is
    upcast to float32 while it is worked on, so the float32 (tokens x vocab) tensors of the plain version (the
    log-probabilities, their gradient) never exist whole, and padding rows are skipped. Returns (loss sum, nll sum);
    the nll sum has no gradient (it is for perplexity).
    """

    CHUNK_ROWS = 512  # 512 x 8000 float32 = 16 MB per chunk: about what a core's share of cache can hold

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, epsilon: float, pad_id: int):  # noqa: ANN001
        vocab = logits.size(-1)
        real = target.reshape(-1).ne(pad_id).nonzero().squeeze(1)  # (n_real,) rows that are not padding
        rows = logits.reshape(-1, vocab).index_select(0, real)  # (n_real, vocab), the logits' dtype
        labels = target.reshape(-1).index_select(0, real)  # (n_real,)
        lse = torch.empty(rows.size(0), dtype=torch.float32, device=logits.device)
        z_y = torch.empty_like(lse)
        z_mean = torch.empty_like(lse)
        for start in range(0, rows.size(0), FusedLabelSmoothedCrossEntropy.CHUNK_ROWS):
            part = slice(start, start + FusedLabelSmoothedCrossEntropy.CHUNK_ROWS)
            z = rows[part].float()  # (chunk, vocab)
            lse[part] = torch.logsumexp(z, dim=-1)
            z_y[part] = z.gather(1, labels[part, None]).squeeze(1)
            z_mean[part] = z.mean(dim=-1)
        nll = (lse - z_y).sum()
        loss = (lse - (1.0 - epsilon) * z_y - epsilon * z_mean).sum()
        ctx.save_for_backward(rows, labels, real, lse)
        ctx.epsilon, ctx.shape = epsilon, logits.shape
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_nll: torch.Tensor):  # noqa: ANN001
        rows, labels, real, lse = ctx.saved_tensors
        epsilon, vocab = ctx.epsilon, ctx.shape[-1]
        grad_rows = torch.empty_like(rows)  # (n_real, vocab), the logits' dtype
        for start in range(0, rows.size(0), FusedLabelSmoothedCrossEntropy.CHUNK_ROWS):
            part = slice(start, start + FusedLabelSmoothedCrossEntropy.CHUNK_ROWS)
            g = torch.exp(rows[part].float() - lse[part, None])  # softmax(z), (chunk, vocab)
            g -= epsilon / vocab
            g.scatter_add_(1, labels[part, None], torch.full_like(lse[part, None], -(1.0 - epsilon)))
            grad_rows[part] = g.mul_(grad_loss)  # cast to the logits' dtype on assignment
        grad = torch.zeros(ctx.shape[:-1].numel(), vocab, dtype=rows.dtype, device=rows.device)
        grad.index_copy_(0, real, grad_rows)
        return grad.view(ctx.shape), None, None, None
