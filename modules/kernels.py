"""The device seam: how the model's few device-sensitive operations are computed, chosen once when the model and
the run are built (config key `device.kernels`), never by a device test inside forward.

Three operations differ by device; everything else in modules/ is the paper's formulas in plain PyTorch:
- attention without its weights, softmax(Q Kᵀ / √d_k) V (Eq. 1); attention maps always take Eq. 1 as written;
- dropout in training (section 5.4);
- the pre-softmax projection with the label-smoothed loss (sections 3.4 and 5.4).

Every kernel set computes what the plain one computes (tests/test_kernels.py holds each to it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from modules.attention import scaled_dot_product_attention, softmax_float32
from modules.cpu_kernels import bitmask_dropout, padded_softmax_float32
from modules.fused_loss import Chunking, projected_loss
from modules.loss import LabelSmoothedCrossEntropy

# (q, k, v, additive bias or None, causal) -> output (batch, heads, q_len, d_v)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", bool], torch.Tensor]
# (x, P_drop) -> x with elements dropped, survivors scaled by 1 / (1 - P_drop)
Dropout = Callable[[torch.Tensor, float], torch.Tensor]
# (criterion, hidden (batch, tgt_len, d_model), weight (vocab, d_model), target (batch, tgt_len)) -> (loss, nll) sums
ProjectedLoss = Callable[
    [LabelSmoothedCrossEntropy, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class Kernels:
    """One implementation of each device-sensitive operation."""

    name: str
    attention: Attention
    dropout: Dropout
    projected_loss: ProjectedLoss


def eq1_attention(q, k, v, bias, causal: bool, softmax=softmax_float32) -> torch.Tensor:  # noqa: ANN001
    """Eq. 1 as written (modules/attention.py), its output only."""
    return scaled_dot_product_attention(q, k, v, bias, causal, softmax)[0]


def fused_attention(q, k, v, bias, causal: bool) -> torch.Tensor:  # noqa: ANN001
    """Eq. 1 through torch's fused kernel, which picks flash, cuDNN or memory-efficient attention by device, shapes
    and mask: the (q_len x k_len) weights are never stored. The additive bias is given in the queries' dtype (the
    kernels want one dtype); a causal mask is passed as is_causal, which lets the flash kernel run."""
    mask = bias.to(q.dtype) if bias is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def torch_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p, training=True)


def plain_projected_loss(criterion, hidden, weight, target):  # noqa: ANN001, ANN201
    return criterion.from_hidden(hidden, weight, target)


# CPU: all logits in one matmul (oneDNN's fastest), then 2^20-element chunks (4 MB of float32, about a core's L2)
# so that every elementwise pass runs from cache.
CPU_CHUNKING = Chunking(matmul_elements=None, elementwise_elements=1 << 20)
# GPU: blocks of about 2^27 logits (0.5 GB in float32): a few large matmuls per batch, a few GB less peak memory
# than whole float32 logits.
CUDA_CHUNKING = Chunking(matmul_elements=1 << 27, elementwise_elements=1 << 27)

PLAIN = Kernels("plain", attention=eq1_attention, dropout=torch_dropout, projected_loss=plain_projected_loss)
CPU = Kernels(
    "cpu",
    attention=partial(eq1_attention, softmax=padded_softmax_float32),
    dropout=bitmask_dropout,
    projected_loss=partial(projected_loss, chunking=CPU_CHUNKING),
)
CUDA = Kernels(
    "cuda",
    attention=fused_attention,
    dropout=torch_dropout,
    projected_loss=partial(projected_loss, chunking=CUDA_CHUNKING),
)
KERNELS = {kernels.name: kernels for kernels in (PLAIN, CPU, CUDA)}
CHOICES = ("auto", *KERNELS)


def select_kernels(choice: str, device: torch.device | str) -> Kernels:
    """The kernels `device.kernels` names for a model on `device`: auto picks by the device's type (cpu, cuda; the
    plain ones elsewhere). The CPU kernels draw their dropout masks on the host, so they run on CPUs only."""
    device_type = torch.device(device).type
    if choice == "auto":
        return KERNELS.get(device_type, PLAIN)
    if choice not in KERNELS:
        raise ValueError(f"device.kernels={choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "cpu" and device_type != "cpu":
        raise ValueError(f"device.kernels=cpu runs on CPUs only, and the model is on {device_type}: use auto")
    return KERNELS[choice]
