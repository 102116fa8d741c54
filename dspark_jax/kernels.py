"""One dispatch for every kernel: the Pallas kernel on a GPU, its pure-JAX reference, or interpret mode.

The backend is a trace-time choice. Jitted entry points take it as a static argument and trace
under `use(backend)`, so compiled programs never mix backends and a new choice compiles anew:
- "pallas": the Pallas GPU kernel where one exists, else the reference;
- "xla": the pure-JAX references (the spec each kernel is tested against);
- "interpret": the Pallas kernels run by the interpreter (CPU tests);
- "auto": "pallas" on a GPU, "xla" elsewhere.

On a (data, tensor, expert) mesh (see dspark_jax.sharding; found from the operands' shardings) each
kernel runs per shard under `shard_map`: attention and cache writes on their own heads and KV
heads (whatever the backend, so the cache is never gathered); the norm and the sampling kernels
on replicated operands — the vocabulary is gathered for fused verification and the Markov loop,
whose XLA references instead run vocabulary-split under the SPMD partitioner.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from dspark_jax import sharding
from pallas_kernels import add_rms_norm as _norm
from pallas_kernels import draft_block_attention as _draft_block
from pallas_kernels import fused_verify as _verify
from pallas_kernels import grouped_matmul as _grouped
from pallas_kernels import markov_sample as _markov
from pallas_kernels import ragged_paged_attention as _ragged

BACKENDS = ("auto", "xla", "pallas", "interpret")
_BACKEND = contextvars.ContextVar("dspark_kernel_backend", default="auto")


def resolve(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return backend


@contextlib.contextmanager
def use(backend: str):
    """Trace the enclosed code with this kernel backend."""
    token = _BACKEND.set(resolve(backend))
    try:
        yield
    finally:
        _BACKEND.reset(token)


def current() -> str:
    return resolve(_BACKEND.get())


def _pick(module, name: str):
    """The kernel entry `name` of a pallas_kernels module for the current backend."""
    backend = current()
    kernel = getattr(module, name, None)
    if backend == "xla" or kernel is None:
        return getattr(module, f"{name}_reference"), {}
    return functools.partial(_shared_call, kernel), {"interpret": backend == "interpret"}


def _shared_call(kernel, *args, **kwargs):
    """Call a Pallas kernel entry through one `jax.jit` per (entry, static arguments).

    Inside a jitted program every call site with the same shapes then reuses one traced jaxpr and
    one lowered function: a Mosaic GPU kernel is built in Python at lowering time, so a 36-layer
    model would otherwise build (and compile) each layer's identical kernel again.
    """
    dynamic = {k: v for k, v in kwargs.items() if _holds_arrays(v)}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in dynamic))
    return _jitted(kernel, static)(*args, **dynamic)


def _holds_arrays(value) -> bool:
    return any(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in jax.tree_util.tree_leaves(value))


@functools.cache
def _jitted(kernel, static: tuple):
    return jax.jit(functools.partial(kernel, **dict(static)))


def _per_shard(fn, args, in_specs, out_specs, *, always: bool):
    """fn(*args), run per shard when the operands live on a mesh of ours.

    `always=False`: only for a Pallas backend; the XLA references are left to the SPMD partitioner.
    """
    mesh = sharding.mesh_of(*args)
    if not sharding.is_ours(mesh) or (not always and current() == "xla"):
        return fn(*args)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


_HEADS = sharding.spec(("heads",))  # sinks [H]
_TOKEN_HEADS = sharding.spec((None, "heads", None))  # q, out [T, H, D]
_TOKEN_KV_HEADS = sharding.spec((None, "kv_heads", None))  # new k, v [T, KVH, D]
_BLOCK_HEADS = sharding.spec((None, None, "heads", None))  # draft block q, out [R, γ, H, D]
_BLOCK_KV_HEADS = sharding.spec((None, None, "kv_heads", None))  # draft block k, v [R, γ, KVH, D]
_PAGES = sharding.spec(sharding.KV_PAGES)  # [num_pages, page_size, KVH, D]


def ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, *, sinks=None, **kw):
    fn, extra = _pick(_ragged, "ragged_paged_attention")
    return _per_shard(lambda q, k, v, table, lens, cu, sinks: fn(q, k, v, table, lens, cu, sinks=sinks, **kw, **extra),
                      (q, k_pages, v_pages, page_table, kv_lens, cu_q_lens, sinks),
                      (_TOKEN_HEADS, _PAGES, _PAGES, P(), P(), P(), _HEADS), _TOKEN_HEADS, always=True)


def write_kv(k_pages, v_pages, k, v, slot_mapping):
    fn, extra = _pick(_ragged, "write_kv")
    return _per_shard(lambda *a: fn(*a, **extra), (k_pages, v_pages, k, v, slot_mapping),
                      (_PAGES, _PAGES, _TOKEN_KV_HEADS, _TOKEN_KV_HEADS, P()), (_PAGES, _PAGES), always=True)


def draft_block_attention(q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens, **kw):
    fn, extra = _pick(_draft_block, "draft_block_attention")
    return _per_shard(lambda *a: fn(*a, **kw, **extra), (q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens),
                      (_BLOCK_HEADS, _BLOCK_KV_HEADS, _BLOCK_KV_HEADS, _PAGES, _PAGES, P(), P()), _BLOCK_HEADS,
                      always=True)


def add_rms_norm(x, delta, weight, *, eps: float, scale_in_fp32: bool = False):
    """(x + delta, RMSNorm(x + delta)) in one pass; weight None = no scale."""
    fn, extra = _pick(_norm, "add_rms_norm")
    return _per_shard(lambda *a: fn(*a, eps=eps, scale_in_fp32=scale_in_fp32, **extra), (x, delta, weight),
                      P(), P(), always=False)


def fused_verify(target_logits, draft_tokens, draft_probs, lengths, accept_u, resample_u, sampling):
    """(num_accepted, next_token) of speculative verification with the uniforms already drawn."""
    fn, extra = _pick(_verify, "fused_verify")
    return _per_shard(lambda *a: fn(*a, **extra),
                      (target_logits, draft_tokens, draft_probs, lengths, accept_u, resample_u, sampling),
                      P(), P(), always=False)


def markov_sample(base, anchors, w1, w2, uniforms, sampling):
    """(tokens, probs) of the Markov sampling loop (vanilla head, or none when w1 is None)."""
    fn, extra = _pick(_markov, "markov_sample")
    return _per_shard(lambda *a: fn(*a, **extra), (base, anchors, w1, w2, uniforms, sampling), P(), P(),
                      always=False)


def grouped_matmul(lhs, rhs, group_sizes, rhs_scales=None):
    """MoE expert matmul over rows grouped by expert; rhs [G, K, N] bf16 or quantized with rhs_scales."""
    fn, extra = _pick(_grouped, "grouped_matmul")
    return fn(lhs, rhs, group_sizes, rhs_scales, **extra)
