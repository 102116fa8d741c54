"""Logits and hidden-state parity with HF transformers (PyTorch) on tiny random models.

The oracle builds each model from an HF config with random weights, saves it with
save_pretrained, and reports its outputs; we load the saved folder with our loader.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from dspark_jax.checkpoint.hf import load_hf_target
from dspark_jax.models import forward

pytestmark = pytest.mark.oracle

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            max_position_embeddings=512)

CASES = {
    "llama3_rope_scaling": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32))),
    "qwen3_tied_gqa1": ("qwen3", dict(
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "qwen3_untied_gqa4": ("qwen3", dict(
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "qwen2_bias_yarn": ("qwen2", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=16))),
}

LAYERS = (0, 2)


def rel_err(ours, ref):
    ours = np.asarray(ours, np.float32)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    return rng.integers(0, BASE["vocab_size"], size=(2, 40)).tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case, oracle, tokens, tmp_path):
    model_type, extra = CASES[case]
    ref = oracle("hf_models.py", dict(
        model_type=model_type, config={**BASE, **extra}, seed=zlib.crc32(case.encode()) % 1000,
        model_dir=str(tmp_path / "model"), out=str(tmp_path / "out.npz"), inputs=tokens,
        hidden_layers=list(LAYERS), dtypes=["float32", "bfloat16"]))

    model = load_hf_target(tmp_path / "model", dtype="float32")
    logits, hidden = forward(model, tokens, layers=LAYERS)
    assert rel_err(logits, ref["logits_float32"]) <= 1e-4
    for layer in LAYERS:
        assert rel_err(hidden[layer], ref[f"hidden_{layer}_float32"]) <= 1e-4

    # bf16: both implementations round differently; ours must be about as close to the fp32
    # reference as HF's own bf16 run is.
    model = load_hf_target(tmp_path / "model", dtype="bfloat16")
    logits, _ = forward(model, tokens)
    ours = rel_err(logits, ref["logits_float32"])
    theirs = rel_err(ref["logits_bfloat16"], ref["logits_float32"])
    assert ours <= max(2.0 * theirs, 1e-2), (ours, theirs)
