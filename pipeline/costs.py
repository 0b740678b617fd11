"""What a training run costs, as the planner (`aiayn plan`, pipeline/plan.py), training's throughput callback
(pipeline/callbacks.py) and the benchmarks compute it: the accelerators' peaks, training FLOPs per target token,
model FLOPs utilization, and how an update's tokens are laid out over devices and micro-batches."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from modules.config import TransformerConfig

GB = 1e9  # the ZeRO paper's and the GPU datasheets' unit: 10^9 bytes


# -- hardware ---------------------------------------------------------------------------------------------------
# Model FLOPs utilization (useful FLOPs / peak, Chowdhery et al. 2022, PaLM, appendix B) assumed when
# cluster.mfu is null. GPUs: a typical value for a tuned data-parallel run of a model this size (an assumption;
# the paper's own base step time, section 5.2, gives about the same by this file's formula).
GPU_MFU = 0.4
# The project's CPU host, derived from bench/train_throughput.json (target tokens/s x FLOPs per token / the peak
# below): small matmuls on a few busy cores use little of the peak.
CPU_MFU = 0.004


@dataclass(frozen=True)
class Accelerator:
    peak_flops: float  # dense FLOP/s at `dtype` (no 2:4 sparsity)
    dtype: str  # the number format the peak is quoted for
    memory_gb: float | None  # device memory in 10^9 bytes; None: this host's RAM, read at run time
    mfu: float = GPU_MFU  # utilization assumed when cluster.mfu is null


ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA H200 datasheet, H200 SXM: 1,979 TFLOPS BF16 Tensor Core with sparsity, so 989 dense (the H100 SXM's
    # Hopper tensor cores), 141 GB HBM3e. H200 NVL (PCIe card, lower clocks): 1,671 with sparsity, 141 GB.
    "h200": Accelerator(989e12, "bf16", 141),
    "h200-nvl": Accelerator(835e12, "bf16", 141),
    # NVIDIA H100 SXM5 datasheet: 989 TFLOPS BF16 Tensor Core dense (1,979 with sparsity), 80 GB HBM3.
    "h100": Accelerator(989e12, "bf16", 80),
    # The same datasheet's other H100 boards: H100 PCIe 1,513 TFLOPS BF16 with sparsity, 80 GB HBM2e; H100 NVL
    # 1,671 with sparsity, 94 GB HBM3.
    "h100-pcie": Accelerator(756e12, "bf16", 80),
    "h100-nvl": Accelerator(835e12, "bf16", 94),
    # NVIDIA A100 datasheet: 312 TFLOPS BF16 Tensor Core dense (624 with sparsity), 80 GB (a 40 GB model exists).
    "a100": Accelerator(312e12, "bf16", 80),
    # NVIDIA V100 SXM2 datasheet: 125 TFLOPS FP16 Tensor Core (no bf16), 32 GB (a 16 GB model exists).
    "v100": Accelerator(125e12, "fp16", 32),
    # The same datasheet, V100 PCIe: 112 TFLOPS FP16 Tensor Core, 32 GB (16 GB too).
    "v100-pcie": Accelerator(112e12, "fp16", 32),
    # The paper's own value, Table 2 footnote 5: "We used values of 2.8, 3.7, 6.0 and 9.5 TFLOPS for K80, K40,
    # M40 and P100, respectively" (single precision: the P100 of 2017 trained in fp32). P100 datasheet: 16 GB.
    "p100": Accelerator(9.5e12, "fp32", 16),
    # This project's development host, bf16 matmuls on AMX; the measured peak varies with the shared host's load
    # (bench/train_throughput.json and bench/step_profile.json record it beside each run).
    "cpu": Accelerator(2.5e12, "bf16", None, mfu=CPU_MFU),
}


def accelerator_for_device_name(name: str) -> str | None:
    """The ACCELERATORS key of a CUDA device's name (torch.cuda.get_device_name), None if the table has no entry.

    The name is split into lower-case letter-and-digit tokens, and keys match whole tokens: the model ("h100",
    "a100", ...), then the board where the table has a variant with other clocks ("pcie", "nvl"). So "NVIDIA H100
    80GB HBM3" is h100, "NVIDIA H100 PCIe" h100-pcie, "NVIDIA A100-SXM4-40GB" a100, "NVIDIA H200 NVL" h200-nvl,
    and "NVIDIA GH200 480GB" none of them (no "h200" token; nor is a key's prefix ever taken for the key).
    """
    tokens = re.findall(r"[a-z0-9]+", name.lower())
    model = next((t for t in tokens if t in ACCELERATORS and t != "cpu"), None)
    if model is None:
        return None
    return next((f"{model}-{t}" for t in tokens if f"{model}-{t}" in ACCELERATORS), model)


def device_memory_bytes(accelerator: Accelerator) -> float:
    """Memory of one device in bytes: the datasheet's, or for `cpu` the physical RAM of this host."""
    if accelerator.memory_gb is not None:
        return accelerator.memory_gb * GB
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# -- FLOPs ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flops:
    params: float  # 6 x non-embedding parameters touched per target token
    attention: float  # QK^T and AV of every attention sub-layer, forward + backward
    output: float  # the pre-softmax projection d_model -> vocab, forward + backward

    @property
    def total(self) -> float:
        return self.params + self.attention + self.output


def training_flops_per_target_token(
    model: TransformerConfig, encoder_params: int, decoder_params: int, src_len: float, tgt_len: float
) -> Flops:
    """Training (forward + backward) FLOPs per target token of the encoder-decoder Transformer.

    The usual estimate (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1: C ~ 6N per
    token; 2 FLOPs per multiply-add, backward = 2 x forward), written out for an encoder-decoder:

      params    = 6 * (r * P_enc + P_dec)           P_enc, P_dec: the non-embedding parameter counts of
                                                    pipeline/params.py (weights, biases, LayerNorm gains);
                                                    r = src_len / tgt_len, source tokens per target token (~1):
                                                    the encoder runs once per source token
      attention = 3 * N * 2 * h * (d_k + d_v) * (r * S + T + S)
                                                    per layer and query token, QK^T costs 2*h*d_k*L and AV
                                                    2*h*d_v*L forward (= 2*2*d_model*L at h*d_k = d_model),
                                                    x3 for forward + backward; L = S (mean source length) in
                                                    encoder self-attention (per source token, hence r*S) and
                                                    decoder cross-attention, T (mean target length) in decoder
                                                    self-attention (the masked half is computed too)
      output    = 6 * d_model * vocab               the pre-softmax projection, once per target token

    Counted: every matmul. Assumed: the cross-attention's K/V projections run per target token (they run per
    source token: exact when r = 1), padding adds nothing (batches are length-bucketed). Not counted: softmax,
    LayerNorm, dropout, residual adds and the loss (elementwise, a few FLOPs per activation), the embedding
    lookups (no FLOPs); no activation recomputation is used, so none is added.
    """
    r = src_len / tgt_len
    per_layer_and_context = 3 * 2 * model.n_heads * (model.d_k + model.d_v)  # FLOPs per query token per key
    return Flops(
        params=6 * (r * encoder_params + decoder_params),
        attention=model.n_layers * per_layer_and_context * (r * src_len + tgt_len + src_len),
        output=6 * model.d_model * model.vocab_size,
    )


# -- batch ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    world_size: int  # data-parallel ranks: nodes x GPUs per node
    max_tokens: int  # padded tokens per micro-batch per device (data.max_tokens)
    accumulation: int  # micro-batches per optimizer update
    requested: int | None  # the token budget asked for (train.tokens_per_update); None: not set

    @property
    def tokens_per_update(self) -> int:
        """What an update really holds, at most: max_tokens x world x accumulation (batches are never overfull)."""
        return self.max_tokens * self.world_size * self.accumulation


def accumulation_steps(tokens_per_update: int, max_tokens: int, world_size: int) -> int:
    """Micro-batches per update so that max_tokens x world x accumulation ~ tokens_per_update (at least 1).

    The rule of the trainer (train.tokens_per_update): round(tokens_per_update / (max_tokens x world)).
    """
    return max(1, round(tokens_per_update / (max_tokens * world_size)))


def batch_layout(max_tokens: int, world_size: int, tokens_per_update: int | None, accumulate: int = 1) -> Batch:
    """The update's layout. Without tokens_per_update the run accumulates trainer.accumulate_grad_batches."""
    if not tokens_per_update:
        return Batch(world_size, max_tokens, accumulate, None)
    accumulation = accumulation_steps(tokens_per_update, max_tokens, world_size)
    return Batch(world_size, max_tokens, accumulation, tokens_per_update)


# -- time and cost ----------------------------------------------------------------------------------------------
def step_seconds(flops_per_update: float, world_size: int, peak_flops: float, mfu: float) -> float:
    """One optimizer update at `mfu` (model FLOPs utilization: useful FLOPs / peak, Chowdhery et al. 2022)."""
    return flops_per_update / (world_size * peak_flops * mfu)


def model_flops_utilization(flops_per_token: float, tokens_per_second: float, devices: int, peak_flops: float) -> float:
    """Measured MFU, the inverse of step_seconds: FLOPs per token x tokens/s / (devices x peak)."""
    return flops_per_token * tokens_per_second / (devices * peak_flops)
