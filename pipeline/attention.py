"""`aiayn attention "<sentence>"`: heatmaps of the attention weights (Eq. 1) a trained model gives one sentence.

    aiayn attention "A man rides a bike." run.dir=<run> [overrides...]
    aiayn attention "A man rides a bike." --target "Ein Mann fährt Fahrrad." run.dir=<run>

The sentence is translated with greedy search unless --target gives the target side; then one teacher-forced
forward pass of (source + <eos>, <bos> + target) is watched (modules/attention_maps.py) and every layer's weights
are drawn: one PNG per attention kind and layer, one heatmap per head, the BPE pieces on the axes (queries down,
keys across). Written to attention.output_dir, by default <run.dir>/attention/<slug of the sentence>/:

    encoder_self-layer1.png .. encoder_self-layerN.png   source over source
    decoder_self-layer1.png .. decoder_self-layerN.png   target over earlier target (the upper triangle is masked)
    cross-layer1.png .. cross-layerN.png                 target over source (encoder-decoder attention)
    weights.npz      the drawn arrays, "<kind>.layer<k>" each (heads, queries, keys), with the pieces and ids

Layer k is model.encoder/decoder.layers[k-1]. The model is the one `aiayn evaluate` uses (evaluate.checkpoint,
else <run.dir>/averaged.ckpt, else checkpoints/last.ckpt), with the run folder's BPE model (pipeline/runs.py). The
same figures are logged to W&B at each validation (pipeline/callbacks.py, AttentionImages).

Figures are matplotlib `Figure` objects with an Agg canvas, made without pyplot: pyplot keeps every figure in a
global registry until plt.close, a leak in a long training run; these are freed like any object, and no display
is ever needed.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig

from data.tokenizer import Tokenizer
from modules.attention_maps import KINDS, AttentionMaps, pair_attention
from modules.search import greedy_search
from modules.transformer import Transformer
from pipeline.inference import check_bpe_model, check_vocabulary, load_model, load_tokenizer
from pipeline.runs import require_run_dir, resolve_checkpoint

TITLES = {
    "encoder_self": "encoder self-attention",
    "decoder_self": "decoder self-attention (masked)",
    "cross": "encoder-decoder attention",
}
# (query side, key side) of each kind
SIDES = {"encoder_self": ("source", "source"), "decoder_self": ("target", "target"), "cross": ("target", "source")}
HEADS_PER_ROW = 4
INCHES_PER_TOKEN = 0.22  # a row or column of a heatmap: room for one 7-point tick label


@dataclass
class SentenceAttention:
    """One sentence pair and the attention weights the model gives it."""

    source: str
    target: str  # --target, or the greedy translation
    greedy: bool  # True: target is the model's own greedy translation
    src_ids: list[int]  # x_1 .. x_m <eos>
    tgt_in_ids: list[int]  # <bos> y_1 .. y_n, the decoder's input
    src_pieces: list[str]
    tgt_pieces: list[str]
    maps: AttentionMaps  # {kind: [(heads, queries, keys) per layer]}


def sentence_attention(
    model: Transformer, tokenizer: Tokenizer, source: str, target: str | None = None, max_extra: int = 50
) -> SentenceAttention:
    """Translate `source` (greedy, unless `target` is given) and collect every layer's attention for the pair."""
    src_ids = tokenizer.encode([source])[0] + [tokenizer.eos_id]  # the source ends with <eos>, as in training
    greedy = target is None
    if greedy:
        # Greedy search is beam search with a beam of 1 (section 6.1 uses 4): the model's own best guess, one
        # token at a time. The weights are then read from a teacher-forced pass over that translation, which
        # gives exactly the weights each decoding step saw (causal masking: no position sees later ones).
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        src = torch.tensor([src_ids], dtype=torch.long, device=device)  # (1, src_len)
        (tgt_ids,) = greedy_search(model, src, tokenizer.bos_id, tokenizer.eos_id, max_extra=max_extra)
        model.train(was_training)
        target = tokenizer.decode([tgt_ids])[0]
    else:
        tgt_ids = tokenizer.encode([target])[0]
    tgt_in_ids = [tokenizer.bos_id, *tgt_ids]
    return SentenceAttention(
        source=source,
        target=target,
        greedy=greedy,
        src_ids=src_ids,
        tgt_in_ids=tgt_in_ids,
        src_pieces=tokenizer.pieces(src_ids),
        tgt_pieces=tokenizer.pieces(tgt_in_ids),
        maps=pair_attention(model, src_ids, tgt_in_ids),
    )


