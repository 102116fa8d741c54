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
previous step's tokens. With top-k/top-p the step first warps as the reference does (its sort
decides the kept set to the last ulp) and the kernel reads the warped logits.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import vocab_stats as vs
from pallas_kernels.common import inverse_cdf, warp_logits, warp_probs


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
        # The kept set must be the reference's to the last ulp: warp once, as it does, and read that.
        x, x2 = warp_logits(base_k if bias is None else base_k + bias, sampling), None
        divisor = jnp.ones(greedy.shape, jnp.float32)
    else:
        x, x2, divisor = base_k, bias, jnp.where(greedy, 1.0, sampling.temperature)
    row_max, norm, argmax, block_mass = vs.row_stats(*vs.vocab_stats(x, x2, divisor, None, interpret=interpret))
    shift = jnp.where(row_max == -jnp.inf, 0.0, row_max)[:, None]
    logits = x.astype(jnp.float32) if x2 is None else x + x2

    def q_of(values, cols):
        """q at columns cols ([R, C] or [1, C]) from the (warped) logits there."""
        sampled = jnp.exp(values / divisor[:, None] - shift) / norm[:, None]
        return jnp.where(greedy[:, None], (cols == argmax[:, None]).astype(jnp.float32), sampled)

    width = min(vs.BLOCK, vocab)

    def block_values(b):
        cols = b[:, None] * width + jnp.arange(width)[None, :]
        inside = cols < vocab
        return jnp.where(inside, q_of(jnp.take_along_axis(logits, jnp.where(inside, cols, 0), 1), cols), 0.0)

    drawn = vs.sample_blocks(block_mass, u, block_values, block=width)
    return jnp.where(greedy, argmax, drawn).astype(jnp.int32), q_of(logits, jnp.arange(vocab)[None, :])
