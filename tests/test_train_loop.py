"""The training loop: data order, loss goes down for every draft kind, exact resume after a kill,
export → load round trip, data parallelism over two (virtual) devices."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, randomize_params
from dspark_jax.checkpoint.deepspec import save_deepspec_draft
from dspark_jax.config import Config, DraftConfig, LlamaArch, TargetConfig, TrainConfig
from dspark_jax.drafts import create_draft
from dspark_jax.loading import load_draft
from dspark_jax.models import create_target
from dspark_jax.train import loop
from dspark_jax.train.data import Batches, TokenizedData
from dspark_jax.train.loop import ResumeError, train
from dspark_jax.train.step import Trainer

VOCAB = 53
ARCH = LlamaArch(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                 head_dim=8, qk_norm=True, tie_word_embeddings=False, model_type="qwen3", eos_token_ids=(),
                 max_position_embeddings=256)
GAMMA = 4


def draft_config(kind: str) -> DraftConfig:
    return DraftConfig(kind=kind, num_layers=1 if kind == "eagle3" else 2, target_layer_ids=(0, 1),
                       mask_token_id=VOCAB - 1, markov_rank=8, block_size=GAMMA, markov_head="rnn")


def config(tmp_path, kind="dspark", **train) -> Config:
    fields = dict(out_dir=str(tmp_path / "run"), steps=6, batch_size=2, grad_accum=2, max_length=64, min_length=16,
                  anchors_per_sequence=6, learning_rate=3e-3, warmup_fraction=0.2, compute_dtype="float32",
                  logits_chunk=32, checkpoint_every=2, log_every=1, min_loss_tokens=4)
    fields.update(train)
    return Config(target=TargetConfig(arch=ARCH), draft=draft_config(kind), train=TrainConfig(**fields))


@pytest.fixture(scope="module")
def target():
    return randomize_params(create_target(ARCH, dtype="float32"), seed=1)


def synthetic_data(count=10, seed=0) -> TokenizedData:
    """Sequences of 12..60 tokens whose second half is supervised (like an answer after a prompt)."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for n in rng.integers(12, 60, count):
        ids.append(rng.integers(0, VOCAB - 1, n).astype(np.int32))
        masks.append(np.arange(n) >= n // 2)
    return TokenizedData(ids, masks, heldout=[])


def params_of(state):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_batches_are_deterministic_buckets_covering_every_sequence_once_per_epoch(tmp_path):
    data = synthetic_data(count=23)
    cfg = config(tmp_path).train
    batches = Batches(data, cfg)
    seen = []
    for step in range(batches.steps_per_epoch):
        length, members = batches.indices(step)
        real = members[members >= 0]
        assert all(Batches(data, cfg).indices(step)[1].tolist() == members.tolist() for _ in range(2))
        assert all(length == min(max(16, 1 << (int(data.lengths[i]) - 1).bit_length()), 64) for i in real)
        tokens, mask = batches.batch(step)
        assert tokens.shape == (2, 2, length) and mask.shape == tokens.shape
        seen.extend(real.tolist())
    assert sorted(seen) == list(range(23))
    assert batches.indices(batches.steps_per_epoch)[1].tolist() != batches.indices(0)[1].tolist() or \
        batches.indices(batches.steps_per_epoch + 1)[1].tolist() != batches.indices(1)[1].tolist()


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_a_few_steps_reduce_the_loss(tmp_path, target, kind):
    cfg = config(tmp_path, kind, steps=14, batch_size=4, grad_accum=1, max_length=32, min_length=32,
                 learning_rate=5e-3, checkpoint_every=100)
    data = synthetic_data(count=4)  # one batch: every step sees the same sequences
    state, finished = train(cfg, target, data, progress=False)
    assert finished and int(state.step) == 14
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 15))
    first, last = lines[0]["loss"], np.mean([m["loss"] for m in lines[-3:]])
    assert np.isfinite(first) and last < 0.85 * first, (first, last)


def test_kill_and_resume_gives_the_same_parameters(tmp_path, target, monkeypatch):
    data = synthetic_data(count=14)
    cfg = config(tmp_path / "b", max_length=32, min_length=32)
    # The Trainer holds only the config and compiled code; sharing it spares recompiling per run.
    trainer = Trainer(target, cfg.draft, cfg.train)
    straight, _ = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(tmp_path / "a"))),
                        target, data, progress=False, trainer=trainer)
    real_step = Trainer.step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 4; step 5 is lost with the process
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, target, data, progress=False, trainer=trainer)
    monkeypatch.setattr(Trainer, "step", real_step)
    assert loop.Checkpoints(tmp_path / "b" / "run" / "checkpoints", 2).latest() == 4
    resumed, finished = train(cfg, target, data, progress=False, trainer=trainer)
    assert finished and int(resumed.step) == 6
    a, b = params_of(straight), params_of(resumed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))

    with pytest.raises(ResumeError, match="train.learning_rate"):
        train(config(tmp_path / "b", max_length=32, min_length=32, learning_rate=1e-3), target, data,
              progress=False, trainer=trainer)


