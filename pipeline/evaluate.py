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
    eval-<split>.json       scores, signatures, checkpoint, decoding settings, timing; with evaluate.tune.enabled
                            also "tuning": every beam x α tried on evaluate.tune.split, its scores, the best
    eval-<split>.nbest.txt  with evaluate.nbest > 1: each sentence's n best hypotheses, best first, one per line:
                            <sentence index> TAB <score> TAB <log-probability> TAB <hypothesis>
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from data.atomic import write_json_atomic, write_text_atomic
from modules.decoding import Decoding, describe_search, translate_ids
from pipeline.inference import load_for_inference, make_search, place_for_inference, prepared_split
from pipeline.loggers import log_run_summary
from pipeline.paper_bleu import tokenized_bleu
from pipeline.progress import Progress
from pipeline.runs import require_run_dir, resolve_checkpoint
from pipeline.scores import score
from pipeline.tuning import TuningResult, settings_grid, tune_search


def wandb_summary(result: dict[str, Any]) -> dict[str, Any]:
    """eval-<split>.json's scores as W&B summary values under the split's name: test/bleu, test/tok_bleu, ..."""
    split = result["split"]
    values = {key: result[key] for key in ("bleu", "chrf", "tok_bleu", "sentences", "translate_seconds")}
    values |= {"global_step": result["global_step"], "checkpoint": Path(result["checkpoint"]).name}
    values["search"] = result["decoding"]["search"]
    values |= {f"signature/{name}": signature for name, signature in result["signatures"].items()}
    return {f"{split}/{key}": value for key, value in values.items()}


def tune(cfg: DictConfig, model: Any, datamodule: Any, device: Any) -> TuningResult:
    """evaluate.tune: every beam x alpha of the grid on evaluate.tune.split, printed; the best setting."""
    tuning_cfg, tokenizer = cfg.evaluate.tune, datamodule.tokenizer
    sources, references = prepared_split(datamodule, tuning_cfg.split)
    grid = settings_grid(Decoding(max_extra=int(cfg.evaluate.max_extra)), tuning_cfg.beams, tuning_cfg.alphas)
    print(f"tuning on {tuning_cfg.split}: {len(grid)} settings x {len(sources)} sentences, best by {tuning_cfg.metric}")
    result = tune_search(
        model,
        sources,
        references,
        tokenizer.decode,
        grid,
        split=tuning_cfg.split,
        metric=tuning_cfg.metric,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        max_tokens=int(cfg.evaluate.max_tokens),
        device=device,
        precision=cfg.evaluate.precision,
    )
    best = result.best
    print(result.table())
    print(
        f"best on {tuning_cfg.split}: {describe_search(best.describe())}; {cfg.evaluate.split} is translated with it "
        f"(the same as evaluate.beam={best.beam} evaluate.alpha={best.alpha})"
    )
    return result


def _write_lines(path: Path, lines: list[str]) -> None:
    write_text_atomic(path, "".join(line.replace("\n", " ") + "\n" for line in lines))


def main(cfg: DictConfig) -> dict[str, Any]:
    run_dir = require_run_dir(cfg, "evaluate")
    split = cfg.evaluate.split
    checkpoint_path = resolve_checkpoint(cfg, run_dir)
    model, checkpoint, datamodule = load_for_inference(cfg, checkpoint_path, "evaluate", run_dir)
    device = place_for_inference(model, cfg.device.kernels)
    sources, references = prepared_split(datamodule, split)
    tokenizer = datamodule.tokenizer

    tuning = tune(cfg, model, datamodule, device) if cfg.evaluate.tune.enabled else None
    settings = cfg.evaluate if tuning is None else OmegaConf.merge(cfg.evaluate, tuning.as_dict()["best"])
    search, decoding = make_search(settings, tokenizer.bos_id, tokenizer.eos_id)
    decoding["precision"] = cfg.evaluate.precision
    started = time.perf_counter()
    with Progress(total=len(sources), desc=f"evaluate {split}") as progress:  # a bar, or a line every few seconds
        nbest = translate_ids(
            model,
            sources,
            search,
            tokenizer.pad_id,
            tokenizer.eos_id,
            int(cfg.evaluate.max_tokens),
            device,
            cfg.evaluate.precision,
            progress=progress.update,
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
    if tuning is not None:
        result["tuning"] = tuning.as_dict()
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
