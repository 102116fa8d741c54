"""Lossless verification of draft tokens (speculative sampling), all in fp32.

Draft token x_k (k = 1..ℓ) is accepted with probability min(1, p_k(x_k) / q_k(x_k)), left to
right; at the first rejection the replacement is drawn from normalize(max(p_k − q_k, 0)); if all ℓ
are accepted a bonus token is drawn from p_{ℓ+1}. p is the target's warped distribution, q the
distribution each draft token was actually drawn from. The committed tokens are then distributed
exactly as the target's own samples. At temperature 0 both are one-hot and this is argmax matching.
The uniforms are drawn here; the tests and the draw run in `kernels.fused_verify` (a fused
kernel, or its reference pallas_kernels.fused_verify).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax import kernels
from dspark_jax.speculative.sampling import SamplingArrays, uniform_from_keys


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
    accept_u = jax.vmap(lambda k: jax.random.uniform(k, (gamma,), jnp.float32))(accept_keys)
    return kernels.fused_verify(target_logits, draft_tokens, draft_probs, lengths, accept_u,
                                uniform_from_keys(resample_keys), sampling)