def test_export_then_load_gives_the_same_draft(tmp_path, target):
    cfg = config(tmp_path, steps=2, max_length=32, min_length=32)
    trainer = Trainer(target, cfg.draft, cfg.train)
    state, _ = train(cfg, target, synthetic_data(), progress=False, trainer=trainer)
    draft = trainer.draft_module(target, state.params)
    folder = save_deepspec_draft(draft, target, tmp_path / "draft")
    loaded = load_draft(str(folder), target)
    for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(draft, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))
    for (path, x), (_, y) in zip(nnx.to_flat_state(state.params), nnx.to_flat_state(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))
    # the same outputs: hidden states, logits-based losses and confidences on the same blocks
    from dspark_jax.train import losses
    from dspark_jax.train.step import target_features

    tokens = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB - 1, (2, 32)), jnp.int32)
    loss_mask = jnp.ones((2, 32), bool)
    features, final_hidden = target_features(target, tokens, cfg.draft.target_layer_ids)
    plan = losses.block_plan(jax.random.split(jax.random.key(0), 2), loss_mask, 6, GAMMA, tokens)
    outputs = [(d.training_blocks(target, features, tokens, plan["anchors"], GAMMA),
                d.confidence_logits(d.training_blocks(target, features, tokens, plan["anchors"], GAMMA), plan["prev"]),
                losses.dspark_sums(d, target, tokens, features, final_hidden, plan, trainer.weights))
               for d in (draft, loaded)]
    for a, b in zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))



def test_slim_export_drops_the_shared_tensors_and_loads_in_bf16(tmp_path, target):
    from safetensors import safe_open

    from dspark_jax.checkpoint.deepspec import SHARED

    cfg = config(tmp_path)
    draft = randomize_params(create_draft(cfg.draft, target), seed=7)
    full = save_deepspec_draft(draft, target, tmp_path / "full")
    slim = save_deepspec_draft(load_draft(str(full), target, dtype="bfloat16"), target, tmp_path / "slim", shared=False)
    with safe_open(str(slim / "model.safetensors"), "np") as f:
        names = set(f.keys())
    with safe_open(str(full / "model.safetensors"), "np") as f:
        assert set(f.keys()) - names == set(SHARED)
    loaded = load_draft(str(slim), target)  # the shared tensors come from the target
    for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(draft, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(loaded, nnx.Param))):
        x = np.asarray(x[...], np.float32)
        np.testing.assert_array_equal(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32),
                                      np.asarray(y[...], np.float32), err_msg=str(path))


DATA_PARALLEL = """
import dataclasses, json, sys
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
sys.path.insert(0, "tests")
from test_train_loop import config, synthetic_data, target_model
from dspark_jax.train.data import Batches
from dspark_jax.train.step import Trainer, data_mesh
import pathlib
assert len(jax.devices()) == 2
cfg = config(pathlib.Path(sys.argv[1]))
target = target_model()
data = synthetic_data(count=8)
batch = Batches(data, cfg.train).batch(0)
out = {}
for n in (1, 2):
    trainer = Trainer(target, cfg.draft, cfg.train, mesh=data_mesh(jax.devices()[:n]))
    state = trainer.init_state(target, 0)
    state, metrics = trainer.step(state, *batch, jax.random.key(5))
    out[n] = dict(loss=float(metrics["loss"]),
                  sharded=str(trainer.batch_sharding.spec),
                  params=[np.asarray(x).ravel()[:50].tolist() for x in jax.tree.leaves(state.params)])
try:
    Trainer(target, cfg.draft, dataclasses.replace(cfg.train, batch_size=3), mesh=data_mesh())
except ValueError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def target_model():
    return randomize_params(create_target(ARCH, dtype="float32"), seed=1)


def test_data_parallel_over_two_devices_equals_one(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = out["1"], out["2"]
    assert "data" in two["sharded"]
    assert "batch_size=3; expected a multiple of the 2 devices" in out["error"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for a, b in zip(one["params"], two["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_train_config_errors_name_the_field():
    from dspark_jax.config import ConfigError, override

    cfg = Config(target=TargetConfig(arch=ARCH))
    for assignment, message in [("train.compute_dtype=float16", r"TrainConfig.compute_dtype = 'float16'; expected one "
                                 r"of \['bfloat16', 'float32'\]"),
                                ("train.min_length=48", r"TrainConfig.min_length = 48; expected a power of two >= 16"),
                                ("train.warmup_fraction=1.0", r"TrainConfig.warmup_fraction = 1.0; expected in \[0, 1\)"),
                                ("train.grad_accum=0", r"TrainConfig.grad_accum = 0; expected >= 1")]:
        with pytest.raises(ConfigError, match=message):
            override(cfg, assignment)
    assert override(cfg, "train.text_data=a/*.txt,b/**/*.py").train.text_data == ("a/*.txt", "b/**/*.py")
