"""Gemma 4 dense text decoder: parity with HF transformers, paged decoding, config errors."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.checkpoint.hf import (TensorSource, arch_from_hf_config, arch_to_hf_config, load_hf_target,
                                      save_hf_target)
from dspark_jax.config import ConfigError, Gemma4Arch
from dspark_jax.models import create_target, forward
from dspark_jax.engine import generate
from dspark_jax.speculative.sampling import SamplingParams
from conftest import randomize_params

S, F = "sliding_attention", "full_attention"

# Tiny shapes with everything that makes Gemma 4 different switched on: sliding and full layers
# with different head sizes, a window much shorter than the sequences, partial RoPE on full layers.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=5, num_heads=4, num_kv_heads=2,
            head_dim=16, global_head_dim=32, layer_types=(S, S, F, S, F), sliding_window=5,
            rope_theta_sliding=10000.0, rope_theta_full=1000000.0, max_position_embeddings=256)
ARCHS = {
    # K=V full layers with their own KV head count, tied embeddings, a softcap small enough to bite.
    "k_eq_v": Gemma4Arch(**TINY, attention_k_eq_v=True, num_global_kv_heads=1, partial_rotary_factor_full=0.25,
                         final_logit_softcapping=2.0),
    # Separate v_proj, biases, untied lm_head, partial RoPE on sliding layers too, no softcap.
    "separate_v": Gemma4Arch(**TINY, attention_k_eq_v=False, partial_rotary_factor_full=0.5,
                             partial_rotary_factor_sliding=0.75, attention_bias=True, tie_word_embeddings=False,
                             final_logit_softcapping=None),
}
SEQ = 16  # > 3 sliding windows
HIDDEN_LAYERS = (1, 2, 4)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def hf_request(model_type: str, config: dict, tmp_path, inputs, hidden_layers, dtypes) -> dict:
    return {"model_type": model_type, "config": config, "seed": 0, "model_dir": str(tmp_path / "hf"),
            "out": str(tmp_path / "out.npz"), "inputs": inputs, "hidden_layers": list(hidden_layers),
            "dtypes": list(dtypes)}


def hf_config(arch: Gemma4Arch) -> dict:
    """Our config.json minus the keys that name the class (the oracle picks it by model_type)."""
    return {k: v for k, v in arch_to_hf_config(arch).items() if k not in ("model_type", "architectures")}


@pytest.mark.oracle
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_logits_and_hidden_match_hf(name, oracle, tmp_path):
    """fp32 matches HF to 1e-4; bf16 is no more than 2x further from HF-fp32 than HF's own bf16."""
    arch = ARCHS[name]
    inputs = np.random.default_rng(0).integers(0, arch.vocab_size, (2, SEQ)).tolist()
    ref = oracle("hf_models.py", hf_request("gemma4_text", hf_config(arch), tmp_path, inputs, HIDDEN_LAYERS,
                                            ("float32", "bfloat16")))
    errors = {}
    for dtype in ("float32", "bfloat16"):
        model = load_hf_target(tmp_path / "hf", dtype=dtype)
        # Our config.json went through HF and back (re-saved in HF's own spelling) unchanged.
        assert model.arch == arch
        logits, hidden = forward(model, inputs, layers=HIDDEN_LAYERS)
        errors[dtype] = {"logits": rel_err(logits, ref["logits_float32"])}
        errors[dtype].update({layer: rel_err(hidden[layer], ref[f"hidden_{layer}_float32"])
                              for layer in HIDDEN_LAYERS})
    hf_bf16 = {"logits": rel_err(ref["logits_bfloat16"], ref["logits_float32"])}
    hf_bf16.update({layer: rel_err(ref[f"hidden_{layer}_bfloat16"], ref[f"hidden_{layer}_float32"])
                    for layer in HIDDEN_LAYERS})
    for key in hf_bf16:
        assert errors["float32"][key] <= 1e-4, (key, errors)
        assert errors["bfloat16"][key] <= 2 * hf_bf16[key], (key, errors["bfloat16"], hf_bf16)


@pytest.mark.oracle
def test_multimodal_checkpoint_loads_text_decoder(oracle, tmp_path):
    """A `gemma4` checkpoint with a vision tower: text weights under model.language_model., towers skipped."""
    text = {k: v for k, v in hf_config(ARCHS["k_eq_v"]).items() if k != "tie_word_embeddings"}
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16, "patch_size": 4, "position_embedding_size": 64,
              "pooling_kernel_size": 2}
    # Multimodal special tokens inside the tiny vocabulary, above every input token.
    specials = {"image_token_id": 120, "boi_token_id": 121, "eoi_token_id": 122, "video_token_id": 123}
    config = {"text_config": text, "vision_config": vision, "audio_config": None, "tie_word_embeddings": True,
              **specials}
    inputs = np.random.default_rng(1).integers(0, 100, (1, SEQ)).tolist()
    ref = oracle("hf_models.py", hf_request("gemma4", config, tmp_path, inputs, (3,), ("float32",)))
    names = TensorSource(tmp_path / "hf").names()
    assert any(n.startswith("model.vision_tower.") for n in names)
    assert any(n.startswith("model.language_model.layers.") for n in names)
    model = load_hf_target(tmp_path / "hf", dtype="float32")
    assert model.arch == ARCHS["k_eq_v"]
    logits, hidden = forward(model, inputs, layers=(3,))
    assert rel_err(logits, ref["logits_float32"]) <= 1e-4
    assert rel_err(hidden[3], ref["hidden_3_float32"]) <= 1e-4


