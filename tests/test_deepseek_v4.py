"""DeepSeek-V4: parity with HF transformers, FP8/FP4 formats, checkpoints, incremental decoding, sizes."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from dspark_jax.checkpoint.deepseek_v4 import (arch_from_config, arch_to_config, canonical_name, dequantize_fp4_np,
                                               dequantize_fp8_np, load_v4_target, save_v4_checkpoint, v4_tensors)
from dspark_jax.checkpoint.hf import CheckpointError, TensorSource, load_hf_target
from dspark_jax.config import ConfigError, DeepseekV4Arch, load_config
from dspark_jax.models import create_target, forward, split_static
from dspark_jax.models.deepseek_v4 import v4_layout, v4_step
from dspark_jax.models.moe import Experts, clamped_swiglu
from dspark_jax.models.quant import Buffer, dequantize_fp4, dequantize_fp8
from dspark_jax.serve import dry_run, main
from conftest import randomize_params

TINY = load_config("v4_tiny.py").target.arch
# HF transformers has no DSpark blocks and builds dense weights.
DENSE = dataclasses.replace(TINY, weight_format="dense", dspark_block_size=0, dspark_noise_token_id=-1,
                            dspark_target_layer_ids=(), dspark_markov_rank=0)
SEQ = 48  # 6 sliding windows, 12 CSA entries (the indexer keeps 5), 6 HCA entries
HIDDEN_LAYERS = (1, 2, 4)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def random_model(arch: DeepseekV4Arch, seed: int):
    """Random parameters, and random quantized codes, scales and routing tables (never constant)."""
    model = randomize_params(create_target(arch, dtype="float32", seed=seed), seed)
    rng = np.random.default_rng(seed + 100)
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, Buffer):
            shape = var.shape
            if path[-1] == "scale":  # powers of two around 1/64
                value = rng.integers(118, 128, shape).astype(np.uint8)
            elif var.dtype == jnp.float8_e4m3fn:  # every finite e4m3 code (0x7f and 0xff are NaN)
                value = (rng.integers(0, 127, shape) | (rng.integers(0, 2, shape) << 7)).astype(np.uint8)
                value = value.view(ml_dtypes.float8_e4m3fn)
            elif var.dtype == jnp.uint8:
                value = rng.integers(0, 256, shape).astype(np.uint8)
            else:  # tid2eid: distinct experts per token
                value = np.argsort(rng.random((shape[0], arch.n_routed_experts)), axis=1)[:, :shape[1]]
            var = var.replace(jnp.asarray(value, var.dtype))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# --------------------------------------------------------------------------------------------
# parity with HF transformers


@pytest.mark.oracle
def test_logits_and_hidden_match_hf(oracle, tmp_path):
    """fp32 within 1e-4 of HF; bf16 no more than 2x further from HF-fp32 than HF's own bf16; the same
    weights under the official names (sharded) give the same logits as HF's save_pretrained names."""
    config = {k: v for k, v in arch_to_config(DENSE).items() if k not in ("model_type", "architectures")}
    inputs = np.random.default_rng(0).integers(0, DENSE.vocab_size, (2, SEQ)).tolist()
    ref = oracle("hf_models.py", {
        "model_type": "deepseek_v4", "config": config, "seed": 0, "model_dir": str(tmp_path / "hf"),
        "out": str(tmp_path / "out.npz"), "inputs": inputs, "hidden_layers": list(HIDDEN_LAYERS),
        "dtypes": ["float32", "bfloat16"], "int_buffers": {"tid2eid": DENSE.n_routed_experts}})
    names = TensorSource(tmp_path / "hf").names()
    assert "model.layers.0.attn.norm.weight" in names and "model.hc_head.hc_fn" in names  # HF's spelling
    errors = {}
    for dtype in ("float32", "bfloat16"):
        model = load_hf_target(tmp_path / "hf", dtype=dtype)
        assert model.arch == DENSE  # our config.json, through HF's spelling and back
        logits, hidden = forward(model, inputs, layers=HIDDEN_LAYERS)
        errors[dtype] = {"logits": rel_err(logits, ref["logits_float32"])}
        errors[dtype].update({layer: rel_err(np.asarray(hidden[layer], np.float32).reshape(2, SEQ, TINY.hc_mult, -1),
                                             ref[f"hidden_{layer}_float32"]) for layer in HIDDEN_LAYERS})
        if dtype == "float32":
            official = load_v4_target(save_v4_checkpoint(model, tmp_path / "official", shards=3), dtype=dtype)
            np.testing.assert_array_equal(forward(official, inputs)[0], logits)
    hf_bf16 = {"logits": rel_err(ref["logits_bfloat16"], ref["logits_float32"])}
    hf_bf16.update({layer: rel_err(ref[f"hidden_{layer}_bfloat16"], ref[f"hidden_{layer}_float32"])
                    for layer in HIDDEN_LAYERS})
    for key in hf_bf16:
        assert errors["float32"][key] <= 1e-4, (key, errors)
        assert errors["bfloat16"][key] <= 2 * hf_bf16[key], (key, errors["bfloat16"], hf_bf16)


