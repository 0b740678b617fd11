"""`aiayn evaluate`: translate a prepared split with a trained model and score it with sacrebleu (section 6.1).

The source side is the split's prepared token ids (exactly what training-time encoding produced, plus <eos>);
hypotheses are decoded back to text with the SentencePiece model, and scored against the split's raw reference
text, as read from the corpus files: detokenized BLEU and chrF with sacrebleu's defaults, whose signatures are
printed and saved, and the paper's own number beside them: BLEU over Moses tokens with compounds split
(pipeline/paper_bleu.py; about a point apart from sacreBLEU on WMT14). The scores also go into the summary of the
run's W&B run when logger.wandb.enabled (pipeline/loggers.log_run_summary). Written into the run folder:

    eval-<split>.hyp.txt    one hypothesis per line, in the split's order
    eval-<split>.ref.txt    the references, so `sacrebleu eval-<split>.ref.txt -i eval-<split>.hyp.txt -m bleu chrf`
                            reproduces the scores
    eval-<split>.json       scores, signatures, checkpoint, decoding settings, timing
    eval-<split>.nbest.txt  with evaluate.nbest > 1: each sentence's n best hypotheses, best first, one per line:
                            <sentence index> TAB <score> TAB <log-probability> TAB <hypothesis>
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from data.manifest import write_json_atomic
from modules.beam import Hypothesis, beam_search
from modules.kernels import select_kernels
from modules.lightning import TranslationModule
from modules.search import greedy_search
from modules.transformer import Transformer
from pipeline.average import AVERAGED_NAME, require_run_dir
from pipeline.checkpoints import load_checkpoint
from pipeline.config import output_dir
from pipeline.errors import RunFolderError
from pipeline.host import reuse_freed_memory
from pipeline.loggers import log_run_summary
from pipeline.paper_bleu import tokenized_bleu

# A search: (model, src (batch, src_len) right-padded) -> each sentence's hypotheses, best first.
Search = Callable[[Transformer, torch.Tensor], list[list[Hypothesis]]]


def resolve_checkpoint(cfg: DictConfig, run_dir: Path | None, section: str = "evaluate") -> Path:
    """<section>.checkpoint (a path; a relative one not found here is looked up inside run.dir), else run.dir's
    averaged.ckpt, else its checkpoints/last.ckpt. section: the command's config section (evaluate, translate)."""
    key, chosen = f"{section}.checkpoint", cfg[section].get("checkpoint")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_absolute() and not path.exists() and run_dir is not None:
            path = run_dir / path
        if not path.exists():
            where = f" (also not in {run_dir})" if run_dir is not None else ""
            raise RunFolderError(f"{key}={chosen}: not found{where}")
        return path.resolve()
    if run_dir is None:
        raise RunFolderError(
            f"run.dir is not set and no {key}: pass run.dir=<output_dir>/runs/<run> (its averaged.ckpt, else "
            f"checkpoints/last.ckpt is used) or {key}=<checkpoint file>"
        )
    for path in (run_dir / AVERAGED_NAME, run_dir / "checkpoints" / "last.ckpt"):
        if path.exists():
            return path
    raise RunFolderError(
        f"no {AVERAGED_NAME} and no checkpoints/last.ckpt in run.dir={run_dir}: train (and `aiayn average`) first, "
        f"or name one with {key}=<path>"
    )


def load_model(path: Path) -> tuple[Transformer, dict[str, Any]]:
    """The Transformer of a checkpoint (file, averaged.ckpt or DeepSpeed folder) in eval mode, and the checkpoint's
    other entries (global_step, hyper_parameters, averaged_from, ...)."""
    checkpoint = load_checkpoint(path)
    if "hyper_parameters" not in checkpoint:
        raise RunFolderError(f"{path} has no hyper_parameters: the model cannot be rebuilt from it")
    module = TranslationModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint.pop("state_dict"))
    return module.model.eval(), checkpoint


def make_search(cfg: DictConfig, bos_id: int, eos_id: int, section: str = "evaluate") -> tuple[Search, dict[str, Any]]:
    """The decoding the <section>.beam / alpha / nbest / max_extra keys ask for (evaluate, translate), and its
    description for eval-<split>.json.

    Section 6.1: "beam search with a beam size of 4 and length penalty α = 0.6 ... maximum output length during
    inference to input length + 50" (modules/beam.py). beam=1 is greedy search, which does not score its output
    (its hypotheses' score and log_prob are NaN).
    """
    beam, alpha, nbest = int(cfg.beam), float(cfg.alpha), int(cfg.nbest)
    max_extra = int(cfg.max_extra)
    if beam < 1:
        raise RunFolderError(f"{section}.beam={beam}: the beam size must be at least 1 (1 is greedy search)")
    if not 1 <= nbest <= beam:
        raise RunFolderError(f"{section}.nbest={nbest}: must be between 1 and {section}.beam={beam}")
    if alpha < 0:
        raise RunFolderError(f"{section}.alpha={alpha}: the length penalty's α must be >= 0 (the paper: 0.6)")

    if beam == 1:

        def greedy(model: Transformer, src: torch.Tensor) -> list[list[Hypothesis]]:
            tokens = greedy_search(model, src, bos_id, eos_id, max_extra=max_extra)
            return [[Hypothesis(t, float("nan"), float("nan"))] for t in tokens]

        return greedy, {"search": "greedy", "max_extra": max_extra}

    def beam_(model: Transformer, src: torch.Tensor) -> list[list[Hypothesis]]:
        return beam_search(model, src, bos_id, eos_id, beam_size=beam, alpha=alpha, max_extra=max_extra, nbest=nbest)

    return beam_, {"search": "beam", "beam": beam, "alpha": alpha, "max_extra": max_extra, "nbest": nbest}


