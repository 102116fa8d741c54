"""Generation through the interpret-mode kernels equals generation through the XLA references.

A small fp32 Llama-family target with a DSpark draft: prefill chunks and verification run the
ragged paged attention kernel, the draft backbone the draft block attention kernel, every layer
the fused add + RMSNorm kernel. Greedy tokens must be identical.
"""

from __future__ import annotations

import numpy as np

from conftest import randomize_params
from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.models import create_target
from dspark_jax.engine import generate
from dspark_jax.speculative.schedule import SpecParams

# hidden 128: the norm kernel's lane width; head_dim 64: the attention kernel's smallest.
ARCH = LlamaArch(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=64, qk_norm=True, tie_word_embeddings=False, model_type="qwen3", eos_token_ids=(),
                 max_position_embeddings=512)


def test_speculative_generation_with_interpreted_kernels_equals_xla():
    target = randomize_params(create_target(ARCH, dtype="float32"), seed=1)
    draft = randomize_params(create_draft(DraftConfig(kind="dspark", num_layers=1, target_layer_ids=(0,),
                                                      mask_token_id=255, markov_rank=32, block_size=3), target), seed=2)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 255, n).tolist() for n in (9, 30)]
    spec = SpecParams(block_size=3)
    reference = generate(target, draft, prompts, max_new_tokens=8, spec=spec, kernels="xla")
    got = generate(target, draft, prompts, max_new_tokens=8, spec=spec, kernels="interpret")
    assert got.tokens == reference.tokens
    assert got.stats.rounds == reference.stats.rounds
