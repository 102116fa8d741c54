"""On a CUDA GPU: generation gives the same greedy tokens as on the CPU (fp32, highest matmul precision).

Skipped without a GPU (see conftest). Runs the same code paths as the CPU suite, on the device.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import randomize_params
from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.models import create_target
from dspark_jax.engine import generate
from dspark_jax.speculative.schedule import SpecParams

pytestmark = pytest.mark.gpu

ARCH = LlamaArch(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                 head_dim=16, qk_norm=True, tie_word_embeddings=False, model_type="qwen3", eos_token_ids=())


def on(device, module):
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.device_put(state, device))


@pytest.mark.parametrize("kind", ["none", "ngram", "dspark", "eagle3"])
def test_gpu_generation_equals_cpu(kind):
    cpu, gpu = jax.devices("cpu")[0], jax.devices("gpu")[0]
    with jax.default_device(cpu):
        target = randomize_params(create_target(ARCH, dtype="float32"), seed=1)
        draft = create_draft(DraftConfig(kind=kind, num_layers=1 if kind == "eagle3" else 2, target_layer_ids=(0, 2),
                                         mask_token_id=511, markov_rank=64, block_size=5), target)
        if kind in ("dspark", "eagle3"):
            draft = randomize_params(draft, seed=2)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 511, n).tolist() for n in (7, 50, 23, 5)]
    spec = SpecParams(block_size=5)
    with jax.default_device(cpu):
        reference = generate(target, draft, prompts, max_new_tokens=32, spec=spec).tokens
    with jax.default_device(gpu):
        got = generate(on(gpu, target), on(gpu, draft) if draft is not None else None, prompts, max_new_tokens=32,
                       spec=spec).tokens
    assert got == reference


@pytest.mark.skipif(not os.environ.get("DSPARK_SMOLLM2_GGUF"), reason="needs DSPARK_SMOLLM2_GGUF")
def test_gpu_smollm2_greedy_equals_cpu():
    import dspark_jax as dj

    cpu, gpu = jax.devices("cpu")[0], jax.devices("gpu")[0]
    with jax.default_device(cpu):
        target = dj.load_target("smollm2-135m-instruct", dtype="float32")
    tokenizer = dj.load_tokenizer(dj.loading.target_folder("smollm2-135m-instruct"))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True)
               for q in ("What is the capital of France?", "Write a haiku about GPUs.")]
    with jax.default_device(cpu):
        reference = generate(target, None, prompts, max_new_tokens=48).tokens
    with jax.default_device(gpu):
        assert generate(on(gpu, target), None, prompts, max_new_tokens=48).tokens == reference
