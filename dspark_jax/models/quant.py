"""Block-scaled low-precision weights (DeepSeek-V4's checkpoint formats), dequantized inside the matmul.

Two formats, both with power-of-two scales stored as e8m0 bytes (the value is 2^(byte − 127)):
- FP8: e4m3 codes [out, in] with one scale per 128×128 block, [⌈out/128⌉, ⌈in/128⌉];
- FP4: e2m1 codes packed two per byte along `in` (low nibble = even column), [out, in/2], with
  one scale per 32 consecutive inputs, [out, in/32].
The codes stay in device memory in these formats; `dequantize_*` expands them in the compute
dtype right before the dot, inside the same jit (a code times a power of two is exact in bf16).
Weights keep the checkpoint's [out, in] orientation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.sharding import logical

FP8_BLOCK = 128
FP4_GROUP = 32
E8M0_BIAS = 127


class Buffer(nnx.Variable):
    """A checkpoint tensor that is not a trainable parameter: quantized codes, their scales, routing tables."""


def e8m0_to_float(scale_bytes: jax.Array) -> jax.Array:
    """fp32 2^(byte − 127) of e8m0 bytes (uint8); byte 0 is 2^-127, byte 255 (NaN in e8m0) never occurs."""
    bits = scale_bytes.astype(jnp.uint32) << 23
    return jnp.where(scale_bytes == 0, jnp.float32(2.0 ** -127), jax.lax.bitcast_convert_type(bits, jnp.float32))


def _expand(scale: jax.Array, axis: int, block: int, size: int) -> jax.Array:
    return jax.lax.slice_in_dim(jnp.repeat(scale, block, axis=axis), 0, size, axis=axis)


def dequantize_fp8(codes: jax.Array, scale_bytes: jax.Array, dtype) -> jax.Array:
    """[..., out, in] e4m3 codes × their 128×128 block scales [..., ⌈out/128⌉, ⌈in/128⌉] → dtype."""
    out_dim, in_dim = codes.shape[-2:]
    scale = e8m0_to_float(scale_bytes).astype(dtype)
    scale = _expand(_expand(scale, -2, FP8_BLOCK, out_dim), -1, FP8_BLOCK, in_dim)
    return codes.astype(dtype) * scale


def fp4_values(nibbles: jax.Array, dtype) -> jax.Array:
    """e2m1 values of 4-bit codes (uint8 in 0..15): sign bit 3, exponent bits 2..1, mantissa bit 0."""
    exponent = (nibbles >> 1) & 3
    mantissa = (nibbles & 1).astype(jnp.float32)
    # Exponent 0 is subnormal (0 or 0.5); otherwise 2^(e−1)·(1 + m/2).
    magnitude = jnp.where(exponent == 0, 0.5 * mantissa,
                          jnp.exp2(exponent.astype(jnp.float32) - 1.0) * (1.0 + 0.5 * mantissa))
    return jnp.where(nibbles >= 8, -magnitude, magnitude).astype(dtype)


def unpack_fp4(packed: jax.Array, dtype) -> jax.Array:
    """[..., n] bytes holding two e2m1 codes → [..., 2n] values (low nibble first)."""
    low, high = fp4_values(packed & 0xF, dtype), fp4_values(packed >> 4, dtype)
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantize_fp4(packed: jax.Array, scale_bytes: jax.Array, dtype) -> jax.Array:
    """[..., out, in/2] packed e2m1 codes × per-32 scales [..., out, in/32] → [..., out, in] in dtype."""
    values = unpack_fp4(packed, dtype)
    scale = _expand(e8m0_to_float(scale_bytes).astype(dtype), -1, FP4_GROUP, values.shape[-1])
    return values * scale


def logical_size(var, leaf: str) -> int:
    """Model parameters a checkpoint variable holds: packed FP4 codes two per byte; scales and
    integer tables none (they only cost bytes)."""
    size = math.prod(var.shape)
    if not isinstance(var, Buffer):
        return size
    if var.dtype == jnp.float8_e4m3fn:
        return size
    return 2 * size if var.dtype == jnp.uint8 and leaf == "weight" else 0


def fp8_scale_shape(out_dim: int, in_dim: int) -> tuple[int, int]:
    return -(-out_dim // FP8_BLOCK), -(-in_dim // FP8_BLOCK)


def fp4_shapes(out_dim: int, in_dim: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(packed codes, scales) shapes of an [out, in] FP4 matrix."""
    if in_dim % FP4_GROUP:
        raise ValueError(f"FP4 weights need in_features % {FP4_GROUP} == 0, got in_features={in_dim}")
    return (out_dim, in_dim // 2), (out_dim, in_dim // FP4_GROUP)


# Random initialisers for quantized weights of random-weight models (benchmarks, tests): codes drawn
# from a unit normal, scale 2^-6 (FP8) / 2^-7 (FP4), i.e. weights of standard deviation ~0.016-0.02.
FP8_INIT_SCALE_BYTE = E8M0_BIAS - 6
FP4_INIT_SCALE_BYTE = E8M0_BIAS - 7


def _fp8_codes_init(key, shape, dtype=jnp.float8_e4m3fn):
    return jnp.clip(jax.random.normal(key, shape, jnp.float32), -448.0, 448.0).astype(dtype)


def _packed_fp4_init(key, shape, dtype=jnp.uint8):
    return jax.random.randint(key, shape, 0, 256, jnp.int32).astype(dtype)


def _scale_init(byte: int):
    def init(key, shape, dtype=jnp.uint8):
        del key
        return jnp.full(shape, byte, dtype)
    return init


class Linear(nnx.Module):
    """y = x Wᵀ with W [out, in] in the checkpoint's orientation, dense or FP8 (`weight` + `scale`).

    `axes`: the logical axes of (out, in) (see dspark_jax.sharding); block scales follow them.
    """

    def __init__(self, in_features: int, out_features: int, *, fp8: bool, dtype, rngs: nnx.Rngs,
                 axes: tuple[str | None, str | None] = (None, None)):
        self.in_features, self.out_features = in_features, out_features
        if fp8:
            self.weight = Buffer(_fp8_codes_init(rngs.params(), (out_features, in_features)), **logical(*axes))
            self.scale = Buffer(_scale_init(FP8_INIT_SCALE_BYTE)(None, fp8_scale_shape(out_features, in_features)),
                                **logical(*axes))
        else:
            self.weight = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (out_features, in_features), dtype),
                                    **logical(*axes))
            self.scale = None

    def dense_weight(self, dtype) -> jax.Array:
        """W [out, in] in dtype (dequantized when FP8)."""
        if self.scale is None:
            return self.weight[...].astype(dtype)
        return dequantize_fp8(self.weight[...], self.scale[...], dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.dense_weight(x.dtype)
        return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


class StackedWeights(nnx.Module):
    """E stacked [out, in] matrices (routed experts): dense, or FP4 packed codes + per-32 scales."""

    def __init__(self, num: int, out_features: int, in_features: int, *, fp4: bool, dtype, rngs: nnx.Rngs):
        self.out_features, self.in_features = out_features, in_features
        split = logical("experts", None, None)  # whole experts per device on a mesh
        if fp4:
            (codes, scales) = fp4_shapes(out_features, in_features)
            self.weight = Buffer(_packed_fp4_init(rngs.params(), (num, *codes)), **split)
            self.scale = Buffer(_scale_init(FP4_INIT_SCALE_BYTE)(None, (num, *scales)), **split)
        else:
            self.weight = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (num, out_features, in_features),
                                                                  dtype), **split)
            self.scale = None

    def arrays(self) -> tuple[jax.Array, jax.Array | None]:
        """(weight, scale or None): what `take_stacked` reads."""
        return self.weight[...], None if self.scale is None else self.scale[...]


def take_stacked(weight: jax.Array, scale: jax.Array | None, ids: jax.Array | None, dtype) -> jax.Array:
    """[len(ids), out, in] matrices in dtype of stacked weights (all of them when ids is None), dequantized
    when FP4 (`scale` not None)."""
    if ids is not None:
        weight = weight[ids]
        scale = None if scale is None else scale[ids]
    if scale is None:
        return weight.astype(dtype)
    return dequantize_fp4(weight, scale, dtype)
