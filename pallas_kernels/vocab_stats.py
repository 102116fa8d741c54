"""One pass over vocabulary rows: per-block max, sum of exponentials and first argmax (Mosaic GPU).

Fused verification and the Markov sampling loop both need, for every row of logits, the softmax
normaliser of the warped row, its argmax (greedy rows) and — to draw a token by inverse CDF —
the mass of every vocabulary block. XLA spends a pass on each; this kernel reads each row once.

The warped row is z = (x + x2) / t with z < floor → −inf (t: temperature, or 1 for greedy rows;
floor: the top-k/top-p threshold, or −inf), exactly `warp_logits`. For every full block of
`BLOCK` columns the kernel writes max(z), Σ exp(z − max) and the first index of the max; the
vocabulary's tail (V mod BLOCK columns) is summarised by the reference in XLA. A CTA is one
warpgroup walking a run of blocks of one row, each block loaded straight from GMEM into
registers (16-byte vectors over the 128 lanes) and reduced three times; no shared memory, so
many CTAs share an SM and keep loads in flight.

`row_stats` folds the blocks into per-row (max, normaliser, argmax, block masses), and
`sample_blocks` draws by inverse CDF in two levels: the block whose cumulative mass crosses u,
then the column inside it — equal to `inverse_cdf` over the whole row up to fp32 summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_flash import interpret_params, num_sms

BLOCK = 4096  # columns per block: 32 fp32 values per lane
LANES = 128
_BIG = 2**30


def _warp(x, x2, temperature, floor):
    z = x.astype(jnp.float32)
    if x2 is not None:
        z = z + x2.astype(jnp.float32)
    z = z / temperature[:, None]
    return z if floor is None else jnp.where(z >= floor[:, None], z, -jnp.inf)


def vocab_stats_reference(x, x2, temperature, floor, *, block: int = BLOCK):
    """Per-block (max [N, nb], sum of exp [N, nb], first argmax [N, nb] int32) of the warped rows.

    x, x2 (None or the same shape, added) [N, V]; temperature [N] (> 0: the divisor); floor [N]
    or None. Blocks are `block` columns, the last one possibly shorter (nb = ceil(V / block)); a
    block with nothing kept has max −inf, sum 0 and argmax its first column.
    """
    rows, vocab = x.shape
    z = _warp(x, x2, temperature, floor)
    full = vocab // block
    parts = [z[:, :full * block].reshape(rows, full, block)] if full else []
    parts += [z[:, full * block:][:, None, :]] if vocab % block else []
    stats = [_block_stats(part) for part in parts]
    top, total, arg = (jnp.concatenate(column, axis=1) for column in zip(*stats))
    return top, total, arg + jnp.arange(top.shape[1], dtype=jnp.int32) * block


def _block_stats(z):
    """(max, Σ exp(z − max), first argmax within the block) over the last axis of z [N, nb, width]."""
    top = jnp.max(z, axis=-1)
    total = jnp.sum(jnp.exp(z - jnp.where(top == -jnp.inf, 0.0, top)[..., None]), axis=-1)
    return top, total, jnp.argmax(z, axis=-1).astype(jnp.int32)


def vocab_stats(x, x2, temperature, floor, *, block: int = BLOCK, interpret=False, ctas: int | None = None):
    """The kernel (same contract as the reference); `ctas` overrides the grid size."""
    rows, vocab = x.shape
    full = vocab // block
    vec = 16 // jnp.dtype(x.dtype).itemsize
    if full == 0 or block % (LANES * vec) or (x2 is not None and x2.dtype != x.dtype):
        return vocab_stats_reference(x, x2, temperature, floor, block=block)
    # Enough CTAs for ~8 per SM, each walking a contiguous run of one row's blocks.
    chunks = min(full, max(1, -(-(ctas or 8 * num_sms()) // rows)))
    per_chunk = -(-full // chunks)
    layout = plgpu.Layout.WG_STRIDED((block,), vec_size=vec)

    def body(*refs):
        x_ref, x2_ref = refs[0], (refs[1] if x2 is not None else None)
        t_ref, *rest = refs[1 + (x2 is not None):]
        f_ref = rest.pop(0) if floor is not None else None
        max_ref, sum_ref, arg_ref = rest
        row, chunk = lax.axis_index("row"), lax.axis_index("chunk")
        column = plgpu.broadcasted_iota(jnp.int32, (block,), 0, layout=layout)
        temp = t_ref[row]
        cut = f_ref[row] if f_ref is not None else None

        @pl.loop(chunk * per_chunk, jnp.minimum((chunk + 1) * per_chunk, full))
        def _block(b):
            cols = pl.ds(b * block, block)
            z = plgpu.load(x_ref.at[row, cols], layout=layout).astype(jnp.float32)
            if x2_ref is not None:
                z = z + plgpu.load(x2_ref.at[row, cols], layout=layout).astype(jnp.float32)
            z = z / temp
            if cut is not None:
                z = jnp.where(z >= cut, z, -jnp.inf)
            top = jnp.max(z)
            total = jnp.sum(jnp.exp(z - jnp.where(top == -jnp.inf, 0.0, top)))
            max_ref[row, b] = top
            sum_ref[row, b] = total
            arg_ref[row, b] = jnp.min(jnp.where(z == top, column + b * block, _BIG))

    out = [jax.ShapeDtypeStruct((rows, full), jnp.float32), jax.ShapeDtypeStruct((rows, full), jnp.float32),
           jax.ShapeDtypeStruct((rows, full), jnp.int32)]
    kernel = plgpu.kernel(body, out_type=out, grid=(rows, chunks), grid_names=("row", "chunk"),
                          interpret=interpret_params(interpret))
    operands = [x] + ([x2] if x2 is not None else []) + [temperature.astype(jnp.float32)]
    operands += [floor.astype(jnp.float32)] if floor is not None else []
    top, total, arg = kernel(*operands)
    if full * block == vocab:
        return top, total, arg
    tail = slice(full * block, vocab)
    t_top, t_total, t_arg = vocab_stats_reference(x[:, tail], None if x2 is None else x2[:, tail], temperature,
                                                  floor, block=block)
    return (jnp.concatenate([top, t_top], 1), jnp.concatenate([total, t_total], 1),
            jnp.concatenate([arg, t_arg + full * block], 1))


def row_stats(top, total, arg):
    """Fold block stats into rows: (max [N], normaliser Σ exp(z − max) [N], argmax [N], block masses [N, nb]).

    Block masses are the blocks' shares of the row's softmax (they sum to 1 up to rounding).
    """
    row_max = jnp.max(top, axis=1)
    safe = jnp.where(row_max == -jnp.inf, 0.0, row_max)
    scaled = total * jnp.exp(jnp.where(top == -jnp.inf, -jnp.inf, top - safe[:, None]))
    norm = jnp.sum(scaled, axis=1)
    first = jnp.argmax(top == row_max[:, None], axis=1)
    argmax = jnp.take_along_axis(arg, first[:, None], axis=1)[:, 0]
    return row_max, norm, argmax, scaled / jnp.where(norm > 0, norm, 1.0)[:, None]


def sample_blocks(block_mass, u, block_values, *, block: int = BLOCK):
    """Inverse-CDF draw in two levels: the first index whose cumulative mass reaches u × total.

    block_mass [N, nb] (≥ 0, not necessarily normalised); u [N] in (0, 1]; block_values(b) →
    the unnormalised masses [N, block] of block b[n] of each row (columns past V must be 0).
    The chosen index always has positive mass, as `inverse_cdf`'s does.
    """
    cum = jnp.cumsum(block_mass, axis=1)
    b = _first_reaching(cum, u * cum[:, -1])
    values = block_values(b)
    inner = jnp.cumsum(values, axis=1)
    before = jnp.take_along_axis(cum, b[:, None], 1)[:, 0] - jnp.take_along_axis(block_mass, b[:, None], 1)[:, 0]
    scale = jnp.take_along_axis(block_mass, b[:, None], 1)[:, 0] / jnp.where(inner[:, -1] > 0, inner[:, -1], 1.0)
    return b * block + _first_reaching(inner, (u * cum[:, -1] - before) / jnp.where(scale > 0, scale, 1.0))


def _first_reaching(cum, target):
    """Per row, the first index i with cum[i] ≥ target, kept on positive increments of cum (cum [N, K] non-decreasing)."""
    positive = jnp.min(jnp.where(cum > 0, cum, jnp.inf), axis=1)
    target = jnp.clip(target, positive, cum[:, -1])
    return jnp.minimum(jnp.sum(cum < target[:, None], axis=1), cum.shape[1] - 1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# GPU checks and benchmark (python -m pallas_kernels.bench)

VOCAB = 151936  # Qwen3


def _inputs(key, rows, vocab, dtype, with_x2, with_floor):
    keys = jax.random.split(key, 3)
    x = (3.0 * jax.random.normal(keys[0], (rows, vocab), jnp.float32)).astype(dtype)
    x2 = jax.random.normal(keys[1], (rows, vocab), jnp.float32).astype(dtype) if with_x2 else None
    temperature = jax.random.uniform(keys[2], (rows,), jnp.float32, 0.5, 1.5)
    floor = jnp.linspace(-1.0, 8.0, rows) if with_floor else None
    return x, x2, temperature, floor


def gpu_checks(bench):
    cases = {"f32_x2_qwen3_vocab": (64, VOCAB, jnp.float32, True, False),
             "bf16_floor_tail": (37, 3 * BLOCK + 5, jnp.bfloat16, False, True)}
    for i, (name, (rows, vocab, dtype, with_x2, with_floor)) in enumerate(cases.items()):
        def run():
            args = _inputs(jax.random.key(400 + i), rows, vocab, dtype, with_x2, with_floor)
            got = jax.jit(vocab_stats)(*args)
            want = jax.jit(vocab_stats_reference)(*args)
            top_ok = np.array_equal(np.asarray(got[0]), np.asarray(want[0]))
            arg_ok = np.array_equal(np.asarray(got[2]), np.asarray(want[2]))
            err = float(np.max(np.abs(np.asarray(got[1]) - np.asarray(want[1])) / np.maximum(np.asarray(want[1]), 1e-30)))
            shapes = f"rows={rows} V={vocab} {jnp.dtype(dtype).name} x2={with_x2} floor={with_floor}"
            return (err if top_ok and arg_ok else float("inf")), 1e-5, shapes + ("" if top_ok and arg_ok else
                                                                                 " (max or argmax differ)")
        bench.check("vocab_stats", name, run)


def benchmark(bench):
    for rows in bench.pick(quick=(512,), default=(64, 512), full=(8, 64, 512, 1024)):
        sets = bench.copies(lambda seed: _inputs(jax.random.key(seed), rows, VOCAB, jnp.float32, False, False),
                            rows * VOCAB * 4)
        ms = bench.time(jax.jit(vocab_stats), sets)
        alternatives = {"xla_reference": bench.attempt(jax.jit(vocab_stats_reference), sets)}
        bench.record("vocab_stats", f"rows={rows} V={VOCAB} f32", ms=ms, bytes_moved=rows * VOCAB * 4,
                     alternatives=alternatives, bar="n/a (part of fused verify / Markov loop)", met=None)
