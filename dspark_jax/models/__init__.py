"""Target model families. `create_target` builds the module for an architecture config."""

from __future__ import annotations

import functools
import math
import weakref

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.config import DeepseekV4Arch, Gemma4Arch, LlamaArch, TargetArch
from dspark_jax.models.attention import DenseCausal
from dspark_jax.models.common import as_dtype
from dspark_jax.models.deepseek_v4 import DeepseekV4ForCausalLM
from dspark_jax.models.gemma import Gemma4ForCausalLM
from dspark_jax.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from dspark_jax.models.quant import logical_size


class StaticGraph:
    """An NNX GraphDef and its parameters' tree structure, usable as a jit static argument.

    Hot jitted functions take a model as (StaticGraph, the flat tuple of its parameter arrays) and
    `merge` them inside. Both halves save host time on every call of a large model's program: jit
    hashes static arguments (a 36-layer GraphDef takes milliseconds; here the hash is computed
    once), and it flattens a tuple of arrays in C++ where an nnx.State costs ~0.6 ms of Python
    flattening for 36 layers.
    """

    __slots__ = ("graphdef", "treedef", "_hash", "__weakref__")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, StaticGraph) and self._hash == other._hash
                                 and self.treedef == other.treedef and self.graphdef == other.graphdef)

    def merge(self, params: tuple):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, params))


_graphs_by_hash: dict[int, list[weakref.ref]] = {}  # the live StaticGraphs split_static handed out


def split_static(module) -> tuple[StaticGraph, tuple]:
    """(StaticGraph, flat tuple of parameter arrays) of an NNX module, for hot jitted functions.

    Equal graphs come back as one StaticGraph object while it lives: a jit cache entry keyed by the
    graph of an earlier split (an earlier decoding state over the same model) then matches by
    identity, where an equality test of two 36-layer GraphDefs costs about a millisecond per call.
    """
    graphdef, state = nnx.split(module)
    params, treedef = jax.tree.flatten(state)
    graph = StaticGraph(graphdef, treedef)
    live = [g for g in (ref() for ref in _graphs_by_hash.get(hash(graph), ())) if g is not None]
    for other in live:
        if other == graph:
            return other, tuple(params)
    _graphs_by_hash[hash(graph)] = [weakref.ref(g) for g in (*live, graph)]
    return graph, tuple(params)


def create_target(arch: TargetArch, *, dtype="bfloat16", seed: int = 0):
    """A randomly initialised target (N(0, 0.02) linears, unit norms) of the given architecture."""
    rngs = nnx.Rngs(seed)
    if isinstance(arch, LlamaArch):
        return LlamaForCausalLM(arch, dtype=as_dtype(dtype), rngs=rngs)
    if isinstance(arch, Gemma4Arch):
        return Gemma4ForCausalLM(arch, dtype=as_dtype(dtype), rngs=rngs)
    if isinstance(arch, DeepseekV4Arch):
        return DeepseekV4ForCausalLM(arch, dtype=as_dtype(dtype), rngs=rngs)
    raise ValueError(f"unknown target architecture {type(arch).__name__}")


def decoder_layer(arch: TargetArch, *, dtype, rngs: nnx.Rngs):
    """One decoder layer of the target's family (drafts stack these as their backbone)."""
    if isinstance(arch, LlamaArch):
        return LlamaDecoderLayer(arch, dtype=as_dtype(dtype), rngs=rngs)
    raise ValueError(f"draft backbones for {type(arch).__name__} targets are not supported; "
                     "Llama-family targets are")


def abstract_target(arch: TargetArch, *, dtype="bfloat16"):
    """The target's structure with shapes only (no allocation), for loading and sizing."""
    return nnx.eval_shape(lambda: create_target(arch, dtype=dtype))


def parameter_counts(model) -> dict[str, int]:
    """Parameter and byte totals of a (possibly abstract) model.

    `total`/`bytes`: the target; `draft`/`draft_bytes`: the modules under `mtp` (the draft blocks a
    DeepSeek-V4 DSpark checkpoint carries); `routed`: routed-expert parameters, of which a token
    uses top_k / n_experts. Packed FP4 codes count two parameters per byte; quantization scales
    and integer tables cost bytes but hold no parameters.
    """
    counts = dict(total=0, bytes=0, draft=0, draft_bytes=0, routed=0)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = [str(p) for p in path]
        size, nbytes = logical_size(var, names[-1]), math.prod(var.shape) * jnp.dtype(var.dtype).itemsize
        if names[0] == "mtp":
            counts["draft"] += size
            counts["draft_bytes"] += nbytes
            continue
        counts["total"] += size
        counts["bytes"] += nbytes
        if "experts" in names and names[names.index("experts") - 1] == "ffn":
            counts["routed"] += size
    return counts


def forward(model, tokens, layers: tuple[int, ...] = ()):
    """Full-sequence forward without a cache: (logits [B, S, V] fp32, {layer: hidden [B, S, H]}).

    `layers` are 0-based decoder layer ids; hidden = that layer's raw residual-stream output.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"forward: tokens must be [batch, seq], got shape {tokens.shape}")
    layers = tuple(int(i) for i in layers)
    num_layers = model.arch.num_layers
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"forward: layers {bad} out of range; the model has layers 0..{num_layers - 1}")
    graph, params = split_static(model)
    return _dense_forward(graph, params, tokens, layers)


@functools.partial(jax.jit, static_argnames=("graph", "layers"))
def _dense_forward(graph, params, tokens, layers):
    model = graph.merge(params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, captured = model(tokens, positions, DenseCausal(positions), capture=layers)
    return model.logits(hidden), captured
