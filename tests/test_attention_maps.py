"""Attention maps: the weights read out of a model (modules/attention_maps.py), the figures drawn from them and
`aiayn attention` (pipeline/attention.py), and the images logged to W&B at validation (pipeline/callbacks.py).

References are independent of the code under test: the weights are recomputed by hand in float64 from a layer's
own input and parameters (softmax((x W_q)(x W_k)ᵀ / √d_k), masked); the pieces come from SentencePiece itself;
the figures are read back through matplotlib's own image arrays and tick labels; the W&B images from the offline
run's files. Models are tiny and seeded; the data and the trained-looking checkpoint are the session's shared
tiny run (tests/tiny_run.py: data=tiny, a 400-piece BPE; fixtures `tiny` and `hand_made_run` in conftest.py).
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from wandb_records import offline_runs

from data import Tokenizer
from modules.attention_maps import KINDS, attention_modules, collect_attention, keeping_attention_weights
from modules.config import TransformerConfig
from modules.search import greedy_search
from modules.transformer import Transformer
from pipeline import cli
from pipeline.attention import attention_figures, sentence_attention, slug, write_attention
from pipeline.callbacks import AttentionImages
from pipeline.config import load_config
from pipeline.inference import load_model

VOCAB = 400  # tests/tiny_run.py's model.vocab_size, the BPE size of data=tiny
SOURCE, TARGET = "two red dogs run", "zwei rote Hunde laufen"


@pytest.fixture(scope="module")
def spm_model(tiny: dict) -> Path:
    """The BPE model of the session's prepared data=tiny."""
    return tiny["dataset_dir"] / "spm.model"


def _model(seed: int = 0, **cfg) -> Transformer:
    torch.manual_seed(seed)
    values = dict(vocab_size=VOCAB, n_layers=2, d_model=32, d_ff=64, n_heads=4, dropout=0.3)
    return Transformer(TransformerConfig(**{**values, **cfg}))


def _by_hand(query: torch.Tensor, memory: torch.Tensor, attn, head: int, masked: torch.Tensor) -> torch.Tensor:
    """softmax((query W_q)(memory W_k)ᵀ / √d_k) of one head in float64, masked positions set to -inf first.

    query (batch, q_len, d_model), memory (batch, k_len, d_model), masked: bool broadcastable to (batch, q_len,
    k_len). Returns (batch, q_len, k_len)."""
    rows = slice(head * attn.d_k, (head + 1) * attn.d_k)  # head i's columns of the side-by-side W^Q, W^K
    w_q, b_q = attn.w_q.weight[rows].double(), attn.w_q.bias[rows].double()
    w_k, b_k = attn.w_k.weight[rows].double(), attn.w_k.bias[rows].double()
    q = query.double() @ w_q.T + b_q
    k = memory.double() @ w_k.T + b_k
    scores = (q @ k.transpose(1, 2) / math.sqrt(attn.d_k)).masked_fill(masked, float("-inf"))
    return torch.softmax(scores, dim=-1)


