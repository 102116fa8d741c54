"""DeepSeek-V4 through the engine: per-slot decoding state (`V4State`) instead of paged K/V.

The tiny V4 of configs/v4_tiny.py (dense random weights, every attention kind, MoE, mHC, its
DSpark draft blocks) serves concurrent requests, plainly and speculatively; every request's
greedy tokens equal decoding it alone with the model's own incremental step (`v4_step`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.config import DraftConfig, load_config
from dspark_jax.drafts import create_draft
from dspark_jax.engine import Engine, EngineConfig, RequestParams
from dspark_jax.models import split_static
from dspark_jax.models.deepseek_v4 import v4_layout, v4_step
from dspark_jax.speculative.schedule import SpecParams
from test_deepseek_v4 import random_model

TINY = load_config("v4_tiny.py").target.arch
ARCH = dataclasses.replace(TINY, weight_format="dense")
CONFIG = EngineConfig(max_batch=2, max_context=64, prefill_chunk=16, warmup=False, compilation_cache=False)
SHAPES = [(5, 12), (20, 9), (33, 10)]  # (prompt length, max_tokens)


@pytest.fixture(scope="module")
def model():
    return random_model(ARCH, seed=3)


@pytest.fixture(scope="module")
def requests_and_oracle(model):
    """The requests and each one's greedy tokens, decoded alone step by step through v4_step."""
    graph, params = split_static(model)
    eos = model.arch.eos_token_ids
    rng = np.random.default_rng(0)
    cases = []
    for length, count in SHAPES:
        prompt = rng.integers(0, ARCH.vocab_size, length).tolist()
        state = model.init_state(1, 64)
        tokens = np.zeros(48, np.int32)
        tokens[:length] = prompt
        layout = v4_layout([0], [length], [0], num_tokens=48, max_q_len=48, max_len=64)
        logits, state, _ = v4_step(graph, params, state, jnp.asarray(tokens), layout)
        out = [int(jnp.argmax(logits[length - 1]))]
        while len(out) < count and out[-1] not in eos:
            layout = v4_layout([length + len(out) - 1], [1], [0], num_tokens=1, max_q_len=1, max_len=64)
            logits, state, _ = v4_step(graph, params, state, jnp.asarray(out[-1:], jnp.int32), layout)
            out.append(int(jnp.argmax(logits[0])))
        cases.append((prompt, count, out))
    return cases


@pytest.mark.parametrize("draft_kind", ["none", "ngram"])
def test_v4_engine_greedy_equals_stepwise_decoding(model, requests_and_oracle, draft_kind):
    draft = create_draft(DraftConfig(kind=draft_kind), model)
    engine = Engine(model, draft, spec=SpecParams(block_size=4) if draft is not None else None, config=CONFIG)
    engine.start()
    handles = [engine.submit(prompt, RequestParams(max_tokens=count)) for prompt, count, _ in requests_and_oracle]
    for handle, (_, _, expected) in zip(handles, requests_and_oracle):
        assert [t for out in handle for t in out.token_ids] == expected
    stats = engine.stats()
    assert (stats["running"], stats["pages_used"]) == (0, 0)
    engine.shutdown(1.0)
