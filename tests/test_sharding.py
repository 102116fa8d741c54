"""Sharding: meshes from the config, partition rules, placement, loading onto a mesh, the dry run's
per-device bytes, and sharded execution equal to one device's.

Sharded execution runs in one subprocess with 8 virtual CPU devices (this process stays on one):
greedy speculative generation of a tiny Qwen3-style target with a DSpark draft on 1×8 (tensor)
and 2×4 (data × tensor) meshes, a tiny DeepSeek-V4 stack through `v4_step` with its 8 experts
split 8 ways and its heads 2 ways, the Pallas attention kernels per shard in interpret mode, and
checkpoints read straight into their shards. Every comparison is against the same computation on
one device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from dspark_jax import sharding
from dspark_jax.config import ConfigError, Gemma4Arch, LlamaArch, ServeConfig, load_config, override
from dspark_jax.models import abstract_target
from dspark_jax.serve import dry_run, main

# Heads and KV heads divide 8 (GQA 2), so every mesh below splits them.
ARCH = LlamaArch(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=16, num_kv_heads=8,
                 head_dim=8, qk_norm=True, tie_word_embeddings=False, model_type="qwen3", eos_token_ids=(),
                 max_position_embeddings=256)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [40, 41]]
NEW_TOKENS = 10


# --------------------------------------------------------------------------------------------
# what runs on 8 virtual devices (imported by the subprocess)


def _tiny_pair():
    """The tiny target and a DSpark draft for it, random (built from shapes: no initialiser compiles)."""
    from conftest import randomize_params
    from dspark_jax.config import DraftConfig
    from dspark_jax.drafts import create_draft

    target = randomize_params(abstract_target(ARCH, dtype="float32"), seed=3)
    draft_cfg = DraftConfig(kind="dspark", num_layers=1, target_layer_ids=(0,), mask_token_id=ARCH.vocab_size - 1,
                            markov_rank=16, block_size=4)
    return target, randomize_params(nnx.eval_shape(lambda: create_draft(draft_cfg, target)), seed=4)


def _specs(tree) -> dict[str, str]:
    return {".".join(map(str, path)): str(var.get_value().sharding.spec)
            for path, var in nnx.to_flat_state(nnx.state(tree))}


def _generation(out: dict):
    import dspark_jax as dj

    def run(target, draft):
        # One page per request holds every position: one page-table bucket, one compiled round.
        res = dj.generate(target, draft, PROMPTS, max_new_tokens=NEW_TOKENS, spec=dj.SpecParams(block_size=4),
                          page_size=64)
        return dict(tokens=res.tokens, acceptance=res.stats.acceptance_length)

    out["generate"] = {"single": run(*_tiny_pair())}
    for assignment in ("serve.mesh=1,8,1", "serve.mesh=2,4,1"):
        cfg = override(load_config("smollm2_dspark.py"), assignment)
        mesh = sharding.make_mesh(cfg.serve.mesh)
        target, draft = _tiny_pair()
        sharding.place_model(target, mesh)
        draft = sharding.place_model(draft, mesh)
        result = run(target, draft)
        result["mesh_found"] = dict(sharding.model_mesh(target).shape)
        if assignment.endswith("1,8,1"):
            result["target_specs"] = _specs(target)
            result["draft_specs"] = _specs(draft)
            cache = draft.init_state(rows=2, num_pages=4, page_size=16, dtype=jnp.float32).caches[0][0]
            result["draft_cache"] = [str(cache.sharding.spec), list(cache.addressable_shards[0].data.shape)]
        out["generate"][assignment] = result


def _kernels_per_shard(out: dict):
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    from dspark_jax import kernels
    from dspark_jax.cache import init_kv_caches
    from pallas_kernels import draft_block_attention as dba
    from pallas_kernels import ragged_paged_attention as rpa

    # JAX 0.11.2's GPU interpreter runs one kernel on all devices together, but checks that no
    # barrier is left allocated — on every device — before they meet at its clean-up barrier, so a
    # device that finishes first sees the others' live barriers. That self-check is skipped here;
    # the clean-up still frees everything, and the outputs are compared with the references.
    gpu_callbacks._assert_no_barriers_allocated = lambda token: token

    mesh = sharding.make_mesh((2, 4, 1))
    put = lambda x, *names: jax.device_put(x, jax.sharding.NamedSharding(mesh, sharding.spec(names)))  # noqa: E731
    errors = {}
    (q, k_pages, v_pages, table, kv_lens, cu, sinks), _ = rpa._inputs(
        jax.random.key(1), [3, 1, 6], [20, 0, 40], heads=8, kv_heads=4, head_dim=64, dtype=jnp.float32, sinks=True)
    new_k, new_v = (jax.random.normal(jax.random.key(i), (int(cu[-1]), 4, 64)) for i in (2, 3))
    slots = jnp.asarray(np.random.default_rng(0).permutation(k_pages.shape[0] * k_pages.shape[1])[:int(cu[-1])],
                        jnp.int32)
    kw = dict(max_q_len=6, scale=0.125, sliding_window=None)

    def step(q, k_pages, v_pages, new_k, new_v, sinks):
        k_pages, v_pages = kernels.write_kv(k_pages, v_pages, new_k, new_v, slots)
        return kernels.ragged_paged_attention(q, k_pages, v_pages, table, kv_lens, cu, sinks=sinks, **kw), k_pages

    with kernels.use("xla"):
        want_out, want_pages = jax.jit(step)(q, k_pages, v_pages, new_k, new_v, sinks)
    with kernels.use("interpret"):
        got_out, got_pages = jax.jit(step)(put(q, None, "heads", None), put(k_pages, *sharding.KV_PAGES),
                                           put(v_pages, *sharding.KV_PAGES), put(new_k, None, "kv_heads", None),
                                           put(new_v, None, "kv_heads", None), put(sinks, "heads"))
    errors["ragged_paged_attention"] = float(jnp.max(jnp.abs(got_out - want_out)))
    errors["write_kv"] = float(jnp.max(jnp.abs(got_pages - want_pages)))
    out["pages_spec"] = str(got_pages.sharding.spec)

    args = dba._inputs(jax.random.key(4), 5, [30, 0, 17], heads=8, kv_heads=4, head_dim=64, dtype=jnp.float32)
    specs = [(None, None, "heads", None), (None, None, "kv_heads", None), (None, None, "kv_heads", None),
             sharding.KV_PAGES, sharding.KV_PAGES, (), ()]
    block = lambda *a: kernels.draft_block_attention(*a, scale=0.125, sliding_window=None)  # noqa: E731
    with kernels.use("xla"):
        want = jax.jit(block)(*args)
    with kernels.use("interpret"):
        got = jax.jit(block)(*(put(a, *s) for a, s in zip(args, specs)))
    errors["draft_block_attention"] = float(jnp.max(jnp.abs(got - want)))
    out["kernel_errors"] = errors
    pages = init_kv_caches([(8, 16), (4, 32)], num_pages=6, page_size=16, dtype=jnp.bfloat16, mesh=mesh)
    out["cache"] = [[str(k.sharding.spec), list(k.addressable_shards[0].data.shape), len(k.sharding.device_set)]
                    for k, _ in pages]


def _v4_greedy(model, prompts, steps):
    """Greedy continuations of a batch through `v4_step`: one prefill chunk, then one token per row."""
    from dspark_jax.models import split_static
    from dspark_jax.models.deepseek_v4 import v4_layout, v4_step

    graph, params = split_static(model)
    rows, width = len(prompts), 16  # one token budget for prefill and decode: one compiled step
    state = model.init_state(rows, 64)
    tokens = np.zeros(width, np.int32)
    flat = np.concatenate(prompts)
    tokens[:len(flat)] = flat
    q_lens = np.array([len(p) for p in prompts])
    start, picks = np.zeros(rows, np.int32), np.cumsum(q_lens) - 1
    generated = []
    for _ in range(steps):
        layout = v4_layout(start, q_lens, np.arange(rows), num_tokens=width, max_q_len=8, max_len=64)
        logits, state, _ = v4_step(graph, params, state, jnp.asarray(tokens), layout)
        nxt = np.asarray(jnp.argmax(logits, axis=-1))[picks]
        generated.append(nxt.tolist())
        start, q_lens, picks = start + q_lens, np.ones(rows, np.int32), np.arange(rows)
        tokens = np.zeros(width, np.int32)
        tokens[:rows] = nxt
    return np.asarray(generated).T.tolist(), state


def _deepseek_v4(out: dict):
    from test_deepseek_v4 import TINY, random_model

    S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
    # One layer of each kind, hash-routed then learned MoE; dense weights: the tiny model's FP8 block
    # scales (one block per matrix) could not be split over "tensor".
    arch = dataclasses.replace(TINY, num_layers=3, layer_types=(S, C, H), num_hash_layers=1, weight_format="dense",
                               dspark_block_size=0, dspark_noise_token_id=-1, dspark_target_layer_ids=(),
                               dspark_markov_rank=0)
    prompts = [np.arange(1, 9, dtype=np.int32), np.arange(30, 36, dtype=np.int32)]
    single, _ = _v4_greedy(random_model(arch, seed=5), prompts, 6)
    mesh = sharding.make_mesh((1, 2, 4))
    model = sharding.place_model(random_model(arch, seed=5), mesh)
    sharded, state = _v4_greedy(model, prompts, 6)
    out["v4"] = dict(single=single, sharded=sharded, state_spec=str(state.layers[1].comp.sharding.spec),
                     state_devices=len(state.layers[1].comp.sharding.device_set),
                     experts=str(model.layers[2].ffn.experts.w1.weight[...].sharding.spec),
                     wq_b=str(model.layers[0].attn.wq_b.weight[...].sharding.spec),
                     wo_a=str(model.layers[0].attn.wo_a.weight[...].sharding.spec),
                     indexer=str(model.layers[1].attn.indexer.wq_b.weight[...].sharding.spec))


def _loading(out: dict, folder: str):
    from conftest import randomize_params
    from dspark_jax.checkpoint.deepseek_v4 import load_v4_target, save_v4_checkpoint
    from dspark_jax.checkpoint.hf import save_hf_target
    from dspark_jax.config import TargetConfig
    from dspark_jax.loading import load_target
    from dspark_jax.models import create_target
    from test_deepseek_v4 import TINY, random_model

    mesh = sharding.make_mesh((2, 4, 1))

    def same(model, loaded) -> bool:
        return all(np.array_equal(np.asarray(a[...]).view(np.uint8), np.asarray(b[...]).view(np.uint8))
                   for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))))

    model = randomize_params(create_target(ARCH, dtype="float32"), seed=8)
    loaded = load_target(save_hf_target(model, os.path.join(folder, "llama")), dtype="float32", mesh=mesh)
    kernel = loaded.layers[1].mlp.down_proj.kernel[...]
    qkv, gate_up = loaded.layers[1].self_attn.qkv_proj.kernel[...], loaded.layers[1].mlp.gate_up_proj.kernel[...]
    out["hf"] = dict(equal=same(model, loaded), down_spec=str(kernel.sharding.spec),
                     down_block=list(kernel.addressable_shards[0].data.shape),
                     qkv_spec=str(qkv.sharding.spec), qkv_block=list(qkv.addressable_shards[0].data.shape),
                     gate_up_spec=str(gate_up.sharding.spec),
                     gate_up_block=list(gate_up.addressable_shards[0].data.shape))
    # Random weights initialised in their shards: the same values as one device's jitted initialisation
    # (and within rounding of the eager one, whose normal transform XLA fuses differently).
    placed = load_target(TargetConfig(arch=ARCH, dtype="float32", seed=2), mesh=mesh)
    create = functools.partial(create_target, ARCH, dtype="float32", seed=2)
    jitted = nnx.merge(nnx.graphdef(abstract_target(ARCH, dtype="float32")), jax.jit(lambda: nnx.state(create()))())
    eager_error = max(float(np.max(np.abs(np.asarray(a[...]) - np.asarray(b[...])))) for (_, a), (_, b) in
                      zip(nnx.to_flat_state(nnx.state(create())), nnx.to_flat_state(nnx.state(placed))))
    out["random"] = dict(equal=same(jitted, placed), eager_error=eager_error,
                         embed_spec=str(placed.embed_tokens.embedding[...].sharding.spec))
    v4 = random_model(TINY, seed=6)
    expert_mesh = sharding.make_mesh((1, 1, 8))
    loaded = load_v4_target(save_v4_checkpoint(v4, os.path.join(folder, "v4"), shards=2), dtype="float32",
                            mesh=expert_mesh)
    codes = loaded.layers[3].ffn.experts.w2.weight[...]
    out["v4_checkpoint"] = dict(equal=same(v4, loaded), codes_spec=str(codes.sharding.spec),
                                codes_block=list(codes.addressable_shards[0].data.shape))


def worker(folder: str) -> None:
    """Run every sharded check on 8 virtual devices and print one JSON line."""
    assert jax.device_count() == 8
    jax.config.update("jax_default_matmul_precision", "highest")
    out: dict = {}
    for check in (_generation, _kernels_per_shard, _deepseek_v4, functools.partial(_loading, folder=folder)):
        start, cpu = time.perf_counter(), time.process_time()
        check(out)
        print(f"{getattr(check, '__name__', 'loading')}: {time.perf_counter() - start:.1f} s "
              f"({time.process_time() - cpu:.1f} s CPU)", file=sys.stderr)
    print(json.dumps(out))


def run_on_8_devices(call: str, *args: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", call, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def on_8_devices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    return run_on_8_devices("import sys, test_sharding; test_sharding.worker(sys.argv[1])", str(folder))


# --------------------------------------------------------------------------------------------
# sharded execution (8 virtual devices)


def test_greedy_generation_on_meshes_equals_one_device(on_8_devices):
    runs = on_8_devices["generate"]
    single = runs["single"]
    assert all(len(t) == NEW_TOKENS for t in single["tokens"])
    for assignment in ("serve.mesh=1,8,1", "serve.mesh=2,4,1"):
        assert runs[assignment]["tokens"] == single["tokens"], assignment
        assert runs[assignment]["acceptance"] == pytest.approx(single["acceptance"])
    assert runs["serve.mesh=1,8,1"]["mesh_found"] == {"data": 1, "tensor": 8, "expert": 1}
    assert runs["serve.mesh=2,4,1"]["mesh_found"] == {"data": 2, "tensor": 4, "expert": 1}


def test_parameters_and_caches_are_split_as_the_rules_say(on_8_devices):
    run = on_8_devices["generate"]["serve.mesh=1,8,1"]
    target, draft = run["target_specs"], run["draft_specs"]
    attn, mlp = "layers.0.self_attn", "layers.1.mlp"
    expected = {
        # q/k/v [in, KVH, G+2, D] split by KV head; gate/up [in, 2, intermediate] by columns.
        f"{attn}.qkv_proj.kernel": "P(None, 'tensor', None, None)", f"{attn}.o_proj.kernel": "P('tensor', None)",
        f"{attn}.q_norm.weight": "P()", f"{mlp}.gate_up_proj.kernel": "P(None, None, 'tensor')",
        f"{mlp}.down_proj.kernel": "P('tensor', None)",
        "embed_tokens.embedding": "P('tensor', None)", "lm_head.kernel": "P(None, 'tensor')", "norm.weight": "P()",
        "layers.0.input_layernorm.weight": "P()",
    }
    assert {k: target[k] for k in expected} == expected
    assert draft["markov_head.markov_w1.embedding"] == "P('tensor', None)"
    assert draft["markov_head.markov_w2.kernel"] == "P(None, 'tensor')"
    assert draft["fc.kernel"] == "P(None, None)" and draft["layers.0.self_attn.qkv_proj.kernel"] == "P(None, 'tensor', None, None)"
    # The draft's context cache: 8 KV heads, one per device.
    assert run["draft_cache"] == ["P(None, None, 'tensor', None)", [4, 16, 1, 8]]


def test_kernels_run_per_shard_in_interpret_mode(on_8_devices):
    for name, error in on_8_devices["kernel_errors"].items():
        assert error < 1e-5, name
    assert on_8_devices["pages_spec"] == "P(None, None, 'tensor')"  # written in place, never gathered
    # init_kv_caches(mesh=...): pages created in their shards, split by KV head over "tensor" (4).
    assert on_8_devices["cache"] == [["P(None, None, 'tensor', None)", [6, 16, 2, 16], 8],
                                     ["P(None, None, 'tensor', None)", [6, 16, 1, 32], 8]]


def test_deepseek_v4_experts_and_heads_split_equal_one_device(on_8_devices):
    v4 = on_8_devices["v4"]
    assert v4["sharded"] == v4["single"]
    assert v4["experts"] == "P(('expert', 'tensor'), None, None)"  # 8 experts, one per device
    assert v4["wq_b"] == "P('tensor', None)" and v4["indexer"] == "P('tensor', None)"
    assert v4["wo_a"] == "P('tensor', None)"
    assert v4["state_spec"] == "P()" and v4["state_devices"] == 8  # one K=V head: replicated on the mesh


def test_checkpoints_load_straight_into_their_shards(on_8_devices):
    hf, random, v4 = on_8_devices["hf"], on_8_devices["random"], on_8_devices["v4_checkpoint"]
    assert hf["equal"] and hf["down_spec"] == "P('tensor', None)" and hf["down_block"] == [16, 32]
    # Fused parameters joined from q/k/v and gate/up tensors block by block: 2 of 8 KV heads (with their
    # 2 query heads each) and 16 of 64 MLP columns per tensor device.
    assert hf["qkv_spec"] == "P(None, 'tensor', None, None)" and hf["qkv_block"] == [32, 2, 4, 8]
    assert hf["gate_up_spec"] == "P(None, None, 'tensor')" and hf["gate_up_block"] == [32, 2, 16]
    assert random["equal"] and random["eager_error"] < 1e-7 and random["embed_spec"] == "P('tensor', None)"
    # FP4 codes of w2 [8 experts, 32, 16 bytes]: one expert per device, read from the checkpoint bytes.
    assert v4["equal"] and v4["codes_spec"] == "P(('expert', 'tensor'), None, None)"
    assert v4["codes_block"] == [1, 32, 16]


# --------------------------------------------------------------------------------------------
# meshes, rules and sizes (this process, abstract meshes)


def test_mesh_from_config_and_devices():
    assert sharding.mesh_shape((), 8) == (1, 8, 1)
    assert sharding.mesh_shape((2, 4, 1), 8) == (2, 4, 1)
    assert override(load_config("smollm2_dspark.py"), "serve.mesh=2,4,1").serve.mesh == (2, 4, 1)
    with pytest.raises(ConfigError, match=r"serve.mesh = \(2, 4, 2\) spans 16 devices .*; 8 devices are used"):
        sharding.mesh_shape((2, 4, 2), 8)
    with pytest.raises(ConfigError, match=r"ServeConfig.mesh = \(2, 4\); expected \(\) or three sizes >= 1"):
        ServeConfig(mesh=(2, 4))
    mesh = sharding.make_mesh()  # this process: one device
    assert dict(mesh.shape) == {"data": 1, "tensor": 1, "expert": 1}


def test_a_mesh_that_does_not_divide_the_model_is_refused():
    heads9 = abstract_target(dataclasses.replace(ARCH, num_heads=9, num_kv_heads=3))
    with pytest.raises(ConfigError, match=r"mesh axis 'tensor' \(size 2\) does not divide LlamaArch.num_heads=9"):
        sharding.check_divisible(heads9, sharding.abstract_mesh((1, 2, 1), 2))
    kv2 = abstract_target(dataclasses.replace(ARCH, num_heads=8, num_kv_heads=2))
    with pytest.raises(ConfigError, match=r"mesh axis 'tensor' \(size 4\) does not divide LlamaArch.num_kv_heads=2"):
        sharding.check_divisible(kv2, sharding.abstract_mesh((), 4))
    vocab = abstract_target(dataclasses.replace(ARCH, vocab_size=66))
    with pytest.raises(ConfigError, match=r"does not divide embed_tokens.embedding's 'vocab' dimension of 66"):
        sharding.check_divisible(vocab, sharding.abstract_mesh((2, 4, 1), 8))
    gemma = abstract_target(Gemma4Arch(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                       num_heads=4, num_kv_heads=4, head_dim=16, global_head_dim=16,
                                       layer_types=("sliding_attention", "full_attention"), attention_k_eq_v=True,
                                       num_global_kv_heads=1))
    sharding.check_divisible(gemma, sharding.abstract_mesh((1, 1, 4), 4))  # nothing split over 4 "tensor"
    with pytest.raises(ConfigError, match=r"does not divide Gemma4Arch.num_global_kv_heads=1"):
        sharding.check_divisible(gemma, sharding.abstract_mesh((), 2))
    # The tiny V4's FP8 block scales (one per matrix) cannot be split; its experts can.
    assert main(["--config", "v4_tiny.py", "--dry-run", "--devices", "2"]) == 2
    assert main(["--config", "v4_tiny.py", "--dry-run", "--devices", "8", "--set", "serve.mesh=1,1,8"]) == 0
    assert main(["--config", "v4_tiny.py", "--dry-run", "--devices", "16", "--set", "serve.mesh=1,1,16"]) == 2


def test_dry_run_reports_bytes_from_the_real_partitioning(capsys):
    """Per-device bytes are each array's own block: split matrices by 8, norms whole (not total / 8)."""
    cfg = load_config("qwen3_4b.py")
    sizes = dry_run(cfg, devices=8, batch=4, context=1024, device_memory_gib=80)
    model = abstract_target(cfg.target.arch, dtype=cfg.target.dtype)
    split = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head")
    expected = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        nbytes = var.size * var.dtype.itemsize
        expected += nbytes // 8 if any(str(p) in split for p in path) else nbytes
    assert sizes["weight_bytes_per_device"] == expected
    assert sizes["weight_bytes_per_device"] > sizes["weight_bytes"] // 8  # the norms are not split
    assert sizes["state_bytes_per_device"] == 4 * 1024 * sizes["kv_bytes_per_token"] // 8  # 8 KV heads, 1 each
    assert sizes["bytes_per_device"] == sizes["weight_bytes_per_device"] + sizes["state_bytes_per_device"]
    assert sizes["mesh"] == {"data": 1, "tensor": 8, "expert": 1}
    replicas = dry_run(override(cfg, "serve.mesh=2,4,1"), devices=8, batch=4, context=1024, device_memory_gib=80)
    assert replicas["weight_bytes_per_device"] > sizes["weight_bytes_per_device"]  # data replicas hold copies
    assert main(["--config", "smollm2_dspark.py", "--dry-run", "--devices", "2"]) == 2
    assert "mesh axis 'tensor' (size 2) does not divide LlamaArch.num_heads=9" in capsys.readouterr().err