def random_model(arch: Gemma4Arch, seed: int):
    return randomize_params(create_target(arch, dtype="float32", seed=seed), seed)


def greedy_reference(model, prompts, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding by re-running the full-sequence forward (no cache) on a fixed-size buffer.

    Causal attention makes the padding after each row's tokens invisible to its last position.
    """
    eos = set(model.arch.eos_token_ids)
    width = max(map(len, prompts)) + max_new_tokens
    rows = [list(p) for p in prompts]
    out = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        live = [i for i in range(len(rows)) if not (out[i] and (out[i][-1] in eos or len(out[i]) == max_new_tokens))]
        if not live:
            break
        buf = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            buf[i, :len(r)] = r
        logits, _ = forward(model, buf)
        for i in live:
            token = int(jnp.argmax(logits[i, len(rows[i]) - 1]))
            rows[i].append(token)
            out[i].append(token)
    return out


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_paged_decoding_matches_full_forward(name):
    """Chunked prefill + decode over a paged cache (page 4, windows crossing pages) = full forward."""
    model = random_model(ARCHS[name], seed=7)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(2, 128, n).tolist() for n in (19, 9)]
    res = generate(model, None, prompts, max_new_tokens=10, sampling=SamplingParams(temperature=0.0),
                   page_size=4, prefill_chunk=8)
    assert res.tokens == greedy_reference(model, prompts, 10)


# --------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_save_and_load_round_trip(name, tmp_path):
    model = random_model(ARCHS[name], seed=0)
    loaded = load_hf_target(save_hf_target(model, tmp_path / "ckpt"), dtype="float32")
    assert loaded.arch == model.arch
    ours, back = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))
    assert [p for p, _ in ours] == [p for p, _ in back]
    for (path, a), (_, b) in zip(ours, back):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_config_json_round_trip():
    for arch in (Gemma4Arch(), *ARCHS.values()):
        assert arch_from_hf_config(arch_to_hf_config(arch)) == arch


@pytest.mark.parametrize("field,value", [
    ("enable_moe_block", True),
    ("num_kv_shared_layers", 2),
    ("hidden_size_per_layer_input", 256),
    ("use_bidirectional_attention", "all"),
])
def test_unsupported_features_are_named(field, value):
    cfg = {**arch_to_hf_config(ARCHS["k_eq_v"]), field: value}
    with pytest.raises(ConfigError, match=field):
        arch_from_hf_config(cfg)


def test_per_layer_inputs_are_on_by_default_in_hf():
    cfg = arch_to_hf_config(ARCHS["k_eq_v"])
    del cfg["hidden_size_per_layer_input"]
    with pytest.raises(ConfigError, match="hidden_size_per_layer_input"):
        arch_from_hf_config(cfg)


def test_unsupported_rope_is_named():
    cfg = arch_to_hf_config(ARCHS["k_eq_v"])
    cfg["rope_parameters"]["full_attention"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(ConfigError, match="rope_type"):
        arch_from_hf_config(cfg)


def test_last_layer_is_forced_to_full_attention_like_hf():
    cfg = {**arch_to_hf_config(ARCHS["separate_v"]), "layer_types": [S, S, F, S, S]}
    assert arch_from_hf_config(cfg).layer_types == (S, S, F, S, F)


@pytest.mark.parametrize("change,field", [
    (dict(layer_types=(S, F)), "layer_types"),
    (dict(layer_types=(S, S, F, S, S)), "layer_types"),
    (dict(layer_types=(S, "global", F, S, F)), "layer_types"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_global_kv_heads=1), "num_global_kv_heads"),
    (dict(attention_k_eq_v=True, num_global_kv_heads=3), "num_global_kv_heads"),
    (dict(partial_rotary_factor_full=1.5), "partial_rotary_factor_full"),
    (dict(global_head_dim=31), "global_head_dim"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(final_logit_softcapping=0.0), "final_logit_softcapping"),
])
def test_arch_range_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"Gemma4Arch.{field}"):
        dataclasses.replace(ARCHS["separate_v"], **change)


def test_kv_cache_shapes_follow_layer_types():
    model = nnx.eval_shape(lambda: create_target(ARCHS["k_eq_v"], dtype="float32"))
    assert model.kv_heads_and_dims() == [(2, 16), (2, 16), (1, 32), (2, 16), (1, 32)]
