"""The label-smoothed loss (modules/loss.py) computed from the logits' formula, over chunks of token rows, so that the
float32 (tokens x vocab) log-probabilities and their gradient never exist. The device kernels (modules/kernels.py)
choose the chunk sizes: small ones that stay in a CPU core's cache, large ones that keep a GPU's matmuls big."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modules.loss import LabelSmoothedCrossEntropy


@dataclass(frozen=True)
class Chunking:
    """How many (tokens x vocab) elements each pass works on at once.

    matmul_elements: logits projected per matmul (None: all rows in one matmul). elementwise_elements: logits
    turned into their loss and gradient at once, within one projected block.
    """

    matmul_elements: int | None
    elementwise_elements: int

    @staticmethod
    def _slices(rows: int, vocab: int, elements: int | None) -> Iterator[slice]:
        step = rows if elements is None else max(1, elements // vocab)
        return (slice(start, start + step) for start in range(0, rows, step))

    def matmul_slices(self, rows: int, vocab: int) -> Iterator[slice]:
        return self._slices(rows, vocab, self.matmul_elements)

    def elementwise_slices(self, rows: int, vocab: int) -> Iterator[slice]:
        return self._slices(rows, vocab, self.elementwise_elements)


def _lse_and_target_(z: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float32 chunk of logits z (chunk, vocab) and its targets (chunk, 1) -> lse(z) and z_y, each (chunk,), and
    Σ_v exp(z_v - max z) (chunk, 1); z is overwritten by exp(z - max z) (one pass fewer than torch.logsumexp)."""
    top = z.amax(dim=-1, keepdim=True)
    z_y = z.gather(1, label).squeeze(1)
    total = z.sub_(top).exp_().sum(dim=-1, keepdim=True)
    return (total.log() + top).squeeze(1), z_y, total


def _logit_gradient_(
    exp_z: torch.Tensor, total: torch.Tensor | None, label: torch.Tensor, epsilon: float, row_weight: torch.Tensor
) -> torch.Tensor:
    """exp(z - m) of a float32 chunk (chunk, vocab) and its row sums Σ_v exp(z_v - m) (chunk, 1; None: already
    normalized), in place -> row_weight·∂loss/∂z = row_weight·(softmax(z) - (1 - ε)·onehot(y) - ε / V).

    row_weight (chunk,) is 0 on padding rows, which so get no gradient without a pass of their own."""
    weight = row_weight[:, None]  # (chunk, 1)
    exp_z.mul_(weight if total is None else weight / total).sub_(weight * (epsilon / exp_z.size(1)))
    return exp_z.scatter_add_(1, label, weight * -(1.0 - epsilon))