def test_collected_weights_are_the_models_own():
    """A padded batch of 2: shapes, rows summing to 1, exact zeros where masked, equality with a by-hand
    recomputation for each kind, equality with each sentence alone, and the model left as it was."""
    model = _model().train()  # dropout on: the collection must use eval mode and put training mode back
    src = torch.tensor([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0]])  # (2, 5): the second sentence has 2 pad positions
    tgt_in = torch.tensor([[2, 11, 12, 13], [2, 14, 0, 0]])  # (2, 4)
    sentinel = torch.ones(1)
    enc0 = model.encoder.layers[0].self_attn
    enc0.keep_weights, enc0.last_weights = True, sentinel

    inputs = {}  # what layer 1 of each stack received, captured by hooks
    hooks = [
        model.encoder.layers[1].register_forward_pre_hook(lambda m, args: inputs.update(enc=args[0])),
        model.decoder.layers[1].register_forward_pre_hook(lambda m, args: inputs.update(dec=args[0], mem=args[1])),
        model.decoder.layers[1].cross_attn.register_forward_pre_hook(lambda m, args: inputs.update(cross=args[0])),
    ]
    maps = collect_attention(model, src, tgt_in)
    for hook in hooks:
        hook.remove()

    assert model.training and enc0.keep_weights and enc0.last_weights is sentinel
    others = [m for kind in KINDS for m in attention_modules(model)[kind] if m is not enc0]
    assert len(others) == 5 and all(not m.keep_weights and m.last_weights is None for m in others)

    shapes = {"encoder_self": (2, 4, 5, 5), "decoder_self": (2, 4, 4, 4), "cross": (2, 4, 4, 5)}
    for kind in KINDS:
        assert [tuple(w.shape) for w in maps[kind]] == [shapes[kind]] * 2, kind
        for w in maps[kind]:
            assert w.dtype == torch.float32
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), rtol=0, atol=1e-6)
            if kind != "decoder_self":
                assert torch.all(w[1, :, :, 3:] == 0), kind  # the second source's padding, for every query
    seen = torch.ones(4, 4, dtype=torch.bool).tril()  # each position and the earlier ones
    for w in maps["decoder_self"]:
        assert torch.all(w[..., ~seen] == 0)  # no position sees a later one (section 3.2.3)
        assert torch.all(w[..., seen] > 0)  # and every earlier one gets some weight: the zeros are the mask's

    # By hand, in float64, from layer 1's inputs (post-norm: each sub-layer reads the layer's input itself).
    pad_keys = src.eq(0)[:, None, :]  # (batch, 1, src_len)
    future = torch.ones(4, 4, dtype=torch.bool).triu(diagonal=1)[None]  # (1, tgt_len, tgt_len)
    enc, dec = model.encoder.layers[1], model.decoder.layers[1]
    for head in range(4):
        expected = {
            "encoder_self": _by_hand(inputs["enc"], inputs["enc"], enc.self_attn, head, pad_keys),
            "decoder_self": _by_hand(inputs["dec"], inputs["dec"], dec.self_attn, head, future),
            "cross": _by_hand(inputs["cross"], inputs["mem"], dec.cross_attn, head, pad_keys),
        }
        for kind, weights in expected.items():
            torch.testing.assert_close(maps[kind][1][:, head].double(), weights, rtol=1e-5, atol=1e-6, msg=kind)

    # The short sentence alone: the same weights over its real positions (padding changes nothing).
    alone = collect_attention(model, src[1:, :3], tgt_in[1:, :2])
    for kind in KINDS:
        for batched, single in zip(maps[kind], alone[kind], strict=True):
            q, k = single.shape[-2:]
            torch.testing.assert_close(batched[1:, :, :q, :k], single, rtol=1e-5, atol=1e-6)

    # Watching changes nothing: the same logits with and without the flags.
    model.eval()
    with torch.no_grad():
        plain = model(src, tgt_in)
        with keeping_attention_weights(model):
            watched = model(src, tgt_in)
    assert torch.equal(plain, watched)


def _pieces(spm_model: Path, text: str) -> list[str]:
    """SentencePiece's own pieces of a text."""
    return spm.SentencePieceProcessor(model_file=str(spm_model)).encode(text, out_type=str)


