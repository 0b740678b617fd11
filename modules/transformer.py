"""The encoder-decoder Transformer (section 3, Figure 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.config import TransformerConfig
from modules.dropout import Dropout
from modules.embedding import LearnedPositionalEmbedding, ScaledEmbedding, SinusoidalPositionalEncoding
from modules.kernels import PLAIN, Kernels
from modules.layers import DecoderLayer, EncoderLayer
from modules.masks import causal_bias, padding_bias

# Per-layer decoding state: {"self": {"k", "v"}, "cross": {"k", "v"}} (see MultiHeadAttention).
DecoderCache = list[dict[str, dict[str, torch.Tensor]]]


def _positional(cfg: TransformerConfig) -> nn.Module:
    if cfg.positional == "learned":
        return LearnedPositionalEmbedding(cfg.d_model, cfg.max_positions)
    return SinusoidalPositionalEncoding(cfg.d_model, cfg.max_positions)


class Encoder(nn.Module):
    """A stack of N identical layers over the embedded source (section 3.1, left half of Figure 1)."""

    def __init__(self, cfg: TransformerConfig, embedding: ScaledEmbedding, kernels: Kernels) -> None:
        super().__init__()
        self.embedding = embedding
        self.positional = _positional(cfg)
        # "we apply dropout to the sums of the embeddings and the positional encodings" (section 5.4)
        self.dropout = Dropout(cfg.dropout, kernels)
        self.layers = nn.ModuleList(EncoderLayer(cfg, kernels) for _ in range(cfg.n_layers))
        # Pre-LN leaves the residual stream un-normalized, so the stack ends with one more LayerNorm.
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()

    def forward(self, src: torch.Tensor, src_bias: torch.Tensor) -> torch.Tensor:
        # src: (batch, src_len) token ids -> (batch, src_len, d_model)
        x = self.embedding(src)
        # .to(x.dtype): DeepSpeed's bf16/fp16 engines cast parameters but keep buffers such as the sinusoid table
        # in fp32, and an fp32 sum would then meet bf16 weights in the first projection.
        x = self.dropout(x + self.positional(src.size(1)).to(x.dtype))
        for layer in self.layers:
            x = layer(x, src_bias)
        return self.final_norm(x)


class Decoder(nn.Module):
    """A stack of N identical layers over the shifted target, attending to the encoder (right half of Figure 1)."""

    def __init__(self, cfg: TransformerConfig, embedding: ScaledEmbedding, kernels: Kernels) -> None:
        super().__init__()
        self.embedding = embedding
        self.positional = _positional(cfg)
        self.dropout = Dropout(cfg.dropout, kernels)
        self.layers = nn.ModuleList(DecoderLayer(cfg, kernels) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()

    def forward(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        src_bias: torch.Tensor,
        cache: DecoderCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """tgt_in: (batch, tgt_len) = <bos> y_1 .. y_{n-1}; returns hidden states (batch, tgt_len, d_model).

        With a cache, tgt_in holds only the newest position(s), `start` is the position of the first of them,
        and the keys/values of earlier positions come from the cache.
        """
        length = tgt_in.size(1)
        y = self.embedding(tgt_in)
        y = self.dropout(y + self.positional(length, start).to(y.dtype))  # dtype: see Encoder.forward
        # One new position sees every cached one and itself: no mask needed. Several positions at once
        # (training, or a prompt) must not see their own future: a whole sequence is causal; new positions after
        # cached ones see all of those and are causal among themselves.
        causal = length > 1 and start == 0
        self_bias = None
        if length > 1 and start > 0:
            past = torch.zeros(1, 1, length, start, device=tgt_in.device)
            self_bias = torch.cat([past, causal_bias(length, tgt_in.device)], dim=-1)
        for i, layer in enumerate(self.layers):
            y = layer(y, memory, self_bias, src_bias, cache[i] if cache is not None else None, causal=causal)
        return self.final_norm(y)


class Transformer(nn.Module):
    """Encoder, decoder and the pre-softmax projection, with three-way weight tying (section 3.4).

    "We share the same weight matrix between the two embedding layers and the pre-softmax linear transformation."
    With `share_embeddings=False` source embeddings, target embeddings and the output projection are separate.

    `kernels` (modules/kernels.py) computes attention, dropout and the projected loss for the device the model runs
    on; the plain ones are the formulas as written. `use_kernels` swaps them (they hold no parameters).
    """

    def __init__(self, cfg: TransformerConfig, kernels: Kernels = PLAIN) -> None:
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
        src_embedding = ScaledEmbedding(cfg.vocab_size, cfg.d_model, cfg.pad_id)
        tgt_embedding = (
            src_embedding if cfg.share_embeddings else ScaledEmbedding(cfg.vocab_size, cfg.d_model, cfg.pad_id)
        )
        self.encoder = Encoder(cfg, src_embedding, kernels)
        self.decoder = Decoder(cfg, tgt_embedding, kernels)
        self.output_projection: nn.Linear | None = None
        if not cfg.share_embeddings:
            self.output_projection = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            nn.init.normal_(self.output_projection.weight, mean=0.0, std=cfg.d_model**-0.5)
        self._init_linear_layers()

    def use_kernels(self, kernels: Kernels) -> Transformer:
        """Compute with `kernels` from now on, in every layer."""
        for module in self.modules():
            if hasattr(module, "kernels"):
                module.kernels = kernels
        return self

    def _init_linear_layers(self) -> None:
        # The paper is silent on initialization. fairseq's scaled start (cfg.init "fairseq": smaller query, key,
        # value and feed-forward weights) learns far more per early update than Glorot-uniform everywhere, the
        # tensor2tensor start this model had before (bench/quality_per_update.json).
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear) or name == "output_projection":
                continue
            role = name.rsplit(".", 1)[-1]
            if self.cfg.init == "xavier":
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif role in ("w_q", "w_k", "w_v"):
                nn.init.xavier_uniform_(module.weight, gain=2**-0.5)  # bias: PyTorch's default, as fairseq's
            elif role == "w_o":
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            # w_1, w_2 (Eq. 2): PyTorch's Linear default, U(±1/√fan_in) for weight and bias

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src: (batch, src_len) -> memory (batch, src_len, d_model) and its padding bias (batch, 1, 1, src_len)."""
        src_bias = padding_bias(src, self.cfg.pad_id)
        return self.encoder(src, src_bias), src_bias

    @property
    def output_weight(self) -> torch.Tensor:
        """The pre-softmax linear transformation's weight, (vocab, d_model): the shared embedding when tied."""
        if self.output_projection is not None:
            return self.output_projection.weight
        return self.decoder.embedding.weight

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-softmax linear transformation: (..., d_model) -> logits (..., vocab)."""
        return F.linear(hidden, self.output_weight)

    def decode(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        src_bias: torch.Tensor,
        cache: DecoderCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Logits for the next token at each position of tgt_in: (batch, tgt_len, vocab)."""
        return self.project(self.decoder(tgt_in, memory, src_bias, cache, start))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits: src (batch, src_len), tgt_in (batch, tgt_len) -> (batch, tgt_len, vocab)."""
        return self.project(self.features(src, tgt_in))

    def features(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder output before the projection: (batch, tgt_len, d_model). Training gives it to
        `kernels.projected_loss` with `output_weight`, which projects it itself."""
        memory, src_bias = self.encode(src)
        return self.decoder(tgt_in, memory, src_bias)

    def new_cache(self) -> DecoderCache:
        """Empty per-layer key/value cache for incremental decoding."""
        return [{"self": {}, "cross": {}} for _ in self.decoder.layers]

    @staticmethod
    def reorder_cache(
        cache: DecoderCache, order: torch.Tensor, kinds: tuple[str, ...] = ("self", "cross")
    ) -> DecoderCache:
        """Select/reorder the batch rows of the cached tensors of `kinds` (used when beams are pruned).

        order: (new_rows,) row indices into the current rows. Beam search reorders only "self" while the rows stay
        the same sentences' beams: the encoder-decoder keys/values of a sentence are the same for all its beams.
        """
        for layer in cache:
            for kind in kinds:
                for key, tensor in layer[kind].items():
                    layer[kind][key] = tensor.index_select(0, order)
        return cache

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters, each shared tensor counted once, split into embedding / encoder / decoder."""
        seen: set[int] = set()
        counts = {"embedding": 0, "encoder": 0, "decoder": 0}
        for name, p in self.named_parameters():  # named_parameters() already yields a tied tensor once
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if "embedding" in name or name.startswith("output_projection"):
                part = "embedding"
            else:
                part = name.split(".")[0]
            counts[part] += p.numel()
        return {"params": sum(counts.values()), **counts}
