"""Evaluation metrics on a hand-checkable synthetic log, AUROC against brute force, and the round
log of a real generation against its SpecStats."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import randomize_params
from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.eval import auroc, calibration, reliability_plot, summarize
from dspark_jax.models import create_target
from dspark_jax.speculative.decode import RoundLog
from dspark_jax.engine import generate
from dspark_jax.speculative.sampling import SamplingParams
from dspark_jax.speculative.schedule import SpecParams


def synthetic_log() -> RoundLog:
    """Five rounds at γ=3: all accepted; one; none; a scheduled length of 2 fully accepted; and an
    accepted EOS at the second draft (the round commits only the two accepted drafts)."""
    return RoundLog(request=np.array([0, 0, 1, 1, 2]), lengths=np.array([3, 3, 3, 2, 3]),
                    accepted=np.array([3, 1, 0, 2, 2]), committed=np.array([4, 2, 1, 3, 2]),
                    confidence_logits=np.zeros((5, 3), np.float32))


def test_summary_of_a_synthetic_log_by_hand():
    out = summarize(synthetic_log(), 3)
    assert out["tau"] == pytest.approx(12 / 5)
    assert out["rounds"] == 5
    # position 1: 5 rounds reach it, 4 accept; position 2: 4 reach (accepted ≥ 1), 3 accept;
    # position 3: rounds 1 and 5 reach it (round 4 verified only 2), round 1 accepts
    assert out["accept_cond"] == pytest.approx([4 / 5, 3 / 4, 1 / 2])
    assert out["survival"] == pytest.approx([4 / 5, 3 / 5, 1 / 5])
    assert out["verify_efficiency"] == pytest.approx(12 / 19)
    cal = out["calibration"]["before_sts"]
    # every σ(0) = 1/2, so a = (1/2, 1/4, 1/8) over the 14 verified (round, position) pairs
    assert cal["pairs"] == 14
    assert cal["brier"] == pytest.approx(3.875 / 14)
    assert cal["ece"] == pytest.approx(3.75 / 14)
    assert cal["auroc"] == pytest.approx(35.5 / 48)
    assert [(b["bin"], b["count"]) for b in cal["reliability"]] == [(2, 4), (5, 5), (10, 5)]
    assert [b["observed"] for b in cal["reliability"]] == pytest.approx([1 / 4, 3 / 5, 4 / 5])
    assert "after_sts" not in out["calibration"]


def test_sts_temperatures_divide_the_logits():
    rng = np.random.default_rng(0)
    log = synthetic_log()
    conf = rng.normal(size=(5, 3))
    temps = np.array([0.5, 2.0, 1.5])
    after = calibration(conf, log.accepted, log.lengths, temps)
    scaled = calibration(conf / temps, log.accepted, log.lengths, np.ones(3))
    for key in ("ece", "auroc", "brier"):
        assert after[key] == pytest.approx(scaled[key]), key


def test_auroc_equals_counting_pairs():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, 60) / 5.0  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])
    assert auroc(scores, labels) == pytest.approx(brute)
    assert auroc(scores, np.ones(60, bool)) is None


def test_reliability_png(tmp_path):
    out = {"set": summarize(synthetic_log(), 3, temps=[1.2, 0.8, 1.0])}
    path = reliability_plot(out, tmp_path / "result.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert reliability_plot({"set": {"tau": 2.0}}, tmp_path / "none.png") is None


def test_round_log_agrees_with_spec_stats():
    vocab = 37
    arch = LlamaArch(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=8, tie_word_embeddings=False, eos_token_ids=(5,), max_position_embeddings=256)
    target = randomize_params(create_target(arch, dtype="float32"), seed=3, scale=0.3)
    draft = randomize_params(create_draft(DraftConfig(kind="dspark", num_layers=1, target_layer_ids=(0, 1),
                                                      mask_token_id=vocab - 1, markov_rank=8, block_size=4), target),
                             seed=4, scale=0.3)
    prompts = [[1, 2, 3], [4, 9, 9, 9, 2], [7], [3, 3]]
    res = generate(target, draft, prompts, max_new_tokens=24, sampling=SamplingParams(temperature=1.0),
                   spec=SpecParams(block_size=4), record_rounds=True, seed=2)
    log, stats = res.rounds, res.stats
    assert len(log.accepted) == stats.rounds and int(log.committed.sum()) == stats.committed_tokens
    assert int((log.lengths + 1).sum()) == stats.verified_tokens
    assert log.confidence_logits.shape == (stats.rounds, 4)
    out = summarize(log, 4)
    assert out["tau"] == pytest.approx(stats.acceptance_length)
    assert out["accept_cond"] == pytest.approx(stats.accept_rate_per_position)
    assert out["survival"] == pytest.approx(stats.survival_per_position)
    assert stats.survival_per_position[0] > 0  # the check is not vacuous: some drafts were accepted
    for r, tokens in enumerate(res.tokens):  # each request's committed tokens are its output (less the first)
        assert int(log.committed[log.request == r].sum()) == len(tokens) - 1
    assert generate(target, draft, prompts, max_new_tokens=24, sampling=SamplingParams(temperature=1.0),
                    spec=SpecParams(block_size=4), seed=2).rounds is None
