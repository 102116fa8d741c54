"""MoE grouped expert matmul: rows sorted by expert, each group multiplied by its expert's weights.

lhs [M, K] holds the routed tokens grouped by expert (group g: `group_sizes[g]` consecutive
rows); rhs [G, K, N] the experts' weights, in bf16 or quantized (V4's routed experts are FP4
e2m1 with one e8m0 scale per 32 input rows: `rhs_scales` [G, K // 32, N]). out [M, N] = lhs_g @
dequantized rhs_g per group, accumulated in fp32, in lhs's dtype.

The kernel path is jax's Mosaic GPU `ragged_dot_mgpu` (a persistent, pipelined wgmma kernel)
on the bf16 weights, chosen because it beats XLA's `ragged_dot` in the benchmark; quantized
weights are dequantized to bf16 first. That dequantization costs a bf16 copy of the weights per
call — 4× the FP4 bytes — which is what bounds a decode step on V4's experts; a kernel that
unpacks FP4 tiles in shared memory is the next step and is only worth writing against these
numbers. The shipped kernel runs only on a GPU (its pipeline is not interpretable), so CPU tests
check the reference and the kernel's lowering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SCALE_ROWS = 32  # input rows sharing one e8m0 scale (V4's FP4 experts)


def dequantize(rhs, rhs_scales, dtype):
    """rhs [G, K, N] (any float dtype) × its per-32-row scales [G, K/32, N] (or None), in `dtype`."""
    w = rhs.astype(jnp.float32)
    if rhs_scales is not None:
        w = w * jnp.repeat(rhs_scales.astype(jnp.float32), SCALE_ROWS, axis=1)
    return w.astype(dtype)


def grouped_matmul_reference(lhs, rhs, group_sizes, rhs_scales=None):
    """out [M, N] in lhs.dtype: rows of group g times expert g's (dequantized) weights, fp32 accumulation."""
    w = dequantize(rhs, rhs_scales, lhs.dtype)
    out = jax.lax.ragged_dot(lhs, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _config(m: int) -> dict:
    """ragged_dot_mgpu tiles: 64-row blocks for decode-sized batches, 128 once rows fill them."""
    return dict(block_m=64 if m <= 4096 else 128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def unsupported_reason(lhs, rhs) -> str | None:
    m, k = lhs.shape
    n = rhs.shape[2]
    if jnp.dtype(lhs.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"lhs dtype {lhs.dtype} (bf16 or f16)"
    if k % 64 or n % 128:
        return f"K={k}, N={n} (multiples of 64 and 128)"
    return None


def grouped_matmul(lhs, rhs, group_sizes, rhs_scales=None, *, interpret=False, config: dict | None = None):
    """The kernel path (same contract as the reference); `config` overrides the tile sizes."""
    if interpret or unsupported_reason(lhs, rhs):
        return grouped_matmul_reference(lhs, rhs, group_sizes, rhs_scales)
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import ragged_dot

    w = dequantize(rhs, rhs_scales, lhs.dtype)
    return ragged_dot(lhs, w, group_sizes=group_sizes.astype(jnp.int32), **(config or _config(lhs.shape[0])))


# --------------------------------------------------------------------------------------------
# GPU checks and benchmark (python -m pallas_kernels.bench)

V4_FLASH = dict(experts=256, top_k=6, hidden=4096, width=2048)  # gate+up: K=4096, N=2·2048; down: K=2048, N=4096


def _inputs(key, tokens, k, n, experts, top_k, quantized):
    """Routed rows grouped by expert (random routing of `tokens` tokens to top_k experts each)."""
    keys = jax.random.split(key, 4)
    routes = jax.random.randint(keys[0], (tokens * top_k,), 0, experts)
    group_sizes = jnp.bincount(routes, length=experts).astype(jnp.int32)
    lhs = jax.random.normal(keys[1], (tokens * top_k, k), jnp.float32).astype(jnp.bfloat16)
    if quantized:
        rhs = jax.random.normal(keys[2], (experts, k, n), jnp.float32).astype(jnp.float4_e2m1fn)
        scales = jnp.exp2(jax.random.randint(keys[3], (experts, k // SCALE_ROWS, n), -8, -4).astype(jnp.float32))
        return lhs, rhs, group_sizes, scales.astype(jnp.float8_e8m0fnu)
    return lhs, (0.02 * jax.random.normal(keys[2], (experts, k, n), jnp.float32)).astype(jnp.bfloat16), group_sizes


def gpu_checks(bench):
    cases = {"bf16_decode_64_tokens": (64, 512, 256, 16, 6, False), "fp4_prefill_1024_tokens": (1024, 256, 512, 32, 6, True),
             "bf16_empty_groups": (3, 256, 128, 64, 2, False)}
    for i, (name, (tokens, k, n, experts, top_k, quantized)) in enumerate(cases.items()):
        def run():
            args = _inputs(jax.random.key(700 + i), tokens, k, n, experts, top_k, quantized)
            got = np.asarray(jax.jit(grouped_matmul)(*args), np.float32)
            want = np.asarray(jax.jit(lambda *a: grouped_matmul_reference(
                a[0].astype(jnp.float32), *a[1:]))(*args), np.float32)
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            return err, 1e-2, f"M={tokens * top_k} K={k} N={n} G={experts} {'fp4+e8m0' if quantized else 'bf16'}"
        bench.check("grouped_matmul", name, run)


def benchmark(bench):
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import ragged_dot

    experts, top_k = V4_FLASH["experts"], V4_FLASH["top_k"]
    shapes = {"gate_up": (V4_FLASH["hidden"], 2 * V4_FLASH["width"]), "down": (V4_FLASH["width"], V4_FLASH["hidden"])}
    for tokens in bench.pick(quick=(64,), default=(64, 4096), full=(1, 16, 64, 128, 4096)):
        for name, (k, n) in (shapes if bench.sweep == "full" else {"gate_up": shapes["gate_up"]}).items():
            for quantized in (False, True):
                sets = [_inputs(jax.random.key(0), tokens, k, n, experts, top_k, quantized)]  # weights ≫ L2
                ms = bench.time(jax.jit(grouped_matmul), sets)
                alternatives = {"xla_ragged_dot": bench.attempt(jax.jit(grouped_matmul_reference), sets)}
                if not quantized:
                    for label, cfg in {"block_m=128": dict(_config(10**9)),
                                       "grid_block_n=4": dict(_config(tokens * top_k), grid_block_n=4)}.items():
                        fn = jax.jit(lambda lhs, rhs, gs, cfg=cfg: ragged_dot(lhs, rhs, group_sizes=gs, **cfg))
                        alternatives[f"ragged_dot_mgpu {label}"] = bench.attempt(fn, sets)
                active = min(experts, tokens * top_k)  # experts whose weights must be read at least once
                weight_bytes = active * k * n * (0.5 + 1 / SCALE_ROWS if quantized else 2)
                moved = weight_bytes + tokens * top_k * (k + n) * 2
                timed = [v for v in alternatives.values() if isinstance(v, float)]
                met = bool(timed) and ms <= min(timed) / 0.8
                note = ("FP4 weights dequantized to bf16 before the matmul: 4x the quantized bytes"
                        if quantized else "")
                bench.record("grouped_matmul", f"v4-flash {name} tokens={tokens} {'fp4' if quantized else 'bf16'}",
                             ms=ms, bytes_moved=moved, alternatives=alternatives,
                             bar=">= 0.8x the best of XLA / ragged_dot_mgpu", met=met, note=note,
                             tflops=2 * tokens * top_k * k * n / ms * 1e-9)
