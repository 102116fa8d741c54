"""The attention kernels in GPU interpret mode against their pure-JAX references (CPU).

Every case draws fresh random inputs. The interpreter fills every buffer it allocates with NaN,
so an output element the kernel forgot to write shows up as NaN; pages outside the page table
are NaN too, so a read outside a request's pages poisons its output. The interpreter also fails
on out-of-bounds reads and on barrier misuse. Lowering to Mosaic GPU (layouts, wgmma shapes,
shared-memory budget) is checked for the shapes the models use without compiling for a device.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import draft_block_attention as dba
from pallas_kernels import paged_flash
from pallas_kernels import ragged_paged_attention as rpa


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _paged(rng, lengths, page_size, kv_heads, head_dim, dtype):
    """Random K/V pools whose unused pages are NaN, and a shuffled page table covering `lengths`."""
    rows = len(lengths)
    per_row = max(1, -(-max(lengths) // page_size))
    num_pages = rows * per_row + 3
    table = rng.permutation(num_pages)[: rows * per_row].reshape(rows, per_row)
    used = np.zeros(num_pages, bool)
    used[table.ravel()] = True

    def pool():
        x = rng.standard_normal((num_pages, page_size, kv_heads, head_dim)).astype(np.float32)
        x[~used] = np.nan
        return jnp.asarray(x, dtype)

    return pool(), pool(), jnp.asarray(table, jnp.int32)


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


RAGGED_CASES = {
    # name: (q_lens, cached context per request, heads, kv heads, head_dim, page_size, window, sinks, splits)
    "decode_gqa4": ((1, 1, 1), (0, 37, 130), 8, 2, 64, 16, None, False, None),
    "verify_gqa3": ((8, 1, 5), (40, 300, 16), 9, 3, 64, 16, None, False, 1),
    "ragged_zero_len": ((3, 0, 1, 17), (61, 5, 0, 64), 4, 4, 64, 8, None, False, 2),
    "prefill_page_boundaries": ((40, 16), (0, 48), 4, 2, 128, 16, None, False, None),
    "window_sinks_mqa": ((6, 2), (200, 90), 8, 1, 64, 32, 50, True, 3),
    "heads_per_kv_128": ((2,), (70,), 128, 1, 64, 8, None, True, None),
    "head_dim_256_big_pages": ((3, 9), (150, 20), 4, 2, 256, 128, 100, False, None),
}


@pytest.mark.parametrize("name", sorted(RAGGED_CASES))
def test_ragged_paged_attention_matches_reference(name):
    q_lens, context, heads, kv_heads, head_dim, page_size, window, with_sinks, splits = RAGGED_CASES[name]
    rng = np.random.default_rng(_seed("ragged", name))
    kv_lens = np.asarray(context) + np.asarray(q_lens)
    k, v, table = _paged(rng, kv_lens, page_size, kv_heads, head_dim, jnp.float32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((int(cu[-1]) + 5, heads, head_dim)), jnp.float32)  # 5 padding tokens
    sinks = jnp.asarray(rng.standard_normal(heads), jnp.float32) if with_sinks else None
    kw = dict(max_q_len=max(q_lens), scale=head_dim ** -0.5, sliding_window=window, sinks=sinks)
    args = (q, k, v, table, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(cu))
    out = rpa.ragged_paged_attention(*args, interpret=True, tuning=paged_flash.Tuning(splits=splits), **kw)
    ref = rpa.ragged_paged_attention_reference(*args, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(out))), "NaN: an unwritten output or a read outside the request's pages"
    assert _rel_err(out, ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(out[cu[-1]:]), 0.0)  # padding tokens


def test_ragged_paged_attention_bf16():
    rng = np.random.default_rng(_seed("ragged-bf16"))
    q_lens, context = (8, 1, 4), (100, 33, 250)
    kv_lens = np.asarray(context) + np.asarray(q_lens)
    k, v, table = _paged(rng, kv_lens, 16, 2, 128, jnp.bfloat16)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((int(cu[-1]), 8, 128)), jnp.bfloat16)
    args = (q, k, v, table, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(cu))
    out = rpa.ragged_paged_attention(*args, max_q_len=8, scale=128 ** -0.5, interpret=True)
    ref = rpa.ragged_paged_attention_reference(*(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args),
                                               max_q_len=8, scale=128 ** -0.5)
    assert out.dtype == jnp.bfloat16
    assert _rel_err(out, ref) < 1e-2


def test_kernel_writes_every_row_of_every_active_block():
    """Raw kernel outputs: every block holding a valid query token is fully written in every split."""
    rng = np.random.default_rng(_seed("poison"))
    q_lens, kv_lens = np.array([5, 0, 1]), np.array([5, 12, 200])
    k, v, table = _paged(rng, kv_lens, 16, 1, 64, jnp.float32)
    plan = paged_flash.make_plan(num_heads=16, num_kv_heads=1, head_dim=64, page_size=16,
                                 pages_per_row=table.shape[1], rows=3, max_q_len=5, dtype=jnp.float32,
                                 tuning=paged_flash.Tuning(splits=4))
    q = jnp.asarray(rng.standard_normal((3, plan.q_blocks * plan.tokens_per_block, 16, 64)), jnp.float32)
    out, lse = paged_flash.paged_flash(paged_flash.to_blocks(q, plan), k, v, table, jnp.asarray(q_lens),
                                       jnp.asarray(kv_lens - q_lens), jnp.asarray(kv_lens), plan=plan, scale=0.125,
                                       causal=True, sliding_window=None, interpret=True)
    out, lse = np.asarray(out), np.asarray(lse)
    for r in range(3):
        for b in range(plan.q_blocks):
            active = b * plan.tokens_per_block < q_lens[r]
            assert active == (not np.isnan(out[:, :, r, b]).any()), (r, b)
            assert active == (not np.isnan(lse[:, :, r, b]).any()), (r, b)


def test_no_races_in_the_key_pipeline():
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    rng = np.random.default_rng(_seed("races"))
    kv_lens = np.array([700, 390])  # more key blocks than pipeline stages: every stage is refilled
    k, v, table = _paged(rng, kv_lens, 16, 1, 64, jnp.float32)
    q = jnp.asarray(rng.standard_normal((6, 4, 64)), jnp.float32)
    out = rpa.ragged_paged_attention(q, k, v, table, jnp.asarray(kv_lens, jnp.int32), jnp.asarray([0, 4, 6], jnp.int32),
                                     max_q_len=4, scale=0.125, tuning=paged_flash.Tuning(splits=1),
                                     interpret=plgpu.InterpretGPUParams(detect_races=True))
    jax.block_until_ready(out)
    assert not get_races().races_found


@pytest.mark.parametrize("gamma,context,heads,kv_heads,window,splits", [
    (1, (33, 0), 4, 2, None, None),
    (5, (0, 17, 130), 8, 2, None, None),
    (7, (64, 200), 9, 3, 40, 2),
    (16, (250, 5), 4, 4, None, 3),
])
def test_draft_block_attention_matches_reference(gamma, context, heads, kv_heads, window, splits):
    rng = np.random.default_rng(_seed("draft", gamma, context))
    rows, head_dim = len(context), 64
    k, v, table = _paged(rng, [max(c, 1) for c in context], 16, kv_heads, head_dim, jnp.float32)
    rand = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    args = (rand(rows, gamma, heads, head_dim), rand(rows, gamma, kv_heads, head_dim),
            rand(rows, gamma, kv_heads, head_dim), k, v, table, jnp.asarray(context, jnp.int32))
    kw = dict(scale=head_dim ** -0.5, sliding_window=window)
    out = dba.draft_block_attention(*args, interpret=True, tuning=paged_flash.Tuning(splits=splits), **kw)
    ref = dba.draft_block_attention_reference(*args, **kw)
    assert np.all(np.isfinite(np.asarray(out)))
    assert _rel_err(out, ref) < 1e-5


def test_unsupported_shapes_fall_back_to_the_reference():
    assert paged_flash.unsupported_reason(jnp.bfloat16, jnp.bfloat16, 64, 1, 512, 16)  # V4's 512-wide heads
    assert paged_flash.unsupported_reason(jnp.bfloat16, jnp.bfloat16, 32, 8, 128, 12)
    assert paged_flash.unsupported_reason(jnp.bfloat16, jnp.bfloat16, 32, 8, 128, 16) is None
    assert paged_flash.unsupported_reason(jnp.float32, jnp.float32, 32, 8, 128, 16)  # tf32 on the device
    assert paged_flash.unsupported_reason(jnp.float32, jnp.float32, 32, 8, 128, 16, interpret=True) is None
    rng = np.random.default_rng(_seed("fallback"))
    k, v, table = _paged(rng, [20], 16, 1, 96, jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 2, 96)), jnp.float32)
    args = (q, k, v, table, jnp.asarray([20], jnp.int32), jnp.asarray([0, 2], jnp.int32))
    np.testing.assert_array_equal(rpa.ragged_paged_attention(*args, max_q_len=2, scale=0.1, interpret=True),
                                  rpa.ragged_paged_attention_reference(*args, max_q_len=2, scale=0.1))


LOWERING = {
    # (tokens, rows, pages per row, heads, kv heads, head_dim, page size, max q len, window, sinks, block_kv)
    "qwen3_decode": (64, 64, 64, 32, 8, 128, 16, 1, None, False, None),
    "qwen3_verify": (512, 64, 64, 32, 8, 128, 16, 8, None, False, None),
    "qwen3_verify_block_kv_128": (512, 64, 64, 32, 8, 128, 16, 8, None, False, 128),
    "qwen3_long_decode": (1, 1, 2048, 32, 8, 128, 16, 1, None, False, None),
    "qwen3_prefill": (2048, 4, 128, 32, 8, 128, 64, 512, None, False, None),
    "smollm2_verify": (32, 4, 8, 9, 3, 64, 16, 8, None, False, None),
    "gemma_sliding_256": (64, 8, 64, 16, 8, 256, 16, 8, 1024, False, None),
    "mqa_64_heads_window_sinks": (16, 2, 64, 64, 1, 128, 16, 8, 128, True, None),
}


@pytest.mark.parametrize("name", sorted(LOWERING))
def test_lowers_to_mosaic_gpu(name):
    """Mosaic GPU lowering (layout inference, wgmma shapes, shared-memory budget) for real model shapes."""
    tokens, rows, pages, heads, kv_heads, head_dim, page_size, max_q_len, window, with_sinks, block_kv = LOWERING[name]
    sds = jax.ShapeDtypeStruct
    pool = sds((rows * pages + 1, page_size, kv_heads, head_dim), jnp.bfloat16)
    fn = functools.partial(rpa.ragged_paged_attention, max_q_len=max_q_len, scale=head_dim ** -0.5,
                           sliding_window=window, tuning=paged_flash.Tuning(block_kv=block_kv))
    lowered = jax.jit(lambda q, k, v, t, kl, cu, s: fn(q, k, v, t, kl, cu, sinks=s)).trace(
        sds((tokens, heads, head_dim), jnp.bfloat16), pool, pool, sds((rows, pages), jnp.int32),
        sds((rows,), jnp.int32), sds((rows + 1,), jnp.int32), sds((heads,), jnp.float32) if with_sinks else None,
    ).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
