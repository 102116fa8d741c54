"""Draft block attention: γ block queries per request over the draft's context cache and the block.

Request r's block sits at positions ctx_lens[r] .. ctx_lens[r]+γ−1. Its queries see every context
position < ctx_lens[r] (the paged draft-context cache, optionally only the last `sliding_window`
positions before each query) and all γ block keys, bidirectionally: the block is drafted in one
parallel pass, so no block position is hidden from another.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import masked_attention


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
