"""Paged KV cache: page pools per layer, a host page allocator, and ragged batch layouts.

A request's cache is the list of pages in its row of the page table; position p lives in page
`page_table[r, p // page_size]` at offset `p % page_size`. Verification writes K/V for every
scheduled token; rejected ones are simply overwritten later because only lengths advance.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax import sharding
from dspark_jax.models.attention import LayerKV, PagedMeta


def init_kv_caches(heads_and_dims: list[tuple[int, int]], *, num_pages: int, page_size: int,
                   dtype, mesh=None) -> list[LayerKV]:
    """Zeroed (k_pages, v_pages) [num_pages, page_size, KVH, D] for each cache layer.

    With a mesh (`sharding.model_mesh(target)`) the pages are created in their shards, split by
    KV head over "tensor" like the heads that read them; a KV head count the tensor axis does not
    divide is refused.
    """
    def pages(kvh: int, d: int) -> jax.Array:
        return sharding.zeros((num_pages, page_size, kvh, d), dtype, sharding.KV_PAGES, mesh)

    return [(pages(kvh, d), pages(kvh, d)) for kvh, d in heads_and_dims]


def kv_cache_bytes(heads_and_dims: list[tuple[int, int]], tokens: int, dtype) -> int:
    return 2 * tokens * sum(kvh * d for kvh, d in heads_and_dims) * jnp.dtype(dtype).itemsize


def pages_for(length: int, page_size: int) -> int:
    return -(-length // page_size)


def bucket(n: int, *, minimum: int = 1, maximum: int | None = None) -> int:
    """The power of two ≥ n (at least `minimum`, at most `maximum`): static shapes in few sizes."""
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return min(size, maximum) if maximum is not None else size


class PageAllocator:
    """Free list of page ids 0..num_pages−1 (a stack: the most recently released page is reused first).

    Pages are all one size, so any free page serves any request: nothing fragments. Releasing a
    page that is not allocated (a double free) is an error.
    """

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache: {n} pages requested, {len(self._free)} of {self.num_pages} free")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def release(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise ValueError(f"page {p} released but not allocated")
            self._used.remove(p)
            self._free.append(p)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RaggedLayout:
    """A flat token batch: which request and query slot each token is, plus attention metadata."""

    positions: jax.Array  # [T] int32 absolute position (0 for padding)
    token_req: jax.Array  # [T] int32 request row
    token_slot: jax.Array  # [T] int32 index within the request's queries
    valid: jax.Array  # [T] bool
    meta: PagedMeta


def ragged_layout(page_table, start, q_lens, *, num_tokens: int, max_q_len: int, page_size: int,
                  num_slots: int) -> RaggedLayout:
    """Flatten q_lens[r] queries per request (starting at cache position start[r]) into T tokens.

    Works in or out of jit. Padding tokens get slot `num_slots` (dropped on write).
    """
    page_table = jnp.asarray(page_table, jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    q_lens = jnp.asarray(q_lens, jnp.int32)
    num_reqs = page_table.shape[0]
    cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q_lens, dtype=jnp.int32)])
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    req = jnp.clip(jnp.searchsorted(cu[1:], token, side="right"), 0, num_reqs - 1).astype(jnp.int32)
    slot = token - cu[req]
    valid = token < cu[-1]
    pos = jnp.where(valid, start[req] + slot, 0)
    page = page_table[req, jnp.clip(pos // page_size, 0, page_table.shape[1] - 1)]
    slot_mapping = jnp.where(valid, page * page_size + pos % page_size, num_slots)
    meta = PagedMeta(page_table=page_table, kv_lens=start + q_lens, cu_q_lens=cu,
                     slot_mapping=slot_mapping.astype(jnp.int32), max_q_len=max_q_len)
    return RaggedLayout(positions=pos, token_req=req, token_slot=jnp.where(valid, slot, 0), valid=valid, meta=meta)
