"""Parameter counts of the paper's models against a count derived by hand from section 3."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline import cli
from pipeline.config import load_config
from pipeline.params import count_parameters


def hand_count(vocab: int, n: int, d: int, d_ff: int) -> dict[str, int]:
    attention = 4 * (d * d + d)  # W^Q, W^K, W^V (h·d_k = h·d_v = d) and W^O, each with a bias
    ffn = d * d_ff + d_ff + d_ff * d + d  # W_1, b_1, W_2, b_2
    layer_norm = 2 * d  # gain and bias
    encoder = n * (attention + ffn + 2 * layer_norm)
    decoder = n * (2 * attention + ffn + 3 * layer_norm)
    embedding = vocab * d  # one matrix shared by both embeddings and the pre-softmax projection
    return {
        "params": embedding + encoder + decoder,
        "embedding": embedding,
        "encoder": encoder,
        "decoder": decoder,
    }


def test_base_and_big_match_hand_count():
    base = count_parameters(load_config(["model=base", "model.vocab_size=37000"]))
    big = count_parameters(load_config(["model=big", "model.vocab_size=37000"]))
    assert base == hand_count(37000, 6, 512, 2048)
    assert big == hand_count(37000, 6, 1024, 4096)
    assert base["params"] == 63_082_496  # the paper rounds to 65M
    assert big["params"] == 214_245_376  # the paper rounds to 213M


def test_untied_embeddings_add_two_matrices():
    tied = count_parameters(load_config(["model=base"]))
    untied = count_parameters(load_config(["model=base", "model.share_embeddings=false"]))
    assert untied["params"] - tied["params"] == 2 * 37000 * 512


def test_cli_prints_one_json_line(capsys):
    """`aiayn params model=base model.vocab_size=37000`, through the CLI's own argument parsing."""
    cli.main(["params", "model=base", "model.vocab_size=37000"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert json.loads(out[0]) == hand_count(vocab=37000, n=6, d=512, d_ff=2048)


def test_python_dash_m_pipeline_is_the_cli():
    """`python -m pipeline` runs the same entry point as the `aiayn` script (help only: no torch import needed)."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("usage: aiayn") and all(c in proc.stdout for c in ("train", "params", "config"))
