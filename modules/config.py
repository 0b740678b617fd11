"""The model's hyperparameters, one field each, documented where they are declared.

Names follow the paper (section 3 and Table 3). The Hydra group `conf/model/` fills this dataclass;
`base.yaml` and `big.yaml` hold the values of Table 3's "base" and "big" rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal


@dataclass
class TransformerConfig:
    vocab_size: int = 37000
    """Size of the shared source/target BPE vocabulary (section 5.1: about 37,000 tokens for WMT14 En-De)."""

    n_layers: int = 6
    """N: identical layers in each of the encoder and decoder stacks (section 3.1)."""

    d_model: int = 512
    """Width of every sub-layer output and of the embeddings (section 3.1)."""

    d_ff: int = 2048
    """Inner width of the position-wise feed-forward network (section 3.3)."""

    n_heads: int = 8
    """h: parallel attention heads (section 3.2.2)."""

    d_k: int | None = None
    """Width of each head's queries and keys; None means d_model / h (section 3.2.2)."""

    d_v: int | None = None
    """Width of each head's values; None means d_model / h (section 3.2.2)."""

    dropout: float = 0.1
    """P_drop: residual dropout on each sub-layer output and on the embedding sums (section 5.4)."""

    positional: Literal["sinusoidal", "learned"] = "sinusoidal"
    """Fixed sinusoids (section 3.5) or learned position embeddings (Table 3, row E)."""

    norm: Literal["post", "pre"] = "post"
    """'post': LayerNorm(x + Dropout(Sublayer(x))) as in the paper; 'pre': x + Dropout(Sublayer(LayerNorm(x)))."""

    share_embeddings: bool = True
    """Tie source embedding, target embedding and pre-softmax projection into one matrix (section 3.4)."""

    init: Literal["fairseq", "xavier"] = "fairseq"
    """How the projections start (the paper does not say; modules/transformer.py): 'fairseq': queries, keys and
    values Glorot-uniform with gain 1/√2, the attention output Glorot-uniform with a zero bias, the feed-forward
    layers PyTorch's Linear default; 'xavier': Glorot-uniform everywhere with zero biases (tensor2tensor's
    uniform_unit_scaling, the paper's code). Embeddings are N(0, d_model^-1/2) either way."""

    max_positions: int = 1024
    """Longest sequence the positional encoding covers (learned embeddings need a fixed table)."""

    pad_id: int = 0
    """Id of the padding token: its embedding is zero and it is masked out of attention and the loss."""

    def __post_init__(self) -> None:
        if self.d_k is None:
            self.d_k = self.d_model // self.n_heads
        if self.d_v is None:
            self.d_v = self.d_model // self.n_heads
        if self.positional not in ("sinusoidal", "learned"):
            raise ValueError(f"model.positional must be 'sinusoidal' or 'learned', got {self.positional!r}")
        if self.init not in ("fairseq", "xavier"):
            raise ValueError(f"model.init must be 'fairseq' or 'xavier', got {self.init!r}")
        if self.norm not in ("post", "pre"):
            raise ValueError(f"model.norm must be 'post' or 'pre', got {self.norm!r}")

    @classmethod
    def from_dict(cls, values: dict) -> TransformerConfig:
        """Build from a (Hydra) mapping, naming any key this dataclass does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)
