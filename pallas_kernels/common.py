"""Math shared by the kernels' pure-JAX references: masked attention, the sampling warp, inverse-CDF draws.

The sampling warp (identical for target and draft): logits / temperature → top-k → top-p (keep
the most probable tokens until their mass reaches top_p, the crossing token included);
temperature 0 means argmax; top_k=0 and top_p=1 disable those steps. `sampling` is any object
with per-request `temperature` [R] fp32, `top_k` [R] int32, `top_p` [R] fp32 and a static
`filters` flag (dspark_jax.speculative.sampling.SamplingArrays).
"""

from __future__ import annotations

import jax
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


def _expand(x, ndim):
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def warp_logits(logits, sampling):
    """Warped logits [..., V] in fp32 (-inf outside top-k/top-p); leading dims start with R.

    Greedy rows are returned unscaled; `warp_probs` turns them into one-hot argmax.
    """
    x = logits.astype(jnp.float32)
    lead = x.ndim - 1
    temperature = _expand(sampling.temperature, lead)
    x = x / jnp.where(temperature > 0, temperature, 1.0)[..., None]
    if not sampling.filters:
        return x
    vocab = x.shape[-1]
    top_k = _expand(sampling.top_k, lead)
    top_p = _expand(sampling.top_p, lead)
    ordered = -jnp.sort(-x, axis=-1)  # descending
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, vocab - 1)[..., None], axis=-1)
    k_floor = jnp.where(top_k[..., None] > 0, kth, -jnp.inf)
    ordered = jnp.where(ordered >= k_floor, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = (mass_before < top_p[..., None]) & (ordered > -jnp.inf)
    # The smallest kept value; ties with it stay (the same rule for target and draft).
    p_floor = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    p_floor = jnp.where(top_p[..., None] < 1.0, p_floor, -jnp.inf)
    return jnp.where(x >= jnp.maximum(k_floor, p_floor), x, -jnp.inf)


def warp_probs(logits, sampling):
    """The distribution a token is drawn from: fp32 [..., V], one-hot argmax where temperature is 0."""
    lead = logits.ndim - 1
    greedy = _expand(sampling.temperature, lead) == 0
    probs = jax.nn.softmax(warp_logits(logits, sampling), axis=-1)
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(greedy[..., None], one_hot, probs)


def sample_from_probs(probs, keys):
    """One draw per row of probs [R, ..., V] (fp32) with keys [R, ...], by inverse CDF.

    u is drawn from (0, 1] and scaled by the row's total mass, so the chosen index is the first
    whose cumulative mass reaches u: it always has positive probability.
    """
    return inverse_cdf(probs, uniform_from_keys(keys))


def uniform_from_keys(keys):
    """One u in (0, 1] per key (fp32), the draw `sample_from_probs` makes."""
    return 1.0 - jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys.reshape(-1)).reshape(keys.shape)


def inverse_cdf(probs, u):
    """The first index whose cumulative mass reaches u × the row's total mass (probs [..., V], u [...])."""
    cdf = jnp.cumsum(probs, axis=-1)
    idx = jnp.sum(cdf < (u * cdf[..., -1])[..., None], axis=-1)
    return jnp.clip(idx, 0, probs.shape[-1] - 1).astype(jnp.int32)
