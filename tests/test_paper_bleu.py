"""The paper's tokenized BLEU with compound splitting (pipeline/paper_bleu.py), against independent references:
get_ende_bleu.sh's perl one-liner itself, tokenizer.perl's rules applied by hand, and BLEU from hand-counted
n-grams with multi-bleu.perl's formula."""

from __future__ import annotations

import math
import shutil
import subprocess

from pipeline.paper_bleu import moses_tokenize, paper_tokens, split_compounds, tokenized_bleu

PERL_ONE_LINER = r"s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g"

LINES = [
    "a-b-c",  # overlapping matches: the first consumes "b", so the second hyphen stays
    "a--b",
    "a---b",
    "-a-",
    "--",
    "x - y",
    "Rich-Text-Format",
    "2-3-4-5",
    "über-ö-ä-ü",  # multi-byte letters: perl sees bytes, so every hyphen here is split
    "Hallo\u00a0-Welt",  # a no-break space: perl (bytes) counts it as \S
    "a\x0b-b x-\x0cy",  # vertical tab and form feed: \s for perl
    "U.S.-Präsident e-Mail-Adresse",
]


def test_compound_splitting_is_the_perl_one_liner() -> None:
    perl = shutil.which("perl")
    assert perl, "perl is part of Debian's base system; this test compares against it"
    text = "".join(line + "\n" for line in LINES).encode("utf-8")
    out = subprocess.run([perl, "-ple", PERL_ONE_LINER], input=text, capture_output=True, check=True).stdout
    expected = out.decode("utf-8").split("\n")[:-1]
    assert [split_compounds(line) for line in LINES] == expected
    # Spelled out, the cases a str (not bytes) regex or an overlapping rule would get wrong:
    assert expected[0] == "a ##AT##-##AT## b-c"
    assert expected[8] == "über ##AT##-##AT## ö ##AT##-##AT## ä ##AT##-##AT## ü"


def test_moses_tokenization_then_compounds() -> None:
    # tokenizer.perl -l de: punctuation split off, a dash inside a word kept, HTML special characters escaped.
    assert moses_tokenize('Er sagt: "Hallo-Welt!" & geht.') == "Er sagt : &quot; Hallo-Welt ! &quot; &amp; geht ."
    assert paper_tokens('Er sagt: "Hallo-Welt!" & geht.') == (
        "Er sagt : &quot; Hallo ##AT##-##AT## Welt ! &quot; &amp; geht ."
    )


def _multi_bleu(correct: list[int], total: list[int], hyp_len: int, ref_len: int) -> float:
    """multi-bleu.perl's formula: BP * exp(mean log precision), log 0 -> -9999999999, BP = exp(1 - r/c) if c < r."""
    bp = math.exp(1 - ref_len / hyp_len) if hyp_len < ref_len else 1.0
    logs = [math.log(c / t) if c else -9999999999 for c, t in zip(correct, total, strict=True)]
    return 100 * bp * math.exp(sum(logs) / 4)


def test_tokenized_bleu_from_hand_counted_ngrams() -> None:
    hyps = ["Der Hund-Besitzer lacht.", "ein Haus."]
    refs = ["Der Hund-Besitzer lacht laut.", "Ein Haus."]
    # Tokens: "Der Hund ##AT##-##AT## Besitzer lacht ." (6) vs "... lacht laut ." (7);
    #         "ein Haus ." (3) vs "Ein Haus ." (3): case counts, "ein" is no match.
    # 1-grams 6/6 + 2/3, 2-grams 4/5 + 1/2, 3-grams 3/4 + 0/1, 4-grams 2/3 + 0/0; lengths 9 vs 10.
    result = tokenized_bleu(hyps, refs)
    expected = _multi_bleu([8, 5, 3, 2], [9, 7, 5, 3], hyp_len=9, ref_len=10)
    assert math.isclose(result["tok_bleu"], expected, rel_tol=1e-12), (result, expected)
    assert result["tok_bleu_text"].startswith(f"BLEU = {expected:.2f}, 88.9/71.4/60.0/66.7 (BP=0.895, ratio=0.900")
    assert "hyp_len=9, ref_len=10)" in result["tok_bleu_text"]
    assert "compound-split" in result["signature"] and "tok:none|smooth:none" in result["signature"]

    # No smoothing, as multi-bleu.perl: a corpus without a matching 3-gram scores 0 (sacreBLEU's default "exp"
    # smoothing would not).
    assert tokenized_bleu(hyps[1:], refs[1:])["tok_bleu"] < 1e-6
