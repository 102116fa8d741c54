"""GGUF -> HF folder conversion on tiny synthetic llama GGUFs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from dspark_jax.checkpoint.gguf import convert_gguf
from dspark_jax.checkpoint.hf import CheckpointError, load_hf_target
from dspark_jax.models import forward
from synthetic_gguf import Q, tiny_gguf


def test_float32_gguf_round_trips_to_the_hf_weights(tmp_path):
    """Stored as F32, every tensor comes back bit-exact in HF layout: the q/k row order is undone."""
    path, contents = tiny_gguf(tmp_path / "tiny.gguf", tied=True)
    folder = convert_gguf(path, tmp_path / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    assert sorted(tensors) == sorted(contents.weights)
    for name, weight in contents.weights.items():
        np.testing.assert_array_equal(tensors[name], weight, err_msg=name)

    config = json.loads((folder / "config.json").read_text())
    spec = contents.spec
    assert config | {
        "model_type": "llama", "vocab_size": spec.vocab_size, "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn, "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim, "tie_word_embeddings": True,
        "max_position_embeddings": spec.context, "bos_token_id": contents.tokens.index("<|im_start|>"),
        # EOS and the end-of-turn token both end generation
        "eos_token_id": [contents.tokens.index("<|im_end|>"), contents.tokens.index("<|endoftext|>")],
    } == config
    assert config["rope_parameters"]["rope_theta"] == spec.rope_theta
    assert config["rms_norm_eps"] == pytest.approx(spec.rms_eps)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]
    assert {"tokenizer.json", "tokenizer_config.json", "gguf_source.json"} <= {p.name for p in folder.iterdir()}
    load_hf_target(folder, dtype="float32")


@pytest.mark.oracle
@pytest.mark.slow
def test_quantized_gguf_logits_match_transformers(tmp_path, oracle):
    """Q8_0 / Q4_1 / F16 / F32 tensors, untied head: our logits equal transformers' on the same file."""
    storage = {}
    for layer in range(2):
        p = f"model.layers.{layer}."
        storage |= {p + "self_attn.q_proj.weight": Q.Q4_1, p + "self_attn.k_proj.weight": Q.Q8_0,
                    p + "self_attn.v_proj.weight": Q.F16, p + "self_attn.o_proj.weight": Q.Q4_1,
                    p + "mlp.gate_proj.weight": Q.Q4_1, p + "mlp.up_proj.weight": Q.Q8_0,
                    p + "mlp.down_proj.weight": Q.Q4_1}
    storage |= {"model.embed_tokens.weight": Q.Q8_0, "lm_head.weight": Q.Q8_0}
    path, contents = tiny_gguf(tmp_path / "tiny.gguf", storage=storage, seed=1)
    inputs = np.random.default_rng(0).integers(0, contents.spec.vocab_size, (2, 24)).tolist()
    ref = oracle("hf_gguf.py", {"gguf": str(path), "out": str(tmp_path / "ref.npz"), "inputs": inputs})

    model = load_hf_target(convert_gguf(path, tmp_path / "hf"), dtype="float32")
    assert model.lm_head is not None
    logits, _ = forward(model, inputs)
    expected = ref["logits_float32"]
    # quantization moved the weights a long way from the F32 originals; agreement here means we
    # decoded the same blocks transformers did
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-4, rtol=2e-4)
    assert np.abs(expected).max() > 1.0


def _assert_fails_cleanly(tmp_path, path, match):
    target = tmp_path / "out" / "hf"
    with pytest.raises(CheckpointError, match=match):
        convert_gguf(path, target)
    # nothing half-written: neither the folder nor a temporary sibling remains
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_unsupported_architecture_is_named(tmp_path):
    path, _ = tiny_gguf(tmp_path / "q.gguf", architecture="qwen2")
    _assert_fails_cleanly(tmp_path, path, r"general\.architecture='qwen2' is not supported; supported: \['llama'\]")


def test_rope_scaling_is_refused(tmp_path):
    path, _ = tiny_gguf(tmp_path / "r.gguf", rope_scaling="linear")
    _assert_fails_cleanly(tmp_path, path, r"llama\.rope\.scaling\.type='linear' is not supported")


def test_unknown_tensor_is_named(tmp_path):
    path, _ = tiny_gguf(tmp_path / "t.gguf", extra_tensors={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
    _assert_fails_cleanly(tmp_path, path, r"tensors \['blk\.0\.attn_q\.bias'\] have no place")


def test_unsupported_tokenizers_are_named(tmp_path):
    path, _ = tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    _assert_fails_cleanly(tmp_path, path, r"tokenizer\.ggml\.model='llama' is not supported")
    path, _ = tiny_gguf(tmp_path / "pre.gguf", pre="qwen2")
    _assert_fails_cleanly(tmp_path, path, r"tokenizer\.ggml\.pre='qwen2' is not supported; supported: \[")