def describe_search(decoding: dict[str, Any]) -> str:
    """The search of make_search's description in words: greedy search, or beam search (beam 4, α 0.6)."""
    if decoding["search"] == "greedy":
        return "greedy search"
    return f"beam search (beam {decoding['beam']}, α {decoding['alpha']})"


def length_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Sentence indices grouped by source length (longest first), each batch at most max_tokens padded tokens
    (at least one sentence), so little of each batch is padding."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])  # the batch's first sentence is its longest
        size = max(1, max_tokens // max(longest, 1))
        batches.append(order[start : start + size])
        start += size
    return batches


def translate_ids(
    model: Transformer,
    sources: Sequence[Sequence[int] | np.ndarray],
    search: Search,
    pad_id: int,
    eos_id: int,
    max_tokens: int,
    device: torch.device,
    precision: str = "32-true",
) -> list[list[Hypothesis]]:
    """Decode every source (ids without eos) in length-sorted batches; each sentence's hypotheses (best first)
    come back in input order.

    precision "bf16-mixed" runs the model under bf16 autocast, as training does (the search's log-softmax and
    scores stay float32): on this project's 2-core CPU beam 4 decoded Multi30k test 1.2x faster than float32 in a
    first pass (202 vs 169 sentences/s), while oneDNN generates its kernels for each new matmul shape, and 1.5x
    faster after (283 vs 186), with sacreBLEU 26.41 against 26.31 (bench/decode_vs_fairseq.json). "32-true":
    float32 throughout.
    """
    if precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"decoding precision must be 32-true or bf16-mixed, got {precision!r} (evaluate.precision)")
    lengths = np.array([len(s) + 1 for s in sources])  # + eos
    hyps: list[list[Hypothesis]] = [[] for _ in sources]
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    for batch in length_batches(lengths, max_tokens):
        src = torch.full((len(batch), int(lengths[batch].max())), pad_id, dtype=torch.long)  # (batch, src_len)
        for row, i in enumerate(batch):
            src[row, : lengths[i] - 1] = torch.from_numpy(np.asarray(sources[i], dtype=np.int64))
            src[row, lengths[i] - 1] = eos_id
        with bf16:
            results = search(model, src.to(device))
        for i, hyp in zip(batch, results, strict=True):
            hyps[i] = hyp
    return hyps


