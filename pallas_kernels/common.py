"""Math shared by the kernels' pure-JAX references."""

from __future__ import annotations

import jax.numpy as jnp


def masked_attention(q, k, v, mask, *, scale: float, sinks=None):
    """Softmax attention in fp32 over explicit masks, grouped-query aware.

    q [..., Q, H, D], k/v [..., K, KVH, D], mask [..., Q, K] bool, sinks [H] or None.
    Returns [..., Q, H, D] in q's dtype; fully masked rows give zeros.
    """
    *batch, num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[-2]
    group = num_heads // num_kv_heads
    qg = q.reshape(*batch, num_q, num_kv_heads, group, head_dim)
    scores = jnp.einsum("...qhgd,...khd->...hgqk", qg, k, preferred_element_type=jnp.float32) * scale
    mask = mask[..., None, None, :, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(num_kv_heads, group, 1, 1)
        row_max = jnp.maximum(row_max, sink)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - row_max)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("...hgqk,...khd->...qhgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(*batch, num_q, num_heads, head_dim).astype(q.dtype)
