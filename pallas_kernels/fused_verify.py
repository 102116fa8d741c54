"""Fused verification: acceptance tests, accepted count and the residual or bonus draw.

Draft token x_k (k = 1..ℓ) is accepted when u_k · q_k(x_k) < p_k(x_k), left to right; at the
first rejection the next token is drawn from normalize(max(p_n − q_n, 0)), else a bonus token
from p_{ℓ+1}; p is the target's warped distribution (temperature, top-k/top-p), q the
distribution the draft token was drawn from. The uniforms are drawn by the caller
(dspark_jax.speculative.verify), so the reference and the kernel decide on the same numbers.

The reference materialises p [R, γ+1, V] (softmax, one-hot rows for greedy requests) as
`warp_probs` does. The kernel path never does: one pass of `vocab_stats` (Mosaic GPU) over the
target logits gives every row's max, normaliser, argmax and block masses; p_k(x_k) and q_k(x_k)
are gathered scalars; the residual draw touches only row n of each request — its block masses
in one fused XLA pass over that row, then one block. With top-k/top-p the threshold comes first
from `warp_floor` (the reference's own select, a few passes over the scaled logits, no sort), and
the kernel applies it while it reads them.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import vocab_stats as vs
from pallas_kernels.common import inverse_cdf, scaled_logits, warp_floor, warp_probs


def fused_verify_reference(target_logits, draft_tokens, draft_probs, lengths, accept_u, resample_u, sampling):
    """(num_accepted [R] int32, next_token [R] int32).

    target_logits [R, γ+1, V] (row k follows x_k); draft_tokens [R, γ] int32; draft_probs [R, γ, V]
    fp32; lengths [R] int32 ≤ γ; accept_u [R, γ] in [0, 1); resample_u [R] in (0, 1]; sampling:
    per-request temperature/top_k/top_p (see pallas_kernels.common).
    """
    rows, gamma = draft_tokens.shape
    p = warp_probs(target_logits, sampling)  # [R, γ+1, V]
    if gamma == 0:
        return jnp.zeros((rows,), jnp.int32), inverse_cdf(p[:, 0], resample_u)
    q = draft_probs.astype(jnp.float32)
    tokens = draft_tokens[..., None]
    p_tok = jnp.take_along_axis(p[:, :gamma], tokens, axis=-1)[..., 0]
    q_tok = jnp.take_along_axis(q, tokens, axis=-1)[..., 0]
    num_accepted = _accepted_prefix(accept_u, p_tok, q_tok, lengths)

    # At a rejection (n < ℓ) use the residual at position n; otherwise the bonus p_{ℓ+1} = row n.
    p_next = jnp.take_along_axis(p, num_accepted[:, None, None], axis=1)[:, 0]
    q_next = jnp.take_along_axis(q, jnp.minimum(num_accepted, gamma - 1)[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_next - q_next, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    # p == q leaves no residual mass; rejection then has probability 0, so p itself is exact.
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_next)
    rejected = num_accepted < lengths
    dist = jnp.where(rejected[:, None], residual, p_next)
    return num_accepted, inverse_cdf(dist, resample_u)


def _accepted_prefix(accept_u, p_tok, q_tok, lengths):
    # u < p/q without dividing; a token the draft could not have drawn (q = 0) is never accepted.
    accepted = (accept_u * q_tok < p_tok) & (q_tok > 0)
    accepted &= jnp.arange(p_tok.shape[1])[None, :] < lengths[:, None]
    return jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def fused_verify(target_logits, draft_tokens, draft_probs, lengths, accept_u, resample_u, sampling,
                 interpret=False):
    """The kernel path (same contract as the reference)."""
    rows, gamma = draft_tokens.shape
    vocab = target_logits.shape[-1]
    greedy = sampling.temperature == 0  # [R]
    if sampling.filters:
        # The reference's scaled logits and threshold, computed as it does, so the kept sets agree to the bit.
        logits, divisor = scaled_logits(target_logits, sampling), jnp.ones((rows,), jnp.float32)
        floor = warp_floor(logits, sampling)  # [R, γ+1]
    else:
        logits, divisor, floor = target_logits, jnp.where(greedy, 1.0, sampling.temperature), None
    row_max, norm, argmax, _ = vs.row_stats(*vs.vocab_stats(
        logits.reshape(rows * (gamma + 1), vocab), None, jnp.repeat(divisor, gamma + 1),
        None if floor is None else floor.reshape(-1), block=vs.BLOCK, interpret=interpret))
    row_max, norm, argmax = (a.reshape(rows, gamma + 1) for a in (row_max, norm, argmax))

    def p_of(k_rows, cols, values):
        """p at columns cols of each request's row k_rows [R, C], from the logits there."""
        m = jnp.take_along_axis(row_max, k_rows, 1)
        z = values.astype(jnp.float32) / divisor[:, None]
        if floor is not None:
            z = jnp.where(z >= jnp.take_along_axis(floor, k_rows, 1), z, -jnp.inf)
        sampled = jnp.exp(z - jnp.where(m == -jnp.inf, 0.0, m)) / jnp.take_along_axis(norm, k_rows, 1)
        return jnp.where(greedy[:, None], (cols == jnp.take_along_axis(argmax, k_rows, 1)).astype(jnp.float32),
                         sampled)

    if gamma == 0:
        num_accepted = jnp.zeros((rows,), jnp.int32)
    else:
        positions = jnp.broadcast_to(jnp.arange(gamma)[None, :], (rows, gamma))
        logit_tok = jnp.take_along_axis(logits[:, :gamma], draft_tokens[..., None], axis=-1)[..., 0]
        p_tok = p_of(positions, draft_tokens, logit_tok)
        q_tok = jnp.take_along_axis(draft_probs, draft_tokens[..., None], axis=-1)[..., 0].astype(jnp.float32)
        num_accepted = _accepted_prefix(accept_u, p_tok, q_tok, lengths)

    # The next token's distribution lives on row n of each request: the residual after a rejection,
    # else p itself (a bonus draw, or p == q leaving no residual mass). Only that row is touched.
    n = num_accepted[:, None]
    logits_n = jnp.take_along_axis(logits, n[..., None], axis=1)[:, 0]  # [R, V]
    p_n = p_of(n, jnp.arange(vocab)[None, :], logits_n)
    if gamma:
        q_n = jnp.take_along_axis(draft_probs, jnp.minimum(n, gamma - 1)[..., None], axis=1)[:, 0]
        residual = jnp.maximum(p_n - q_n.astype(jnp.float32), 0.0)
        use_residual = (num_accepted < lengths)[:, None] & (jnp.sum(residual, axis=1, keepdims=True) > 0)
        p_n = jnp.where(use_residual, residual, p_n)
    width = min(vs.BLOCK, vocab)
    nb = -(-vocab // width)
    blocks = jnp.pad(p_n, ((0, 0), (0, nb * width - vocab))).reshape(rows, nb, width)
    sampled = vs.sample_blocks(jnp.sum(blocks, axis=2), resample_u,
                               lambda b: jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0], block=width)
    next_token = jnp.where(greedy, jnp.take_along_axis(argmax, n, 1)[:, 0], sampled)
    return num_accepted, next_token.astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# GPU checks and benchmark (python -m pallas_kernels.bench)

