"""The DSpark Markov sampling loop: γ steps of bias lookup + warp + sample, left to right.

Step k: logits = U_k + W1[x_{k−1}] W2 (the vanilla Markov head; no bias for DFlash), q_k =
warp(logits) (temperature, top-k/top-p; one-hot argmax at temperature 0), x_k drawn from q_k by
inverse CDF with the caller's uniform. Returns the tokens and every q_k, which verification needs
as the exact distributions the tokens came from.

The reference runs each step as `warp_probs` + `inverse_cdf` do: softmax, one-hot and cumulative
sums over [R, V] in several passes. The kernel path keeps one pass of `vocab_stats` (Mosaic GPU)
over U_k + bias per step — max, normaliser, argmax and block masses in one read — draws inside
one block, and writes q_k once. The bias itself is a [R, rank] × [rank, V] product per step
(cuBLAS through XLA): W2 must be streamed once per step because each step's rows depend on the
previous step's tokens. With top-k/top-p the step scales U_k + bias once, finds the threshold
with `warp_floor` (the reference's own select, a few passes over the row, no sort), and the
kernel applies it while it reads the scaled row.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import vocab_stats as vs
from pallas_kernels.common import inverse_cdf, scaled_logits, warp_floor, warp_probs


def _bias(w1, w2, prev):
    """W1[prev] W2 in fp32 [R, V], as the Markov head computes it."""
    emb = jnp.take(w1, prev, axis=0)
    return jnp.einsum("...r,rv->...v", emb.astype(w2.dtype), w2, preferred_element_type=jnp.float32)


def markov_sample_reference(base, anchors, w1, w2, uniforms, sampling):
    """(tokens [R, γ] int32, probs [R, γ, V] fp32).

    base [R, γ, V]: the block's base logits U_k (fp32); anchors [R] int32 (x_0); w1 [V, rank] and
    w2 [rank, V] the vanilla Markov head (both None: no head); uniforms [R, γ] in (0, 1];
    sampling: per-request temperature/top_k/top_p (see pallas_kernels.common).
    """
    prev, tokens, probs = anchors, [], []
    for k in range(base.shape[1]):
        logits = base[:, k] if w1 is None else base[:, k] + _bias(w1, w2, prev)
        q = warp_probs(logits, sampling)
        prev = inverse_cdf(q, uniforms[:, k])
        tokens.append(prev)
        probs.append(q)
    return jnp.stack(tokens, 1), jnp.stack(probs, 1)


def markov_sample(base, anchors, w1, w2, uniforms, sampling, interpret=False):
    """The kernel path (same contract as the reference)."""
    prev, tokens, probs = anchors, [], []
    for k in range(base.shape[1]):
        bias = None if w1 is None else _bias(w1, w2, prev)
        prev, q = _draw(base[:, k], bias, uniforms[:, k], sampling, interpret)
        tokens.append(prev)
        probs.append(q)
    return jnp.stack(tokens, 1), jnp.stack(probs, 1)


def _draw(base_k, bias, u, sampling, interpret):
    """One step: the token drawn from q = warp(base_k + bias) with uniform u, and q itself ([R], [R, V])."""
    vocab = base_k.shape[1]
    greedy = sampling.temperature == 0
    if sampling.filters:
        # The reference's scaled logits and threshold, computed as it does, so the kept sets agree to the bit.
        x, x2 = scaled_logits(base_k if bias is None else base_k + bias, sampling), None
        divisor, floor = jnp.ones(greedy.shape, jnp.float32), warp_floor(x, sampling)
    else:
        x, x2, divisor, floor = base_k, bias, jnp.where(greedy, 1.0, sampling.temperature), None
    logits = x.astype(jnp.float32) if x2 is None else x + x2
    block = vs.BLOCK
    row_max, norm, argmax, block_mass = vs.row_stats(*vs.vocab_stats(x, x2, divisor, floor, block=block,
                                                                     interpret=interpret))
    shift = jnp.where(row_max == -jnp.inf, 0.0, row_max)[:, None]

    def q_of(values, cols):
        """q at columns cols ([R, C] or [1, C]) from the logits there."""
        z = values / divisor[:, None]
        if floor is not None:
            z = jnp.where(z >= floor[:, None], z, -jnp.inf)
        sampled = jnp.exp(z - shift) / norm[:, None]
        return jnp.where(greedy[:, None], (cols == argmax[:, None]).astype(jnp.float32), sampled)

    width = min(block, vocab)  # one block of the statistics: b covers columns [b·block, b·block + width)

    def block_values(b):
        cols = b[:, None] * width + jnp.arange(width)[None, :]
        inside = cols < vocab
        return jnp.where(inside, q_of(jnp.take_along_axis(logits, jnp.where(inside, cols, 0), 1), cols), 0.0)

    drawn = vs.sample_blocks(block_mass, u, block_values, block=width)
    return jnp.where(greedy, argmax, drawn).astype(jnp.int32), q_of(logits, jnp.arange(vocab)[None, :])


# --------------------------------------------------------------------------------------------
# GPU checks and benchmark (python -m pallas_kernels.bench)

VOCAB, RANK = 151936, 256  # Qwen3 vocabulary, DSpark's Markov rank


def _inputs(key, rows, gamma, vocab, rank):
    keys = jax.random.split(key, 5)
    base = 2.0 * jax.random.normal(keys[0], (rows, gamma, vocab), jnp.float32)
    w1 = (0.5 * jax.random.normal(keys[1], (vocab, rank), jnp.float32)).astype(jnp.bfloat16)
    w2 = (0.1 * jax.random.normal(keys[2], (rank, vocab), jnp.float32)).astype(jnp.bfloat16)
    anchors = jax.random.randint(keys[3], (rows,), 0, vocab, jnp.int32)
    return base, anchors, w1, w2, 1.0 - jax.random.uniform(keys[4], (rows, gamma))


def gpu_checks(bench):
    from pallas_kernels.fused_verify import CHECK_ROWS, MODES, sampling_of

    gamma = 7
    for i, (mode, setting) in enumerate(MODES.items()):
        for rows in CHECK_ROWS.get(mode, (8,)):
            def run():
                sampling = sampling_of(rows, *setting)
                args = _inputs(jax.random.key(600 + i), rows, gamma, VOCAB, RANK)
                tokens, probs = jax.jit(lambda *a: markov_sample(*a, sampling))(*args)
                want_tokens, want_probs = jax.jit(lambda *a: markov_sample_reference(*a, sampling))(*args)
                if not np.array_equal(np.asarray(tokens), np.asarray(want_tokens)):
                    mismatched = int(np.sum(np.asarray(tokens) != np.asarray(want_tokens)))
                    return float("inf"), 1e-6, f"R={rows} gamma={gamma} {mode}: {mismatched} tokens differ"
                err = float(np.max(np.abs(np.asarray(probs) - np.asarray(want_probs))))
                return err, 1e-6, f"R={rows} gamma={gamma} V={VOCAB} rank={RANK} {mode} (error = max |q - q_ref|)"
            bench.check("markov_sample", f"{mode} R={rows}", run)


def benchmark(bench):
    from pallas_kernels.bench import qwen3_4b_round_bytes, sort_floor_path
    from pallas_kernels.fused_verify import MODES, bench_rows, sampling_of

    gamma = 7
    for mode, setting in MODES.items():
        for rows in bench_rows(bench, mode):
            sampling = sampling_of(rows, *setting)
            sets = bench.copies(lambda seed: _inputs(jax.random.key(seed), rows, gamma, VOCAB, RANK),
                                2 * rows * gamma * VOCAB * 4)
            ms = bench.time(jax.jit(lambda *a: markov_sample(*a, sampling)), sets)
            alternatives = {"xla_reference": bench.attempt(
                jax.jit(lambda *a: markov_sample_reference(*a, sampling)), sets)}
            if sampling.filters:
                with sort_floor_path(sys.modules[__name__]):
                    alternatives["sort_floor_path"] = bench.attempt(jax.jit(lambda *a: markov_sample(*a, sampling)),
                                                                    sets)
            moved = gamma * RANK * VOCAB * 2 + 2 * rows * gamma * VOCAB * 4  # W2 per step; base in, q out
            round_ms = bench.floor_ms(qwen3_4b_round_bytes(rows, gamma=gamma))
            w2_ms = bench.floor_ms(gamma * RANK * VOCAB * 2)
            bench.record("markov_sample", f"R={rows} gamma={gamma} {mode}", ms=ms, bytes_moved=moved,
                         alternatives=alternatives, bar="<= 2% of a Qwen3-4B round (its bytes floor, ctx 1024)",
                         met=ms <= 0.02 * round_ms, round_floor_ms=round_ms,
                         note=f"{100 * ms / round_ms:.2f}% of a {round_ms:.2f} ms round floor; streaming W2 once "
                              f"per step alone is {100 * w2_ms / round_ms:.2f}%"
                              + ("; sort_floor_path: the previous path, the floor by sorting each row"
                                 if sampling.filters else ""))
