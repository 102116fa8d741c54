"""llama-architecture GGUF files (llama.cpp's format) converted into HF model folders.

The folder holds what `load_hf_target` and `load_tokenizer` read: config.json, model.safetensors
(float32: every tensor dequantized by the `gguf` package's own decoders), tokenizer.json,
tokenizer_config.json and generation_config.json, plus gguf_source.json naming the file it came
from. It is written atomically, so a failed or interrupted conversion leaves no folder behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dspark_jax.checkpoint.gguf_tokenizer import eos_token_ids, read_metadata, tokenizer_from_metadata
from dspark_jax.checkpoint.hf import CheckpointError, arch_to_hf_config, atomic_folder, hf_tensor_name
from dspark_jax.checkpoint.tensors import stored_parts
from dspark_jax.config import ConfigError, LlamaArch
from dspark_jax.models import abstract_target

# Bump when the conversion's output changes, so cached folders made by older code are redone.
CONVERTER_VERSION = 1

SUPPORTED_ARCHITECTURES = ("llama",)
LLM = gguf.Keys.LLM
ATTENTION = gguf.Keys.Attention
ROPE = gguf.Keys.Rope


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def arch_from_gguf(meta: dict[str, Any], tensor_names: set[str], where: str = "GGUF") -> LlamaArch:
    """Our architecture config from a llama GGUF's metadata (and which tensors it stores)."""
    architecture = meta.get(gguf.Keys.General.ARCHITECTURE)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{where}: {gguf.Keys.General.ARCHITECTURE}={architecture!r} is not supported; "
                              f"supported: {list(SUPPORTED_ARCHITECTURES)}")

    def field(template: str, default: Any = None):
        key = template.format(arch=architecture)
        if key in meta:
            return meta[key]
        if default is None:
            raise CheckpointError(f"{where}: GGUF metadata has no {key!r}")
        return default

    hidden = int(field(LLM.EMBEDDING_LENGTH))
    heads = int(field(ATTENTION.HEAD_COUNT))
    head_dim = int(field(ATTENTION.KEY_LENGTH, hidden // heads))
    for template in (ATTENTION.VALUE_LENGTH, ROPE.DIMENSION_COUNT):
        # our attention uses one head width for keys and values, and rotates all of it
        if int(field(template, head_dim)) != head_dim:
            raise CheckpointError(f"{where}: {template.format(arch=architecture)}={field(template)}; "
                                  f"expected the head dimension {head_dim}")
    scaling = field(ROPE.SCALING_TYPE, "none")
    if scaling != "none":
        raise CheckpointError(f"{where}: {ROPE.SCALING_TYPE.format(arch=architecture)}={scaling!r} is not "
                              "supported; expected 'none'")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{where}: tensor 'rope_freqs.weight' (llama3-style RoPE frequency factors) "
                              "is not supported")
    tokens = meta.get(gguf.Keys.Tokenizer.LIST)
    bos = meta.get(gguf.Keys.Tokenizer.BOS_ID)
    try:
        return LlamaArch(
            vocab_size=int(field(LLM.VOCAB_SIZE, len(tokens) if tokens else None)),
            hidden_size=hidden,
            intermediate_size=int(field(LLM.FEED_FORWARD_LENGTH)),
            num_layers=int(field(LLM.BLOCK_COUNT)),
            num_heads=heads,
            num_kv_heads=int(field(ATTENTION.HEAD_COUNT_KV, heads)),
            head_dim=head_dim,
            rope_theta=float(field(ROPE.FREQ_BASE, 10000.0)),
            rms_norm_eps=float(field(ATTENTION.LAYERNORM_RMS_EPS)),
            # llama.cpp stores the output projection only when it differs from the embedding
            tie_word_embeddings="output.weight" not in tensor_names,
            max_position_embeddings=int(field(LLM.CONTEXT_LENGTH)),
            bos_token_id=int(bos) if bos is not None else -1,
            eos_token_ids=eos_token_ids(meta),
            model_type="llama",
        )
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


class Placement(NamedTuple):
    """Where a GGUF tensor goes: its HF name and shape, and the head count whose rotary rows to unpermute."""

    hf_name: str
    shape: tuple[int, ...]
    rotary_heads: int  # 0 = not a rotary (q/k) projection


def placements(arch: LlamaArch) -> dict[str, Placement]:
    """GGUF tensor name -> Placement for every parameter our model has.

    The names come from our own module tree, mapped through the `gguf` package's table, so the
    folder holds exactly what `load_hf_target` will look for.
    """
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, arch.num_layers)
    rotary = {gguf.MODEL_TENSOR.ATTN_Q: arch.num_heads, gguf.MODEL_TENSOR.ATTN_K: arch.num_kv_heads}
    model = abstract_target(arch, dtype="float32")
    out = {}
    stored = [part for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)) for part in stored_parts(path, var)]
    for path, shape in stored:
        name, transposed = hf_tensor_name(path)
        found = table.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise CheckpointError(f"no GGUF tensor name for parameter {name}")
        kind, gguf_name = found
        out[gguf_name] = Placement(name, tuple(reversed(shape)) if transposed else shape, rotary.get(kind, 0))
    return out


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of attn_q / attn_k rows.

    llama.cpp's RoPE rotates adjacent pairs (x0, x1), (x2, x3), ... while HF rotates the two halves
    of each head (x_i, x_{i+d/2}); its converter therefore interleaves the halves of every head.
    Row 2i+j of a head in the file is row i + j*d/2 of HF's head.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantize(tensor, where: str) -> np.ndarray:
    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise CheckpointError(f"{where}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the "
                              f"gguf package cannot dequantize") from None


