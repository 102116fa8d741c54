"""Fused residual add + RMSNorm in GPU interpret mode against its reference (CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import add_rms_norm as arn

CASES = {
    # name: (shape, dtype, weight, scale_in_fp32, ctas)
    "llama_fp32": ((3, 5, 256), jnp.float32, True, False, None),
    "gemma_scale_fp32": ((7, 2560), jnp.float32, True, True, None),
    "no_weight": ((2, 384), jnp.float32, False, False, None),
    "bf16_vec8": ((9, 1024), jnp.bfloat16, True, False, None),
    "strided_rows": ((37, 512), jnp.bfloat16, True, False, 5),  # 5 CTAs loop over 37 rows
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_add_rms_norm_matches_reference(name):
    shape, dtype, with_weight, scale_in_fp32, ctas = CASES[name]
    rng = np.random.default_rng(len(name))
    x = jnp.asarray(3.0 * rng.standard_normal(shape), dtype)
    delta = jnp.asarray(rng.standard_normal(shape), dtype)
    weight = jnp.asarray(1.0 + 0.3 * rng.standard_normal(shape[-1]), dtype) if with_weight else None
    kw = dict(eps=1e-6, scale_in_fp32=scale_in_fp32)
    h, normed = arn.add_rms_norm(x, delta, weight, interpret=True, ctas=ctas, **kw)
    h_ref, normed_ref = arn.add_rms_norm_reference(x, delta, weight, **kw)
    assert h.dtype == h_ref.dtype and normed.dtype == normed_ref.dtype and normed.shape == shape
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_ref, np.float32))
    # The sum of squares is reduced in another order: one rounding step of the output dtype at most.
    ulp = float(jnp.finfo(dtype).eps)
    got, want = np.asarray(normed, np.float32), np.asarray(normed_ref, np.float32)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2 * ulp, atol=2 * ulp)


def test_unsupported_width_runs_the_reference():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 576)), jnp.float32)  # SmolLM2: 576 = 4.5 × 128
    got = arn.add_rms_norm(x, x, None, eps=1e-5, interpret=True)
    want = arn.add_rms_norm_reference(x, x, None, eps=1e-5)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("width", [2560, 4096, 7168])
def test_lowers_to_mosaic_gpu(width):
    sds = jax.ShapeDtypeStruct((4096, width), jnp.bfloat16)
    fn = functools.partial(arn.add_rms_norm, eps=1e-6)
    lowered = jax.jit(fn).trace(sds, sds, jax.ShapeDtypeStruct((width,), jnp.bfloat16)).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