def score(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF with sacrebleu's defaults (13a tokenization for BLEU), with their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    result: dict[str, Any] = {"signatures": {}}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        value = metric.corpus_score(hyps, [refs])
        result[name] = value.score
        result[f"{name}_text"] = str(value)  # e.g. "BLEU = 27.30 59.1/33.2/... (BP = 1.000 ...)"
        result["signatures"][name] = str(metric.get_signature())
    return result


def wandb_summary(result: dict[str, Any]) -> dict[str, Any]:
    """eval-<split>.json's scores as W&B summary values under the split's name: test/bleu, test/tok_bleu, ..."""
    split = result["split"]
    values = {key: result[key] for key in ("bleu", "chrf", "tok_bleu", "sentences", "translate_seconds")}
    values |= {"global_step": result["global_step"], "checkpoint": Path(result["checkpoint"]).name}
    values["search"] = result["decoding"]["search"]
    values |= {f"signature/{name}": signature for name, signature in result["signatures"].items()}
    return {f"{split}/{key}": value for key, value in values.items()}


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def place_for_inference(model: Transformer, kernels: str) -> torch.device:
    """Move an inference model to the GPU if there is one, else keep it on the CPU, with the device.kernels for it;
    returns the device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Every beam step allocates and frees logits-sized blocks; kept by malloc instead of given back to the
        # kernel, they are not faulted in again.
        reuse_freed_memory()
    model.to(device).use_kernels(select_kernels(kernels, device))
    return device


def load_for_inference(cfg: DictConfig, checkpoint_path: Path, command: str) -> tuple[Transformer, dict, Any]:
    """The checkpoint's model (eval mode), the checkpoint, and the set-up data module of cfg.data, whose BPE model
    reads and writes the model's token ids: `aiayn evaluate`, `translate` and `attention` all start here."""
    from data import TranslationDataModule

    datamodule = TranslationDataModule(cfg.data, output_dir(cfg), seed=cfg.seed)
    datamodule.setup()  # reads the prepared folder: a DatasetNotPreparedError says to run `aiayn prepare`
    model, checkpoint = load_model(checkpoint_path)
    if model.cfg.vocab_size != datamodule.tokenizer.vocab_size:
        raise RunFolderError(
            f"{checkpoint_path} has model.vocab_size={model.cfg.vocab_size}, the BPE model of "
            f"{datamodule.dataset_dir} has {datamodule.tokenizer.vocab_size}: run `aiayn {command}` with the "
            "overrides the run was trained with (see the run folder's config.yaml)"
        )
    return model, checkpoint, datamodule


def prepared_split(datamodule: Any, split: str) -> tuple[list[np.ndarray], list[str]]:
    """A set-up data module's split: its prepared source ids (without <eos>) and its raw reference lines, as read
    from the corpus files."""
    if split not in datamodule.splits:
        raise RunFolderError(
            f"evaluate.split={split}: {datamodule.dataset_dir} has only {sorted(datamodule.splits)}; "
            f"add data.splits.{split} and run `aiayn prepare` again"
        )
    pairs = datamodule.splits[split]
    references = [ref for _, ref in datamodule.raw_pairs(split, len(pairs))]
    if len(references) != len(pairs):
        raise RunFolderError(f"{split}: {len(pairs)} prepared pairs but {len(references)} reference lines")
    return [pairs[i][0] for i in range(len(pairs))], references


def main(cfg: DictConfig) -> dict[str, Any]:
    run_dir = require_run_dir(cfg, "evaluate")
    split = cfg.evaluate.split
    checkpoint_path = resolve_checkpoint(cfg, run_dir)
    model, checkpoint, datamodule = load_for_inference(cfg, checkpoint_path, "evaluate")
    device = place_for_inference(model, cfg.device.kernels)
    sources, references = prepared_split(datamodule, split)
    tokenizer = datamodule.tokenizer

    search, decoding = make_search(cfg.evaluate, tokenizer.bos_id, tokenizer.eos_id)
    decoding["precision"] = cfg.evaluate.precision
    started = time.perf_counter()
    nbest = translate_ids(
        model,
        sources,
        search,
        tokenizer.pad_id,
        tokenizer.eos_id,
        int(cfg.evaluate.max_tokens),
        device,
        cfg.evaluate.precision,
    )
    hypotheses = tokenizer.decode([hyps[0].tokens for hyps in nbest])
    seconds = time.perf_counter() - started

    files = {kind: run_dir / f"eval-{split}.{kind}.txt" for kind in ("hyp", "ref")}
    _write_lines(files["hyp"], hypotheses)
    _write_lines(files["ref"], references)
    nbest_file = run_dir / f"eval-{split}.nbest.txt"
    nbest_file.unlink(missing_ok=True)  # an earlier run's n-best list would not match these hypotheses
    if int(cfg.evaluate.nbest) > 1:
        files["nbest"] = nbest_file
        flat = [(i, h) for i, hyps in enumerate(nbest) for h in hyps]
        texts = tokenizer.decode([h.tokens for _, h in flat])
        lines = [f"{i}\t{h.score:.4f}\t{h.log_prob:.4f}\t{text}" for (i, h), text in zip(flat, texts, strict=True)]
        _write_lines(files["nbest"], lines)
    scores = score(hypotheses, references)
    paper = tokenized_bleu(hypotheses, references, lang=cfg.data.tgt_lang)
    scores["tok_bleu"], scores["tok_bleu_text"] = paper["tok_bleu"], paper["tok_bleu_text"]
    scores["signatures"]["tok_bleu"] = paper["signature"]
    result = {
        "split": split,
        "sentences": len(hypotheses),
        **scores,
        "checkpoint": str(checkpoint_path),
        "global_step": checkpoint.get("global_step"),
        "averaged_from": checkpoint.get("averaged_from"),
        "dataset_dir": str(datamodule.dataset_dir),
        "decoding": {**decoding, "max_tokens": int(cfg.evaluate.max_tokens), "device": str(device)},
        "translate_seconds": round(seconds, 2),
        "files": {kind: path.name for kind, path in files.items()},
    }
    json_path = run_dir / f"eval-{split}.json"
    write_json_atomic(json_path, result)
    print(
        f"{split}: {len(hypotheses)} sentences translated in {seconds:.1f} s with {checkpoint_path.name} "
        f"(step {result['global_step']}, {describe_search(decoding)})\n"
        f"  sacreBLEU {scores['bleu_text']}\n    {scores['signatures']['bleu']}\n"
        f"  {scores['chrf_text']}\n    {scores['signatures']['chrf']}\n"
        f"  tokenized BLEU, compounds split (the paper's, get_ende_bleu.sh): {scores['tok_bleu_text']}\n"
        f"    {scores['signatures']['tok_bleu']}"
    )
    wandb_id = log_run_summary(cfg, run_dir, wandb_summary(result))
    if wandb_id is not None:
        print(f"W&B: {split}/* scores in the summary of run {wandb_id}")
    print(json_path)
    return result
