"""Checkpoint loading fails loudly, naming what is wrong."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dspark_jax.checkpoint.hf import CheckpointError, arch_from_hf_config, load_hf_target, save_hf_target
from dspark_jax.checkpoint.deepspec import save_deepspec_draft
from dspark_jax.config import ConfigError, DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.loading import load_draft
from dspark_jax.models import create_target

ARCH = LlamaArch(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, tie_word_embeddings=False)


@pytest.fixture
def folder(tmp_path):
    save_hf_target(create_target(ARCH, dtype="float32"), tmp_path / "m")
    return tmp_path / "m"


def edit_tensors(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def test_round_trip_is_exact(folder):
    model = create_target(ARCH, dtype="float32")
    loaded = load_hf_target(folder, dtype="float32")
    for (path, ours), (_, theirs) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))):
        # every parameter, the fused q/k/v and gate/up included
        np.testing.assert_array_equal(np.asarray(theirs[...]), np.asarray(ours[...]), err_msg=".".join(map(str, path)))


def test_missing_tensor_is_named(folder):
    edit_tensors(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): \['model.layers.1.self_attn.k_proj.weight'\]"):
        load_hf_target(folder)


def test_unexpected_tensor_is_named(folder):
    edit_tensors(folder, lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", np.zeros((2, 2), np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): \['model.layers.7.mlp.up_proj.weight'\]"):
        load_hf_target(folder)


def test_misshaped_tensor_is_named(folder):
    edit_tensors(folder, lambda t: t.__setitem__("model.norm.weight", np.ones((31,), np.float32)))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: checkpoint \[31\], expected \[32\]"):
        load_hf_target(folder)


def test_misshaped_part_of_a_fused_parameter_is_named(folder):
    # v_proj [KVH·D = 16, 32] is one part of the fused qkv parameter.
    edit_tensors(folder, lambda t: t.__setitem__("model.layers.0.self_attn.v_proj.weight", np.ones((8, 32), np.float32)))
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors \(1\): \['model.layers.0.self_attn.v_proj.weight: "
                                              r"checkpoint \[8, 32\], expected \[16, 32\]'\]"):
        load_hf_target(folder)


def test_sharded_checkpoint_with_index(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    (folder / "model.safetensors").unlink()
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_hf_target(folder, dtype="float32")
    np.testing.assert_array_equal(np.asarray(loaded.lm_head.kernel[...]).T, tensors["lm_head.weight"])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="the index names model-00002-of-00002.safetensors, which is missing"):
        load_hf_target(folder)


def test_missing_config_and_unknown_model_type(tmp_path, folder):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_target(tmp_path)
    with pytest.raises(ConfigError, match=r"model_type='gpt2'; supported: \['llama', 'mistral', 'qwen2', 'qwen3', 'gemma4_text'"):
        arch_from_hf_config({"model_type": "gpt2"})


def test_loaded_dtype(folder):
    assert load_hf_target(folder, dtype="bfloat16").layers[0].self_attn.qkv_proj.kernel[...].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"dtype='int8'; expected one of"):
        load_hf_target(folder, dtype="int8")


def test_draft_kind_none_decodes_plainly_whatever_the_source():
    """`--set draft.kind=none` on a config that ships a draft folder must turn speculation off."""
    shipped = Path(__file__).resolve().parent.parent / "drafts" / "smollm2_dspark"
    assert shipped.is_dir()
    assert load_draft(DraftConfig(kind="none", source=str(shipped)), create_target(ARCH)) is None


def test_a_draft_source_of_another_kind_is_named(tmp_path):
    """draft.kind=dflash over a folder holding a DSpark draft must not load the DSpark draft silently."""
    target = create_target(ARCH, dtype="float32")
    config = DraftConfig(kind="dspark", num_layers=1, target_layer_ids=(0,), mask_token_id=63, markov_rank=8,
                         block_size=4)
    save_deepspec_draft(create_draft(config, target), target, tmp_path / "draft")
    assert load_draft(dataclasses.replace(config, source=str(tmp_path / "draft")), target).config.kind == "dspark"
    with pytest.raises(ValueError, match=r"DraftConfig.kind='dflash' but draft.source=.* holds a 'dspark' draft"):
        load_draft(dataclasses.replace(config, kind="dflash", source=str(tmp_path / "draft")), target)
