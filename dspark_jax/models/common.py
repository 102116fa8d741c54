"""Building blocks shared by the target families: norms, rotary embeddings, fused projections, gated MLPs."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import kernels
from dspark_jax.sharding import logical
from dspark_jax.config import RopeScaling
from pallas_kernels.add_rms_norm import rms_norm_reference

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name_or_dtype) -> jnp.dtype:
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in DTYPES:
            raise ValueError(f"dtype={name_or_dtype!r}; expected one of {list(DTYPES)}")
        return jnp.dtype(DTYPES[name_or_dtype])
    return jnp.dtype(name_or_dtype)


def normal_init(stddev: float = 0.02):
    return nnx.initializers.normal(stddev)


def linear(in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs,
           axes: tuple[str | None, str | None] = (None, None)) -> nnx.Linear:
    """A Linear with kernel [in, out] in `dtype` (HF stores [out, in]; loaders transpose).

    `axes`: the logical axes of (in, out) (see dspark_jax.sharding); the bias follows `out`.
    """
    return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=dtype,
                      kernel_init=normal_init(), kernel_metadata=logical(*axes), bias_metadata=logical(axes[1]),
                      rngs=rngs)


@dataclasses.dataclass(frozen=True)
class TensorParts:
    """How a fused parameter is stored in checkpoints: as separate tensors, one per part.

    The parameter's axes from `first` on are [*groups, slots, features]; part i (the sibling
    module `names[i]`, e.g. `q_proj` next to `qkv_proj`) holds `slots[i]` consecutive slots of every
    group, and its own tensor flattens those axes group-major: [..., groups·slots[i]·features]
    (HF's output order). `first` is 1 for a kernel [in, ...], 0 for a bias. Loaders join the parts
    and exporters split them back by this rule (dspark_jax.checkpoint.tensors).
    """

    names: tuple[str, ...]
    slots: tuple[int, ...]
    first: int

    def part_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Each part's own (flattened) shape, for a fused parameter of `shape`."""
        lead, groups, features = shape[:self.first], shape[self.first:-2], shape[-1]
        return [(*lead, math.prod(groups) * n * features) for n in self.slots]

    def unflatten(self, part, index: int, shape: tuple[int, ...]):
        """Part `index` [..., groups·slots·features] as [..., *groups, slots, features] (a view where possible)."""
        return part.reshape(*part.shape[:-1], *shape[self.first:-2], self.slots[index], shape[-1])

    def join(self, parts, shape: tuple[int, ...]):
        """The fused parameter (numpy) of its parts' arrays, each in its own shape."""
        return np.concatenate([self.unflatten(np.asarray(p), i, shape) for i, p in enumerate(parts)], axis=-2)

    def split(self, value) -> list:
        """The parts' arrays, each in its own shape, of a fused parameter's value."""
        bounds = [sum(self.slots[:i]) for i in range(len(self.slots) + 1)]
        lead = value.shape[:self.first]
        return [value[..., lo:hi, :].reshape(*lead, -1) for lo, hi in zip(bounds, bounds[1:])]


class FusedLinear(nnx.Module):
    """Projections of one input stored as ONE kernel [in, *groups, slots, features]: one matmul for all.

    `parts` = ((checkpoint module name, slots), ...) in slot order (see TensorParts); q/k/v fuse as
    groups (KVH,), slots (G, 1, 1), so a mesh splitting the groups holds whole KV heads with their
    query heads. `axes`: the logical axes of (*groups, slots, features); the bias follows them.
    """

    def __init__(self, in_features: int, parts: tuple[tuple[str, int], ...], *, features: int,
                 groups: tuple[int, ...] = (), bias: bool, dtype, rngs: nnx.Rngs,
                 axes: tuple[str | None, ...]):
        names, slots = zip(*parts)
        shape = (*groups, sum(slots), features)
        self.kernel = nnx.Param(normal_init()(rngs.params(), (in_features, *shape), dtype),
                                tensor_parts=TensorParts(names, slots, first=1), **logical(None, *axes))
        self.bias = nnx.Param(jnp.zeros(shape, dtype), tensor_parts=TensorParts(names, slots, first=0),
                              **logical(*axes)) if bias else None

    def __call__(self, x: jax.Array, slots: slice | None = None) -> jax.Array:
        """x [..., in] -> [..., *groups, slots, features]; `slots` computes only that range (e.g. K and V)."""
        kernel = self.kernel[...] if slots is None else self.kernel[..., slots, :]
        y = jax.lax.dot_general(x.astype(kernel.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if self.bias is not None:
            y = y + (self.bias[...] if slots is None else self.bias[..., slots, :])
        return y


def embedding(vocab: int, features: int, *, dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """A token embedding [vocab, features] split by vocabulary rows on a mesh."""
    return nnx.Embed(vocab, features, dtype=dtype, param_dtype=dtype, embedding_init=normal_init(),
                     embedding_metadata=logical("vocab", None), rngs=rngs)


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32.

    `scale_in_fp32=False` casts the normalised value back before the weight multiply (Llama,
    Qwen); True multiplies in fp32 first (Gemma). `with_scale=False` has no weight at all.
    """

    def __init__(self, dim: int, *, eps: float, dtype, with_scale: bool = True,
                 scale_in_fp32: bool = False):
        self.eps = eps
        self.scale_in_fp32 = scale_in_fp32
        self.weight = nnx.Param(jnp.ones((dim,), dtype)) if with_scale else None

    def __call__(self, x: jax.Array) -> jax.Array:
        weight = None if self.weight is None else self.weight[...]
        return rms_norm_reference(x, weight, eps=self.eps, scale_in_fp32=self.scale_in_fp32)

    def add_and_norm(self, x: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(h, norm(h)) for the residual update h = x + delta, fused where a kernel is available."""
        weight = None if self.weight is None else self.weight[...]
        return kernels.add_rms_norm(x, delta, weight, eps=self.eps, scale_in_fp32=self.scale_in_fp32)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                  rotary_dim: int | None = None) -> jax.Array:
    """Inverse frequencies [rotary_dim/2] in fp32, with llama3/linear/yarn scaling applied."""
    dim = rotary_dim or head_dim
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    if scaling.kind == "yarn":
        return _yarn_inv_freq(inv_freq, dim, theta, scaling)
    raise ValueError(f"RopeScaling.kind={scaling.kind!r}; expected llama3, linear or yarn")


def proportional_rope_inv_freq(head_dim: int, theta: float, partial_rotary_factor: float) -> jax.Array:
    """[head_dim/2] inverse frequencies of "proportional" partial RoPE (HF Gemma 4).

    Unlike `rotary_dim` partial RoPE, the whole head keeps its pairing (i, i + head_dim/2) and its
    full-head frequency ladder; only the first `partial_rotary_factor` of the pairs turn. The
    other pairs get frequency 0 (cos 1, sin 0), so `apply_rope` passes them through exactly.
    Factor 1 is plain RoPE.
    """
    turning = int(partial_rotary_factor * head_dim // 2)
    return jnp.where(jnp.arange(head_dim // 2) < turning, rope_inv_freq(head_dim, theta), 0.0)


def _yarn_inv_freq(inv_freq, dim, theta, scaling: RopeScaling):
    # Blend interpolated and extrapolated frequencies by a linear ramp between the correction dims.
    def correction_dim(num_rotations):
        return (dim * math.log(scaling.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return inv_freq / scaling.factor * (1 - extrapolation_weight) + inv_freq * extrapolation_weight


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """The cos/sin multiplier: yarn's mscale, 1 for every other kind."""
    if scaling is None or scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor > 0:
        return scaling.attention_factor
    return 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0


def _rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, attention_factor: float):
    """fp32 cos, sin [..., 1, rot/2] (a heads axis to broadcast over) at `positions` [...]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    return (jnp.cos(freqs) * attention_factor)[..., None, :], (jnp.sin(freqs) * attention_factor)[..., None, :]


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, *, attention_factor: float = 1.0,
               rotary_dim: int | None = None) -> jax.Array:
    """Half-split ("rotate_half") RoPE on the first `rotary_dim` dims of x [..., heads, head_dim].

    positions has x's shape without the last two axes. Computed in fp32, returned in x's dtype.
    """
    head_dim = x.shape[-1]
    rot = rotary_dim or head_dim
    cos, sin = _rope_cos_sin(positions, inv_freq, attention_factor)
    x32 = x.astype(jnp.float32)
    x_rot, x_pass = x32[..., :rot], x32[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated, x_pass], axis=-1).astype(x.dtype)


def apply_interleaved_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, *,
                           inverse: bool = False) -> jax.Array:
    """Interleaved RoPE on the *last* 2·len(inv_freq) dims of x [..., heads, head_dim] (DeepSeek-V4).

    Channel pairs (2i, 2i+1) of that tail turn by angle position·inv_freq[i]; the leading dims pass.
    `inverse` turns by the negative angle, undoing a rotation at the same positions. fp32 inside.
    """
    rot = 2 * inv_freq.shape[0]
    cos, sin = _rope_cos_sin(positions, inv_freq, 1.0)
    if inverse:
        sin = -sin
    x32 = x.astype(jnp.float32)
    x_pass, x_rot = x32[..., :-rot], x32[..., -rot:]
    even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(x_rot.shape)
    return jnp.concatenate([x_pass, rotated], axis=-1).astype(x.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)), gate and up as one fused kernel [hidden, 2, intermediate]."""

    def __init__(self, hidden: int, intermediate: int, *, act: str, bias: bool = False, dtype, rngs):
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={act!r}; expected one of {list(ACTIVATIONS)}")
        self.act = act
        # Column-split gate/up and row-split down: one all-reduce per MLP on a tensor mesh.
        self.gate_up_proj = FusedLinear(hidden, (("gate_proj", 1), ("up_proj", 1)), features=intermediate, bias=bias,
                                        dtype=dtype, rngs=rngs, axes=(None, "mlp"))
        self.down_proj = linear(intermediate, hidden, bias=bias, dtype=dtype, rngs=rngs, axes=("mlp", None))

    def __call__(self, x):
        gate_up = self.gate_up_proj(x)
        return self.down_proj(ACTIVATIONS[self.act](gate_up[..., 0, :]) * gate_up[..., 1, :])


def fp32_matmuls(dtype):
    """Trace an fp32 model's matmuls at full fp32 ("highest"); other dtypes keep the default.

    XLA's default precision runs fp32 dots as TF32 on recent NVIDIA GPUs (bf16 passes on TPUs),
    so an fp32 model would silently disagree with fp32 references (PyTorch computes them in fp32)
    at near-tied logits. CPUs compute fp32 dots in fp32 either way.
    """
    return jax.default_matmul_precision("highest") if jnp.dtype(dtype) == jnp.float32 else contextlib.nullcontext()


def lm_head_logits(embed_tokens: nnx.Embed, lm_head: nnx.Linear | None, hidden):
    """fp32 logits [..., V] through the output head (the embedding when tied)."""
    weight = embed_tokens.embedding[...] if lm_head is None else lm_head.kernel[...].T
    with fp32_matmuls(weight.dtype):
        return jnp.einsum("...h,vh->...v", hidden.astype(weight.dtype), weight, preferred_element_type=jnp.float32)


def run_layers(layers, x, positions, attn, capture: tuple[int, ...]):
    """Apply decoder layers in order; returns (output, {layer id: raw output of that layer})."""
    captured = {}
    with fp32_matmuls(x.dtype):
        for i, layer in enumerate(layers):
            x = layer(x, positions, attn, i)
            if i in capture:
                captured[i] = x
    return x, captured