VOCAB = 151936  # Qwen3
# Top-k/top-p settings first: under the time budget their rows (the threshold select) come first.
MODES = {"T=0.7 top-k 20 top-p 0.8": (0.7, 20, 0.8), "T=1 top-p 0.95": (1.0, 0, 0.95), "greedy": (0.0, 0, 1.0),
         "T=1": (1.0, 0, 1.0)}
# Batches checked per setting, where not the default (fused verify 16, Markov loop 8): Qwen3's
# recommended sampling at R = 1, 16 and 64. Every top-k/top-p setting's floor is checked at R = 64.
CHECK_ROWS = {"T=0.7 top-k 20 top-p 0.8": (1, 16, 64)}
BENCH_ROWS = {"T=0.7 top-k 20 top-p 0.8": (1, 16, 64), "T=1 top-p 0.95": (64,)}  # default sweep; the others at 1, 64


def sampling_of(rows, temperature, top_k, top_p):
    """Per-request sampling arrays (the fields SamplingArrays carries) for one setting on every row."""
    return SimpleNamespace(temperature=jnp.full((rows,), temperature, jnp.float32),
                           top_k=jnp.full((rows,), top_k, jnp.int32), top_p=jnp.full((rows,), top_p, jnp.float32),
                           filters=top_k > 0 or top_p < 1.0)


def bench_rows(bench, mode):
    """Batch sizes timed for a sampling setting in this sweep."""
    return bench.pick(quick=(64,), default=BENCH_ROWS.get(mode, (1, 64)), full=(1, 16, 64, 128))


def _inputs(key, rows, gamma, vocab, sampling):
    keys = jax.random.split(key, 5)
    target = 2.0 * jax.random.normal(keys[0], (rows, gamma + 1, vocab), jnp.float32)
    q = warp_probs(target[:, :gamma] + 0.5 * jax.random.normal(keys[1], (rows, gamma, vocab)), sampling)
    tokens = inverse_cdf(q, 1.0 - jax.random.uniform(keys[2], (rows, gamma)))
    lengths = jnp.full((rows,), gamma, jnp.int32)
    return (target, tokens, q, lengths, jax.random.uniform(keys[3], (rows, gamma)),
            1.0 - jax.random.uniform(keys[4], (rows,)))