def test_broadcast_from_leader_and_distributed_environment():
    batch = {"tokens": np.arange(6, dtype=np.int32).reshape(2, 3), "temperature": np.float32(0.7)}
    assert sharding.is_leader()
    got = sharding.broadcast_from_leader(batch)
    np.testing.assert_array_equal(np.asarray(got["tokens"]), batch["tokens"])
    assert float(got["temperature"]) == pytest.approx(0.7)
    assert sharding.initialize_distributed({}) is False  # one process: nothing to join
    with pytest.raises(ConfigError, match=r"\['JAX_COORDINATOR_ADDRESS'\] set but \['JAX_NUM_PROCESSES', "
                                          r"'JAX_PROCESS_ID'\] missing"):
        sharding.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    with pytest.raises(ConfigError, match=r"JAX_NUM_PROCESSES='two'; expected an integer"):
        sharding.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                                         "JAX_PROCESS_ID": "0"})
    with pytest.raises(ConfigError, match=r"JAX_PROCESS_ID=2; expected 0..JAX_NUM_PROCESSES-1=1"):
        sharding.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                         "JAX_PROCESS_ID": "2"})


def test_placing_on_a_one_device_mesh_keeps_the_model():
    from dspark_jax.models import create_target, forward

    model = create_target(ARCH, dtype="float32")
    tokens = jnp.asarray([PROMPTS[0]])
    want = forward(model, tokens)[0]
    mesh = sharding.make_mesh()
    sharding.place_model(model, mesh)
    assert sharding.model_mesh(model) == mesh
    np.testing.assert_array_equal(forward(model, tokens)[0], want)


def test_slot_state_starts_where_the_programs_put_it():
    """A Core on a mesh starts its slot state replicated on it, as every program returns it: the first
    call of a program compiles it once, not once for the fresh state and again for its own outputs."""
    from dspark_jax.models import create_target
    from dspark_jax.speculative.decode import Core, pack_chunk

    target = sharding.place_model(create_target(ARCH, dtype="float32"), sharding.make_mesh())
    core = Core(target, None, None, slots=1, max_context=32, page_size=16, num_pages=2, backend="xla")
    assert core.state.anchors.sharding == sharding.replicated(sharding.model_mesh(target))
    for _ in range(2):
        core.prefill(pack_chunk([], rows=1, lane=16, slots=core.slots, scratch_row=core.scratch_row), 16)
    assert core.compiles.count == 1, core.compiles.shapes
