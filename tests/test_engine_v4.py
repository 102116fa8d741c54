"""DeepSeek-V4 through the engine: per-slot decoding state (`V4State`) instead of paged K/V.

The tiny V4 of configs/v4_tiny.py (dense random weights, every attention kind, MoE, mHC, its
DSpark draft blocks) serves concurrent requests, plainly and speculatively with the checkpoint's
own draft blocks; every request's greedy tokens equal decoding it alone with the model's own
incremental step (`v4_step`). As in test_engine.py the target's attention outputs are zeroed (its
next token is a function of the current one) and the draft's Markov head (rank = vocabulary)
knows that function for two thirds of the tokens: rounds commit several tokens and roll back the
rejected ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.config import DraftConfig, load_config
from dspark_jax.drafts import create_draft
from dspark_jax.engine import Engine, EngineConfig, RequestParams
from dspark_jax.models import forward, split_static
from dspark_jax.models.deepseek_v4 import v4_layout, v4_step
from dspark_jax.speculative.schedule import SpecParams
from test_deepseek_v4 import random_model

TINY = load_config("v4_tiny.py")
ARCH = dataclasses.replace(TINY.target.arch, weight_format="dense", dspark_markov_rank=TINY.target.arch.vocab_size)
DRAFT = dataclasses.replace(TINY.draft, markov_rank=ARCH.vocab_size)
GAMMA = DRAFT.block_size
SPS = tuple(1.0 / (1.0 + 0.05 * b) for b in range(2 * (GAMMA + 1) + 1))
CONFIG = EngineConfig(max_batch=2, max_context=64, prefill_chunk=16, warmup=False, compilation_cache=False)
SHAPES = [(5, 12), (20, 9), (33, 10)]  # (prompt length, max_tokens)


@pytest.fixture(scope="module")
def model():
    model = random_model(ARCH, seed=3)
    for layer in model.layers:  # attention adds nothing: the next token is a function of the current one
        layer.attn.wo_b.weight[...] = jnp.zeros_like(layer.attn.wo_b.weight[...])
    vocab = ARCH.vocab_size
    table = np.asarray(jnp.argmax(forward(model, jnp.arange(vocab)[:, None])[0][:, 0], axis=-1))
    rng = np.random.default_rng(4)
    table = np.where(rng.random(vocab) < 1 / 3, rng.permutation(vocab), table)
    head = model.mtp[-1].markov_head  # bias(x) = W1[x] · W2ᵀ = 40 · onehot(table[x])
    head.markov_w1.embedding[...] = jnp.eye(vocab, dtype=jnp.float32)
    head.markov_w2.weight[...] = jnp.asarray(40.0 * jax.nn.one_hot(table, vocab).T, jnp.float32)
    return model


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


@pytest.mark.parametrize("drafting", [pytest.param("none", marks=pytest.mark.slow), "dspark-fixed",
                                      pytest.param("dspark-causal", marks=pytest.mark.slow)])
def test_v4_engine_greedy_equals_stepwise_decoding(model, requests_and_oracle, drafting):
    draft = create_draft(DRAFT, model) if drafting != "none" else None
    spec = SpecParams(block_size=GAMMA, scheduler=drafting.split("-")[-1], sps=SPS) if draft is not None else None
    engine = Engine(model, draft, spec=spec, config=CONFIG)
    engine.start()
    handles = [engine.submit(prompt, RequestParams(max_tokens=count)) for prompt, count, _ in requests_and_oracle]
    finals = []
    for handle, (_, _, expected) in zip(handles, requests_and_oracle):
        outputs = list(handle)
        assert [t for out in outputs for t in out.token_ids] == expected
        finals.append(outputs[-1])
    if drafting == "dspark-fixed":  # the checkpoint's draft blocks ran, and multi-token rounds happened
        assert sum(f.stats.committed_tokens for f in finals) > 1.5 * sum(f.stats.rounds for f in finals)
    stats = engine.stats()
    assert (stats["running"], stats["pages_used"]) == (0, 0)
    engine.shutdown(1.0)


def test_v4_draft_config_must_match_the_checkpoint(model):
    with pytest.raises(ValueError, match="DraftConfig.mask_token_id=3; the V4 checkpoint's DSpark blocks expect 95"):
        create_draft(dataclasses.replace(DRAFT, mask_token_id=3), model)
    assert create_draft(DraftConfig(kind="ngram"), model) is not None
