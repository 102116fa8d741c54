"""Mixture-of-experts pieces: routers, clamped SwiGLU experts, and a dense-dispatch grouped matmul.

Dispatch is static-shaped: the T·k (token, expert) assignments are sorted by expert and run
through `jax.lax.ragged_dot_general` over the experts they use. Only the experts some token
picked are gathered (and dequantized, for FP4 weights): at most min(E, T·k) of them, so a decode
step reads k experts per token rather than all E. On a mesh each device does this for its own
experts over every token (the batch is replicated) and the outputs are summed (expert parallelism
by all-gather + psum; a `ragged_all_to_all` dispatch would move only the routed rows).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dspark_jax import sharding
from dspark_jax.models.quant import Buffer, Linear, StackedWeights, take_stacked

_HIGHEST = jax.lax.Precision.HIGHEST


def sqrt_softplus(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jax.nn.softplus(x))


def clamped_swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """silu(min(gate, limit)) · clip(up, ±limit)."""
    return jax.nn.silu(jnp.minimum(gate, limit)) * jnp.clip(up, -limit, limit)


class Router(nnx.Module):
    """Scores sqrt(softplus(x Wᵀ)) in fp32; picks the top-k by score + `bias` (noaux_tc), or by the
    token-id table `tid2eid` (hash routing). Weights are the picked scores normalised to sum 1,
    times `scaling`."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, vocab_size: int, hash_routing: bool,
                 scaling: float, dtype, rngs: nnx.Rngs):
        self.top_k, self.scaling = top_k, scaling
        self.weight = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (num_experts, hidden), dtype))
        if hash_routing:
            self.bias = None
            self.tid2eid = Buffer(jax.random.randint(rngs.params(), (vocab_size, top_k), 0, num_experts, jnp.int32))
        else:
            self.bias = nnx.Param(jnp.zeros((num_experts,), jnp.float32))
            self.tid2eid = None

    def __call__(self, x: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(weights [T, k] fp32, expert ids [T, k] int32) for x [T, H] and token ids [T]."""
        # The router runs in fp32 (DeepSeek's gate does): bf16 logits would change which experts win.
        logits = jnp.einsum("th,eh->te", x.astype(jnp.float32), self.weight[...].astype(jnp.float32),
                            precision=_HIGHEST)
        scores = sqrt_softplus(logits)
        if self.tid2eid is None:
            _, ids = jax.lax.top_k(scores + self.bias[...], self.top_k)
        else:
            ids = self.tid2eid[...][tokens]
        picked = jnp.take_along_axis(scores, ids, axis=1)
        weights = picked / (jnp.sum(picked, axis=1, keepdims=True) + 1e-20)
        return weights * self.scaling, ids.astype(jnp.int32)


class Experts(nnx.Module):
    """E routed SwiGLU experts: w1 (gate) and w3 (up) [E, I, H], w2 (down) [E, H, I].

    On a mesh the experts are split over the "expert" × "tensor" axes (see dspark_jax.sharding) and
    dispatch is expert-parallel: every device sees all tokens and their assignments, runs the ones
    routed to its own experts, and the partial outputs are summed across devices.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, fp4: bool, limit: float, dtype,
                 rngs: nnx.Rngs):
        self.num_experts, self.limit = num_experts, limit
        self.w1 = StackedWeights(num_experts, intermediate, hidden, fp4=fp4, dtype=dtype, rngs=rngs)
        self.w2 = StackedWeights(num_experts, hidden, intermediate, fp4=fp4, dtype=dtype, rngs=rngs)
        self.w3 = StackedWeights(num_experts, intermediate, hidden, fp4=fp4, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
        """Σ_j weights[t, j] · expert_{ids[t, j]}(x[t]) for x [T, H]; returns [T, H] in x's dtype."""
        stacks = (self.w1.arrays(), self.w2.arrays(), self.w3.arrays())
        mesh = sharding.mesh_of(stacks[0][0])
        axes = sharding.mesh_axes("experts")
        if not sharding.is_ours(mesh) or math.prod(mesh.shape[a] for a in axes) == 1:
            return routed_experts(x, ids, weights, stacks, self.num_experts, self.limit).astype(x.dtype)
        local = self.num_experts // math.prod(mesh.shape[a] for a in axes)

        def per_device(x, ids, weights, stacks):
            first = jax.lax.axis_index(axes) * local  # this device's experts: first .. first + local − 1
            return jax.lax.psum(routed_experts(x, ids - first, weights, stacks, local, self.limit), axes)

        split = jax.sharding.PartitionSpec(axes)
        out = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), split), out_specs=P(),
                            check_vma=False)(x, ids, weights, stacks)
        return out.astype(x.dtype)


