"""What a command shows while it works: a bar on a terminal, plain lines in a log file (a SLURM job's .out, `make
train > log`), where a bar would draw nothing readable.

Training (pipeline/callbacks.py's RunProgress, a Lightning ProgressBar): one bar for the whole run, step /
max_steps, on a terminal; off a terminal a line every trainer.log_every_n_steps optimizer steps, in the manner of
fairseq's `--log-format simple`, and one after each validation:

  train | step 150/4000 | loss 5.312 | ppl 203.1 | lr 0.00021 | gnorm 1.204 | tok/s 5120 | elapsed 0:01:12 | eta 0:31:05
  valid | step 500/4000 | loss 4.511 | ppl 70.3 | bleu 10.21 | elapsed 0:04:02 | eta 0:27:40

Fields are `name value` pairs split by " | " (the first says which kind of line), numbers without separators: a
log reads back with `dict(field.split(" ", 1) for field in line.split(" | ")[1:])`. A field appears once its value
exists (tok/s from the first logging step on, eta once a step has been timed). eta is the time to max_steps at the
rate since training started (validations included), or to trainer.max_time where that comes first.

Sentences (Progress, here: no Lightning, which `aiayn prepare` then need not import): `aiayn evaluate`, `translate`
and `prepare`: sentences (pairs) done / total and their rate, as a tqdm bar on a terminal, else a line every
PLAIN_EVERY_S seconds and one at the end:

  evaluate test: 1000/3003 sentences (33%) | 41.5 sentences/s | elapsed 0:00:24 | eta 0:00:48
"""

from __future__ import annotations

import sys
import time
from typing import IO

from tqdm.auto import tqdm

PLAIN_EVERY_S = 10.0  # seconds between two lines of sentence progress off a terminal


def is_terminal(stream: IO[str]) -> bool:
    """Whether `stream` is a terminal (False for files, pipes, and pytest's or contextlib's stand-ins)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS (hours past 24 keep counting): 72 -> 0:01:12."""
    minutes, secs = divmod(max(int(seconds), 0), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Progress through `total` items (sentences, sentence pairs), used as a tqdm bar is:

        with Progress(total=len(sources), desc="evaluate test") as progress:
            ...
            progress.update(len(batch))

    On a terminal it is a tqdm bar on `stream`; elsewhere a plain line every `every_s` seconds and a last one when
    it closes (also after an error: how far it got). stream: stdout unless given (`aiayn translate` writes its
    translations there, and its progress to stderr); read when the progress starts, so that a redirected stdout
    counts.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "sentences",
        stream: IO[str] | None = None,
        every_s: float = PLAIN_EVERY_S,
    ) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream if stream is not None else sys.stdout
        self.done = 0
        self._started = self._last_line = time.monotonic()
        self._closed = False
        self._bar = None
        if is_terminal(self.stream):
            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self._write(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self._write(time.monotonic(), last=True)

    def line(self, now: float, last: bool = False) -> str:
        """The plain line: `<desc>: done/total <unit> (pct%) | rate <unit>/s | elapsed H:MM:SS | eta H:MM:SS`."""
        elapsed = now - self._started
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        fields = [f"{self.desc}: {count} {self.unit}{percent}"]
        if elapsed > 0:
            rate = self.done / elapsed
            fields.append(f"{rate:.1f} {self.unit}/s")
        fields.append(f"elapsed {clock(elapsed)}")
        if not last and self.total and self.done and elapsed > 0:
            fields.append(f"eta {clock((self.total - self.done) * elapsed / self.done)}")
        return " | ".join(fields)

    def _write(self, now: float, last: bool = False) -> None:
        print(self.line(now, last), file=self.stream, flush=True)
