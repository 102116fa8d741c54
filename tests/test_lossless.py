"""Losslessness at T > 0, statistically, with negative controls that must fail the same test.

A toy second-order Markov target and a toy DSpark-like draft (base logits per block position
from the anchor, a Markov bias on the previous draft token, confidences that depend on the
previous draft token) run the real sampling warp, schedulers and `verify` in a full generation
loop over 10^6 independent sequences. The joint law of the first three generated tokens must
match the target's exact law (chi-square, Bonferroni over the positive cases). The controls —
the retrospective scheduler of paper appendix A, bf16 draft sampling against fp32 q, a draft that
ignores temperature, and q that is not the sampled distribution — must be rejected.

Every case runs with both verify implementations (`kernels.fused_verify`): the reference ("xla")
and the fused path ("interpret": per-row softmax statistics, gathered p/q at the draft tokens,
the two-level inverse-CDF draw; this vocabulary is below one kernel block, so its statistics come
from the block reference — the Mosaic kernel is compared with it in test_kernels_sampling.py).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dspark_jax import kernels
from dspark_jax.speculative.sampling import SamplingArrays, SamplingParams, sample_from_probs, warp_probs
from dspark_jax.speculative.schedule import admit_top, best_capacity, schedule_prefix, survival, threshold_lengths
from dspark_jax.speculative.verify import verify

VOCAB, GAMMA, PROMPT = 5, 3, (0, 1)
SEQUENCES = 1_000_000
CHUNK = 250_000
ALPHA = 1e-3  # family-wise: a correct implementation fails this file with probability ≤ 0.1%

rng = np.random.default_rng(1234)
TARGET = jnp.asarray(2.0 * rng.standard_normal((VOCAB, VOCAB, VOCAB)), jnp.float32)  # [x_{t-2}, x_{t-1}] -> logits
# Draft logits sit around 40, as real LLM logits can, where bf16's spacing is 1/4: the bf16 control
# then distorts the sampled distribution by a few percent, like the real bug.
DRAFT_BASE = jnp.asarray(40.0 + 1.5 * rng.standard_normal((VOCAB, GAMMA, VOCAB)), jnp.float32)  # [anchor, k]
DRAFT_MARKOV = jnp.asarray(1.0 * rng.standard_normal((VOCAB, VOCAB)), jnp.float32)  # [x_{k-1}] -> bias
CONFIDENCE = jnp.asarray(1.5 * rng.standard_normal((GAMMA, VOCAB)) + 0.5, jnp.float32)  # [k, x_{k-1}] -> logit


@dataclasses.dataclass(frozen=True)
class Case:
    sampling: SamplingParams
    scheduler: str  # fixed | threshold | causal | async | retrospective
    fixed_length: int = GAMMA
    group: int = 1  # requests scheduled together
    draft_bug: str = ""  # "", "bf16", "ignores_temperature", "q_not_sampled"
    sps: tuple[float, ...] = ()


def steep_sps(rows):
    # Throughput falls fast with batch tokens, so causal scheduling really cuts drafts.
    return tuple(1.0 / (1.0 + 0.35 * b) for b in range(rows * (GAMMA + 1) + 1))


APPENDIX_A_SPS = (0.0, 1.0, 0.5, 0.45, 0.44)  # SPS(1)=1.0, SPS(2)=0.5, SPS(3)=0.45 as in appendix A

POSITIVE = {
    "t1_fixed": Case(SamplingParams(temperature=1.0), "fixed"),
    "t07_topk3_len2": Case(SamplingParams(temperature=0.7, top_k=3), "fixed", fixed_length=2),
    "t1_len0": Case(SamplingParams(temperature=1.0), "fixed", fixed_length=0),
    "t13_topp08_causal": Case(SamplingParams(temperature=1.3, top_p=0.8), "causal", sps=steep_sps(1)),
    "t1_topk2_topp09_threshold": Case(SamplingParams(temperature=1.0, top_k=2, top_p=0.9), "threshold"),
    "t05_async_group4": Case(SamplingParams(temperature=0.5), "async", group=4, sps=steep_sps(4)),
    "t1_causal_group4": Case(SamplingParams(temperature=1.0), "causal", group=4, sps=steep_sps(4)),
    "t1_causal_appendix_a": Case(SamplingParams(temperature=1.0), "causal", sps=APPENDIX_A_SPS),
}
NEGATIVE = {
    "retrospective_scheduler": Case(SamplingParams(temperature=1.0), "retrospective", sps=APPENDIX_A_SPS),
    "bf16_draft_sampling": Case(SamplingParams(temperature=1.0), "fixed", draft_bug="bf16"),
    "draft_ignores_temperature": Case(SamplingParams(temperature=0.6), "fixed", draft_bug="ignores_temperature"),
    "q_not_sampled_distribution": Case(SamplingParams(temperature=1.0), "fixed", draft_bug="q_not_sampled"),
}


def retrospective_lengths(a, sps):
    """The negative control: Algorithm 1 without the early stop (global argmax of Θ over the path)."""
    rows, gamma = a.shape
    order = jnp.lexsort((jnp.arange(rows * gamma), jnp.tile(jnp.arange(gamma), rows), -a.reshape(-1)))
    a_sorted = a.reshape(-1)[order]
    theta = (rows + jnp.concatenate([jnp.zeros(1), jnp.cumsum(a_sorted)])) * jnp.asarray(sps)[rows + jnp.arange(rows * gamma + 1)]
    best = jnp.argmax(jnp.where(jnp.concatenate([jnp.ones(1, bool), a_sorted > 0]), theta, -jnp.inf))
    admitted = jnp.arange(rows * gamma) < best
    return jax.ops.segment_sum(admitted.astype(jnp.int32), order // gamma, num_segments=rows)


def sampling_arrays(params: SamplingParams, n: int) -> SamplingArrays:
    return SamplingArrays(jnp.full((n,), params.temperature, jnp.float32), jnp.full((n,), params.top_k, jnp.int32),
                          jnp.full((n,), params.top_p, jnp.float32), params.filters)


def bf16(x):
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)


def draft_block(case: Case, anchors, samp, keys):
    """Sequential toy DSpark draft: tokens [N, γ], reported q [N, γ, V], confidence logits [N, γ]."""
    prev, tokens, probs, conf = anchors, [], [], []
    for k in range(GAMMA):
        logits = DRAFT_BASE[anchors, k] + DRAFT_MARKOV[prev]
        q = warp_probs(logits, samp)
        if case.draft_bug == "bf16":
            # Round to bf16 explicitly: XLA may drop an f32->bf16->f32 convert pair (excess precision).
            drawn_from = warp_probs(bf16(logits), samp)
        elif case.draft_bug == "ignores_temperature":
            drawn_from = jax.nn.softmax(logits, -1)
        elif case.draft_bug == "q_not_sampled":
            drawn_from, q = q, warp_probs(DRAFT_BASE[anchors, k], samp)
        else:
            drawn_from = q
        token = sample_from_probs(drawn_from, jax.vmap(lambda key: jax.random.fold_in(key, k))(keys))
        conf.append(CONFIDENCE[k, prev])
        tokens.append(token)
        probs.append(q)
        prev = token
    return jnp.stack(tokens, 1), jnp.stack(probs, 1), jnp.stack(conf, 1)


@functools.partial(jax.jit, static_argnames=("case", "backend"))
def run_round(case: Case, ctx, out, count, capacity, prev_capacity, fixed_lengths, key, backend: str):
    """One round for every sequence; ctx [N, 2] holds the last two committed tokens (ctx[:, 1] = anchor)."""
    n = ctx.shape[0]
    samp = sampling_arrays(case.sampling, n)
    draft_keys, verify_keys = jax.random.split(key)
    tokens, q, conf_logits = draft_block(case, ctx[:, 1], samp, jax.random.split(draft_keys, n))
    # target logits after [x0, x1..xγ]: row k conditions on (x_{k-1}, x_k)
    seq = jnp.concatenate([ctx, tokens], axis=1)
    target_logits = jnp.stack([TARGET[seq[:, k], seq[:, k + 1]] for k in range(GAMMA + 1)], axis=1)

    confidence = jax.nn.sigmoid(conf_logits)
    a = survival(confidence)
    grouped = a.reshape(n // case.group, case.group, GAMMA)
    next_capacity = capacity
    if case.scheduler == "fixed":
        lengths = fixed_lengths
    elif case.scheduler == "threshold":
        lengths = threshold_lengths(confidence, 0.45, jnp.full_like(fixed_lengths, GAMMA))
    elif case.scheduler == "causal":
        lengths = jax.vmap(lambda s: schedule_prefix(s, case.sps))(grouped).reshape(n)
    elif case.scheduler == "async":
        # capacity K comes from two rounds back; this round records its own for later
        lengths = jax.vmap(admit_top)(grouped, prev_capacity).reshape(n)
        next_capacity = jax.vmap(lambda s: best_capacity(s, case.sps))(grouped)
    else:
        lengths = jax.vmap(lambda s: retrospective_lengths(s, case.sps))(grouped).reshape(n)

    with kernels.use(backend):
        accepted, nxt = verify(target_logits, tokens, q, lengths, verify_keys, samp)
    committed = jnp.where(jnp.arange(GAMMA + 1)[None, :] == accepted[:, None], nxt[:, None],
                          jnp.concatenate([tokens, tokens[:, :1]], 1))
    rows = jnp.arange(n)
    for i in range(GAMMA + 1):  # append committed[:, i] where i ≤ accepted and room is left
        write = (i <= accepted) & (count < 3)
        at = jnp.minimum(count, 2)
        out = out.at[rows, at].set(jnp.where(write, committed[:, i], out[rows, at]))
        count = count + write
    last = jnp.take_along_axis(committed, accepted[:, None], 1)[:, 0]
    before = jnp.where(accepted > 0, jnp.take_along_axis(committed, jnp.maximum(accepted - 1, 0)[:, None], 1)[:, 0],
                       ctx[:, 1])
    return jnp.stack([before, last], 1), out, count, next_capacity, capacity


def sample_first_three(case: Case, seed: int, backend: str) -> np.ndarray:
    counts = np.zeros(VOCAB ** 3, np.int64)
    for c in range(SEQUENCES // CHUNK):
        key = jax.random.key(seed * 1000 + c)
        ctx = jnp.tile(jnp.asarray(PROMPT, jnp.int32), (CHUNK, 1))
        out = jnp.zeros((CHUNK, 3), jnp.int32)
        count = jnp.zeros((CHUNK,), jnp.int32)
        groups = CHUNK // case.group
        capacity = prev_capacity = jnp.full((groups,), case.group * GAMMA, jnp.int32)
        fixed_lengths = jnp.full((CHUNK,), case.fixed_length, jnp.int32)
        for r in range(3):  # every round commits at least one token
            ctx, out, count, capacity, prev_capacity = run_round(case, ctx, out, count, capacity, prev_capacity,
                                                                 fixed_lengths, jax.random.fold_in(key, r), backend)
        assert bool(jnp.all(count == 3))
        flat = np.asarray(out[:, 0] * VOCAB * VOCAB + out[:, 1] * VOCAB + out[:, 2])
        counts += np.bincount(flat, minlength=VOCAB ** 3)
    return counts


def exact_law(params: SamplingParams) -> np.ndarray:
    samp = sampling_arrays(params, 1)
    law = np.zeros(VOCAB ** 3)
    for a, b, c in itertools.product(range(VOCAB), repeat=3):
        p1 = warp_probs(TARGET[PROMPT[0], PROMPT[1]][None], samp)[0, a]
        p2 = warp_probs(TARGET[PROMPT[1], a][None], samp)[0, b]
        p3 = warp_probs(TARGET[a, b][None], samp)[0, c]
        law[a * VOCAB * VOCAB + b * VOCAB + c] = float(p1) * float(p2) * float(p3)
    return law / law.sum()  # the fp32 warps sum to 1 only up to rounding


def chi_square_pvalue(counts: np.ndarray, law: np.ndarray) -> float:
    assert counts[law == 0].sum() == 0, "a token the target can never produce was generated"
    expected = law * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(stats.chisquare(obs[keep], exp[keep]).pvalue)


VERIFY_BACKENDS = ("xla", "interpret")


@pytest.mark.slow
@pytest.mark.parametrize("backend", VERIFY_BACKENDS)
@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_joint_law_of_first_three_tokens_matches_target(name, backend):
    case = POSITIVE[name]
    p = chi_square_pvalue(sample_first_three(case, zlib.crc32(name.encode()), backend), exact_law(case.sampling))
    assert p > ALPHA / (len(POSITIVE) * len(VERIFY_BACKENDS)), f"{name}: p = {p:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", VERIFY_BACKENDS)
@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_negative_controls_are_detected(name, backend):
    case = NEGATIVE[name]
    p = chi_square_pvalue(sample_first_three(case, zlib.crc32(name.encode()), backend), exact_law(case.sampling))
    assert p < ALPHA / (len(POSITIVE) * len(VERIFY_BACKENDS)), f"{name} was not detected: p = {p:.3g}"


def test_appendix_a_scheduler_stops_before_the_first_token():
    # a1 = 0.8 with SPS(1)=1, SPS(2)=0.5: Θ0 = 1.0 > Θ1 = 0.9, so ℓ = 0 whatever c2 would be.
    for c2 in (0.9, 0.0):
        a = survival(jnp.asarray([[0.8, c2]]))
        assert int(schedule_prefix(a, APPENDIX_A_SPS)[0]) == 0
    assert int(retrospective_lengths(survival(jnp.asarray([[0.8, 0.9]])), APPENDIX_A_SPS)[0]) == 2
    assert int(retrospective_lengths(survival(jnp.asarray([[0.8, 0.0]])), APPENDIX_A_SPS)[0]) == 0
