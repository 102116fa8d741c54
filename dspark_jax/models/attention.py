"""Attention contexts: how a layer's q/k/v become its output.

A model layer computes q, k, v and hands them to the context it was called with:
- `DenseCausal`: whole sequences [B, S] without a cache (research forward, training features);
- `PagedKV`: a flattened ragged token batch [T] over a paged KV cache (prefill chunks, decode,
  verification); it writes the new K/V into the layer's pages and attends over them;
- `DraftBlock`: a DSpark/DFlash draft block over its context cache, bidirectional inside.
The context collects updated caches as the layers run, so a model forward stays one function.
"""

from __future__ import annotations

import dataclasses

import jax

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