def test_figures_draw_the_weights_with_the_pieces_on_the_axes(spm_model: Path, tmp_path: Path):
    """Five heads (a second row of panels): each panel's image array is that head's weights, the first column is
    labelled with the query pieces, the panels with nothing below them with the key pieces; the files written are
    one PNG per kind and layer, of the figure's size, and weights.npz holds the same arrays."""
    tokenizer = Tokenizer(spm_model)
    model = _model(seed=1, d_model=20, n_heads=5).eval()
    att = sentence_attention(model, tokenizer, SOURCE, target=TARGET)
    src_pieces = [*_pieces(spm_model, SOURCE), "<eos>"]
    tgt_pieces = ["<bos>", *_pieces(spm_model, TARGET)]
    assert att.src_pieces == src_pieces and att.tgt_pieces == tgt_pieces and not att.greedy
    assert len(src_pieces) > 4 and len(tgt_pieces) > 4  # several pieces: the checks below can tell them apart
    # The maps are those of a teacher-forced pass over exactly these ids.
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    src_ids, tgt_in_ids = [*sp.encode(SOURCE), 3], [2, *sp.encode(TARGET)]
    assert (att.src_ids, att.tgt_in_ids) == (src_ids, tgt_in_ids)
    reference = collect_attention(model, torch.tensor([src_ids]), torch.tensor([tgt_in_ids]))

    labels = {"encoder_self": (src_pieces, src_pieces), "decoder_self": (tgt_pieces, tgt_pieces)}
    labels["cross"] = (tgt_pieces, src_pieces)
    figures = list(attention_figures(att))
    assert [(kind, layer) for kind, layer, _ in figures] == [(k, n) for k in KINDS for n in (1, 2)]
    for kind, layer, fig in figures:
        panels = [ax for ax in fig.axes if ax.get_title().startswith("head")]
        assert [ax.get_title() for ax in panels] == [f"head {h}" for h in range(1, 6)]
        assert f"layer {layer} of 2" in fig.get_suptitle()
        queries, keys = labels[kind]
        for head, ax in enumerate(panels):
            drawn = np.asarray(ax.images[0].get_array())
            np.testing.assert_array_equal(drawn, reference[kind][layer - 1][0, head].numpy())
            np.testing.assert_array_equal(drawn, att.maps[kind][layer - 1][head].numpy())
            y_labels = [t.get_text() for t in ax.get_yticklabels()]
            x_labels = [t.get_text() for t in ax.get_xticklabels()]
            assert y_labels == (queries if head in (0, 4) else [""] * len(queries)), (kind, head)
            assert x_labels == (keys if head != 0 else [""] * len(keys)), (kind, head)  # head 5 is below head 1

    paths = write_attention(att, tmp_path / "maps")
    names = [p.name for p in paths]
    assert names == [f"{k}-layer{n}.png" for k in KINDS for n in (1, 2)] + ["weights.npz"]
    for path, (_, _, fig) in zip(paths[:-1], figures, strict=True):
        with Image.open(path) as png:
            width, height = fig.get_size_inches() * fig.dpi  # Agg truncates to whole pixels
            assert abs(png.size[0] - width) < 1.01 and abs(png.size[1] - height) < 1.01
    saved = np.load(paths[-1])
    for kind in KINDS:
        for n in (1, 2):
            np.testing.assert_array_equal(saved[f"{kind}.layer{n}"], att.maps[kind][n - 1].numpy())
    assert saved["src_pieces"].tolist() == src_pieces and saved["tgt_pieces"].tolist() == tgt_pieces
    assert saved["tgt_in_ids"].tolist() == tgt_in_ids and str(saved["target"]) == TARGET


def test_without_a_target_the_greedy_translation_is_drawn(spm_model: Path):
    tokenizer = Tokenizer(spm_model)
    model = _model(seed=2).eval()
    att = sentence_attention(model, tokenizer, SOURCE, max_extra=6)
    src = torch.tensor([att.src_ids])
    (hyp,) = greedy_search(model, src, bos_id=2, eos_id=3, max_extra=6)
    assert att.greedy and att.tgt_in_ids == [2, *hyp] and att.target == tokenizer.decode([hyp])[0]
    assert [w.shape[-2] for w in att.maps["cross"]] == [len(hyp) + 1] * 2