def gpu_checks(bench):
    from pallas_kernels import common
    from pallas_kernels.bench import sort_floor_path

    gamma = 7
    for i, (mode, setting) in enumerate(MODES.items()):
        for rows in CHECK_ROWS.get(mode, (16,)):
            def run():
                sampling = sampling_of(rows, *setting)
                args = _inputs(jax.random.key(500 + i), rows, gamma, VOCAB, sampling)
                got = jax.jit(lambda *a: fused_verify(*a, sampling))(*args)
                want = jax.jit(lambda *a: fused_verify_reference(*a, sampling))(*args)
                mismatches = int(np.sum(np.asarray(got[0]) != np.asarray(want[0])) +
                                 np.sum(np.asarray(got[1]) != np.asarray(want[1])))
                return float(mismatches), 0.0, f"R={rows} gamma={gamma} V={VOCAB} {mode} (error = mismatched outputs)"
            bench.check("fused_verify", f"{mode} R={rows}", run)
        if not sampling_of(1, *setting).filters:
            continue

        def same_distribution():
            """The warp with the select against the warp with the sort: only rounding ties of the mass may differ."""
            rows = 64
            sampling = sampling_of(rows, *setting)
            target = _inputs(jax.random.key(550 + i), rows, gamma, VOCAB, sampling)[0]
            selected = jax.jit(lambda t: warp_probs(t, sampling))(target)
            with sort_floor_path(common):
                by_sort = jax.jit(lambda t: warp_probs(t, sampling))(target)
            distance = 0.5 * float(jnp.max(jnp.sum(jnp.abs(selected - by_sort), axis=-1)))
            return distance, 1e-5, f"R={rows} x {gamma + 1} rows, V={VOCAB} {mode} (error = max total variation)"
        bench.check("warp_floor", f"{mode} vs sort", same_distribution)


def _floor_timings(bench, sets, sampling):
    """The floor alone on the scaled target logits: the select at 7 and 15 thresholds a pass, and the sort."""
    from pallas_kernels.bench import sort_floor

    scaled = [(scaled_logits(args[0], sampling),) for args in sets]
    timings = {f"floor by select, {count} thresholds": bench.attempt(
        jax.jit(lambda x, count=count: warp_floor(x, sampling, candidates=count)), scaled) for count in (7, 15)}
    timings["floor by sort (previous)"] = bench.attempt(jax.jit(lambda x: sort_floor(x, sampling)), scaled)
    return timings


def benchmark(bench):
    from pallas_kernels.bench import qwen3_4b_round_bytes, sort_floor_path

    gamma = 7
    for mode, setting in MODES.items():
        for rows in bench_rows(bench, mode):
            sampling = sampling_of(rows, *setting)
            sets = bench.copies(lambda seed: _inputs(jax.random.key(seed), rows, gamma, VOCAB, sampling),
                                rows * (2 * gamma + 1) * VOCAB * 4)
            ms = bench.time(jax.jit(lambda *a: fused_verify(*a, sampling)), sets)
            alternatives = {"xla_reference": bench.attempt(jax.jit(lambda *a: fused_verify_reference(*a, sampling)),
                                                           sets)}
            extra = {}
            if sampling.filters:
                with sort_floor_path(sys.modules[__name__]):
                    alternatives["sort_floor_path"] = bench.attempt(jax.jit(lambda *a: fused_verify(*a, sampling)),
                                                                    sets)
                if rows == 64:
                    extra["variants"] = _floor_timings(bench, sets, sampling)
            moved = rows * (gamma + 1) * VOCAB * 4 + 2 * rows * VOCAB * 4  # target logits, then row n and q_n
            round_ms = bench.floor_ms(qwen3_4b_round_bytes(rows, gamma=gamma))
            bench.record("fused_verify", f"R={rows} gamma={gamma} {mode}", ms=ms, bytes_moved=moved,
                         alternatives=alternatives, bar="< 5% of a Qwen3-4B round (its bytes floor, ctx 1024)",
                         met=ms < 0.05 * round_ms, round_floor_ms=round_ms,
                         note=f"{100 * ms / round_ms:.2f}% of a {round_ms:.2f} ms round floor"
                              + ("; sort_floor_path: the previous path, the floor by sorting each row"
                                 if sampling.filters else ""), **extra)
