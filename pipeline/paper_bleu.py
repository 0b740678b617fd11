"""The paper's BLEU: case-sensitive BLEU over Moses tokens with hyphenated compounds split (section 6.1, Table 2).

The BLEU scores of the paper were computed the way tensor2tensor computes them for WMT14 English-German, in its
script tensor2tensor/utils/get_ende_bleu.sh:

    perl tokenizer.perl -l de < hyp > hyp.tok                              # Moses tokenization (the reference
                                                                           # was tokenized the same way)
    perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g' < x.tok > x.atat      # split compounds, both sides
    perl multi-bleu.perl ref.atat < hyp.atat                               # BLEU over the tokens

("Put compounds in ATAT format (comparable to papers like GNMT, ConvS2S)": "rich-text format" -> "rich ##AT##-##AT##
text format".) Here: sacremoses (the Python port of tokenizer.perl, with its default HTML escaping as the script
uses it), the same substitution with Python's re (split_compounds), and sacrebleu's BLEU over the resulting tokens
with what multi-bleu.perl does: no tokenization of its own, case-sensitive, no smoothing (an n-gram order without a
match makes BLEU 0), brevity penalty exp(1 - r/c) over the corpus when c < r.

This is not sacreBLEU's number (detokenized text, its own 13a tokenization, no compound splitting): on WMT14 the two
differ by about a point, so `aiayn evaluate` reports both.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.metadata import version
from typing import Any

# get_ende_bleu.sh's `perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'`, on the line's UTF-8 BYTES, as perl reads it
# (no UTF-8 layer): there \s is ASCII whitespace only and every byte of a multi-byte character is \S on its own.
# Both engines replace non-overlapping matches left to right, each search starting after the previous match, so
# "a-b-c" -> "a ##AT##-##AT## b-c" (the first match consumed "b"), but "ö-ä-ü" -> "ö ##AT##-##AT## ä ##AT##-##AT## ü":
# the first match consumes only the first byte of "ä", and its second byte starts the next match. A str pattern
# would leave "ä-ü" joined. The replacement only stands in for the ASCII "-", which is never part of a multi-byte
# character, so the result is valid UTF-8 again.
COMPOUND = re.compile(rb"(\S)-(\S)")
COMPOUND_REPLACEMENT = rb"\1 ##AT##-##AT## \2"


def split_compounds(line: str) -> str:
    """get_ende_bleu.sh's compound splitting of one (already tokenized) line."""
    return COMPOUND.sub(COMPOUND_REPLACEMENT, line.encode("utf-8")).decode("utf-8")


@cache
def _moses(lang: str):
    from sacremoses import MosesTokenizer

    return MosesTokenizer(lang=lang)


def moses_tokenize(line: str, lang: str = "de") -> str:
    """tokenizer.perl -l <lang> with its defaults (no aggressive hyphen splitting, HTML escaping on)."""
    return _moses(lang).tokenize(line, return_str=True, escape=True)


def paper_tokens(line: str, lang: str = "de") -> str:
    """A line as get_ende_bleu.sh hands it to multi-bleu.perl: Moses-tokenized, then compounds split."""
    return split_compounds(moses_tokenize(line, lang))


def tokenized_bleu(hyps: list[str], refs: list[str], lang: str = "de") -> dict[str, Any]:
    """The paper's BLEU of detokenized hypotheses against raw references (one reference per hypothesis).

    Returns {"tok_bleu": score (0-100), "tok_bleu_text": multi-bleu.perl's output line, "signature": the settings}.
    """
    from sacrebleu.metrics import BLEU

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    # tokenize="none": the tokens are get_ende_bleu.sh's; force: sacrebleu warns about tokenized input otherwise.
    metric = BLEU(tokenize="none", smooth_method="none", force=True)
    result = metric.corpus_score([paper_tokens(h, lang) for h in hyps], [[paper_tokens(r, lang) for r in refs]])
    precisions = "/".join(f"{p:.1f}" for p in result.precisions)
    text = (  # multi-bleu.perl's own output format, for comparison with numbers reported that way
        f"BLEU = {result.score:.2f}, {precisions} (BP={result.bp:.3f}, ratio={result.ratio:.3f}, "
        f"hyp_len={result.sys_len}, ref_len={result.ref_len})"
    )
    signature = f"moses-tok:{lang}|escape:yes|compound-split:##AT##|{metric.get_signature()}|sacremoses:" + version(
        "sacremoses"
    )
    return {"tok_bleu": result.score, "tok_bleu_text": text, "signature": signature}
