"""The top-k/top-p floor, vocabulary statistics, fused verification and the Markov loop (CPU; kernels interpreted).

The floor (`warp_floor`, an exact threshold select) is checked against sorting each row — the
definition it replaced, kept here only as the oracle — on rows of many kinds. The kernels run in
GPU interpret mode: fresh random inputs every case; vocabularies with a partial last block and below one block;
temperatures, top-k/top-p and greedy rows mixed in one batch; γ from 0 to 16. The interpreter
fills outputs with NaN, so an unwritten block statistic shows up. Draws use the same uniforms as
the references, so the tokens must be equal.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.speculative.sampling import SamplingArrays, SamplingParams
from pallas_kernels import fused_verify as fv
from pallas_kernels import markov_sample as ms
from pallas_kernels import vocab_stats as vs
from pallas_kernels.common import inverse_cdf, scaled_logits, warp_floor, warp_probs

B = vs.BLOCK
MIXED = (SamplingParams(1.0), SamplingParams(0.0), SamplingParams(0.7, top_k=40), SamplingParams(1.3, top_p=0.8),
         SamplingParams(0.9, top_k=200, top_p=0.95))


def _rng(*parts):
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def _sampling(rows, params):
    return SamplingArrays.of([params[i % len(params)] for i in range(rows)])


def _sort_floor(x, sampling):
    """The oracle: max(k_floor, p_floor) [...] of scaled logits x [..., V], by sorting each row (the old warp)."""
    vocab = x.shape[-1]
    top_k, top_p = sampling.top_k[:, None], sampling.top_p[:, None]
    ordered = -jnp.sort(-x, axis=-1)
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)
    k_floor = jnp.where(top_k > 0, kth, -jnp.inf)
    ordered = jnp.where(ordered >= k_floor, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = (mass_before < top_p) & (ordered > -jnp.inf)
    p_floor = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.maximum(k_floor, jnp.where(top_p < 1.0, p_floor, -jnp.inf))[:, 0]


ROW_KINDS = ("gauss", "gauss_wide", "ties", "flat", "peaked", "neg_inf", "bf16", "mass_tie", "constant")


def _row(rng, kind, vocab):
    """One row of logits of a kind: Gaussian, heavy ties, flat, one peak, −inf entries, bf16-rounded, ..."""
    if kind == "gauss":
        return 3.0 * rng.standard_normal(vocab)
    if kind == "gauss_wide":  # values spread over many binades, both signs, and far below the max
        spread = rng.standard_normal(vocab) * 10.0 ** rng.uniform(-30, 2, vocab)
        return spread - np.where(rng.random(vocab) < 0.1, 1e4, 0)
    if kind == "ties":
        return np.round(4.0 * rng.standard_normal(vocab)) / 4
    if kind == "flat":
        return 1e-3 * rng.standard_normal(vocab)
    if kind == "peaked":
        return np.where(np.arange(vocab) < 3, 12.0 + rng.standard_normal(vocab), rng.standard_normal(vocab))
    if kind == "neg_inf":  # masked entries, sometimes all but a few
        row = 3.0 * rng.standard_normal(vocab)
        return np.where(rng.random(vocab) < rng.choice([0.3, 0.995]), -np.inf, row)
    if kind == "bf16":
        return np.asarray(jnp.asarray(3.0 * rng.standard_normal(vocab), jnp.bfloat16).astype(jnp.float32))
    if kind == "mass_tie":  # one token at 0, two at −ln 2: the top token's mass is 1/2 (top_p 0.5 hits it)
        return np.concatenate([[0.0, -np.log(2.0), -np.log(2.0)], np.full(vocab - 3, -200.0)])[rng.permutation(vocab)]
    return np.full(vocab, rng.standard_normal())  # constant


def _assert_mass_tie(x, floors, top_k, top_p):
    """Two floors of one row may differ only where the top-p crossing between them is a tie at fp32 rounding.

    In exact arithmetic (float64 here) the mass of the tokens at or above the higher floor and the
    mass strictly above the lower one must both be top_p within 1e-6 (fp32 sums of ≤ 151,936
    probabilities, in blocks or as a cumulative sum, are that accurate).
    """
    x = np.asarray(x, np.float64)
    kth = np.sort(x)[::-1][min(top_k, x.size) - 1] if top_k > 0 else -np.inf
    weight = np.where(x >= kth, np.exp(np.where(x >= kth, x - x.max(), 0.0)), 0.0)
    probs = weight / weight.sum()
    low, high = min(floors), max(floors)
    assert top_p < 1.0 and low >= kth, (floors, kth)  # the k_floor is exact: only the p_floor may differ
    assert probs[x >= high].sum() > top_p - 1e-6 and probs[x > low].sum() < top_p + 1e-6, (floors, top_p)


@pytest.mark.parametrize("vocab,rows", [(1000, 4 * len(ROW_KINDS) * 6 * 5), (151936, 36)])
def test_warp_floor_equals_the_sort_floor(vocab, rows):
    """Each row kind × top-k in {0, 1, 2, 20, V−1, V} × top-p in {0.05, 0.5, 0.8, 0.95, 1}, mixed temperatures."""
    rng = _rng("floor", vocab)
    combos = [(kind, k, p) for kind in ROW_KINDS for k in (0, 1, 2, 20, vocab - 1, vocab)
              for p in (0.05, 0.5, 0.8, 0.95, 1.0)]
    order = range(rows) if rows >= len(combos) else rng.permutation(len(combos))[:rows]  # all, or a random few
    picks = [combos[i % len(combos)] for i in order]
    logits = jnp.asarray(np.stack([_row(rng, kind, vocab) for kind, _, _ in picks]), jnp.float32)
    top_k = np.asarray([k for _, k, _ in picks], np.int32)
    top_p = np.asarray([p for _, _, p in picks], np.float32)
    top_k[0], top_p[0] = 0, 1.0  # a row without filters in a batch with them: its floor is −inf
    sampling = SamplingArrays(jnp.asarray(rng.choice([0.0, 0.3, 0.7, 1.0, 1.5], rows), jnp.float32),
                              jnp.asarray(top_k), jnp.asarray(top_p), True)
    x = jax.jit(scaled_logits)(logits, sampling)
    got = np.asarray(jax.jit(warp_floor)(x, sampling))
    want = np.asarray(jax.jit(_sort_floor)(x, sampling))
    assert got[0] == -np.inf
    for r in np.nonzero(got != want)[0]:
        _assert_mass_tie(x[r], (got[r], want[r]), int(top_k[r]), float(top_p[r]))


@pytest.mark.parametrize("vocab,dtype,with_x2,with_floor,ctas", [
    (2 * B + 77, jnp.float32, True, True, None),
    (3 * B, jnp.bfloat16, False, False, 2),  # two CTAs per row: each walks a run of blocks
    (B + 1, jnp.float32, False, True, None),
    (300, jnp.float32, True, False, None),  # below one block: the reference summarises it
])
def test_vocab_stats_matches_reference(vocab, dtype, with_x2, with_floor, ctas):
    rng = _rng("stats", vocab, with_x2)
    rows = 3
    x = jnp.asarray(3.0 * rng.standard_normal((rows, vocab)), dtype)
    x2 = jnp.asarray(rng.standard_normal((rows, vocab)), dtype) if with_x2 else None
    temperature = jnp.asarray([1.0, 0.6, 1.7], jnp.float32)
    floor = jnp.asarray([-jnp.inf, 1.0, 9.0], jnp.float32) if with_floor else None  # 9.0: most blocks empty
    got = vs.vocab_stats(x, x2, temperature, floor, interpret=True, ctas=ctas)
    want = vs.vocab_stats_reference(x, x2, temperature, floor)
    for g, w in zip(got, want):
        assert g.shape == w.shape == (rows, -(-vocab // B)) and g.dtype == w.dtype
        assert not np.isnan(np.asarray(g, np.float32)).any()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)  # ±inf compare equal
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    np.testing.assert_array_equal(got[2], want[2])


def test_row_stats_and_two_level_draw_follow_inverse_cdf():
    rng = _rng("blocks")
    rows, vocab = 64, 2 * B + 500
    logits = 4.0 * rng.standard_normal((rows, vocab))
    logits[:, B:2 * B] = -np.inf  # a whole empty block in the middle
    logits[::3, -300:] = -np.inf  # empty tails
    x = jnp.asarray(logits, jnp.float32)
    row_max, norm, argmax, block_mass = vs.row_stats(*vs.vocab_stats_reference(x, None, jnp.ones(rows), None))
    probs = jax.nn.softmax(x, axis=-1)
    np.testing.assert_array_equal(argmax, jnp.argmax(x, axis=-1))
    np.testing.assert_allclose(block_mass.sum(1), 1.0, rtol=1e-5)
    u = jnp.asarray(np.concatenate([[1.0, 1e-9], 1.0 - rng.uniform(size=rows - 2)]), jnp.float32)
    padded = jnp.pad(probs, ((0, 0), (0, 3 * B - vocab))).reshape(rows, 3, B)
    got = np.asarray(vs.sample_blocks(block_mass, u, lambda b: jnp.take_along_axis(padded, b[:, None, None], 1)[:, 0]))
    want = np.asarray(inverse_cdf(probs, u))
    np.testing.assert_array_equal(got[2:], want[2:])
    # u = 1 and u → 0 sit on the ends of the CDF, where fp32 summation order decides: any index
    # whose cumulative mass is within rounding of the target is exact; it must have positive mass.
    cdf = np.cumsum(np.asarray(probs, np.float64), axis=1)
    for r in (0, 1):
        target = float(u[r]) * cdf[r, -1]
        assert cdf[r, got[r]] >= target - 1e-6 and (got[r] == 0 or cdf[r, got[r] - 1] <= target + 1e-6)
    assert np.all(np.take_along_axis(np.asarray(probs), got[:, None], 1) > 0)


def _draft(rng, target_logits, sampling, gamma):
    """Draft distributions near the target's and tokens drawn from them."""
    rows, _, vocab = target_logits.shape
    draft_logits = target_logits[:, :gamma] + jnp.asarray(0.5 * rng.standard_normal((rows, gamma, vocab)), jnp.float32)
    q = warp_probs(draft_logits, sampling)
    u = jnp.asarray(1.0 - rng.uniform(size=(rows, gamma)), jnp.float32)
    return inverse_cdf(q, u), q


