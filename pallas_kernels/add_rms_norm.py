"""Fused residual add + RMSNorm: h = x + delta, normed = RMSNorm(h); returns both in one pass.

A decoder layer adds each block's output to the residual stream and normalises the sum for the
next block; XLA reads x and delta twice (once for the sum of squares, once for the outputs). The
kernel (Mosaic GPU) reads each row once and writes h and normed: 4 × N·H·itemsize bytes, the
floor.

Layout: one warpgroup per row at a time, the row spread over the 128 lanes in `vec`-element
vectors (16 B where H allows), loaded straight from GMEM into registers — no shared memory, so
many CTAs share an SM and keep enough rows in flight to cover HBM latency. A persistent grid
(a few CTAs per SM) strides over the rows. The sum of squares is one warpgroup reduction. Rows
whose width is not a multiple of 128 lanes (SmolLM2's 576) run the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_flash import interpret_params, num_sms

LANES = 128
CTAS_PER_SM = 8


def rms_norm_reference(x, weight, *, eps: float, scale_in_fp32: bool = False):
    """RMSNorm computed in fp32 (the models' norm).

    weight None: no scale. scale_in_fp32=False casts the normalised value back before the weight
    multiply (Llama, Qwen); True multiplies in fp32 first (Gemma).
    """
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight is None:
        return normed.astype(dtype)
    if scale_in_fp32:
        return (normed * weight.astype(jnp.float32)).astype(dtype)
    return weight * normed.astype(dtype)


def add_rms_norm_reference(x, delta, weight, *, eps: float, scale_in_fp32: bool = False):
    """(h, normed) with h = x + delta in x's dtype and normed = rms_norm_reference(h)."""
    h = x + delta
    return h, rms_norm_reference(h, weight, eps=eps, scale_in_fp32=scale_in_fp32)


def _vec_size(width: int, dtype) -> int | None:
    for vec in (16 // jnp.dtype(dtype).itemsize, 4, 2, 1):
        if width % (LANES * vec) == 0:
            return vec
    return None


def add_rms_norm(x, delta, weight, *, eps: float, scale_in_fp32: bool = False, interpret=False,
                 ctas: int | None = None):
    """The Pallas kernel (same contract as the reference); `ctas` overrides the grid (8 per SM)."""
    width = x.shape[-1]
    rows = int(np.prod(x.shape[:-1]))
    vec = _vec_size(width, x.dtype)
    exact_weight = weight is None or scale_in_fp32 or weight.dtype == x.dtype  # else the product promotes
    if vec is None or rows == 0 or delta.dtype != x.dtype or delta.shape != x.shape or not exact_weight:
        return add_rms_norm_reference(x, delta, weight, eps=eps, scale_in_fp32=scale_in_fp32)
    dtype = x.dtype
    ctas = min(rows, ctas or num_sms() * CTAS_PER_SM)
    layout = plgpu.Layout.WG_STRIDED((width,), vec_size=vec)

    def body(*refs):
        if weight is None:
            x_ref, d_ref, h_ref, n_ref = refs
        else:
            x_ref, d_ref, w_ref, h_ref, n_ref = refs
            w = plgpu.load(w_ref, layout=layout)
            w32 = w.astype(jnp.float32)

        @pl.loop(lax.axis_index("cta"), rows, step=ctas)
        def _row(row):
            xs = plgpu.load(x_ref.at[row], layout=layout).astype(jnp.float32)
            ds = plgpu.load(d_ref.at[row], layout=layout).astype(jnp.float32)
            h = (xs + ds).astype(dtype)  # the add rounds to x's dtype first, as the reference's does
            h32 = h.astype(jnp.float32)
            normed = h32 * lax.rsqrt(jnp.sum(h32 * h32) / width + eps)
            h_ref[row] = h
            if weight is None:
                n_ref[row] = normed.astype(dtype)
            elif scale_in_fp32:
                n_ref[row] = (normed * w32).astype(dtype)
            else:
                n_ref[row] = w * normed.astype(dtype)

    out = jax.ShapeDtypeStruct((rows, width), dtype)
    kernel = plgpu.kernel(body, out_type=(out, out), grid=(ctas,), grid_names=("cta",),
                          interpret=interpret_params(interpret))
    operands = (x.reshape(rows, width), delta.reshape(rows, width))
    if weight is not None:
        operands += (weight,)
    h, normed = kernel(*operands)
    return h.reshape(x.shape), normed.reshape(x.shape)
