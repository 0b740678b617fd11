"""`aiayn translate`: raw sentences in, translations out, with a trained run's model (as fairseq-interactive does).

Input, translate.input: a text file (one sentence a line), "-" for stdin, or null: stdin when it is piped or
redirected, else an interactive prompt (a line in, its translation out, until end of input). Each line goes through
what the training text went through: data.clean's text steps (Unicode normalization, control characters,
whitespace; data/clean.py), then the prepared dataset's SentencePiece model, plus <eos>. Lines are translated in
batches of similar length (translate.max_tokens padded source tokens, as `aiayn evaluate`), written in input order,
decoded back to text by SentencePiece, to stdout or translate.output. An empty line gives an empty line.

Model: model_dir (a folder written by `aiayn export`), else translate.checkpoint, else run.dir's averaged.ckpt,
else its checkpoints/last.ckpt (pipeline/runs.py's resolve_checkpoint). The BPE model is the run folder's copy (or
the exported folder's); a model whose vocabulary is another size is refused.

Decoding: translate.beam, alpha, nbest, max_extra default to the evaluate.* keys (section 6.1). With nbest > 1 each
sentence gives nbest lines `<line index>\\t<score>\\t<translation>`, best first (fairseq's H- lines, without the H-);
an empty line too: nbest lines with an empty translation, scored 0.0000, so that every line index has nbest lines.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from omegaconf import DictConfig

from pipeline import inference
from pipeline.errors import RunFolderError
from pipeline.export import load_exported
from pipeline.inference import Translator
from pipeline.progress import Progress
from pipeline.runs import require_run_dir, resolve_checkpoint


def load_translator(cfg: DictConfig) -> tuple[Translator, Path]:
    """The translate.* settings' Translator (pipeline/inference.py), and what it loaded: an exported model folder
    (model_dir, pipeline/export.py), else a run's checkpoint."""
    if cfg.get("model_dir"):
        model_dir = Path(cfg.model_dir).expanduser().resolve()
        model, tokenizer, clean = load_exported(model_dir)
        return inference.translator_for(cfg, model, tokenizer, clean), model_dir
    run_dir = require_run_dir(cfg, "translate") if cfg.run.get("dir") else None
    checkpoint_path = resolve_checkpoint(cfg, run_dir, section="translate")
    return inference.load_translator(cfg, checkpoint_path, run_dir), checkpoint_path


def format_nbest(index: int, nbest: list[tuple[float, str]], n: int) -> list[str]:
    """The output lines of input line `index`: its translation, or with n > 1 `index\\tscore\\ttranslation` lines, one
    per hypothesis of `nbest` (n of them: pipeline/inference.py's Translator gives an empty line n too)."""
    if n == 1:
        return [nbest[0][1]]
    return [f"{index}\t{score:.4f}\t{text}" for score, text in nbest]


def _read_lines(stream: Iterable[str]) -> list[str]:
    return [line.rstrip("\r\n") for line in stream]


@contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    if not path:
        yield sys.stdout
        return
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise RunFolderError(f"translate.output={path}: no folder {target.parent}")
    with open(target, "w", encoding="utf-8") as f:
        yield f


def main(cfg: DictConfig) -> None:
    tcfg = cfg.translate
    source = tcfg.get("input")
    interactive = source is None and sys.stdin.isatty()
    if source not in (None, "-") and not Path(source).expanduser().is_file():
        raise RunFolderError(f"translate.input={source}: no such file (use - for stdin)")
    translator, checkpoint_path = load_translator(cfg)
    n = int(tcfg.nbest)
    with _output(tcfg.get("output")) as out:
        if interactive:
            print(f"{checkpoint_path}: type a sentence and Enter; Ctrl-D ends", file=sys.stderr)
            index = 0
            while True:
                print("> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
                if not line:
                    break
                for text in format_nbest(index, translator(_read_lines([line]))[0], n):
                    print(text, file=out, flush=True)
                index += 1
            return
        if source in (None, "-"):
            lines = _read_lines(sys.stdin)
        else:
            with open(Path(source).expanduser(), encoding="utf-8") as f:
                lines = _read_lines(f)
        # Progress on stderr (stdout may be the translations): a bar on a terminal, else a line every few seconds.
        with Progress(total=sum(1 for line in lines if line.strip()), desc="translate", stream=sys.stderr) as progress:
            translations = translator(lines, progress.update)
        for index, nbest in enumerate(translations):
            out.writelines(text + "\n" for text in format_nbest(index, nbest, n))
        out.flush()