@pytest.mark.parametrize("gamma,vocab", [(0, B + 33), (1, 2 * B), (3, 2 * B + 77), (16, 600)])
def test_fused_verify_matches_reference(gamma, vocab):
    rng = _rng("verify", gamma, vocab)
    rows = 10
    sampling = _sampling(rows, MIXED)
    target_logits = jnp.asarray(2.0 * rng.standard_normal((rows, gamma + 1, vocab)), jnp.float32)
    tokens, q = _draft(rng, target_logits, sampling, gamma)
    lengths = jnp.asarray(rng.integers(0, gamma + 1, rows), jnp.int32).at[0].set(gamma)
    accept_u = jnp.asarray(rng.uniform(size=(rows, gamma)), jnp.float32)
    resample_u = jnp.asarray(1.0 - rng.uniform(size=rows), jnp.float32)
    args = (target_logits, tokens, q, lengths, accept_u, resample_u, sampling)
    got = fv.fused_verify(*args, interpret=True)
    want = fv.fused_verify_reference(*args)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_fused_verify_rejections_draw_from_the_residual():
    """Drafts that disagree with the target: most rows reject, and the residual draw decides the token."""
    rng = _rng("verify-reject")
    rows, gamma, vocab = 12, 4, B + 300
    sampling = _sampling(rows, (SamplingParams(1.0), SamplingParams(0.8, top_k=30)))
    target_logits = jnp.asarray(3.0 * rng.standard_normal((rows, gamma + 1, vocab)), jnp.float32)
    other = jnp.asarray(3.0 * rng.standard_normal((rows, gamma, vocab)), jnp.float32)
    q = warp_probs(other, sampling)
    tokens = inverse_cdf(q, jnp.asarray(1.0 - rng.uniform(size=(rows, gamma)), jnp.float32))
    args = (target_logits, tokens, q, jnp.full((rows,), gamma, jnp.int32),
            jnp.asarray(rng.uniform(size=(rows, gamma)), jnp.float32),
            jnp.asarray(1.0 - rng.uniform(size=rows), jnp.float32), sampling)
    got, want = fv.fused_verify(*args, interpret=True), fv.fused_verify_reference(*args)
    assert int(jnp.sum(want[0] < gamma)) >= rows // 2
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_fused_verify_on_tied_logits_matches_reference():
    """bf16-rounded logits with −inf entries (ties at every threshold) and the filters' corner settings."""
    rng = _rng("verify-ties")
    rows, gamma, vocab = 8, 2, B + 33
    params = (SamplingParams(0.7, top_k=1), SamplingParams(1.0, top_k=2, top_p=0.5), SamplingParams(1.0, top_p=0.05),
              SamplingParams(0.0, top_k=20), SamplingParams(1.3, top_k=vocab - 1, top_p=0.95),
              SamplingParams(1.0, top_k=20, top_p=0.8))
    sampling = _sampling(rows, params)
    logits = np.round(2.0 * rng.standard_normal((rows, gamma + 1, vocab)), 1)
    logits[rng.random(logits.shape) < 0.2] = -np.inf
    target_logits = jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)
    tokens, q = _draft(rng, target_logits, sampling, gamma)
    args = (target_logits, tokens, q, jnp.full((rows,), gamma, jnp.int32),
            jnp.asarray(rng.uniform(size=(rows, gamma)), jnp.float32),
            jnp.asarray(1.0 - rng.uniform(size=rows), jnp.float32), sampling)
    got, want = fv.fused_verify(*args, interpret=True), fv.fused_verify_reference(*args)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("gamma,vocab,head", [(1, 2 * B + 5, True), (5, B + 700, True), (16, 700, False)])
