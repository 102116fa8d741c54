"""Checkpoint files: lazy safetensors reading (index-aware, FP8/E8M0 included), config.json, atomic folders.

The primitives every checkpoint format shares (HF folders, DeepSpec drafts, DeepSeek-V4, GGUF
conversion); format-specific names and layouts live in the format's own module.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


# safetensors dtypes that numpy has no name for (so safe_open cannot return them): read from the
# file's bytes and viewed through ml_dtypes.
RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
              "F8_E8M0": ml_dtypes.float8_e8m0fnu}
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
                **RAW_DTYPES}


class TensorSource:
    """Lazy access to every tensor of a folder's safetensors files (index-aware)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files")
        self.location: dict[str, Path] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{folder}: the index names {f.name}, which is missing")
            with safe_open(str(f), framework="flax") as handle:
                for key in handle.keys():
                    self.location[key] = f
        self._open: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype string (F32, BF16, F8_E4M3, I8, ...)."""
        return self._handle(name).get_slice(name).get_dtype()

    def get(self, name: str) -> jax.Array | np.ndarray:
        """The tensor; FP8/E8M0 tensors come as numpy arrays of the ml_dtypes type."""
        dtype = self.dtype(name)
        if dtype in RAW_DTYPES:
            return np.array(self.view(name))
        return self._handle(name).get_tensor(name)

    def view(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map: indexing it reads only the bytes indexed (each device's
        block when loading onto a mesh), never the whole tensor."""
        path = self.location[name]
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            entry = json.loads(f.read(header_len))[name]
        if entry["dtype"] not in NUMPY_DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} has dtype {entry['dtype']}; expected one of "
                                  f"{sorted(NUMPY_DTYPES)}")
        begin, end = entry["data_offsets"]
        if end == begin:  # numpy cannot map zero bytes
            return np.zeros(entry["shape"], NUMPY_DTYPES[entry["dtype"]])
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len + begin, shape=(end - begin,))
        return data.view(NUMPY_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def _handle(self, name: str):
        f = self.location[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="flax")
        return self._open[f]


def stored_parts(path: tuple, var) -> list[tuple[tuple, tuple[int, ...]]]:
    """[(module path, shape)] of the tensors a parameter is stored as in checkpoints: itself, or, for a
    fused parameter (`tensor_parts` metadata, see models.common.TensorParts), each of its parts under
    its own sibling module name (`...self_attn.qkv_proj.kernel` -> `...self_attn.q_proj.kernel`, ...)."""
    parts = var.get_metadata().get("tensor_parts")
    if parts is None:
        return [(tuple(path), tuple(var.shape))]
    *module, _, leaf = path
    return [((*module, name, leaf), shape) for name, shape in zip(parts.names, parts.part_shapes(tuple(var.shape)))]


def stored_arrays(var, value) -> list:
    """`value` of a parameter as the arrays `stored_parts` names (split back into its parts if fused)."""
    parts = var.get_metadata().get("tensor_parts")
    return [value] if parts is None else parts.split(value)


class JoinedParts:
    """A fused parameter's value over its parts' host arrays (memory maps), joined lazily: indexing
    reads only the indexed block of each part, so a device loads just its own shard."""

    def __init__(self, parts, arrays: list, shape: tuple[int, ...]):
        self.shape = shape
        self.parts = [parts.unflatten(a, i, shape) for i, a in enumerate(arrays)]

    def __getitem__(self, index):
        index = (index,) if not isinstance(index, tuple) else index
        if index == (Ellipsis,):
            index = ()
        index = index + (slice(None),) * (len(self.shape) - len(index))
        every_slot = index[:-2] + (slice(None), index[-1])
        joined = np.concatenate([np.asarray(p[every_slot]) for p in self.parts], axis=-2)
        return joined[..., index[-2], :]


def to_device(array, dtype, sharding=None) -> jax.Array:
    """A host array (a memory map, `JoinedParts`) as a device array of `dtype`: whole on the default
    device, or with `sharding` built block by block, each device reading only its own block of `array`."""
    if sharding is None:
        return jnp.asarray(array[...], dtype)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: np.asarray(array[index], dtype))


def read_config_json(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected an HF model folder)")
    return json.loads(path.read_text())


def atomic_folder(folder: str | Path):
    """Context manager yielding a temporary folder that replaces `folder` only on success."""
    return _AtomicFolder(Path(folder))


class _AtomicFolder:
    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self) -> Path:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", dir=self.folder.parent))
        os.chmod(self.tmp, 0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.folder.exists():
            # Two renames (Linux cannot swap non-empty folders atomically); put the old one back
            # if the second fails, so the folder is never left missing.
            old = self.folder.with_name(f".{self.folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.folder, old)
            try:
                os.replace(self.tmp, self.folder)
            except OSError:
                os.replace(old, self.folder)
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.folder)
        return False
