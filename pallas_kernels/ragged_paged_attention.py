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

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import paged_flash
from pallas_kernels.common import masked_attention


def ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, *, max_q_len: int, scale: float,
                           sliding_window: int | None = None, sinks=None, interpret: bool = False,
                           tuning: paged_flash.Tuning | None = None):
    """The Pallas kernel (same contract as the reference); `tuning` overrides block sizes and splits."""
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
                                 dtype=q.dtype, tuning=tuning)
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


# --------------------------------------------------------------------------------------------
# GPU checks and benchmark (python -m pallas_kernels.bench)

QWEN3 = dict(heads=32, kv_heads=8, head_dim=128)  # Qwen3-4B and -8B share their attention shape
V4_FLASH = dict(heads=64, kv_heads=1, head_dim=512, window=128, sinks=True)


def _inputs(key, q_lens, context, *, heads, kv_heads, head_dim, page_size=16, dtype=jnp.bfloat16, sinks=False,
            pad_tokens=0):
    """(args, kv_lens) of one call: q_lens[r] new tokens after context[r] cached ones."""
    q_lens, context = np.asarray(q_lens), np.asarray(context)
    kv_lens = context + q_lens
    q_key, cache_key, sink_key = jax.random.split(key, 3)
    k_pages, v_pages, table = paged_flash.random_pages(cache_key, kv_lens, page_size=page_size, kv_heads=kv_heads,
                                                       head_dim=head_dim, dtype=dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = jax.random.normal(q_key, (int(cu[-1]) + pad_tokens, heads, head_dim), jnp.float32).astype(dtype)
    sink = jax.random.normal(sink_key, (heads,), jnp.float32) if sinks else None
    return (q, k_pages, v_pages, table, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(cu), sink), kv_lens


def _call(fn, max_q_len, scale, window, **kw):
    return jax.jit(lambda q, k, v, t, kl, cu, s: fn(q, k, v, t, kl, cu, max_q_len=max_q_len, scale=scale,
                                                     sliding_window=window, sinks=s, **kw))


def gpu_checks(bench):
    cases = {  # name: (q_lens, context, heads, kv_heads, head_dim, page_size, window, sinks, splits)
        "decode_mixed_lengths": ((1,) * 5, (900, 33, 0, 4000, 17), 32, 8, 128, 16, None, False, None),
        "verify_with_empty_rows": ((8, 0, 1, 5), (1000, 60, 7, 300), 32, 8, 128, 16, None, False, None),
        "verify_gqa3_head64": ((8, 8, 3), (500, 16, 1), 9, 3, 64, 16, None, False, None),
        "prefill_chunks": ((512, 100), (0, 1500), 32, 8, 128, 16, None, False, None),
        "forced_splits": ((1, 2), (5000, 3000), 32, 8, 128, 16, None, False, 7),
        "window_sinks_64_heads_mqa": ((6, 1), (3000, 90), 64, 1, 128, 16, 128, True, None),
        "head_dim_256_window": ((8, 1), (700, 2000), 16, 8, 256, 16, 1024, False, None),
        "pages_of_128": ((8, 3), (1000, 200), 32, 8, 128, 128, None, False, None),
    }
    for i, (name, (q_lens, context, heads, kv_heads, head_dim, page_size, window, sinks, splits)) in enumerate(
            cases.items()):
        def run():
            args, _ = _inputs(jax.random.key(100 + i), q_lens, context, heads=heads, kv_heads=kv_heads,
                              head_dim=head_dim, page_size=page_size, sinks=sinks, pad_tokens=3)
            scale = head_dim ** -0.5
            out = _call(ragged_paged_attention, max(q_lens), scale, window,
                        tuning=paged_flash.Tuning(splits=splits))(*args)
            up = [a.astype(jnp.float32) if a is not None and a.dtype == jnp.bfloat16 else a for a in args]
            ref = _call(ragged_paged_attention_reference, max(q_lens), scale, window)(*up)
            out = np.asarray(out.astype(jnp.float32))
            err = float(np.linalg.norm(out - np.asarray(ref)) / np.linalg.norm(np.asarray(ref)))
            shapes = (f"q_lens={q_lens} context={context} H={heads}/{kv_heads} D={head_dim} page={page_size} "
                      f"window={window} sinks={sinks} splits={splits}")
            return (err if np.all(np.isfinite(out)) else float("nan")), 1.5e-2, shapes
        bench.check("ragged_paged_attention", name, run)


def _dense(args, kv_lens):
    """The same caches laid out densely [R, S, KVH, D] (for cuDNN, which has no paged input)."""
    q, k_pages, v_pages, table = args[:4]
    rows, pages = table.shape
    s = int(max(kv_lens))
    k = k_pages[table].reshape(rows, pages * k_pages.shape[1], *k_pages.shape[2:])[:, :s]
    v = v_pages[table].reshape(rows, pages * v_pages.shape[1], *v_pages.shape[2:])[:, :s]
    return jnp.nan_to_num(k), jnp.nan_to_num(v)


def benchmark(bench):
    full = [("decode", r, 1, c) for r in (1, 16, 64, 128) for c in (1024, 8192, 32768) if r * c <= 2**21]
    full += [("verify", r, 8, c) for r in (1, 16, 64) for c in (1024, 8192)]
    default = [("decode", 1, 1, 1024), ("decode", 64, 1, 1024), ("decode", 64, 1, 8192), ("decode", 128, 1, 8192),
               ("verify", 1, 8, 1024), ("verify", 64, 8, 1024), ("verify", 64, 8, 8192)]
    cases = bench.pick(quick=[("decode", 64, 1, 1024), ("verify", 64, 8, 1024)], default=default, full=full)
    for kind, rows, q_len, context in cases:
        _bench_case(bench, f"qwen3 {kind} R={rows} ctx={context}", QWEN3, rows, q_len, context)
    _bench_case(bench, "qwen3 prefill 1x2048", QWEN3, 1, 2048, 0)
    if bench.sweep != "quick":
        _bench_case(bench, "qwen3 prefill 4x512 after 1536", QWEN3, 4, 512, 1536)
        _bench_case(bench, "v4-flash decode R=16 ctx=8192 window", V4_FLASH, 16, 1, 8192)


def _bench_case(bench, case, model, rows, q_len, context):
    heads, kv_heads, head_dim = model["heads"], model["kv_heads"], model["head_dim"]
    window, sinks = model.get("window"), model.get("sinks", False)
    scale = head_dim ** -0.5

    def make(seed):
        return _inputs(jax.random.key(seed), (q_len,) * rows, (context,) * rows, heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim, sinks=sinks)[0]

    kv_lens = np.full(rows, context + q_len)
    visible = np.minimum(kv_lens, window + q_len - 1) if window else kv_lens
    cache_bytes = paged_flash.kv_bytes(visible, kv_heads, head_dim, jnp.bfloat16)
    q_bytes = 2 * rows * q_len * heads * head_dim * 2  # q in, out back
    sets = bench.copies(make, paged_flash.kv_bytes(kv_lens, kv_heads, head_dim, jnp.bfloat16))
    ms = bench.time(_call(ragged_paged_attention, q_len, scale, window), sets)
    alternatives = {"xla_reference": bench.attempt(_call(ragged_paged_attention_reference, q_len, scale, window),
                                                   sets)}
    reason = paged_flash.unsupported_reason(jnp.bfloat16, jnp.bfloat16, heads, kv_heads, head_dim, 16)
    if not window:
        dense = [(a[0].reshape(rows, q_len, heads, head_dim), *_dense(a, kv_lens), a[4]) for a in sets]
        causal = q_len > 1 and context == 0  # cuDNN's causal mask is top-left aligned: exact only without a prefix
        cudnn = jax.jit(lambda q, k, v, lens: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=None if causal else lens,
            implementation="cudnn"))
        alternatives["cudnn_dense"] = bench.attempt(cudnn, dense)
    if q_len == 1 and not window:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        triton = [(a[0], a[1].transpose(2, 0, 1, 3), a[2].transpose(2, 0, 1, 3), a[3], a[4]) for a in sets]
        pages = sets[0][3].shape[1]
        fn = jax.jit(lambda q, k, v, t, lens: paged_attention(q * scale, jnp.nan_to_num(k), jnp.nan_to_num(v), t,
                                                              lens, k_splits=max(1, min(16, pages // 8))))
        alternatives["jax_triton_paged"] = bench.attempt(fn, triton)
    flops = 4 * rows * q_len * heads * head_dim * (context + (q_len + 1) / 2)
    variants = {} if reason or (rows < 64 and bench.sweep != "full") else {
        name: bench.attempt(_call(ragged_paged_attention, q_len, scale, window, tuning=tuning), sets)
        for name, tuning in paged_flash.VARIANTS.items()}
    if reason:
        bench.record("ragged_paged_attention", case, ms=ms, bytes_moved=cache_bytes + q_bytes,
                     alternatives=alternatives, bar="n/a", met=None,
                     note=f"kernel not used ({reason}): the dispatch runs the XLA reference, timed here")
        return
    if q_len > 64:
        cudnn = alternatives.get("cudnn_dense")
        met = isinstance(cudnn, float) and cudnn / ms >= 0.9
        bench.record("ragged_paged_attention", case, ms=ms, bytes_moved=cache_bytes + q_bytes,
                     alternatives=alternatives, bar=">= 0.9x cuDNN", met=met, tflops=flops / ms * 1e-9,
                     variants=variants)
    else:
        share = bench.floor_ms(cache_bytes + q_bytes) / ms
        bench.record("ragged_paged_attention", case, ms=ms, bytes_moved=cache_bytes + q_bytes,
                     alternatives=alternatives, bar=">= 80% of bandwidth", met=share >= 0.8,
                     tflops=flops / ms * 1e-9, variants=variants)