def attention_figure(weights: torch.Tensor, query_labels: list[str], key_labels: list[str], title: str) -> Figure:
    """One heatmap per head of weights (heads, queries, keys): rows are queries, columns keys, colour 0..1.

    Heads sit HEADS_PER_ROW to a row and share their axes: query pieces label the first column, key pieces the
    bottom row. Panels are placed at fixed sizes in inches rather than by matplotlib's constrained layout, which
    measures the extent of every tick label, more than once, for a layout that fixed sizes give directly.
    """
    heads, n_queries, n_keys = weights.shape
    cols = min(heads, HEADS_PER_ROW)
    rows = math.ceil(heads / cols)
    # Sizes in inches: a 7-point character is about 0.06 in wide; a panel gets INCHES_PER_TOKEN per row/column.
    label_room = 0.25 + 0.065 * max(len(label) for label in [*query_labels, *key_labels, "x"])
    panel_w, panel_h = max(1.6, INCHES_PER_TOKEN * n_keys), max(1.6, INCHES_PER_TOKEN * n_queries)
    gap, head_title, top, bar = 0.2, 0.3, 0.7, 0.9
    # At least as wide as the title's longest line (10-point characters, about 0.075 in each).
    title_width = 0.4 + 0.075 * max(len(line) for line in title.splitlines())
    width = max(label_room + cols * panel_w + (cols - 1) * gap + bar, title_width)
    height = top + rows * (head_title + panel_h) + label_room
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # headless: renders to PNG, never to a screen
    image = None
    for head in range(heads):
        row, col = divmod(head, cols)
        left = label_room + col * (panel_w + gap)
        bottom = label_room + (rows - 1 - row) * (head_title + panel_h)
        ax = fig.add_axes((left / width, bottom / height, panel_w / width, panel_h / height))
        image = ax.imshow(
            weights[head].numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest"
        )
        last_row = row == rows - 1 or head + cols >= heads  # nothing below this panel
        ax.set_xticks(range(n_keys), key_labels if last_row else [], rotation=90, fontsize=7)
        ax.set_yticks(range(n_queries), query_labels if col == 0 else [], fontsize=7)
        ax.set_title(f"head {head + 1}", fontsize=9)
    bar_left = label_room + cols * panel_w + (cols - 1) * gap + 0.2
    bar_axes = fig.add_axes((bar_left / width, label_room / height, 0.15 / width, panel_h / height))
    fig.colorbar(image, cax=bar_axes, label="attention weight")
    fig.suptitle(title, y=1 - 0.15 / height, va="top", fontsize=10)
    return fig


def attention_figures(att: SentenceAttention) -> Iterator[tuple[str, int, Figure]]:
    """(kind, layer from 1, figure) for every attention kind and layer, drawn one at a time."""
    pieces = {"source": att.src_pieces, "target": att.tgt_pieces}
    for kind in KINDS:
        query_side, key_side = SIDES[kind]
        layers = att.maps[kind]
        for index, weights in enumerate(layers):
            title = f"{TITLES[kind]}, layer {index + 1} of {len(layers)}\n{query_side} (rows) over {key_side} (columns)"
            yield kind, index + 1, attention_figure(weights, pieces[query_side], pieces[key_side], title)


def slug(source: str, target: str | None = None) -> str:
    """A folder name for a sentence: its first words, and a hash that tells sentences (and targets) apart."""
    words = re.sub(r"\W+", "-", source.lower()).strip("-")[:40].rstrip("-") or "empty"
    digest = hashlib.sha256(f"{source}\n{target or ''}".encode()).hexdigest()[:8]
    return f"{words}-{digest}"


def write_attention(att: SentenceAttention, out_dir: Path) -> list[Path]:
    """The PNGs (one per kind and layer) and weights.npz in out_dir; returns their paths, the .npz last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, layer, fig in attention_figures(att):
        path = out_dir / f"{kind}-layer{layer}.png"
        fig.savefig(path)
        paths.append(path)
    arrays = {f"{kind}.layer{i + 1}": w.numpy() for kind in KINDS for i, w in enumerate(att.maps[kind])}
    npz = out_dir / "weights.npz"
    np.savez(
        npz,
        **arrays,
        src_pieces=np.array(att.src_pieces),
        tgt_pieces=np.array(att.tgt_pieces),
        src_ids=np.array(att.src_ids),
        tgt_in_ids=np.array(att.tgt_in_ids),
        source=np.array(att.source),
        target=np.array(att.target),
    )
    return [*paths, npz]


def main(cfg: DictConfig, sentence: str, target: str | None = None) -> list[Path]:
    run_dir = require_run_dir(cfg, "attention")
    checkpoint_path = resolve_checkpoint(cfg, run_dir)
    model, checkpoint = load_model(checkpoint_path)
    tokenizer = load_tokenizer(cfg, run_dir)
    check_vocabulary(model, tokenizer, checkpoint_path, "attention")
    check_bpe_model(checkpoint, tokenizer, checkpoint_path)
    att = sentence_attention(model, tokenizer, sentence, target, max_extra=int(cfg.evaluate.max_extra))
    chosen = cfg.attention.get("output_dir")
    out_dir = Path(chosen).expanduser() if chosen else run_dir / "attention" / slug(sentence, target)
    paths = write_attention(att, out_dir.resolve())
    step = checkpoint.get("global_step")
    print(f"SRC {att.source}\n{'HYP' if att.greedy else 'TGT'} {att.target}")
    print(f"attention of {checkpoint_path.name} (step {step}): {len(paths) - 1} figures, weights in {paths[-1].name}")
    for path in paths:
        print(path)
    return paths
