"""Device meshes and partition rules: how parameters, caches and batches lie on several devices.

One mesh of three axes, sized by `serve.mesh` = (data, tensor, expert), or `--devices N` (all on
"tensor"):
- "tensor": attention heads, MLP columns/rows and the vocabulary are split (Megatron-style tensor
  parallelism); the KV cache pages are split by KV head along with the heads that read them;
- "expert": a MoE's routed experts are split over "expert" × "tensor" (so a plain "tensor" mesh is
  also expert-parallel for DeepSeek-V4), while attention stays split over "tensor" alone;
- "data": whole replicas of the weights and caches. Splitting the request batch over replicas is
  the engine's choice (each replica serving its own requests); nothing here splits it.

Modules name the axes of their variables with logical names (`logical(None, "heads")`, stored as
flax NNX `out_sharding` metadata); RULES maps the names onto mesh axes and
`nnx.get_partition_spec` under those rules gives each variable's PartitionSpec. `place_model`
puts a module's variables onto a mesh; jitted functions then follow their inputs' shardings (XLA's
SPMD partitioner inserts the collectives) and `kernels.py` runs the Pallas kernels per shard with
`shard_map`. A module placed here records nothing else: `model_mesh(model)` reads the mesh back
from its arrays, and `mesh_of` finds it inside a jitted function from the operands' types.

What a serving loop does: load the target onto a mesh (`load_target(..., mesh=make_mesh(...))` or
`place_model`; `load_draft` puts the draft on the target's mesh), create the KV caches with
`init_kv_caches(..., mesh=model_mesh(target))` (drafts' `init_state` and V4's `init_state` find
the mesh themselves), and put the small per-row arrays it builds on the host on the mesh,
replicated (`jax.device_put(x, NamedSharding(mesh, P()))`): a jitted step's outputs then have its
inputs' shardings, so the next step reuses the same compiled program.

Several hosts: `initialize_distributed()` joins the job the environment describes; every process
runs the same program over the global mesh. The engine's request loop runs on process 0
(`is_leader()`); each step it hands the others what they need to launch the same programs on the
same inputs with `broadcast_bytes_from_leader` (dspark_jax.engine.lockstep).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dspark_jax.config import ConfigError, DeepseekV4Arch, Gemma4Arch, LlamaArch

MESH_AXES = ("data", "tensor", "expert")

# Logical axis -> mesh axes. Dimensions named None (or not named) are replicated.
RULES = (
    ("vocab", "tensor"),  # embedding rows, output head rows, Markov head columns
    ("heads", "tensor"),  # query heads (their flattened heads·head_dim projections, sinks)
    ("kv_heads", "tensor"),  # key/value heads: projections and cache pages
    ("mlp", "tensor"),  # gated MLP columns (gate/up) and rows (down)
    ("index_heads", "tensor"),  # DeepSeek-V4 Lightning Indexer heads
    ("o_groups", "tensor"),  # DeepSeek-V4 grouped output projection (whole groups of heads)
    ("experts", ("expert", "tensor")),  # routed MoE experts
)
_RULE = dict(RULES)

KV_PAGES = (None, None, "kv_heads", None)  # [num_pages, page_size, KVH, D]


def logical(*names: str | None) -> dict:
    """NNX variable metadata naming each dimension's logical axis, e.g. `nnx.Param(w, **logical(None, "mlp"))`.

    Variables are created on the default device as usual (no eager sharding); `place_model` or the
    loaders put them on a mesh.
    """
    return dict(out_sharding=names, eager_sharding=False)


def mesh_axes(name: str | None) -> tuple[str, ...]:
    """The mesh axes a logical axis is split over (() = replicated)."""
    axes = _RULE.get(name) if name is not None else None
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def spec(names) -> P:
    """The PartitionSpec of dimensions with these logical names."""
    return P(*(_RULE.get(n) if n is not None else None for n in names))


# --------------------------------------------------------------------------------------------
# meshes


def mesh_shape(sizes: tuple[int, ...], devices: int) -> tuple[int, int, int]:
    """(data, tensor, expert) from `serve.mesh` (() = all `devices` on "tensor"), checked against the count."""
    if devices < 1:
        raise ConfigError(f"devices={devices}; expected >= 1")
    if not sizes:
        return (1, devices, 1)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ConfigError(f"serve.mesh = {tuple(sizes)}; expected three sizes >= 1 for {MESH_AXES}")
    if math.prod(sizes) != devices:
        raise ConfigError(f"serve.mesh = {tuple(sizes)} spans {math.prod(sizes)} devices (data × tensor × expert); "
                          f"{devices} devices are used")
    return tuple(sizes)


def make_mesh(sizes: tuple[int, ...] = (), devices=None) -> jax.sharding.Mesh:
    """A (data, tensor, expert) mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(tuple(sizes), len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(sizes: tuple[int, ...] = (), devices: int = 1) -> jax.sharding.AbstractMesh:
    """The mesh's shape without devices (sizing a deployment from here, e.g. `serve --dry-run`)."""
    shape = mesh_shape(tuple(sizes), devices)
    return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _axis_size(mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def is_ours(mesh) -> bool:
    """Whether `mesh` has this module's axes (other meshes, e.g. training's data mesh, keep their own rules)."""
    return mesh is not None and all(a in mesh.axis_names for a in MESH_AXES)


def mesh_of(*trees):
    """The mesh the first array of `trees` on a multi-device mesh lives on (an AbstractMesh inside jit), else None."""
    for a in jax.tree.leaves(trees):
        if not isinstance(a, jax.Array):  # tracers are too; Python numbers and other leaves carry no mesh
            continue
        mesh = getattr(jax.typeof(a).sharding, "mesh", None)
        if mesh is not None and not mesh.empty and mesh.size > 1:
            return mesh
    return None


def model_mesh(model):
    """The mesh a module's variables were placed on (`place_model`, a loader given `mesh=`), or None."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


# --------------------------------------------------------------------------------------------
# parameters


def _unit_counts(arch) -> list[tuple[str, str, int]]:
    """(logical axis, arch field, count) for axes that hold whole units (heads, groups) flattened
    with their width: a split must not cut through a unit, which the dimension alone cannot show."""
    if isinstance(arch, LlamaArch):
        return [("heads", "num_heads", arch.num_heads), ("kv_heads", "num_kv_heads", arch.num_kv_heads)]
    if isinstance(arch, Gemma4Arch):
        units = [("heads", "num_heads", arch.num_heads), ("kv_heads", "num_kv_heads", arch.num_kv_heads)]
        if arch.num_global_kv_heads is not None and "full_attention" in arch.layer_types:
            units.append(("kv_heads", "num_global_kv_heads", arch.num_global_kv_heads))
        return units
    if isinstance(arch, DeepseekV4Arch):
        return [("heads", "num_heads", arch.num_heads), ("index_heads", "index_n_heads", arch.index_n_heads),
                ("o_groups", "o_groups", arch.o_groups), ("experts", "n_routed_experts", arch.n_routed_experts)]
    return []


def _module_arch(model):
    # Targets carry `arch`; drafts the architecture of their own layers.
    return getattr(model, "arch", None) or getattr(model, "layer_arch", None)


def _axis_words(mesh, axes: tuple[str, ...]) -> str:
    return " × ".join(f"{a!r} (size {mesh.shape[a]})" for a in axes if a in mesh.shape)


def check_divisible(model, mesh) -> None:
    """Refuse a mesh that does not divide the model: every split unit count and every split dimension."""
    arch = _module_arch(model)
    for axis, field, count in _unit_counts(arch):
        axes = mesh_axes(axis)
        size = _axis_size(mesh, axes)
        if count % size:
            raise ConfigError(f"mesh axis {_axis_words(mesh, axes)} does not divide {type(arch).__name__}.{field}"
                              f"={count} (logical axis {axis!r} is split over it); choose serve.mesh / --devices "
                              f"so that {size} divides {count}")
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = var.get_metadata().get("out_sharding") or ()
        for dim, name in zip(var.shape, names):
            axes = mesh_axes(name)
            size = _axis_size(mesh, axes)
            if dim % size:
                where = ".".join(map(str, path))
                raise ConfigError(f"mesh axis {_axis_words(mesh, axes)} does not divide {where}'s {name!r} dimension "
                                  f"of {dim} (shape {tuple(var.shape)}); choose serve.mesh / --devices so that "
                                  f"{size} divides {dim}")


def partition_specs(model):
    """An NNX State of each variable's PartitionSpec under RULES (unannotated variables: replicated)."""
    with nnx.logical_axis_rules(RULES):
        return nnx.get_partition_spec(nnx.state(model))


def shardings(model, mesh) -> dict[tuple, NamedSharding]:
    """{variable path: NamedSharding on `mesh`} of a (possibly abstract) module, after checking the mesh divides it."""
    check_divisible(model, mesh)
    return {path: NamedSharding(mesh, var.get_value())
            for path, var in nnx.to_flat_state(partition_specs(model))}


def place_model(model, mesh):
    """Move every variable of `model` onto `mesh` with its partitioning (in place); returns `model`.

    Each variable is resharded from wherever it lies; a model loaded with `mesh=` is already placed.
    """
    by_path = shardings(model, mesh)
    state = nnx.state(model)
    placed = [(path, var.replace(jax.device_put(var.get_value(), by_path[path])))
              for path, var in nnx.to_flat_state(state)]
    nnx.update(model, nnx.from_flat_state(placed))
    return model


def create_placed(create, mesh):
    """The module `create()` builds, built straight into its shards on `mesh` (random weights of a
    model no single device holds): one jitted initialisation whose outputs are already split."""
    abstract = nnx.eval_shape(create)
    by_path = shardings(abstract, mesh)
    graphdef, abstract_state = nnx.split(abstract)
    flat = nnx.to_flat_state(abstract_state)
    out_shardings = nnx.from_flat_state([(path, var.replace(by_path[path])) for path, var in flat])
    state = jax.jit(lambda: nnx.state(create()), out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)


def replicated(mesh) -> NamedSharding | None:
    """A whole copy on every device of `mesh` (None without a mesh: the default device)."""
    return NamedSharding(mesh, P()) if mesh is not None else None


def zeros(shape, dtype, names, mesh=None) -> jax.Array:
    """Zeros created straight in their shards on `mesh` (logical `names` per dimension); default device without one."""
    if mesh is None:
        return jnp.zeros(shape, dtype)
    for dim, name in zip(shape, names):
        size = _axis_size(mesh, mesh_axes(name))
        if dim % size:
            raise ConfigError(f"mesh axis {_axis_words(mesh, mesh_axes(name))} does not divide the {name!r} "
                              f"dimension of {dim} of a cache of shape {tuple(shape)}")
    return jnp.zeros(shape, dtype, device=NamedSharding(mesh, spec(names)))


def shard_shape(shape, names, mesh) -> tuple[int, ...]:
    """One device's block of an array of `shape` whose dimensions have logical `names` (mesh may be abstract)."""
    names = tuple(names) + (None,) * (len(shape) - len(tuple(names)))
    return tuple(-(-dim // _axis_size(mesh, mesh_axes(name))) for dim, name in zip(shape, names))


def bytes_per_device(model, mesh) -> int:
    """Bytes of a (possibly abstract) module's variables on one device of `mesh`, from their partitioning."""
    check_divisible(model, mesh)
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model)):
        names = var.get_metadata().get("out_sharding") or ()
        total += math.prod(shard_shape(var.shape, names, mesh)) * jnp.dtype(var.dtype).itemsize
    return total


# --------------------------------------------------------------------------------------------
# several hosts


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """Join a multi-process job when the environment describes one; returns whether it did.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID,
    all three. Otherwise a SLURM or Open MPI job of several tasks is detected by JAX itself. A
    single process (none of these) needs nothing.
    """
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    given = {n: environ[n] for n in names if environ.get(n)}
    if given:
        missing = [n for n in names if n not in given]
        if missing:
            raise ConfigError(f"multi-host: {sorted(given)} set but {missing} missing; set all of {list(names)}")
        count, index = (_int_env(environ, n) for n in names[1:])
        if not 0 <= index < count:
            raise ConfigError(f"JAX_PROCESS_ID={index}; expected 0..JAX_NUM_PROCESSES-1={count - 1}")
        jax.distributed.initialize(given["JAX_COORDINATOR_ADDRESS"], num_processes=count, process_id=index)
        return True
    if _int_env(environ, "SLURM_NTASKS", 1) > 1 or _int_env(environ, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        jax.distributed.initialize()
        return True
    return False


def _int_env(environ, name: str, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}; expected an integer") from None


def is_leader() -> bool:
    """Whether this process runs the request loop (process 0)."""
    return jax.process_index() == 0


def broadcast_from_leader(batch):
    """Process 0's `batch` (a pytree of numpy arrays / scalars of the same shapes everywhere) on every process.

    The other processes pass arrays of the right shapes (their values are unused).
    """
    return multihost_utils.broadcast_one_to_all(batch, is_source=is_leader())


MIN_BROADCAST_BYTES = 256  # the smallest padded buffer: short messages share one program


def broadcast_bytes_from_leader(data: bytes) -> bytes:
    """Process 0's `data` on every process (the others pass anything, e.g. b"").

    Two collectives: the length, then the bytes padded to a power of two (so the broadcast compiles
    once per size bucket, not per message length).
    """
    length = int(broadcast_from_leader(np.int32(len(data) if is_leader() else 0)))
    size = max(MIN_BROADCAST_BYTES, 1 << (length - 1).bit_length())
    buffer = np.zeros(size, np.uint8)
    if is_leader():
        buffer[:length] = np.frombuffer(data, np.uint8)
    return broadcast_from_leader(buffer)[:length].tobytes()
