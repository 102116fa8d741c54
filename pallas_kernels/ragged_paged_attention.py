"""Ragged paged attention: many requests' query tokens flattened into one batch.

Request r owns query tokens `q[cu_q_lens[r]:cu_q_lens[r+1]]`; its K/V live in the pages listed by
`page_table[r]` and its cache holds `kv_lens[r]` tokens *including* this step's queries, which
sit at positions `kv_lens[r] - q_len_r + i`. Each query attends causally to its own request's
cache (optionally only to the last `sliding_window` positions, optionally with a per-head sink
logit in the softmax denominator). Tokens past `cu_q_lens[R]` are padding and produce zeros.

The same signature serves prefill chunks (q_len = chunk), decode (1) and verification (ℓ+1).

The kernel is `pallas_kernels.paged_flash` (Mosaic GPU): each request's queries are gathered
into 64-row blocks (query tokens × the query heads of one KV head), keys stream from the pages in
place, and the per-token outputs are gathered back. Shapes it does not cover (see
`paged_flash.unsupported_reason`) run the reference.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import paged_flash
from pallas_kernels.common import masked_attention


def ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, *, max_q_len: int, scale: float,
                           sliding_window: int | None = None, sinks=None, interpret: bool = False,
                           splits: int | None = None):
    """The Pallas kernel (same contract as the reference); `splits` overrides the KV-split heuristic."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, page_size = k_pages.shape[2], k_pages.shape[1]
    if paged_flash.unsupported_reason(q.dtype, k_pages.dtype, num_heads, num_kv_heads, head_dim, page_size,
                                       interpret):
        return ragged_paged_attention_reference(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens,
                                                max_q_len=max_q_len, scale=scale, sliding_window=sliding_window,
                                                sinks=sinks)
    rows, pages_per_row = page_table.shape
    plan = paged_flash.make_plan(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                 page_size=page_size, pages_per_row=pages_per_row, rows=rows, max_q_len=max_q_len,
                                 dtype=q.dtype, splits=splits)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    slot = jnp.arange(plan.q_blocks * plan.tokens_per_block)
    src = jnp.clip(cu_q_lens[:-1, None] + slot[None, :], 0, num_tokens - 1)
    q_grid = jnp.where((slot[None, :] < q_lens[:, None])[..., None, None], q[src], 0)
    out, lse = paged_flash.paged_flash(
        paged_flash.to_blocks(q_grid, plan), k_pages, v_pages, page_table, q_lens, kv_lens - q_lens, kv_lens,
        plan=plan, scale=scale, causal=True, sliding_window=sliding_window, interpret=interpret)

    token = jnp.arange(num_tokens)
    req = jnp.clip(jnp.searchsorted(cu_q_lens[1:], token, side="right"), 0, rows - 1)
    idx = jnp.clip(token - cu_q_lens[req], 0, max_q_len - 1)
    out, lse = paged_flash.from_blocks(out, lse, req, idx, plan)
    out = paged_flash.merge_partials(out, lse, sinks)
    return jnp.where((token < cu_q_lens[-1])[:, None, None], out, 0).astype(q.dtype)


def ragged_paged_attention_reference(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, *,
                                     max_q_len: int, scale: float, sliding_window: int | None = None,
                                     sinks=None):
    """Pure-JAX ragged paged attention (the spec for the Pallas kernel).

    q [T, H, D]; k_pages/v_pages [num_pages, page_size, KVH, D]; page_table [R, P] int32;
    kv_lens [R] int32; cu_q_lens [R+1] int32; every request's query count must be ≤ max_q_len.
    Gathers each request's pages once (R·P·page_size keys), so callers bucket P to the longest
    live context.
    """
    num_tokens = q.shape[0]
    num_reqs, pages_per_req = page_table.shape
    page_size = k_pages.shape[1]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    slot = jnp.arange(max_q_len)
    flat = cu_q_lens[:-1, None] + slot[None, :]  # [R, Q]
    valid_q = slot[None, :] < q_lens[:, None]
    q_padded = jnp.concatenate([q, jnp.zeros((1,) + q.shape[1:], q.dtype)], axis=0)
    q_grid = q_padded[jnp.where(valid_q, flat, num_tokens)]  # [R, Q, H, D]

    keys = k_pages[page_table].reshape(num_reqs, pages_per_req * page_size, *k_pages.shape[2:])
    values = v_pages[page_table].reshape(num_reqs, pages_per_req * page_size, *v_pages.shape[2:])
    q_pos = kv_lens[:, None] - q_lens[:, None] + slot[None, :]  # [R, Q]
    k_pos = jnp.arange(pages_per_req * page_size)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < kv_lens[:, None, None])
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    mask &= valid_q[:, :, None]
    out_grid = masked_attention(q_grid, keys, values, mask, scale=scale, sinks=sinks)

    token = jnp.arange(num_tokens)
    req = jnp.clip(jnp.searchsorted(cu_q_lens[1:], token, side="right"), 0, num_reqs - 1)
    idx = jnp.clip(token - cu_q_lens[req], 0, max_q_len - 1)
    out = out_grid[req, idx]
    return jnp.where((token < cu_q_lens[-1])[:, None, None], out, 0).astype(q.dtype)


def write_kv_reference(k_pages, v_pages, k, v, slot_mapping):
    """Scatter new K/V [T, KVH, D] into the flat slots `page * page_size + offset`.

    Slots ≥ num_pages·page_size (padding tokens) are dropped.
    """
    num_pages, page_size = k_pages.shape[:2]
    flat_k = k_pages.reshape(num_pages * page_size, *k_pages.shape[2:])
    flat_v = v_pages.reshape(num_pages * page_size, *v_pages.shape[2:])
    flat_k = flat_k.at[slot_mapping].set(k.astype(k_pages.dtype), mode="drop")
    flat_v = flat_v.at[slot_mapping].set(v.astype(v_pages.dtype), mode="drop")
    return flat_k.reshape(k_pages.shape), flat_v.reshape(v_pages.shape)
