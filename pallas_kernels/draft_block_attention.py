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

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import paged_flash
from pallas_kernels.common import masked_attention


def draft_block_attention(q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens, *, scale: float,
                          sliding_window: int | None = None, interpret: bool = False,
                          tuning: paged_flash.Tuning | None = None):
    """The Pallas kernel (same contract as the reference); `tuning` overrides block sizes and splits."""
    rows, gamma, num_heads, head_dim = q.shape
    num_kv_heads, page_size = k_pages.shape[2], k_pages.shape[1]
    if paged_flash.unsupported_reason(q.dtype, k_pages.dtype, num_heads, num_kv_heads, head_dim, page_size,
                                       interpret):
        return draft_block_attention_reference(q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens,
                                               scale=scale, sliding_window=sliding_window)
    plan = paged_flash.make_plan(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                 page_size=page_size, pages_per_row=page_table.shape[1], rows=rows, max_q_len=gamma,
                                 dtype=q.dtype, tuning=tuning)
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


# --------------------------------------------------------------------------------------------
# GPU checks and benchmark (python -m pallas_kernels.bench)

QWEN3_DRAFT = dict(heads=32, kv_heads=8, head_dim=128)  # DSpark draft layers copy the target's attention


def _inputs(key, gamma, context, *, heads, kv_heads, head_dim, page_size=16, dtype=jnp.bfloat16):
    keys = jax.random.split(key, 4)
    rows = len(context)
    k_pages, v_pages, table = paged_flash.random_pages(keys[0], [max(c, 1) for c in context], page_size=page_size,
                                                       kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    rand = lambda k, *shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)  # noqa: E731
    return (rand(keys[1], rows, gamma, heads, head_dim), rand(keys[2], rows, gamma, kv_heads, head_dim),
            rand(keys[3], rows, gamma, kv_heads, head_dim), k_pages, v_pages, table, jnp.asarray(context, jnp.int32))


def _call(fn, scale, window, **kw):
    return jax.jit(lambda *args: fn(*args, scale=scale, sliding_window=window, **kw))


def gpu_checks(bench):
    cases = {  # name: (gamma, context, heads, kv_heads, head_dim, window, splits)
        "gamma7_mixed_context": (7, (1000, 0, 33, 4000), 32, 8, 128, None, None),
        "gamma1": (1, (300, 17), 32, 8, 128, None, None),
        "gamma16_gqa3": (16, (800, 64), 9, 3, 64, None, None),
        "window_forced_splits": (5, (3000, 100), 32, 8, 128, 512, 5),
        "head_dim_256": (7, (500, 2000), 16, 8, 256, None, None),
    }
    for i, (name, (gamma, context, heads, kv_heads, head_dim, window, splits)) in enumerate(cases.items()):
        def run():
            args = _inputs(jax.random.key(200 + i), gamma, context, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
            tuning = paged_flash.Tuning(splits=splits)
            out = _call(draft_block_attention, head_dim ** -0.5, window, tuning=tuning)(*args)
            up = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args]
            ref = np.asarray(_call(draft_block_attention_reference, head_dim ** -0.5, window)(*up))
            out = np.asarray(out.astype(jnp.float32))
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            shapes = f"gamma={gamma} context={context} H={heads}/{kv_heads} D={head_dim} window={window} splits={splits}"
            return (err if np.all(np.isfinite(out)) else float("nan")), 1.5e-2, shapes
        bench.check("draft_block_attention", name, run)


def benchmark(bench):
    full = [(r, c) for r in (1, 16, 64, 128) for c in (1024, 8192, 32768) if r * c <= 2**21]
    for rows, context in bench.pick(quick=[(64, 1024)], default=[(1, 1024), (64, 8192)], full=full):
        _bench_case(bench, f"qwen3 draft gamma=7 R={rows} ctx={context}", QWEN3_DRAFT, rows, 7, context)


def _bench_case(bench, case, model, rows, gamma, context):
    heads, kv_heads, head_dim = model["heads"], model["kv_heads"], model["head_dim"]
    scale = head_dim ** -0.5

    def make(seed):
        return _inputs(jax.random.key(seed), gamma, (context,) * rows, heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim)

    cache = paged_flash.kv_bytes([context] * rows, kv_heads, head_dim, jnp.bfloat16)
    block = 2 * rows * gamma * (2 * heads + 2 * kv_heads) * head_dim  # q, out, block K/V in bf16
    sets = bench.copies(make, cache)
    ms = bench.time(_call(draft_block_attention, scale, None), sets)
    alternatives = {"xla_reference": bench.attempt(_call(draft_block_attention_reference, scale, None), sets)}
    variants = {name: bench.attempt(_call(draft_block_attention, scale, None, tuning=tuning), sets)
                for name, tuning in paged_flash.VARIANTS.items()}
    share = bench.floor_ms(cache + block) / ms
    bench.record("draft_block_attention", case, ms=ms, bytes_moved=cache + block, alternatives=alternatives,
                 bar=">= 80% of bandwidth", met=share >= 0.8, variants=variants)