def test_markov_sample_matches_reference(gamma, vocab, head):
    rng = _rng("markov", gamma, vocab, head)
    rows, rank = 5, 16
    sampling = _sampling(rows, MIXED)
    base = jnp.asarray(2.0 * rng.standard_normal((rows, gamma, vocab)), jnp.float32)
    w1 = jnp.asarray(rng.standard_normal((vocab, rank)), jnp.float32) if head else None
    w2 = jnp.asarray(0.5 * rng.standard_normal((rank, vocab)), jnp.float32) if head else None
    anchors = jnp.asarray(rng.integers(0, vocab, rows), jnp.int32)
    u = jnp.asarray(1.0 - rng.uniform(size=(rows, gamma)), jnp.float32)
    tokens, probs = ms.markov_sample(base, anchors, w1, w2, u, sampling, interpret=True)
    want_tokens, want_probs = ms.markov_sample_reference(base, anchors, w1, w2, u, sampling)
    np.testing.assert_array_equal(tokens, want_tokens)
    assert probs.shape == want_probs.shape and probs.dtype == jnp.float32
    np.testing.assert_allclose(probs, want_probs, atol=1e-6)


@pytest.mark.parametrize("dtype,with_x2,with_floor", [(jnp.float32, True, False), (jnp.bfloat16, False, True)])
def test_vocab_stats_lowers_to_mosaic_gpu(dtype, with_x2, with_floor):
    rows, vocab = 512, 151936
    sds = jax.ShapeDtypeStruct
    fn = jax.jit(lambda x, x2, t, f: vs.vocab_stats(x, x2, t, f))
    lowered = fn.trace(sds((rows, vocab), dtype), sds((rows, vocab), dtype) if with_x2 else None,
                       sds((rows,), jnp.float32), sds((rows,), jnp.float32) if with_floor else None
                       ).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
