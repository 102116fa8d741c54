"""The Mosaic GPU flash-attention kernel over paged K/V that both attention entry points launch.

`ragged_paged_attention` (prefill chunks, decode, verification) and `draft_block_attention`
(the draft's context) differ only in how query rows map to requests and which keys a row may
see; this module owns the kernel and the layout plumbing around it.

Query layout. One CTA computes a 64-row block (the wgmma M tile): `tokens_per_block` query
tokens of one request times `heads_per_block` query heads that share a KV head (GQA folded into
the rows, so a KV tile is read once for all heads of its group and all query tokens of the
block). Queries are laid out host-side (in XLA) as `[q_groups, R, q_blocks, 64, D]`, so every
block is one aligned TMA box; the outputs come back in the same padded layout.

Key stream. A CTA walks the key blocks its rows can see (`block_kv` keys each, a whole number
of pages or a slice of one page), each fetched by TMA straight from the page pool — one copy per
page, all completing on the stage's barrier — `stages` blocks ahead of the compute. Masks are
per row: key k is visible to the query at position p iff k ≤ p (causal) or k < kv_len
(non-causal), and k > p − window when a sliding window is set.

Splits. With few CTAs (small batch, long context) the visible key range is split `splits` ways
(flash-decoding); every CTA writes its normalised partial output and log-sum-exp, and
`merge_partials` combines them (plus an optional per-head sink logit) in XLA.

P (the probabilities) goes to the PV wgmma through shared memory rather than registers, and each
step's PV product is added to the running accumulator in registers: the GPU interpreter runs
neither register operands nor `run_state` accumulators, and one code path for both keeps the
CPU tests honest. The cost is an 8 KB shared-memory round trip per key block, far below the
32 KB of K/V the block streams in.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # wgmma M: query rows per CTA
OUT_CHUNK = 128  # output columns staged through shared memory at a time (fp32: 32 KB)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
SMEM_BYTES = 227 * 1024  # usable shared memory per block on Hopper


def mma_transforms(last_dim: int, dtype) -> tuple:
    """Tiling + swizzle an SMEM operand of wgmma needs: (8, swizzle/itemsize) tiles, widest swizzle that fits."""
    itemsize = jnp.dtype(dtype).itemsize
    for swizzle in (128, 64, 32):
        if last_dim % (swizzle // itemsize) == 0:
            return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)
    raise ValueError(f"a wgmma operand's last dimension {last_dim} must be a multiple of {32 // itemsize}")


def num_sms() -> int:
    """Streaming multiprocessors of the default device (an H100's 132 when not on a GPU)."""
    device = jax.devices()[0]
    return getattr(device, "core_count", 0) if device.platform == "gpu" else 132


def interpret_params(interpret):
    """`interpret` as a kernel argument: False (compile), True (the GPU interpreter) or its own InterpretGPUParams."""
    if isinstance(interpret, bool):
        return plgpu.InterpretGPUParams() if interpret else False
    return interpret


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape of one launch."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    heads_per_block: int  # query heads of one KV head in a row block (≤ 64)
    tokens_per_block: int  # query tokens per row block
    q_blocks: int  # row blocks per request
    block_kv: int  # keys per pipeline stage
    stages: int
    splits: int
    page_size: int
    pages_per_row: int

    @property
    def q_groups(self) -> int:
        return self.num_heads // self.heads_per_block

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rows_per_copy(self) -> int:
        return min(self.page_size, self.block_kv)


def unsupported_reason(q_dtype, kv_dtype, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                       interpret=False):
    """Why the kernel cannot run these shapes (None when it can); callers then use the reference."""
    if jnp.dtype(q_dtype) != jnp.dtype(kv_dtype):
        return f"query dtype {q_dtype} differs from the cache dtype {kv_dtype}"
    allowed = (jnp.bfloat16, jnp.float16) + ((jnp.float32,) if interpret else ())
    if jnp.dtype(q_dtype) not in map(jnp.dtype, allowed):
        # On the device fp32 operands would run as tf32 wgmmas: not fp32 attention.
        return f"dtype {q_dtype} (bf16 or f16; f32 only in interpret mode)"
    if head_dim not in (64, 128, 256):
        return f"head_dim {head_dim} (64, 128 or 256; a 64-row fp32 accumulator of a wider head exceeds a warpgroup's registers)"
    group = num_heads // num_kv_heads
    if group > ROWS and group % ROWS:
        return f"{group} query heads per KV head (at most {ROWS}, or a multiple of {ROWS})"
    if page_size < 8 or page_size & (page_size - 1):
        return f"page_size {page_size} (a power of two ≥ 8: TMA boxes land on 8-row swizzle tiles)"
    return None


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Overrides of the plan's choices (None: the heuristic), for benchmarks and tests."""

    block_kv: int | None = None  # keys per pipeline stage (a multiple of 64)
    stages: int | None = None  # key blocks in flight
    splits: int | None = None  # ways the key range is split across CTAs


# Other settings the benchmark times next to the default (their times pick the next default).
VARIANTS = {"block_kv=128": Tuning(block_kv=128), "stages=2": Tuning(stages=2)}


def make_plan(*, num_heads, num_kv_heads, head_dim, page_size, pages_per_row, rows, max_q_len, dtype,
              tuning: Tuning | None = None) -> Plan:
    """Block sizes, pipeline depth and KV splits for these static shapes."""
    tuning = tuning or Tuning()
    heads_per_block = min(num_heads // num_kv_heads, ROWS)
    tokens_per_block = ROWS // heads_per_block
    q_blocks = -(-max_q_len // tokens_per_block)
    itemsize = jnp.dtype(dtype).itemsize
    block_kv = tuning.block_kv or 64
    fixed = ROWS * head_dim * itemsize + ROWS * min(head_dim, OUT_CHUNK) * 4 + ROWS * block_kv * itemsize + 2048
    stage = 2 * block_kv * head_dim * itemsize
    stages = tuning.stages or max(2, min(4, (SMEM_BYTES - fixed) // stage))
    kv_blocks = -(-pages_per_row * page_size // block_kv)
    splits = tuning.splits
    if splits is None:
        ctas = rows * (num_heads // heads_per_block) * q_blocks
        # Enough CTAs to fill every SM twice, but no split shorter than 4 key blocks.
        splits = max(1, min(-(-2 * num_sms() // ctas), kv_blocks // 4))
    return Plan(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, heads_per_block=heads_per_block,
                tokens_per_block=tokens_per_block, q_blocks=q_blocks, block_kv=block_kv, stages=int(stages),
                splits=int(splits), page_size=page_size, pages_per_row=pages_per_row)


def to_blocks(q_tokens, plan: Plan):
    """[R, q_blocks·tokens_per_block, H, D] → the kernel's row blocks [q_groups, R, q_blocks, 64, D]."""
    rows = q_tokens.shape[0]
    x = q_tokens.reshape(rows, plan.q_blocks, plan.tokens_per_block, plan.q_groups, plan.heads_per_block,
                         plan.head_dim)
    x = x.transpose(3, 0, 1, 2, 4, 5).reshape(plan.q_groups, rows, plan.q_blocks, -1, plan.head_dim)
    used = plan.tokens_per_block * plan.heads_per_block
    return jnp.pad(x, ((0, 0),) * 3 + ((0, ROWS - used), (0, 0)))


def from_blocks(out, lse, req, idx, plan: Plan):
    """Partials of the query tokens (req[t], idx[t]): ([S, T, H, D], [S, T, H]) from the row-block layout."""
    used = plan.tokens_per_block * plan.heads_per_block
    s, groups, rows, blocks = out.shape[:4]
    out = out[..., :used, :].reshape(s, groups, rows, blocks, plan.tokens_per_block, plan.heads_per_block, -1)
    lse = lse[..., :used].reshape(s, groups, rows, blocks, plan.tokens_per_block, plan.heads_per_block)
    block, slot = idx // plan.tokens_per_block, idx % plan.tokens_per_block
    out = out[:, :, req, block, slot]  # [S, G, T, HB, D]
    lse = lse[:, :, req, block, slot]  # [S, G, T, HB]
    tokens = req.shape[0]
    out = out.transpose(0, 2, 1, 3, 4).reshape(s, tokens, plan.num_heads, -1)
    lse = lse.transpose(0, 2, 1, 3).reshape(s, tokens, plan.num_heads)
    return out, lse


def merge_partials(outs, lses, sinks=None):
    """Combine normalised partial attentions over disjoint key sets (fp32).

    outs [N, T, H, D], lses [N, T, H] (natural log; −inf for an empty key set); sinks [H] adds
    exp(sink) to every row's denominator. Rows with no keys and no sink give zeros.
    """
    if outs.shape[0] == 1 and sinks is None:
        return outs[0]
    top = jnp.max(lses, axis=0)
    if sinks is not None:
        top = jnp.maximum(top, sinks.astype(jnp.float32))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lses - top)  # [N, T, H]
    denom = jnp.sum(weights, axis=0)
    if sinks is not None:
        denom = denom + jnp.exp(sinks.astype(jnp.float32) - top)
    out = jnp.einsum("nth,nthd->thd", weights, outs)
    return out / jnp.where(denom > 0, denom, 1.0)[..., None]


def paged_flash(q_blocks, k_pages, v_pages, page_table, q_lens, q_start, kv_lens, *, plan: Plan, scale: float,
                causal: bool, sliding_window: int | None, interpret: bool):
    """Run the kernel. Returns (out [S, q_groups, R, q_blocks, 64, D] fp32, lse [S, q_groups, R, q_blocks, 64]).

    Per request r (int32 [R] arrays): q_lens[r] valid query tokens, the first at position
    q_start[r] (token i at q_start + i); kv_lens[r] keys in its pages. Only row blocks holding a
    valid token are computed; the rest of the outputs is left unwritten.
    """
    rows = page_table.shape[0]
    hb, bq, bk, stages, splits = plan.heads_per_block, plan.tokens_per_block, plan.block_kv, plan.stages, plan.splits
    d, dtype = plan.head_dim, q_blocks.dtype
    per_copy = plan.rows_per_copy
    copies = bk // per_copy
    kv_per_q_group = plan.group // hb  # query groups sharing one KV head (1 unless G > 64)

    def paged_flash_kernel(pt_ref, qlen_ref, qstart_ref, kvlen_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
             q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_bar, k_bar, v_bar):
        r, qg, qb, split = (lax.axis_index(n) for n in ("r", "qg", "qb", "split"))
        kvh = lax.div(qg, jnp.int32(kv_per_q_group))
        q_len, q_pos0, kv_len = qlen_ref[r], qstart_ref[r], kvlen_ref[r]
        tok0 = qb * bq

        @pl.when(tok0 < q_len)
        def _block():
            last_tok = jnp.minimum(q_len, tok0 + bq) - 1
            # The keys any row of this block may see: [first, end).
            end = q_pos0 + last_tok + 1 if causal else kv_len
            first = jnp.int32(0)
            if sliding_window is not None:
                first = jnp.maximum(q_pos0 + tok0 - sliding_window + 1, 0)
            b_first, b_end = lax.div(first, jnp.int32(bk)), lax.div(end + bk - 1, jnp.int32(bk))
            per_split = lax.div(jnp.maximum(b_end - b_first, 0) + splits - 1, jnp.int32(splits))
            lo = b_first + split * per_split
            steps = jnp.clip(b_end - lo, 0, per_split)

            plgpu.copy_gmem_to_smem(q_ref.at[qg, r, qb], q_smem, q_bar)

            def fetch(i):
                slot = lax.rem(i, jnp.int32(stages))
                for j in range(copies):
                    pos = (lo + i) * bk + j * per_copy
                    page = pt_ref[r, jnp.minimum(lax.div(pos, jnp.int32(plan.page_size)), plan.pages_per_row - 1)]
                    src = pl.ds(lax.rem(pos, jnp.int32(plan.page_size)), per_copy)
                    dst = pl.ds(j * per_copy, per_copy)
                    plgpu.copy_gmem_to_smem(k_ref.at[page, src, kvh], k_smem.at[slot, dst], k_bar.at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[page, src, kvh], v_smem.at[slot, dst], v_bar.at[slot])

            for i in range(stages):
                pl.when(i < steps)(functools.partial(fetch, jnp.int32(i)))

            row = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 0, layout=plgpu.Layout.WGMMA)
            col = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 1, layout=plgpu.Layout.WGMMA)
            tok = tok0 + lax.div(row, jnp.int32(hb))
            q_pos = q_pos0 + tok
            limit = q_pos if causal else jnp.full_like(q_pos, kv_len - 1)
            limit = jnp.where(tok < q_len, limit, -1)  # rows past the request see nothing
            floor = q_pos - sliding_window if sliding_window is not None else None

            plgpu.barrier_wait(q_bar)

            def step(i, carry):
                acc, m, l = carry
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(k_bar.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32)) * (scale * _LOG2E)
                k_pos = (lo + i) * bk + col
                visible = k_pos <= limit
                if floor is not None:
                    visible &= k_pos > floor
                s = jnp.where(visible, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                p_smem[...] = p.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(v_bar.at[slot])

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                    return acc_ref[...]

                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pl.run_scoped(
                    pv, plgpu.ACC((ROWS, d), jnp.float32))
                # Both wgmmas of this step are done: its stage may be refilled.
                pl.when(i + stages < steps)(functools.partial(fetch, i + stages))
                return acc, m_new, l

            acc = plgpu.layout_cast(jnp.zeros((ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc, m, l = lax.fori_loop(0, steps, step, (acc, m, l))

            nonempty = l > 0
            l_safe = jnp.where(nonempty, l, 1.0)
            out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            lse_smem[...] = jnp.where(nonempty, (m + jnp.log2(l_safe)) * _LN2, -jnp.inf)
            chunk = o_smem.shape[1]
            for c in range(0, d, chunk):
                if c:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk has left o_smem
                o_smem[...] = out[:, c:c + chunk]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, qg, r, qb, :, pl.ds(c, chunk)])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, qg, r, qb])
            plgpu.wait_smem_to_gmem(0)

    grid = (rows, plan.q_groups, plan.q_blocks, splits)
    out_type = (jax.ShapeDtypeStruct((splits, plan.q_groups, rows, plan.q_blocks, ROWS, d), jnp.float32),
                jax.ShapeDtypeStruct((splits, plan.q_groups, rows, plan.q_blocks, ROWS), jnp.float32))
    scratch = [
        plgpu.SMEM((ROWS, d), dtype, transforms=mma_transforms(d, dtype)),
        plgpu.SMEM((stages, bk, d), dtype, transforms=mma_transforms(d, dtype)),
        plgpu.SMEM((stages, bk, d), dtype, transforms=mma_transforms(d, dtype)),
        plgpu.SMEM((ROWS, bk), dtype, transforms=mma_transforms(bk, dtype)),
        plgpu.SMEM((ROWS, min(d, OUT_CHUNK)), jnp.float32),
        plgpu.SMEM((ROWS,), jnp.float32),
        plgpu.Barrier(),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
    ]
    kernel = plgpu.kernel(paged_flash_kernel, out_type=out_type, scratch_types=scratch, grid=grid,
                          grid_names=("r", "qg", "qb", "split"),
                          compiler_params=plgpu.CompilerParams(approx_math=True),
                          interpret=interpret_params(interpret))
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return kernel(i32(page_table), i32(q_lens), i32(q_start), i32(kv_lens), q_blocks, k_pages, v_pages)


def random_pages(key, lengths, *, page_size: int, kv_heads: int, head_dim: int, dtype):
    """Benchmark/check inputs: K/V pools holding `lengths` tokens per request on shuffled pages.

    Pages no request owns are NaN, so a read outside a request's pages poisons its output.
    Returns (k_pages, v_pages, page_table [R, P] int32).
    """
    rows = len(lengths)
    per_row = max(1, -(-max(lengths) // page_size))
    num_pages = rows * per_row + 1
    k_key, v_key, perm_key = jax.random.split(key, 3)
    table = jax.random.permutation(perm_key, num_pages)[: rows * per_row].reshape(rows, per_row).astype(jnp.int32)
    used = jnp.zeros((num_pages,), bool).at[table.reshape(-1)].set(True)[:, None, None, None]

    def pool(k):
        x = jax.random.normal(k, (num_pages, page_size, kv_heads, head_dim), jnp.float32)
        return jnp.where(used, x, jnp.nan).astype(dtype)

    return pool(k_key), pool(v_key), table


def kv_bytes(lengths, kv_heads: int, head_dim: int, dtype) -> int:
    """Bytes of K and V a request set must read at least once."""
    return 2 * int(np.sum(lengths)) * kv_heads * head_dim * jnp.dtype(dtype).itemsize