def routed_experts(x, ids, weights, stacks, num_experts: int, limit: float) -> jax.Array:
    """fp32 [T, H]: Σ_j weights[t, j] · expert_{ids[t, j]}(x[t]) over the assignments to experts 0..num_experts−1.

    stacks: (w1, w2, w3) as (weight, scale or None) with `num_experts` stacked matrices each; an
    assignment to an id outside 0..num_experts−1 contributes nothing (another device's expert).
    Assignments are sorted by expert and run through `ragged_dot_general`; only the experts some
    token picked are gathered (and dequantized): at most min(E, T·k).
    """
    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    mine = (flat >= 0) & (flat < num_experts)
    used_count = min(num_experts, num_tokens * top_k)
    if used_count < num_experts:
        # The experts some token picked, in id order, padded with unused ones (empty groups).
        picked = jnp.zeros((num_experts,), bool).at[jnp.where(mine, flat, num_experts)].set(True, mode="drop")
        used = jnp.argsort(~picked, stable=True)[:used_count]
        group = jnp.zeros((num_experts,), jnp.int32).at[used].set(jnp.arange(used_count, dtype=jnp.int32))[
            jnp.clip(flat, 0, num_experts - 1)]
    else:
        used, group = None, flat
    group = jnp.where(mine, group, used_count)  # other devices' assignments sort last, in no group
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=used_count).astype(jnp.int32)
    token = order // top_k
    xs = x[token]
    (w1, s1), (w2, s2), (w3, s3) = stacks
    gate = _grouped(xs, take_stacked(w1, s1, used, x.dtype), sizes)
    up = _grouped(xs, take_stacked(w3, s3, used, x.dtype), sizes)
    hidden = clamped_swiglu(gate, up, limit).astype(x.dtype)
    out = _grouped(hidden, take_stacked(w2, s2, used, x.dtype), sizes)
    out = jnp.where(mine[order][:, None], out * weights.reshape(-1)[order][:, None], 0.0)
    return jax.ops.segment_sum(out, token, num_segments=num_tokens)


def _grouped(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """Rows of x [A, in] (sorted by group) times their group's Wᵀ, w [G, out, in] → [A, out] fp32."""
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    return jax.lax.ragged_dot_general(x, w, sizes, dims, preferred_element_type=jnp.float32)


class SharedExpert(nnx.Module):
    """The always-on expert: the same clamped SwiGLU with w1/w3/w2 linears."""

    def __init__(self, hidden: int, intermediate: int, *, fp8: bool, limit: float, dtype, rngs: nnx.Rngs):
        self.limit = limit
        self.w1 = Linear(hidden, intermediate, fp8=fp8, dtype=dtype, rngs=rngs, axes=("mlp", None))
        self.w2 = Linear(intermediate, hidden, fp8=fp8, dtype=dtype, rngs=rngs, axes=(None, "mlp"))
        self.w3 = Linear(hidden, intermediate, fp8=fp8, dtype=dtype, rngs=rngs, axes=("mlp", None))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit).astype(x.dtype))


class MoE(nnx.Module):
    """Routed experts plus one shared expert (DeepSeek-V4's `ffn`)."""

    def __init__(self, hidden: int, intermediate: int, *, num_experts: int, top_k: int, vocab_size: int,
                 hash_routing: bool, scaling: float, limit: float, quantized: bool, dtype, rngs: nnx.Rngs):
        self.gate = Router(hidden, num_experts, top_k, vocab_size=vocab_size, hash_routing=hash_routing,
                           scaling=scaling, dtype=dtype, rngs=rngs)
        self.experts = Experts(num_experts, hidden, intermediate, fp4=quantized, limit=limit, dtype=dtype, rngs=rngs)
        self.shared_experts = SharedExpert(hidden, intermediate, fp8=quantized, limit=limit, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, tokens: jax.Array) -> jax.Array:
        weights, ids = self.gate(x, tokens)
        return self.experts(x, ids, weights) + self.shared_experts(x)