# --------------------------------------------------------------------------------------------
# quantized formats


def test_fp8_and_fp4_dequantization_match_numpy():
    rng = np.random.default_rng(0)
    # FP8: ragged blocks on both axes (200 = 128 + 72, 300 = 2·128 + 44).
    codes = (rng.integers(0, 127, (200, 300)) | (rng.integers(0, 2, (200, 300)) << 7)).astype(np.uint8)
    codes = codes.view(ml_dtypes.float8_e4m3fn)
    scales = rng.integers(100, 150, (2, 3)).astype(np.uint8)
    ref = dequantize_fp8_np(codes, scales)
    assert ref[0, 0] == float(codes[0, 0].astype(np.float32)) * 2.0 ** (int(scales[0, 0]) - 127)
    assert ref[199, 299] == float(codes[199, 299].astype(np.float32)) * 2.0 ** (int(scales[1, 2]) - 127)
    for dtype in (jnp.float32, jnp.bfloat16):
        np.testing.assert_array_equal(np.asarray(dequantize_fp8(jnp.asarray(codes), jnp.asarray(scales), dtype),
                                                 np.float32), ref)
    # FP4: every byte value, three experts, two scale groups per row.
    packed = rng.integers(0, 256, (3, 8, 32)).astype(np.uint8)
    packed[0, 0, :16] = np.arange(0, 256, 16) + np.arange(16)  # low nibble i, high nibble i
    fp4_scales = rng.integers(110, 140, (3, 8, 2)).astype(np.uint8)
    ref = dequantize_fp4_np(packed, fp4_scales)
    e2m1 = [0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6]
    np.testing.assert_array_equal(ref[0, 0, :32:2] / 2.0 ** (int(fp4_scales[0, 0, 0]) - 127), e2m1)
    np.testing.assert_array_equal(ref[0, 0, 1:32:2] / 2.0 ** (int(fp4_scales[0, 0, 0]) - 127), e2m1)
    for dtype in (jnp.float32, jnp.bfloat16):
        np.testing.assert_array_equal(np.asarray(dequantize_fp4(jnp.asarray(packed), jnp.asarray(fp4_scales), dtype),
                                                 np.float32), ref)


