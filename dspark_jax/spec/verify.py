"""Lossless verification of draft tokens (speculative sampling), all in fp32.

Draft token x_k (k = 1..ℓ) is accepted with probability min(1, p_k(x_k) / q_k(x_k)), left to
right; at the first rejection the replacement is drawn from normalize(max(p_k − q_k, 0)); if all ℓ
are accepted a bonus token is drawn from p_{ℓ+1}. p is the target's warped distribution, q the
distribution each draft token was actually drawn from. The committed tokens are then distributed
exactly as the target's own samples. At temperature 0 both are one-hot and this is argmax matching.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.spec.sampling import SamplingArrays, sample_from_probs, warp_probs


def _row_keys(key, rows: int):
    """Per-request keys: a [R] key array is used as is; a single key is split by row index."""
    if key.shape == ():
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(rows))
    if key.shape != (rows,):
        raise ValueError(f"verify: key must be a single key or one per request ({rows}), got shape {key.shape}")
    return key


def verify(target_logits, draft_tokens, draft_probs, lengths, key, sampling: SamplingArrays):
    """Accept a prefix of each request's draft and pick the token that follows it.

    target_logits [R, γ+1, V]: the target's logits after [x0, x1..xγ] (row k predicts the token
    after x_k). draft_tokens [R, γ] int32; draft_probs [R, γ, V] fp32, the distribution x_k was
    drawn from; lengths [R] int32 ≤ γ, the scheduled ℓ_r (positions ≥ ℓ_r are ignored); key: one
    key, or [R] keys so a request's randomness does not depend on its batch neighbours.
    Returns (num_accepted [R] int32, next_token [R] int32). Pure and jittable.
    """
    rows, gamma = draft_tokens.shape
    keys = _row_keys(key, rows)
    accept_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    resample_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)

    p = warp_probs(target_logits, sampling)  # [R, γ+1, V]
    if gamma == 0:
        return jnp.zeros((rows,), jnp.int32), sample_from_probs(p[:, 0], resample_keys)
    q = draft_probs.astype(jnp.float32)
    tokens = draft_tokens[..., None]
    p_tok = jnp.take_along_axis(p[:, :gamma], tokens, axis=-1)[..., 0]
    q_tok = jnp.take_along_axis(q, tokens, axis=-1)[..., 0]
    u = jax.vmap(lambda k: jax.random.uniform(k, (gamma,), jnp.float32))(accept_keys)
    # u < p/q without dividing; a token the draft could not have drawn (q = 0) is never accepted.
    accepted = (u * q_tok < p_tok) & (q_tok > 0)
    accepted &= jnp.arange(gamma)[None, :] < lengths[:, None]
    num_accepted = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)

    # At a rejection (n < ℓ) use the residual at position n; otherwise the bonus p_{ℓ+1} = row n.
    p_next = jnp.take_along_axis(p, num_accepted[:, None, None], axis=1)[:, 0]
    q_next = jnp.take_along_axis(q, jnp.minimum(num_accepted, gamma - 1)[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_next - q_next, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    # p == q leaves no residual mass; rejection then has probability 0, so p itself is exact.
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_next)
    rejected = num_accepted < lengths
    dist = jnp.where(rejected[:, None], residual, p_next)
    next_token = sample_from_probs(dist, resample_keys)
    return num_accepted, next_token
