"""MoE grouped matmul: the reference against a per-group product, FP4 dequantization, and the
shipped Mosaic GPU kernel's lowering at V4-Flash shapes (it cannot be interpreted on the CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul as gm


def test_reference_is_the_per_group_product_with_fp4_scales():
    rng = np.random.default_rng(0)
    experts, k, n = 5, 64, 24
    sizes = np.array([3, 0, 7, 1, 0])
    lhs = jnp.asarray(rng.standard_normal((sizes.sum(), k)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((experts, k, n)), jnp.float4_e2m1fn)
    scales = jnp.asarray(2.0 ** rng.integers(-3, 3, (experts, k // gm.SCALE_ROWS, n)), jnp.float8_e8m0fnu)
    out = gm.grouped_matmul_reference(lhs, rhs, jnp.asarray(sizes), scales)
    w = np.asarray(rhs.astype(jnp.float32)) * np.repeat(np.asarray(scales.astype(jnp.float32)), gm.SCALE_ROWS, 1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    want = np.concatenate([np.asarray(lhs)[starts[g]:starts[g + 1]] @ w[g] for g in range(experts)])
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    assert set(np.unique(np.asarray(rhs.astype(jnp.float32)))) <= {0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2,
                                                                   -3, -4, -6}


def test_interpret_and_unsupported_shapes_run_the_reference():
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.standard_normal((6, 64)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((2, 64, 40)), jnp.bfloat16)  # N=40: not a 128 multiple
    sizes = jnp.asarray([2, 4], jnp.int32)
    assert gm.unsupported_reason(lhs, rhs)
    np.testing.assert_array_equal(gm.grouped_matmul(lhs, rhs, sizes, interpret=True),
                                  gm.grouped_matmul_reference(lhs, rhs, sizes))


@pytest.mark.parametrize("tokens,quantized", [(64, False), (4096, True)])
def test_kernel_lowers_to_mosaic_gpu(tokens, quantized):
    experts, k, n = 256, 4096, 4096
    sds = jax.ShapeDtypeStruct
    rhs = sds((experts, k, n), jnp.float4_e2m1fn if quantized else jnp.bfloat16)
    scales = sds((experts, k // gm.SCALE_ROWS, n), jnp.float8_e8m0fnu) if quantized else None
    lowered = jax.jit(gm.grouped_matmul).trace(sds((tokens * 6, k), jnp.bfloat16), rhs, sds((experts,), jnp.int32),
                                               scales).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