def _sums(lse, z_y, z_mean, real, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(loss sum, nll sum) over the real tokens from per-token lse(z), z_y and mean_v z_v (each (tokens,)):
    -log p_y = lse - z_y, mean_v(-log p_v) = lse - mean_v z_v. Weighted by `real` rather than indexed with it, so a
    GPU never waits for the count of real tokens."""
    nll = ((lse - z_y) * real).sum()
    loss = ((lse - (1.0 - epsilon) * z_y - epsilon * z_mean) * real).sum()
    return loss, nll


class FusedLabelSmoothedCrossEntropy(torch.autograd.Function):
    """The loss of given logits z, written in their terms over chunks of rows:

        -log p_v = lse(z) - z_v, with lse(z) = log Σ_v exp(z_v), so
        loss     = lse(z) - (1 - ε)·z_y - ε·mean_v(z_v)
        ∂loss/∂z = softmax(z) - (1 - ε)·onehot(y) - ε / V

    Forward keeps only lse per token; backward recomputes softmax from the saved logits. Each chunk is upcast to
    float32 only while it is worked on. Used for float16 logits, whose gradient must be formed after the loss scale
    (see `projected_loss`). Returns (loss sum, nll sum); the nll sum has no gradient (it is for perplexity).
    """

    @staticmethod
    def forward(ctx, logits, target, epsilon: float, pad_id: int, chunking: Chunking):  # noqa: ANN001
        vocab = logits.size(-1)
        rows = logits.reshape(-1, vocab)  # (tokens, vocab), the logits' dtype
        labels = target.reshape(-1)  # (tokens,)
        lse = torch.empty(rows.size(0), dtype=torch.float32, device=logits.device)
        z_y, z_sum = torch.empty_like(lse), torch.empty_like(lse)
        for part in chunking.elementwise_slices(rows.size(0), vocab):
            z = rows[part].to(torch.float32, copy=True)  # (chunk, vocab): a copy even of float32 logits
            z_sum[part] = z.sum(dim=-1)
            lse[part], z_y[part], _ = _lse_and_target_(z, labels[part, None])
        real = labels.ne(pad_id).float()  # (tokens,)
        loss, nll = _sums(lse, z_y, z_sum / vocab, real, epsilon)
        ctx.save_for_backward(logits, labels, real, lse)
        ctx.epsilon, ctx.chunking = epsilon, chunking
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_nll: torch.Tensor):  # noqa: ANN001
        logits, labels, real, lse = ctx.saved_tensors
        vocab = logits.size(-1)
        rows = logits.reshape(-1, vocab)
        grad = torch.empty_like(rows)  # (tokens, vocab), the logits' dtype
        row_weight = real * grad_loss  # (tokens,): the upstream gradient, 0 on padding
        for part in ctx.chunking.elementwise_slices(rows.size(0), vocab):
            softmax = rows[part].float().sub_(lse[part, None]).exp_()  # (chunk, vocab)
            grad[part] = _logit_gradient_(softmax, None, labels[part, None], ctx.epsilon, row_weight[part])
        return grad.view(logits.shape), None, None, None, None


class ProjectedLabelSmoothedCrossEntropy(torch.autograd.Function):
    """The output projection z = W h (section 3.4) and the label-smoothed loss of z (the formulas above) in one:

        ∂loss/∂h = (∂loss/∂z) W,   ∂loss/∂W = (∂loss/∂z)ᵀ h,   ∂loss/∂z = softmax(z) - (1 - ε)·onehot(y) - ε / V

    The loss is a sum, so its gradient with respect to the logits is known in forward up to the one scalar the
    backward pass brings: it is formed there, block by block of rows, written over that block's logits, and
    multiplied into ∂/∂h and ∂/∂W at once; backward only scales those two. So only one block of logits exists at a
    time (all of them when `chunking.matmul_elements` is None), and never their float32 log-probabilities.
    mean_v(z_v) is h·mean_v(W_v), a matrix-vector product instead of a pass over the logits. ∂/∂W is computed as
    (hᵀ ∂loss/∂z)ᵀ with hᵀ made contiguous, the operand order oneDNN multiplies fastest.

    hidden: (batch, tgt_len, d_model) and weight: (vocab, d_model) as the model holds them (float32 parameters under
    autocast); both are multiplied in `dtype` (float32 or bf16) and their gradients returned in their own dtypes.
    target: (batch, tgt_len). `need_grad` False (validation) skips the gradient. Returns (loss sum, nll sum) as
    FusedLabelSmoothedCrossEntropy does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, epsilon, pad_id, dtype, need_grad, chunking: Chunking):  # noqa: ANN001
        h = hidden.reshape(-1, hidden.size(-1)).to(dtype)  # (tokens, d_model)
        w = weight.to(dtype)  # (vocab, d_model)
        labels = target.reshape(-1)  # (tokens,)
        real = labels.ne(pad_id).float()  # (tokens,)
        tokens, vocab = h.size(0), w.size(0)
        lse = torch.empty(tokens, dtype=torch.float32, device=h.device)
        z_y = torch.empty_like(lse)
        grad_hidden = torch.empty_like(h) if need_grad else None  # (tokens, d_model)
        grad_weight_t = None  # (d_model, vocab), float32 once summed over several blocks
        for block in chunking.matmul_slices(tokens, vocab):
            z = F.linear(h[block], w)  # (block, vocab): the logits, then ∂loss/∂z in place
            for part in chunking.elementwise_slices(z.size(0), vocab):
                rows, label = z[part], labels[block][part, None]  # (chunk, vocab), (chunk, 1)
                probs = rows.float()  # float32 (the logits themselves if float32), becomes exp(z - max z)
                lse[block][part], z_y[block][part], total = _lse_and_target_(probs, label)
                if need_grad:
                    rows.copy_(_logit_gradient_(probs, total, label, epsilon, real[block][part]))
            if need_grad:
                grad_hidden[block] = z @ w
                part_w = h[block].t().contiguous() @ z  # (d_model, vocab)
                grad_weight_t = part_w if grad_weight_t is None else grad_weight_t.float().add_(part_w)
        z_mean = h.float() @ (w.sum(dim=0, dtype=torch.float32) / vocab)  # (tokens,): mean_v z_v
        loss, nll = _sums(lse, z_y, z_mean, real, epsilon)
        ctx.mark_non_differentiable(nll)
        if need_grad:
            ctx.save_for_backward(grad_hidden.view(hidden.shape), grad_weight_t)
            ctx.dtypes = hidden.dtype, weight.dtype
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_nll: torch.Tensor):  # noqa: ANN001
        grad_hidden, grad_weight_t = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = grad_hidden.to(hidden_dtype) * grad_loss
        # (vocab, d_model) in the weight's dtype and layout in one copy, then scaled
        grad_weight = grad_weight_t.t().to(weight_dtype, memory_format=torch.contiguous_format).mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def projected_loss(
    criterion: LabelSmoothedCrossEntropy,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    chunking: Chunking,
) -> tuple[torch.Tensor, torch.Tensor]:
    """criterion.from_hidden(hidden, weight, target), the same two sums, through the chunked functions above.

    With logits in float32 or bf16 this is ProjectedLabelSmoothedCrossEntropy. float16 projects first and then takes
    FusedLabelSmoothedCrossEntropy: float16's gradient of the logits must be formed after the loss scale is applied,
    or its small probabilities underflow.
    """
    device = hidden.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(hidden.dtype, weight.dtype)
    if dtype not in (torch.float32, torch.bfloat16):
        logits = F.linear(hidden, weight)
        return FusedLabelSmoothedCrossEntropy.apply(logits, target, criterion.epsilon, criterion.pad_id, chunking)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return ProjectedLabelSmoothedCrossEntropy.apply(
            hidden, weight, target, criterion.epsilon, criterion.pad_id, dtype, need_grad, chunking
        )