def test_cli_attention_writes_the_figures_and_weights(
    tiny: dict, hand_made_run: dict, spm_model: Path, capsys: pytest.CaptureFixture, tmp_path: Path
):
    run = tmp_path / "run"  # a run folder with only the hand-made step-300 checkpoint, as last.ckpt
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(hand_made_run["run"] / "checkpoints" / "step0000300.ckpt", run / "checkpoints" / "last.ckpt")
    sentence = "Two red dogs, running."  # punctuation and spaces: one argument, never parsed as an override
    cli.main(["attention", sentence, f"run.dir={run}", *tiny["overrides"], "evaluate.max_extra=4"])
    out = capsys.readouterr().out.strip().splitlines()
    folder = run / "attention" / slug(sentence)
    expected = [folder / f"{k}-layer{n}.png" for k in KINDS for n in (1, 2)] + [folder / "weights.npz"]
    assert out[-7:] == [str(p) for p in expected] and all(p.is_file() for p in expected)
    assert out[0] == f"SRC {sentence}" and out[1].startswith("HYP ") and "last.ckpt (step 300)" in out[2]
    # The weights are the checkpoint's model's, for the greedy translation it printed.
    saved = np.load(expected[-1])
    model, _ = load_model(run / "checkpoints" / "last.ckpt")
    src, tgt_in = torch.tensor([saved["src_ids"].tolist()]), torch.tensor([saved["tgt_in_ids"].tolist()])
    (hyp,) = greedy_search(model, src, 2, 3, max_extra=4)
    assert len(hyp) > 1 and saved["tgt_in_ids"].tolist() == [2, *hyp] and out[1] == f"HYP {saved['target']}"
    maps = collect_attention(model, src, tgt_in)
    np.testing.assert_allclose(saved["cross.layer2"], maps["cross"][1][0].numpy(), rtol=1e-6, atol=1e-7)

    # --target among the overrides (argparse would drop the overrides after it), and attention.output_dir.
    out_dir = tmp_path / "chosen"
    argv = ["attention", sentence, f"run.dir={run}", "--target", TARGET, *tiny["overrides"]]
    cli.main([*argv, f"attention.output_dir={out_dir}"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[1] == f"TGT {TARGET}" and out[-1] == str(out_dir / "weights.npz")
    saved = np.load(out_dir / "weights.npz")
    assert saved["tgt_pieces"].tolist() == ["<bos>", *_pieces(spm_model, TARGET)]
    assert len(list(out_dir.glob("*.png"))) == 6

    # The sentence in an override's place: a one-line error that says the order.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["attention", f"run.dir={run}", sentence])
    assert exit_info.value.code == 2
    assert 'the sentence comes first, quoted: aiayn attention "<sentence>"' in capsys.readouterr().err


def test_validation_logs_the_attention_images_to_wandb(tiny: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`aiayn train`'s run (pipeline/train.py build_run) on the tiny data, 2 steps with a validation after
    each and a sanity check before: the offline W&B run holds val/attention/<kind> at steps 1 and 2 only, one image
    per layer, and the last ones are the figures of the first validation pair under the final weights."""
    from pipeline import train
    from pipeline.loggers import finish_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    run = tmp_path / "fit"
    overrides = [*tiny["overrides"], f"run.dir={run}", "trainer.max_steps=2", "trainer.val_check_interval=1"]
    overrides += ["trainer.num_sanity_val_steps=1", "trainer.limit_val_batches=1", "trainer.precision=32-true"]
    overrides += ["trainer.enable_progress_bar=false", "run.n_samples=0", "run.val_bleu_sentences=0"]
    parts = train.build_run(load_config(overrides))
    module, datamodule, trainer = parts.module, parts.datamodule, parts.trainer
    trainer.fit(module, datamodule=datamodule)
    finish_wandb()

    (wandb_run,) = offline_runs(run)
    ((source, reference),) = datamodule.valid_examples(1)
    att = sentence_attention(module.model, datamodule.tokenizer, source, target=reference)
    for kind in KINDS:
        rows = [row for row in wandb_run.history if f"val/attention/{kind}" in row]
        assert [row["trainer/global_step"] for row in rows] == [1, 2], kind  # not the sanity check
        logged = rows[-1][f"val/attention/{kind}"]
        assert logged["_type"] == "images/separated" and logged["count"] == 2
        assert logged["captions"] == [f"layer {n} | {source} -> {reference}" for n in (1, 2)]
        drawn = [fig for drawn_kind, _, fig in attention_figures(att) if drawn_kind == kind]
        for name, fig in zip(logged["filenames"], drawn, strict=True):
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
            with Image.open(wandb_run.folder / "files" / name) as got, Image.open(buffer) as want:
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # Off with run.val_attention_maps=false; without a W&B logger the callback reads no attention at all.
    off = train.build_trainer(load_config([*overrides, "run.val_attention_maps=false"]), run)
    assert not any(isinstance(c, AttentionImages) for c in off.callbacks)

    class Read(Exception):
        """Raised by the stand-in for reading the attention."""

    def read(*args, **kwargs):
        raise Read

    monkeypatch.setattr("pipeline.attention.sentence_attention", read)
    csv_only = SimpleNamespace(sanity_checking=False, loggers=trainer.loggers[:1], datamodule=datamodule)
    AttentionImages().on_validation_epoch_end(csv_only, module)  # no W&B logger: returns before reading
    with_wandb = SimpleNamespace(sanity_checking=False, loggers=trainer.loggers, datamodule=datamodule)
    with pytest.raises(Read):  # the same call with the W&B logger does read it: the check above can fail
        AttentionImages().on_validation_epoch_end(with_wandb, module)
