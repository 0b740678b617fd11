"""Greedy and beam search (section 6.1) on tiny random models, against independent references: every possible
output enumerated and scored by the model teacher-forced, GNMT's length penalty written out here, greedy search,
each sentence decoded alone, and decoding without the key/value cache."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from modules.beam import Hypothesis, beam_search
from modules.config import TransformerConfig
from modules.lightning import TranslationModule
from modules.search import greedy_search
from modules.transformer import Transformer
from pipeline.errors import RunFolderError
from pipeline.inference import make_search

PAD, BOS, EOS = 0, 2, 3


def _model(seed: int, vocab: int, n_layers: int = 2, d_model: int = 32, norm: str = "post") -> Transformer:
    """A seeded random model in eval mode, from tensor2tensor's start (init xavier). Its output projection (untied)
    is scaled x3: with that initialisation alone the next-token distributions are flat and the same at every step;
    scaled, they are peaked and depend on the prefix, so the outputs differ in length and content between sentences
    and searches (fairseq's smaller start, the default, leaves them flatter)."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        vocab_size=vocab,
        n_layers=n_layers,
        d_model=d_model,
        d_ff=2 * d_model,
        n_heads=2,
        dropout=0.0,
        norm=norm,
        share_embeddings=False,
        init="xavier",
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.output_projection.weight.mul_(3.0)
    return model


def _sources(lengths: list[int], vocab: int, seed: int) -> torch.Tensor:
    """Right-padded (batch, max_len) sources of the given lengths, each ending in <eos>."""
    generator = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for row, n in enumerate(lengths):
        src[row, : n - 1] = torch.randint(4, vocab, (n - 1,), generator=generator)
        src[row, n - 1] = EOS
    return src


def _lp(length: int, alpha: float) -> float:
    """GNMT's length penalty (Wu et al., 2016), the paper's reference for α: ((5 + |Y|) / 6)^α, |Y| with <eos>."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def _log_prob(model: Transformer, src: torch.Tensor, tokens: list[int]) -> float:
    """log P(tokens <eos> | src), teacher-forced through the whole model at once. src: (src_len,) without padding."""
    target = torch.tensor([*tokens, EOS])
    logits = model(src[None], torch.tensor([[BOS, *tokens]]))[0]  # (len + 1, vocab)
    return float(F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).sum())


def _unpadded(src: torch.Tensor, row: int) -> torch.Tensor:
    return src[row][src[row].ne(PAD)]


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_cached_steps_with_reordered_beams_equal_full_recomputation(norm: str) -> None:
    """What beam search does to the cache, checked logit by logit: rows are expanded to 2 beams per sentence, then
    at every step each beam continues a random beam of its own sentence (only the self-attention cache is
    reordered; the encoder-decoder keys/values of a sentence are the same for all its beams). At every step the
    newest token's logits equal the whole model run teacher-forced over each row's full prefix."""
    vocab = 12
    model = _model(5, vocab=vocab, norm=norm)
    src = _sources([3, 7, 5], vocab=vocab, seed=5)  # (3, 7)
    generator = torch.Generator().manual_seed(5)
    memory, src_bias = model.encode(src)
    cache = model.new_cache()
    rows = torch.arange(3)  # each decoder row's sentence
    prefix = torch.full((3, 1), BOS)  # (rows, step + 1)
    with torch.no_grad():
        for step in range(6):
            logits = model.decode(prefix[:, -1:], memory, src_bias, cache, start=step)[:, 0]  # (rows, vocab)
            full = model(src.index_select(0, rows), prefix)[:, -1]  # (rows, vocab)
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
            if step == 0:  # one row per sentence -> 2 beams each: everything is copied
                order = torch.arange(3).repeat_interleave(2)  # (6,)
                memory, src_bias = memory.index_select(0, order), src_bias.index_select(0, order)
                Transformer.reorder_cache(cache, order)
                rows = rows.index_select(0, order)
            else:  # beam b of sentence s continues beam parent[s, b] of the same sentence
                parent = torch.randint(0, 2, (3, 2), generator=generator)
                order = (torch.arange(3)[:, None] * 2 + parent).flatten()  # (6,)
                Transformer.reorder_cache(cache, order, ("self",))
            tokens = torch.randint(4, vocab, (order.numel(), 1), generator=generator)
            prefix = torch.cat([prefix.index_select(0, order), tokens], dim=1)
    assert torch.unique(prefix, dim=0).size(0) > 3  # the beams of a sentence did go different ways


def test_beam_of_one_is_greedy_search() -> None:
    """With α = 0, a 1-wide beam ends exactly where greedy search does: it finishes a hypothesis only when <eos>
    is the best next token (greedy's hypothesis), and its live hypothesis, prefix + a less likely token, cannot
    beat it. With α > 0 the search may go on (a longer output can score better under the length penalty), so
    there it finds greedy's hypothesis or a better-scored one."""
    model = _model(2, vocab=12)
    src = _sources([3, 7, 5, 9, 2, 6], vocab=12, seed=2)
    greedy = greedy_search(model, src, BOS, EOS, max_extra=6)
    assert len({len(g) for g in greedy}) > 2  # sentences of several lengths: not one repeated output

    beam = beam_search(model, src, BOS, EOS, beam_size=1, alpha=0.0, max_extra=6)
    assert [hyps[0].tokens for hyps in beam] == greedy

    beam = beam_search(model, src, BOS, EOS, beam_size=1, alpha=0.6, max_extra=6)
    for row, (hyps, tokens) in enumerate(zip(beam, greedy, strict=True)):
        greedy_score = _log_prob(model, _unpadded(src, row), tokens) / _lp(len(tokens) + 1, 0.6)
        assert hyps[0].score >= greedy_score - 1e-5


@torch.no_grad()
def _enumerate(model: Transformer, src: torch.Tensor, limit: int, vocab: int) -> list[tuple[list[int], float]]:
    """Every output beam search can produce for src (src_len,): any tokens but <eos>, then <eos>, at most `limit`
    tokens with <eos>; each with its log-probability, teacher-forced (all outputs of one length in one batch)."""
    body = [t for t in range(vocab) if t != EOS]
    scored = []
    for n in range(limit):
        bodies = list(itertools.product(body, repeat=n))
        count = len(bodies)
        outputs = torch.tensor(bodies, dtype=torch.long).view(count, n)  # (count, n)
        tgt_in = torch.cat([torch.full((count, 1), BOS), outputs], dim=1)  # <bos> y
        tgt_out = torch.cat([outputs, torch.full((count, 1), EOS)], dim=1)  # y <eos>
        log_probs = F.log_softmax(model(src.expand(count, -1), tgt_in).float(), dim=-1)  # (count, n + 1, vocab)
        totals = log_probs.gather(2, tgt_out[:, :, None]).sum(dim=(1, 2))  # (count,)
        scored += list(zip(outputs.tolist(), totals.tolist(), strict=True))
    return scored


@pytest.mark.parametrize("seed", [3, 11])
def test_wide_beam_finds_the_best_of_every_possible_output(seed: int) -> None:
    """Vocabulary 6, outputs of at most 3 and 4 tokens: 31 and 156 possible outputs, all scored. A beam as wide as
    the most extensions of any step (6 x 5^2 = 150) prunes nothing, so its 5 best must be the enumeration's 5 best;
    narrower beams may miss the best, but never score above it."""
    vocab, max_extra = 6, 1
    model = _model(seed, vocab=vocab, n_layers=1, d_model=16)
    src = _sources([3, 2], vocab=vocab, seed=seed)
    sources = [_unpadded(src, row) for row in range(src.size(0))]
    outputs = [_enumerate(model, source, source.numel() + max_extra, vocab) for source in sources]
    narrow_missed, best = 0, {}
    for alpha in (0.0, 0.6):
        wide = beam_search(model, src, BOS, EOS, beam_size=150, alpha=alpha, max_extra=max_extra, nbest=5)
        narrow = [beam_search(model, src, BOS, EOS, beam_size=k, alpha=alpha, max_extra=max_extra) for k in (1, 2, 3)]
        for row in range(src.size(0)):
            ranked = sorted(((lp / _lp(len(y) + 1, alpha), lp, y) for y, lp in outputs[row]), reverse=True)
            best[row, alpha] = ranked[0][2]
            assert [h.tokens for h in wide[row]] == [y for _, _, y in ranked[:5]]
            close = {"rtol": 0, "atol": 1e-5}
            torch.testing.assert_close([h.score for h in wide[row]], [s for s, _, _ in ranked[:5]], **close)
            torch.testing.assert_close([h.log_prob for h in wide[row]], [lp for _, lp, _ in ranked[:5]], **close)
            for result in narrow:
                assert result[row][0].score <= ranked[0][0] + 1e-5
                narrow_missed += result[row][0].score < ranked[0][0] - 1e-4
    # The cases are not trivial: narrow beams do miss the best, and α changes which output is best.
    assert narrow_missed > 0
    assert any(best[row, 0.0] != best[row, 0.6] for row in range(src.size(0)))


@torch.no_grad()
def _reference_beam(model: Transformer, source: torch.Tensor, k: int, alpha: float, max_extra: int, nbest: int):
    """modules/beam.py's search written out for one sentence over Python lists, every extension of every live
    hypothesis scored from the model run teacher-forced on the whole prefix: [(tokens, score, log_prob)], best first."""
    limit = source.numel() + max_extra
    live, finished = [([], 0.0)], []
    for step in range(limit):
        extensions = []
        for tokens, lp in live:
            logits = model(source[None], torch.tensor([[BOS, *tokens]]))[0, -1]
            token_lp = F.log_softmax(logits.float(), dim=-1).tolist()
            for token, t_lp in enumerate(token_lp):
                if step + 1 < limit or token == EOS:
                    extensions.append((lp + t_lp, tokens + [token]))
        extensions.sort(key=lambda e: e[0], reverse=True)
        for lp, tokens in extensions[:k]:
            if tokens[-1] == EOS:
                finished.append((tokens[:-1], lp / _lp(step + 1, alpha), lp))
        finished = sorted(finished, key=lambda f: f[1], reverse=True)[:nbest]
        live = [(tokens, lp) for lp, tokens in extensions if tokens[-1] != EOS][:k]
        if not live or (len(finished) == nbest and live[0][1] / _lp(limit, alpha) <= finished[-1][1]):
            return finished
    return finished


def test_beam_search_equals_the_search_written_out_per_sentence() -> None:
    """A vocabulary of 40 (so each beam's 2K = 8 best tokens, which the search looks at first, are a fifth of it),
    beam 4, two of each sentence's best kept: the batched search returns the reference's hypotheses and scores."""
    model = _model(5, vocab=40)
    src = _sources([4, 7, 2, 5], vocab=40, seed=5)
    results = beam_search(model, src, BOS, EOS, beam_size=4, alpha=0.6, max_extra=5, nbest=2)
    lengths = []
    for row, hyps in enumerate(results):
        expected = _reference_beam(model, _unpadded(src, row), k=4, alpha=0.6, max_extra=5, nbest=2)
        assert [h.tokens for h in hyps] == [tokens for tokens, _, _ in expected]
        torch.testing.assert_close([h.score for h in hyps], [score for _, score, _ in expected], rtol=0, atol=1e-5)
        torch.testing.assert_close([h.log_prob for h in hyps], [lp for _, _, lp in expected], rtol=0, atol=1e-5)
        lengths += [len(h.tokens) for h in hyps]
    assert len(set(lengths)) > 2  # outputs of several lengths: not a trivial case


def test_batching_changes_no_sentence() -> None:
    """Each sentence decoded alone equals it decoded in a padded batch of sentences of other lengths (which also
    finish, and leave the batch, at other steps)."""
    model = _model(2, vocab=12)
    src = _sources([3, 7, 5, 9, 2, 6], vocab=12, seed=2)
    batched = beam_search(model, src, BOS, EOS, beam_size=4, alpha=0.6, max_extra=6, nbest=3)
    greedy_batched = greedy_search(model, src, BOS, EOS, max_extra=6)
    for row, hyps in enumerate(batched):
        alone = beam_search(model, _unpadded(src, row)[None], BOS, EOS, beam_size=4, alpha=0.6, max_extra=6, nbest=3)
        assert [h.tokens for h in hyps] == [h.tokens for h in alone[0]]
        torch.testing.assert_close([h.score for h in hyps], [h.score for h in alone[0]], rtol=0, atol=1e-5)
        assert greedy_search(model, _unpadded(src, row)[None], BOS, EOS, max_extra=6)[0] == greedy_batched[row]
    assert len({len(hyps[0].tokens) for hyps in batched}) > 2


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_decoding_without_the_cache_gives_the_same_outputs(norm: str) -> None:
    model = _model(2, vocab=12, norm=norm)
    src = _sources([3, 7, 5, 9, 2, 6], vocab=12, seed=2)
    cached = beam_search(model, src, BOS, EOS, beam_size=4, alpha=0.6, max_extra=6, nbest=4)
    recomputed = beam_search(model, src, BOS, EOS, beam_size=4, alpha=0.6, max_extra=6, nbest=4, use_cache=False)
    for a, b in zip(cached, recomputed, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        torch.testing.assert_close([h.score for h in a], [h.score for h in b], rtol=0, atol=1e-5)
    assert greedy_search(model, src, BOS, EOS, max_extra=6) == greedy_search(
        model, src, BOS, EOS, max_extra=6, use_cache=False
    )


def test_nbest_are_distinct_sorted_and_scored_by_the_model() -> None:
    model = _model(2, vocab=12)
    src = _sources([3, 7, 5, 9, 2, 6], vocab=12, seed=2)
    results = beam_search(model, src, BOS, EOS, beam_size=5, alpha=0.6, max_extra=6, nbest=5)
    for row, hyps in enumerate(results):
        assert len(hyps) == 5 and all(isinstance(h, Hypothesis) for h in hyps)
        assert len({tuple(h.tokens) for h in hyps}) == 5  # the first step expands one beam: no duplicates
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        for h in hyps:
            assert EOS not in h.tokens and len(h.tokens) < _unpadded(src, row).numel() + 6
            log_prob = _log_prob(model, _unpadded(src, row), h.tokens)
            assert h.log_prob == pytest.approx(log_prob, abs=1e-5)
            assert h.score == pytest.approx(log_prob / _lp(len(h.tokens) + 1, 0.6), abs=1e-5)
    with pytest.raises(ValueError, match="nbest <= beam_size"):
        beam_search(model, src, BOS, EOS, beam_size=2, nbest=3)


def test_search_stops_once_no_live_hypothesis_can_win() -> None:
    """A model for which <eos> first is nearly certain: after one step the best live hypothesis, even if it kept
    its log-probability up to the longest allowed output (the bound log P / lp(L)), scores below the finished
    empty output, so the search ends there instead of running to input length + 50."""
    model = _model(3, vocab=12)
    src = _sources([6], vocab=12, seed=3)
    with torch.no_grad():
        first = F.log_softmax(model(src, torch.tensor([[BOS]]))[0, 0], dim=-1)  # (vocab,) the first step
    best_live = first[torch.arange(12) != EOS].max()
    assert float(best_live) / _lp(6 + 50, 0.6) < float(first[EOS])  # the bound, computed here
    calls = 0
    decode = model.decode

    def counting_decode(*args, **kwargs):
        nonlocal calls
        calls += 1
        return decode(*args, **kwargs)

    model.decode = counting_decode
    assert beam_search(model, src, BOS, EOS, beam_size=4, alpha=0.6, max_extra=50)[0][0].tokens == []
    assert calls == 1


def test_make_search_follows_the_evaluate_keys() -> None:
    model = _model(2, vocab=12)
    src = _sources([3, 7, 5], vocab=12, seed=2)
    keys = {"beam": 4, "alpha": 0.6, "nbest": 2, "max_extra": 6}
    search, description = make_search(OmegaConf.create(keys), BOS, EOS)
    assert description == {"search": "beam", **keys}
    assert search(model, src) == beam_search(model, src, BOS, EOS, beam_size=4, alpha=0.6, max_extra=6, nbest=2)

    search, description = make_search(OmegaConf.create({**keys, "beam": 1, "nbest": 1}), BOS, EOS)
    assert description == {"search": "greedy", "max_extra": 6}
    assert [hyps[0].tokens for hyps in search(model, src)] == greedy_search(model, src, BOS, EOS, max_extra=6)
    with pytest.raises(RunFolderError, match="evaluate.nbest=5: must be between 1 and the beam size, 4"):
        make_search(OmegaConf.create({**keys, "nbest": 5}), BOS, EOS)


class _SpaceSeparatedIds:
    """A stand-in for data.Tokenizer: "5 6 7" <-> [5, 6, 7]."""

    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, sentences: list[str]) -> list[list[int]]:
        return [[int(t) for t in s.split()] for s in sentences]

    def decode(self, batch: list[list[int]]) -> list[str]:
        return [" ".join(map(str, row)) for row in batch]


def test_validation_translations_use_val_beam() -> None:
    """run.val_beam reaches TranslationModule (saved with its hyper-parameters); a checkpoint written before the
    argument existed loads with greedy decoding."""
    model_cfg = {"vocab_size": 12, "n_layers": 2, "d_model": 32, "d_ff": 64, "n_heads": 2, "dropout": 0.0}
    optim = {"label_smoothing": 0.1, "betas": [0.9, 0.98], "eps": 1e-9, "warmup_steps": 10}
    module = TranslationModule(model=model_cfg, optim=optim, val_beam=3, val_alpha=0.6).eval()
    assert module.hparams["val_beam"] == 3 and module.hparams["val_alpha"] == 0.6
    with torch.no_grad():
        module.model.decoder.embedding.weight.mul_(3.0)  # peaked distributions (tied projection): see _model
    sentences = ["5 6 7", "8 9 10 11 4 5", "6"]
    src = torch.tensor([[5, 6, 7, 3, 0, 0, 0], [8, 9, 10, 11, 4, 5, 3], [6, 3, 0, 0, 0, 0, 0]])
    beam = [" ".join(map(str, h[0].tokens)) for h in beam_search(module.model, src, BOS, EOS, beam_size=3)]
    greedy = [" ".join(map(str, t)) for t in greedy_search(module.model, src, BOS, EOS)]
    assert beam != greedy  # the check below can tell the two apart
    assert module.translate(sentences, _SpaceSeparatedIds()) == beam

    old_hparams = {k: v for k, v in module.hparams.items() if k not in ("val_beam", "val_alpha")}
    old = TranslationModule(**old_hparams)
    old.load_state_dict(module.state_dict())
    assert old.translate(sentences, _SpaceSeparatedIds()) == greedy


def test_bf16_decoding_runs_in_bf16_and_scores_like_float32() -> None:
    """translate_ids(precision="bf16-mixed") (evaluate.precision): the decoder's matmuls run in bf16, and each
    hypothesis' log-probability is the float32 model's, teacher-forced, within bf16's precision; nothing else
    changes (the hypotheses are complete sentences). An unknown precision names the key."""
    from modules.decoding import translate_ids

    model = _model(5, vocab=40)
    src = _sources([5, 8, 3, 7, 6, 4], vocab=40, seed=5)
    sources = [_unpadded(src, row)[:-1].tolist() for row in range(src.size(0))]  # ids without <eos>

    def search(model, batch):  # noqa: ANN001
        return beam_search(model, batch, BOS, EOS, beam_size=4, alpha=0.6, max_extra=5)

    dtypes = set()
    hook = model.decoder.layers[0].ffn.w_1.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    nbest = translate_ids(model, sources, search, PAD, EOS, 64, torch.device("cpu"), "bf16-mixed")
    hook.remove()
    assert dtypes == {torch.bfloat16}
    for row, hyps in enumerate(nbest):
        source = torch.tensor([*sources[row], EOS])
        float32 = _log_prob(model, source, hyps[0].tokens)
        assert abs(hyps[0].log_prob - float32) <= 0.02 * abs(float32) + 0.05, (row, hyps[0].log_prob, float32)
    with pytest.raises(ValueError, match="evaluate.precision"):
        translate_ids(model, sources, search, PAD, EOS, 64, torch.device("cpu"), "16-mixed")


@pytest.mark.parametrize("vocab", [8000, 37000, 8000 + 17])  # enough blocks for the blocked search
def test_blocked_top_k_gives_topk(vocab):
    """modules/beam.top_k against torch.topk on rows without ties (values and columns), with the largest entries
    packed into one block, spread over blocks, in the short last block, and with -inf entries (masked tokens)."""
    from modules.beam import TOP_K_BLOCK, top_k

    torch.manual_seed(0)
    rows = torch.randn(6, vocab, dtype=torch.float64).float()  # distinct values: no ties to break differently
    rows[1, :16] += 100.0  # the 16 best in the first block
    rows[2, -3:] += 100.0  # three of the best in the last (possibly short) block
    rows[3, ::TOP_K_BLOCK] += 100.0  # one best per block
    rows[4, 5:] = float("-inf")  # only 5 finite entries
    for k in (1, 8, 16):
        ours, theirs = top_k(rows, k), rows.topk(k, dim=1)
        assert torch.equal(ours[0], theirs[0]), k
        assert torch.equal(ours[1][torch.isfinite(ours[0])], theirs[1][torch.isfinite(theirs[0])]), k
