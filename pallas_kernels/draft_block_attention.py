"""Draft block attention: γ block queries per request over the draft's context cache and the block.

Request r's block sits at positions ctx_lens[r] .. ctx_lens[r]+γ−1. Its queries see every context
position < ctx_lens[r] (the paged draft-context cache, optionally only the last `sliding_window`
positions before each query) and all γ block keys, bidirectionally: the block is drafted in one
parallel pass, so no block position is hidden from another.

The kernel streams the context pages in place through `pallas_kernels.paged_flash` (Mosaic
GPU; the γ queries of a request × the query heads of one KV head form a row block) and attends
to the γ block keys in XLA — a γ×γ tile per head, too small to be worth a launch of its own; the
two partial softmaxes are merged exactly by their log-sum-exps.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import paged_flash
from pallas_kernels.common import masked_attention


def draft_block_attention(q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens, *, scale: float,
                          sliding_window: int | None = None, interpret: bool = False, splits: int | None = None):
    """The Pallas kernel (same contract as the reference); `splits` overrides the KV-split heuristic."""
    rows, gamma, num_heads, head_dim = q.shape
    num_kv_heads, page_size = k_pages.shape[2], k_pages.shape[1]
    if paged_flash.unsupported_reason(q.dtype, k_pages.dtype, num_heads, num_kv_heads, head_dim, page_size,
                                       interpret):
        return draft_block_attention_reference(q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens,
                                               scale=scale, sliding_window=sliding_window)
    plan = paged_flash.make_plan(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                 page_size=page_size, pages_per_row=page_table.shape[1], rows=rows, max_q_len=gamma,
                                 dtype=q.dtype, splits=splits)
    ctx_lens = ctx_lens.astype(jnp.int32)
    q_grid = jnp.pad(q, ((0, 0), (0, plan.q_blocks * plan.tokens_per_block - gamma), (0, 0), (0, 0)))
    out, lse = paged_flash.paged_flash(
        paged_flash.to_blocks(q_grid, plan), k_pages, v_pages, page_table, jnp.full((rows,), gamma, jnp.int32),
        ctx_lens, ctx_lens, plan=plan, scale=scale, causal=False, sliding_window=sliding_window,
        interpret=interpret)
    req, idx = jnp.repeat(jnp.arange(rows), gamma), jnp.tile(jnp.arange(gamma), rows)
    ctx_out, ctx_lse = paged_flash.from_blocks(out, lse, req, idx, plan)
    block_out, block_lse = _block_partial(q, k_block.astype(q.dtype), v_block.astype(q.dtype), scale)
    outs = jnp.concatenate([ctx_out, block_out.reshape(1, rows * gamma, num_heads, head_dim)])
    lses = jnp.concatenate([ctx_lse, block_lse.reshape(1, rows * gamma, num_heads)])
    return paged_flash.merge_partials(outs, lses).reshape(q.shape).astype(q.dtype)


def _block_partial(q, k_block, v_block, scale):
    """Softmax attention of every block query over the γ block keys: (out [R, γ, H, D] fp32, lse [R, γ, H])."""
    rows, gamma, num_heads, head_dim = q.shape
    num_kv_heads = k_block.shape[2]
    qg = q.reshape(rows, gamma, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("rqhgd,rkhd->rqhgk", qg, k_block, preferred_element_type=jnp.float32) * scale
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - top)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("rqhgk,rkhd->rqhgd", (weights / denom).astype(v_block.dtype), v_block,
                     preferred_element_type=jnp.float32)
    lse = (top + jnp.log(denom))[..., 0]
    return out.reshape(rows, gamma, num_heads, head_dim), lse.reshape(rows, gamma, num_heads)


def draft_block_attention_reference(q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens, *, scale: float,
                                    sliding_window: int | None = None):
    """Pure-JAX draft block attention (the spec for the Pallas kernel).

    q [R, γ, H, D]; k_block/v_block [R, γ, KVH, D]; k_pages/v_pages [num_pages, page_size, KVH, D];
    page_table [R, P] int32 (bucketed to the longest context); ctx_lens [R] int32.
    Returns [R, γ, H, D] in q's dtype.
    """
    rows, pages = page_table.shape
    gamma = q.shape[1]
    page_size = k_pages.shape[1]
    ctx_keys = k_pages[page_table].reshape(rows, pages * page_size, *k_pages.shape[2:])
    ctx_values = v_pages[page_table].reshape(rows, pages * page_size, *v_pages.shape[2:])
    keys = jnp.concatenate([ctx_keys, k_block.astype(ctx_keys.dtype)], axis=1)
    values = jnp.concatenate([ctx_values, v_block.astype(ctx_values.dtype)], axis=1)
    ctx_pos = jnp.arange(pages * page_size)[None, None, :]
    q_pos = ctx_lens[:, None, None] + jnp.arange(gamma)[None, :, None]
    ctx_mask = ctx_pos < ctx_lens[:, None, None]
    if sliding_window is not None:
        ctx_mask &= ctx_pos > q_pos - sliding_window
    ctx_mask = jnp.broadcast_to(ctx_mask, (rows, gamma, pages * page_size))
    mask = jnp.concatenate([ctx_mask, jnp.ones((rows, gamma, gamma), bool)], axis=-1)
    return masked_attention(q, keys, values, mask, scale=scale)