def test_experts_dispatch_matches_a_per_token_loop():
    """Fewer (token, expert) pairs than experts: only the used experts are gathered; duplicates add up."""
    rngs = nnx.Rngs(0)
    experts = Experts(16, 32, 64, fp4=True, limit=1.5, dtype=jnp.float32, rngs=rngs)
    experts = random_model_like(experts, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    ids = np.array([[3, 9], [9, 9], [15, 0]], np.int32)
    weights = rng.random((3, 2)).astype(np.float32)
    out = experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights))
    w1, w2, w3 = (dequantize_fp4_np(np.asarray(m.weight[...]), np.asarray(m.scale[...]))
                  for m in (experts.w1, experts.w2, experts.w3))
    ref = np.zeros_like(x)
    for t in range(3):
        for j in range(2):
            e = ids[t, j]
            h = np.asarray(clamped_swiglu(x[t] @ w1[e].T, x[t] @ w3[e].T, 1.5))
            ref[t] += weights[t, j] * (h @ w2[e].T)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def random_model_like(module, seed: int):
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(module)
    flat = [(p, v.replace(jnp.asarray(rng.integers(118, 128, v.shape) if p[-1] == "scale"
                                      else rng.integers(0, 256, v.shape), jnp.uint8)))
            for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def test_quantized_checkpoint_round_trip(tmp_path):
    """FP8/FP4 codes and scales survive save/load as bytes (sharded, official or HF-prefixed names);
    dequantized loading gives the dense model the quantized one computes with."""
    model = random_model(TINY, seed=5)
    folder = save_v4_checkpoint(model, tmp_path / "fp8", shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"layers.1.attn.wq_a.weight", "layers.1.attn.wq_a.scale", "layers.1.ffn.experts.7.w2.weight",
            "layers.1.ffn.experts.7.w2.scale", "layers.0.ffn.gate.tid2eid", "layers.4.ffn.gate.bias",
            "layers.1.attn.indexer.compressor.ape", "mtp.0.main_proj.weight", "mtp.2.markov_head.markov_w1.weight",
            "mtp.2.confidence_head.proj.weight", "mtp.2.hc_head_fn", "hc_head_fn", "embed.weight",
            "head.weight"} <= set(index)
    source = TensorSource(folder)
    assert (source.dtype("layers.1.attn.wq_a.weight"), source.dtype("layers.1.attn.wq_a.scale")) == ("F8_E4M3",
                                                                                                     "F8_E8M0")
    assert source.shape("layers.1.ffn.experts.7.w2.weight") == (TINY.hidden_size, TINY.moe_intermediate_size // 2)
    for hf_names in (False, True):
        path = save_v4_checkpoint(model, tmp_path / f"named_{hf_names}", hf_names=hf_names) if hf_names else folder
        loaded = load_hf_target(path, dtype="float32")
        assert loaded.arch == TINY
        for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))):
            assert a.dtype == b.dtype, p
            np.testing.assert_array_equal(np.asarray(a[...]).view(np.uint8), np.asarray(b[...]).view(np.uint8),
                                          err_msg=str(p))
    dense = load_v4_target(folder, dtype="float32", dequantize=True)
    assert dense.arch.weight_format == "dense" and dense.layers[1].attn.wq_a.weight[...].dtype == jnp.float32
    np.testing.assert_array_equal(dense.layers[1].attn.wq_a.weight[...],
                                  dequantize_fp8_np(model.layers[1].attn.wq_a.weight[...],
                                                    model.layers[1].attn.wq_a.scale[...]))
    tokens = np.random.default_rng(3).integers(0, TINY.vocab_size, (1, 24))
    np.testing.assert_allclose(forward(dense, tokens)[0], forward(model, tokens)[0], rtol=1e-5, atol=1e-5)


def _write(folder, tensors: dict, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def tiny_tensors():
    model = random_model(TINY, seed=9)
    return v4_tensors(model), arch_to_config(TINY)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("layers.2.attn.wkv.scale"), r"missing: layers.2.attn.wkv.scale"),
    (lambda t: t.__setitem__("layers.2.attn.wkv.weight", np.zeros((16, 32), ml_dtypes.bfloat16)),
     r"layers.2.attn.wkv.weight: dtype BF16; expected FP8 e4m3 codes \(F8_E4M3\)"),
    (lambda t: t.__setitem__("layers.3.ffn.experts.5.w1.weight", np.zeros((32, 32), np.uint8)),
     r"layers.3.ffn.experts.5.w1.weight: shape \[32, 32\], expected \[32, 16\]"),
    (lambda t: t.__setitem__("layers.3.ffn.experts.5.w1.scale", np.zeros((32, 1), np.float32)),
     r"layers.3.ffn.experts.5.w1.scale: dtype F32; expected e8m0 scales"),
    (lambda t: t.__setitem__("layers.9.attn.wq_a.weight", np.zeros((2, 2), np.float32)),
     r"unexpected tensors \(1\): \['layers.9.attn.wq_a.weight'\]"),
    (lambda t: t.__setitem__("layers.0.ffn.gate.tid2eid", np.full((96, 2), 8, np.int64)),
     r"layers.0.ffn.gate.tid2eid: expert ids outside \[0, 8\)"),
    (lambda t: t.__setitem__("model.embed_tokens.weight", t["embed.weight"]), r"names collide"),
])
def test_checkpoint_mismatches_are_named(edit, message, tiny_tensors, tmp_path):
    tensors, config = dict(tiny_tensors[0]), tiny_tensors[1]
    edit(tensors)
    with pytest.raises(CheckpointError, match=message):
        load_hf_target(_write(tmp_path / "ckpt", tensors, config))


