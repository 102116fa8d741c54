"""Fused q/k/v and gate/up parameters: the same math as HF's separate projections, one matmul each,
HF's query-head order, and checkpoints that keep HF's separate tensors through load and export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import randomize_params
from dspark_jax.checkpoint.deepspec import load_deepspec_draft, save_deepspec_draft
from dspark_jax.checkpoint.hf import load_hf_target, save_hf_target
from dspark_jax.checkpoint.tensors import stored_parts
from dspark_jax.config import DraftConfig, Gemma4Arch, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.models import abstract_target
from dspark_jax.models.attention import DenseCausal
from dspark_jax.models.common import apply_rope, rope_inv_freq

# 4 query heads over 2 KV heads (G = 2); hidden ≠ heads·head_dim so every weight has its own shape.
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE = 4, 2, 8, 40, 48
QWEN3 = LlamaArch(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_layers=2, num_heads=HEADS,
                  num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, qk_norm=True, attention_bias=True,
                  tie_word_embeddings=False, model_type="qwen3", eos_token_ids=())
LLAMA = LlamaArch(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_layers=2, num_heads=HEADS,
                  num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, tie_word_embeddings=False, model_type="llama",
                  eos_token_ids=())
ATTN, MLP = "model.layers.0.self_attn.", "model.layers.0.mlp."


def hf_folder(arch, tmp_path, seed: int, replace=lambda tensors: None):
    """An HF folder of `arch` whose tensors are fresh HF-layout draws (not our exporter's values),
    then edited by `replace`; returns (folder, {name: tensor})."""
    folder = save_hf_target(randomize_params(abstract_target(arch, dtype="float32"), seed=0), tmp_path / "hf")
    rng = np.random.default_rng(seed)
    tensors = {name: (0.3 * rng.standard_normal(t.shape)).astype(np.float32)
               for name, t in load_file(str(folder / "model.safetensors")).items()}
    replace(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, tensors


def reference_attention(t, x, positions):
    """HF Qwen3 attention from the separate tensors: q/k/v projections, per-head norms, RoPE,
    key/value head h // G for query head h (HF's repeat_kv), causal softmax, o_proj."""
    def proj(name, heads):
        return (x @ t[ATTN + name + ".weight"].T + t[ATTN + name + ".bias"]).reshape(*x.shape[:-1], heads, HEAD_DIM)

    def norm(y, name):
        return y / jnp.sqrt(jnp.mean(y * y, axis=-1, keepdims=True) + QWEN3.rms_norm_eps) * t[ATTN + name + ".weight"]

    inv_freq = rope_inv_freq(HEAD_DIM, QWEN3.rope_theta)
    q = apply_rope(norm(proj("q_proj", HEADS), "q_norm"), positions, inv_freq)
    k = apply_rope(norm(proj("k_proj", KV_HEADS), "k_norm"), positions, inv_freq)
    v = proj("v_proj", KV_HEADS)
    group = HEADS // KV_HEADS
    k, v = jnp.repeat(k, group, axis=-2), jnp.repeat(v, group, axis=-2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * HEAD_DIM ** -0.5
    seq = x.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -jnp.inf)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(*x.shape[:-1], -1)
    return out @ t[ATTN + "o_proj.weight"].T + t[ATTN + "o_proj.bias"]


def test_fused_attention_and_mlp_equal_the_separate_projections(tmp_path):
    folder, t = hf_folder(QWEN3, tmp_path, seed=1)
    layer = load_hf_target(folder, dtype="float32").layers[0]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, HIDDEN)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    ours = layer.self_attn(x, positions, DenseCausal(positions), 0)
    np.testing.assert_allclose(ours, reference_attention(t, x, positions), rtol=2e-5, atol=2e-5)
    gate, up, down = (t[MLP + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    np.testing.assert_allclose(layer.mlp(x), (jax.nn.silu(x @ gate.T) * (x @ up.T)) @ down.T, rtol=2e-5, atol=2e-5)


def test_query_heads_keep_hf_order(tmp_path):
    """Query head h reads KV head h // G: every output channel of every head gets its own value."""
    channels = np.arange(HEAD_DIM, dtype=np.float32)

    def by_head(base, heads):  # [heads·D, HIDDEN]: only input 0 feeds, channel (h, d) gets base + 100h + d
        weight = np.zeros((heads * HEAD_DIM, HIDDEN), np.float32)
        weight[:, 0] = (base + 100 * np.arange(heads)[:, None] + channels).reshape(-1)
        return weight

    def replace(tensors):
        tensors |= {ATTN + "q_proj.weight": by_head(0, HEADS), ATTN + "k_proj.weight": by_head(1000, KV_HEADS),
                    ATTN + "v_proj.weight": by_head(2000, KV_HEADS)}

    folder, _ = hf_folder(LLAMA, tmp_path, seed=3, replace=replace)
    attn = load_hf_target(folder, dtype="float32").layers[0].self_attn
    seen = {}

    def record(layer, q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v)
        return q

    x = jnp.zeros((1, HIDDEN), jnp.float32).at[0, 0].set(1.0)
    positions = jnp.zeros((1,), jnp.int32)  # RoPE at position 0 turns nothing
    attn(x, positions, record, 0)
    heads = lambda base, n: base + 100 * np.arange(n)[:, None] + channels  # noqa: E731
    np.testing.assert_array_equal(seen["q"][0], heads(0, HEADS))
    np.testing.assert_array_equal(seen["k"][0], heads(1000, KV_HEADS))
    np.testing.assert_array_equal(seen["v"][0], heads(2000, KV_HEADS))
    k, v = attn.project_kv(x, positions)  # the drafts' context path: only the K and V slots
    np.testing.assert_array_equal(k, seen["k"])
    np.testing.assert_array_equal(v, seen["v"])
    # The kernel holds each KV head's query heads, then its K, then its V.
    kernel = np.asarray(attn.qkv_proj.kernel[...])[0]  # [KVH, G+2, D] of input 0
    np.testing.assert_array_equal(kernel[1], np.stack([heads(200, 1)[0], heads(300, 1)[0], heads(1100, 1)[0],
                                                       heads(2100, 1)[0]]))


def _weight_dots(arch, seq: int) -> dict[str, int]:
    """{parameter path: dot_general ops that consume it} in the lowered program of one decoder layer."""
    layer = abstract_target(arch, dtype="float32").layers[0]
    graphdef, state = nnx.split(randomize_params(layer, seed=4))
    positions = jnp.zeros((1, seq), jnp.int32)

    def step(state, x):
        return nnx.merge(graphdef, state)(x, positions, DenseCausal(positions), 0)

    text = jax.jit(step).lower(state, jnp.zeros((1, seq, arch.hidden_size), jnp.float32)).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    types = {".".join(map(str, path)): f"tensor<{'x'.join(map(str, var.shape))}xf32>"
             for path, var in nnx.to_flat_state(state) if path[-1] == "kernel"}
    assert len(set(types.values())) == len(types), f"weights must have distinct shapes to be told apart: {types}"
    return {path: sum(t in line for line in dots) for path, t in types.items()}


@pytest.mark.parametrize("seq", [1, 7])
def test_one_matmul_for_qkv_and_one_for_gate_up(seq):
    # seq 1: a decode step; 7: a prefill chunk. Every weight is read by exactly one dot.
    assert _weight_dots(QWEN3, seq) == {"self_attn.qkv_proj.kernel": 1, "self_attn.o_proj.kernel": 1,
                                        "mlp.gate_up_proj.kernel": 1, "mlp.down_proj.kernel": 1}


def test_gemma4_k_eq_v_layers_fuse_without_a_v_slot():
    arch = Gemma4Arch(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, global_head_dim=16, layer_types=("sliding_attention", "full_attention"),
                      attention_k_eq_v=True, num_global_kv_heads=1)
    model = abstract_target(arch, dtype="float32")
    sliding, full = (layer.self_attn.qkv_proj.kernel for layer in model.layers)
    assert sliding.shape == (32, 2, 4, 8) and full.shape == (32, 1, 5, 16)  # G + 2 and G + 1 slots
    path = ("layers", 1, "self_attn", "qkv_proj", "kernel")
    assert stored_parts(path, full) == [(("layers", 1, "self_attn", "q_proj", "kernel"), (32, 64)),
                                        (("layers", 1, "self_attn", "k_proj", "kernel"), (32, 16))]


def test_draft_load_and_export_reproduce_the_file_tensors(tmp_path):
    target = randomize_params(abstract_target(QWEN3, dtype="float32"), seed=5)
    config = DraftConfig(kind="dspark", num_layers=2, target_layer_ids=(0,), mask_token_id=63, markov_rank=8,
                         block_size=4)
    draft = randomize_params(nnx.eval_shape(lambda: create_draft(config, target)), seed=6)
    written = save_deepspec_draft(draft, target, tmp_path / "written") / "model.safetensors"
    # Fresh values in every draft tensor (the target's frozen copies stay: the loader checks them).
    rng = np.random.default_rng(7)
    tensors = {name: t if name in ("embed_tokens.weight", "lm_head.weight")
               else rng.standard_normal(t.shape).astype(np.float32) for name, t in load_file(str(written)).items()}
    assert {"layers.1.self_attn.v_proj.bias", "layers.1.mlp.up_proj.weight"} <= set(tensors)
    save_file(tensors, str(written))
    loaded = load_deepspec_draft(tmp_path / "written", target, dtype="float32")
    exported = load_file(str(save_deepspec_draft(loaded, target, tmp_path / "exported") / "model.safetensors"))
    assert sorted(exported) == sorted(tensors)
    for name, tensor in tensors.items():
        assert exported[name].dtype == tensor.dtype and exported[name].shape == tensor.shape, name
        assert exported[name].tobytes() == tensor.tobytes(), name