def hf_tensors(reader: gguf.GGUFReader, arch: LlamaArch, where: str = "GGUF") -> dict[str, np.ndarray]:
    """Every tensor of the file, dequantized to float32, under HF names and layouts."""
    places = placements(arch)
    stored = {t.name for t in reader.tensors}
    unexpected = sorted(stored - set(places))
    if unexpected:
        raise CheckpointError(f"{where}: tensors {unexpected[:10]} have no place in a {arch.model_type} model "
                              "of this configuration")
    missing = sorted(set(places) - stored)
    if missing:
        raise CheckpointError(f"{where}: missing tensors {missing[:10]}")
    out = {}
    for tensor in reader.tensors:
        place = places[tensor.name]
        weight = _dequantize(tensor, where)
        if weight.shape != place.shape:
            raise CheckpointError(f"{where}: tensor {tensor.name!r} has shape {list(weight.shape)}; the "
                                  f"metadata implies {list(place.shape)}")
        out[place.hf_name] = unpermute_rotary_rows(weight, place.rotary_heads) if place.rotary_heads else weight
    return out


def generation_config(arch: LlamaArch, tokenizer_config: dict, backend) -> dict:
    model_config = arch_to_hf_config(arch)
    config = {"bos_token_id": model_config["bos_token_id"], "eos_token_id": model_config["eos_token_id"]}
    if "pad_token" in tokenizer_config:
        config["pad_token_id"] = backend.token_to_id(tokenizer_config["pad_token"])
    return config


def convert_gguf(gguf_path: str | Path, folder: str | Path) -> Path:
    """Convert a llama GGUF into an HF model folder (replacing `folder` atomically)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise CheckpointError(f"{gguf_path}: no such GGUF file")
    where = str(gguf_path)
    reader = gguf.GGUFReader(gguf_path)
    meta = read_metadata(reader)
    arch = arch_from_gguf(meta, {t.name for t in reader.tensors}, where)
    backend, tokenizer_config = tokenizer_from_metadata(meta, where)
    if backend.get_vocab_size() > arch.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {backend.get_vocab_size()} tokens, more than the "
                              f"model's {LLM.VOCAB_SIZE.format(arch='llama')}={arch.vocab_size}")
    tensors = hf_tensors(reader, arch, where)
    source = {"file": gguf_path.name, "sha256": file_sha256(gguf_path), "converter_version": CONVERTER_VERSION}
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        backend.save(str(tmp / "tokenizer.json"))
        files = {"config.json": arch_to_hf_config(arch), "tokenizer_config.json": tokenizer_config,
                 "generation_config.json": generation_config(arch, tokenizer_config, backend),
                 "gguf_source.json": source}
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return Path(folder)


def gguf_source(folder: str | Path) -> dict | None:
    """What a converted folder was made from (gguf_source.json), or None for other folders."""
    path = Path(folder) / "gguf_source.json"
    return json.loads(path.read_text()) if path.is_file() else None
