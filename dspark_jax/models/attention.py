"""Attention contexts: how a layer's q/k/v become its output.

A model layer computes q, k, v and hands them to the context it was called with:
- `DenseCausal`: whole sequences [B, S] without a cache (research forward, training features);
- `PagedKV`: a flattened ragged token batch [T] over a paged KV cache (prefill chunks, decode,
  verification); it writes the new K/V into the layer's pages and attends over them;
- `DraftBlock`: a DSpark/DFlash draft block over its context cache, bidirectional inside;
- `DenseDraftBlocks`: many draft blocks per whole training sequence over a dense context;
- `TrainTimeTest`: Eagle3's training-time test, step by step over whole sequences.
The context collects updated caches as the layers run, so a model forward stays one function.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dspark_jax import kernels
from pallas_kernels.common import masked_attention

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedMeta:
    """Where each flattened token sits. Built on the host (see cache.py) with bucketed shapes."""

    page_table: jax.Array  # [R, P] int32, pages of each request (bucketed to the longest)
    kv_lens: jax.Array  # [R] int32, cache length after this step's tokens are written
    cu_q_lens: jax.Array  # [R+1] int32, flat-token offsets of each request's queries
    slot_mapping: jax.Array  # [T] int32, flat cache slot of each token; out of range = padding
    max_q_len: int = dataclasses.field(metadata=dict(static=True))


LayerKV = tuple[jax.Array, jax.Array]  # (k_pages, v_pages) [num_pages, page_size, KVH, D]


class DenseCausal:
    """Causal attention over whole sequences; `positions` [B, S] orders the keys."""

    def __init__(self, positions: jax.Array):
        self.positions = positions

    def __call__(self, layer: int, q, k, v, *, scale: float, sliding_window: int | None = None,
                 sinks=None):
        qp = self.positions[:, :, None]
        kp = self.positions[:, None, :]
        mask = kp <= qp
        if sliding_window is not None:
            mask &= kp > qp - sliding_window
        return masked_attention(q, k, v, mask, scale=scale, sinks=sinks)


class PagedKV:
    """Ragged tokens over a paged cache; `caches[i]` is replaced as layer i runs."""

    def __init__(self, caches: list[LayerKV], meta: PagedMeta):
        self.caches = list(caches)
        self.meta = meta

    def __call__(self, layer: int, q, k, v, *, scale: float, sliding_window: int | None = None,
                 sinks=None):
        m = self.meta
        k_pages, v_pages = kernels.write_kv(*self.caches[layer], k, v, m.slot_mapping)
        self.caches[layer] = (k_pages, v_pages)
        return kernels.ragged_paged_attention(
            q, k_pages, v_pages, m.page_table, m.kv_lens, m.cu_q_lens, max_q_len=m.max_q_len,
            scale=scale, sliding_window=sliding_window, sinks=sinks)


class DraftBlock:
    """A draft block [R, γ] attending to the draft-context cache (positions < ctx_lens) and itself."""

    def __init__(self, caches: list[LayerKV], page_table, ctx_lens):
        self.caches, self.page_table, self.ctx_lens = caches, page_table, ctx_lens

    def __call__(self, layer: int, q, k, v, *, scale: float, sliding_window: int | None = None):
        return kernels.draft_block_attention(q, k, v, *self.caches[layer], self.page_table, self.ctx_lens,
                                             scale=scale, sliding_window=sliding_window)


def context_and_local_attention(q, k_ctx, v_ctx, ctx_mask, k_loc, v_loc, *, scale: float):
    """Softmax attention in fp32 over shared context keys plus per-group local keys.

    q [B, G, Q, H, D]: queries in G groups; k_ctx/v_ctx [B, S, KVH, D]: keys every group may see,
    ctx_mask [B, G, Q, S] bool; k_loc/v_loc [B, G, L, KVH, D]: keys every query of its group sees
    (L ≥ 1, so no row is fully masked). The context is never copied per group: its scores are one
    einsum, and both score sets share one softmax. Returns [B, G, Q, H, D] in q's dtype.
    """
    b, g, nq, heads, dim = q.shape
    kv_heads = k_ctx.shape[-2]
    qg = q.reshape(b, g, nq, kv_heads, heads // kv_heads, dim)
    s_ctx = jnp.einsum("bgqhrd,bshd->bghrqs", qg, k_ctx, preferred_element_type=jnp.float32) * scale
    s_loc = jnp.einsum("bgqhrd,bglhd->bghrql", qg, k_loc, preferred_element_type=jnp.float32) * scale
    mask = ctx_mask[:, :, None, None]
    s_ctx = jnp.where(mask, s_ctx, -jnp.inf)
    row_max = jnp.maximum(jnp.max(s_ctx, axis=-1, keepdims=True), jnp.max(s_loc, axis=-1, keepdims=True))
    w_ctx = jnp.where(mask, jnp.exp(s_ctx - row_max), 0.0)
    w_loc = jnp.exp(s_loc - row_max)
    denom = jnp.sum(w_ctx, axis=-1, keepdims=True) + jnp.sum(w_loc, axis=-1, keepdims=True)
    out = (jnp.einsum("bghrqs,bshd->bgqhrd", (w_ctx / denom).astype(v_ctx.dtype), v_ctx,
                      preferred_element_type=jnp.float32)
           + jnp.einsum("bghrql,bglhd->bgqhrd", (w_loc / denom).astype(v_loc.dtype), v_loc,
                        preferred_element_type=jnp.float32))
    return out.reshape(b, g, nq, heads, dim).astype(q.dtype)


class DenseDraftBlocks:
    """Training: N draft blocks per sequence, each over the dense context before its anchor.

    Block n of sequence b holds queries [B, N, γ] at positions anchors[b, n] + 0..γ−1. It sees the
    context K/V of positions < anchors[b, n] (each draft layer's own projection of the whole
    sequence's context, `context_kv[layer]` = ([B, S, KVH, D], [B, S, KVH, D])) and its own γ
    keys, bidirectionally — what `DraftBlock` computes at inference from the paged cache.
    """

    def __init__(self, context_kv: list[LayerKV], anchors):
        self.context_kv, self.anchors = context_kv, anchors

    def __call__(self, layer: int, q, k, v, *, scale: float, sliding_window: int | None = None):
        k_ctx, v_ctx = self.context_kv[layer]
        key_pos = jnp.arange(k_ctx.shape[1])[None, None, None, :]
        anchor = self.anchors[:, :, None, None]
        mask = key_pos < anchor  # [B, N, 1, S]: the same for every query of a block
        if sliding_window is not None:
            query_pos = anchor + jnp.arange(q.shape[2])[None, None, :, None]
            mask &= key_pos > query_pos - sliding_window
        return _rematerialised(q, k_ctx, v_ctx, mask, k, v, scale)


def _rematerialised(q, k_ctx, v_ctx, ctx_mask, k_loc, v_loc, scale: float):
    """context_and_local_attention whose backward pass recomputes the scores: training would
    otherwise keep [B, N, H, γ, S] fp32 scores per layer alive until the gradient is taken."""
    return jax.checkpoint(functools.partial(context_and_local_attention, scale=scale))(
        q, k_ctx, v_ctx, ctx_mask, k_loc, v_loc)


class TrainTimeTest:
    """Eagle3's training-time test over whole sequences [B, S], one call per step.

    Query t of step s (position t+s) extends the chain that starts after position t: it sees the
    step-0 keys at positions ≤ t and the keys of its own chain from steps 1..s (the diagonal),
    which is what the paged cache holds when the draft proposes its (s+1)-th token after x_{t+1}.
    Step 0 is plain causal attention. The layer calls it once per step; it keeps the keys.
    """

    def __init__(self):
        self.base: LayerKV | None = None
        self.chain: list[LayerKV] = []

    def __call__(self, layer: int, q, k, v, *, scale: float, sliding_window: int | None = None):
        if sliding_window is not None:
            raise ValueError("TrainTimeTest: sliding-window draft layers are not supported")
        seq = q.shape[1]
        causal = jnp.arange(seq)[None, None, :] <= jnp.arange(seq)[None, :, None]  # [1, S(query), S(key)]
        if self.base is None:
            self.base = (k, v)
            return masked_attention(q, k, v, causal[0], scale=scale)
        self.chain.append((k, v))
        k_loc = jnp.stack([c[0] for c in self.chain], axis=2)  # [B, S, s, KVH, D]
        v_loc = jnp.stack([c[1] for c in self.chain], axis=2)
        mask = jnp.broadcast_to(causal[:, :, None, :], (q.shape[0], seq, 1, seq))
        return _rematerialised(q[:, :, None], *self.base, mask, k_loc, v_loc, scale)[:, :, 0]