def test_base_checkpoint_mtp_is_skipped_and_shards_are_checked(tiny_tensors, tmp_path):
    tensors, config = tiny_tensors
    base = {k: v for k, v in config.items() if not k.startswith("dspark_")}
    model = load_hf_target(_write(tmp_path / "base", dict(tensors), base))  # mtp.* present, not used
    assert model.arch.num_mtp_layers == 0 and len(model.mtp) == 0
    folder = save_v4_checkpoint(model, tmp_path / "sharded", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="the index names model-00002-of-00002.safetensors, which is missing"):
        load_hf_target(folder)


def test_hf_spellings_fold_to_official_names():
    assert canonical_name("model.layers.3.attn.norm.weight") == "layers.3.attn.kv_norm.weight"
    assert canonical_name("model.layers.3.attn.compressor.norm.weight") == "layers.3.attn.compressor.norm.weight"
    assert canonical_name("model.embed_tokens.weight") == "embed.weight"
    assert canonical_name("model.hc_head.hc_scale") == "hc_head_scale"
    assert canonical_name("layers.3.ffn.experts.0.w1.scale") == "layers.3.ffn.experts.0.w1.scale"


# --------------------------------------------------------------------------------------------
# incremental decoding


def test_incremental_steps_match_the_full_forward():
    """Three requests of different lengths in one flat batch, fed in random chunks (prefill pieces,
    single tokens, verification chunks whose trailing tokens are rejected and rolled back): every
    committed position's logits equal the full forward's. One compiled step serves every call."""
    model = random_model(DENSE, seed=3)
    rng = np.random.default_rng(1)
    lengths = [45, 30, 20]
    seqs = [rng.integers(0, TINY.vocab_size, n) for n in lengths]
    padded = np.zeros((3, max(lengths)), np.int32)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    ref = np.asarray(forward(model, padded)[0])  # causal: the padding never reaches earlier positions
    graph, params = split_static(model)
    rollback = 3
    state = model.init_state(4, 64, rollback=rollback)
    rows = np.array([2, 0, 3])  # state rows need not follow request order; row 1 stays empty
    pos, got, steps = [0, 0, 0], [{} for _ in lengths], 0
    while any(p < n for p, n in zip(pos, lengths)):
        chunks, rejected = [], []
        for r in range(3):
            n = min(lengths[r] - pos[r], int(rng.choice([0, 1, 1, 2, 3, 5, 9, 12])))
            junk = int(rng.integers(0, rollback + 1)) if n else 0
            chunks.append(np.concatenate([seqs[r][pos[r]:pos[r] + n], rng.integers(0, TINY.vocab_size, junk)]))
            rejected.append(junk)
        tokens = np.zeros(48, np.int32)
        flat = np.concatenate(chunks)
        tokens[:len(flat)] = flat
        q_lens = np.array([len(c) for c in chunks])
        layout = v4_layout(np.array(pos), q_lens, rows, num_tokens=48, max_q_len=16, max_len=64)
        logits, state, _ = v4_step(graph, params, state, jnp.asarray(tokens), layout)
        logits, offset, steps = np.asarray(logits), 0, steps + 1
        for r in range(3):
            for k in range(q_lens[r] - rejected[r]):
                got[r][pos[r] + k] = logits[offset + k]
            offset += q_lens[r]
            pos[r] += q_lens[r] - rejected[r]
    assert steps >= 5
    for r in range(3):
        assert sorted(got[r]) == list(range(lengths[r]))
        np.testing.assert_allclose(np.stack([got[r][p] for p in range(lengths[r])]), ref[r, :lengths[r]],
                                   rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# configuration and sizes


def test_official_config_round_trip_and_errors():
    for name in ("v4_flash.py", "v4_pro.py", "v4_tiny.py"):
        arch = load_config(name).target.arch
        assert arch_from_config(arch_to_config(arch)) == arch
    cfg = arch_to_config(load_config("v4_flash.py").target.arch)
    assert cfg["compress_ratios"][:4] == [0, 0, 4, 128] and cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    for key, value, message in [
        ("scoring_func", "softmax", r"scoring_func='softmax'; DeepSeek-V4 support expects 'sqrtsoftplus'"),
        ("compress_ratios", [0, 4, 64], r"compress_ratios holds \[64\]; expected 0, 4 \(CSA\) or 128 \(HCA\)"),
        ("mlp_layer_types", ["moe", "hash_moe"], r"mlp_layer_types=\['moe', 'hash_moe'\]"),
        ("expert_dtype", "fp8", r"quantization_config.expert_dtype='fp8'; supported: 'fp4'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            arch_from_config({**cfg, key: value})
    with pytest.raises(ConfigError, match=r"DeepseekV4Arch.o_groups = 3; expected a divisor of num_heads=64"):
        dataclasses.replace(load_config("v4_flash.py").target.arch, o_groups=3)
    with pytest.raises(ConfigError, match=r"DeepseekV4Arch.moe_intermediate_size = 48; expected a multiple of 32"):
        dataclasses.replace(TINY, moe_intermediate_size=48)


@pytest.mark.parametrize("name, total, active", [("v4_flash.py", 284e9, 13e9), ("v4_pro.py", 1.6e12, 49e9)])
def test_dry_run_sizes(name, total, active):
    sizes = dry_run(load_config(name), devices=8, batch=16, context=65536, device_memory_gib=80)
    tolerance = 0.02 if name == "v4_flash.py" else 0.03
    assert abs(sizes["params_total"] / total - 1) <= tolerance, sizes
    assert abs(sizes["params_active"] / active - 1) <= 0.10, sizes
    # FP8 linears and FP4 experts: ~0.55 bytes per parameter (Flash ≈ 160 GB, Pro DSpark ≈ 893 GB with its draft).
    assert 0.5 < sizes["weight_bytes"] / sizes["params_total"] < 0.6
    # Compressed entries only: (512 + 128) / 4 per CSA layer and 512 / 128 per HCA layer, bf16.
    arch = load_config(name).target.arch
    csa = arch.layer_types.count("compressed_sparse_attention")
    hca = arch.layer_types.count("heavily_compressed_attention")
    assert sizes["kv_bytes_per_token"] == round(2 * (csa * 640 / 4 + hca * 512 / 128))
    assert sizes["params_draft"] > 0 and sizes["bytes_per_device"] * 8 >= sizes["weight_bytes"]


def test_dry_run_cli_prints_one_json_line(capsys):
    # The tiny model's FP8 block scales are too few to split over "tensor": its two devices hold experts.
    assert main(["--config", "v4_tiny.py", "--dry-run", "--devices", "2", "--batch", "3", "--context", "100",
                 "--set", "serve.mesh=1,1,2"]) == 0
    sizes = json.loads(capsys.readouterr().out.strip())
    assert {"params_total", "params_active", "weight_bytes", "kv_bytes_per_token", "bytes_per_device",
            "fits"} <= set(sizes) and sizes["fits"] is True and sizes["batch"] == 3
    assert main(["--config", "v4_tiny.py", "--dry-run", "--devices", "0"]) == 2
    assert "--devices=0; expected >= 1" in capsys.readouterr().err


def test_serve_prompt_refuses_a_target_that_does_not_fit_before_loading_it(capsys):
    from dspark_jax.serve import device_memory_gib

    cfg = load_config("v4_flash.py")
    if dry_run(cfg, devices=jax.device_count(), batch=1, context=131, device_memory_gib=device_memory_gib())["fits"]:
        pytest.skip("this machine's devices hold DeepSeek-V4-Flash")
    assert main(["--config", "v4_flash.py", "--prompt", "1 2 3"]) == 2
    assert "the target does not fit: 145.3 GiB of weights" in capsys.readouterr().err


def test_serve_prompt_runs_v4_on_token_ids(capsys):
    """A random-weight V4 has no tokenizer: the prompt and the completion are token ids."""
    assert main(["--config", "v4_tiny.py", "--prompt", "5 17 3", "--set", "draft.kind=none",
                 "--set", "serve.max_new_tokens=4"]) == 0
    completion, stats = capsys.readouterr().out.strip().splitlines()[-2:]
    ids = [int(t) for t in completion.split()]
    assert 1 <= len(ids) <= 4 and all(0 <= t < TINY.vocab_size for t in ids)
    assert json.loads(stats)["new_tokens"] == len(ids)
    assert main(["--config", "v4_tiny.py", "--prompt", "hi"]) == 2
    assert "give token ids separated by spaces" in capsys.readouterr().err
