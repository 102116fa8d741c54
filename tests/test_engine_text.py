"""Engine text: incremental detokenization, stop strings, stop token ids, EOS and ignore_eos.

The tokenizer is the tiny byte-level BPE of tests/synthetic_gguf.py, read from a GGUF file. The
target is a random model over its vocabulary whose head can only produce printable-ASCII tokens
(other columns are zero, the rest scaled up), so the full decode of its tokens is plain text, and
whose attention is off, so it falls into cycles the n-gram draft predicts (multi-token commits:
stops land inside a round). Every expectation is derived from an unstopped run and
`tokenizer.decode`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomize_params
from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.engine import Engine, EngineConfig, RequestParams
from dspark_jax.models import create_target
from dspark_jax.speculative.schedule import SpecParams
from dspark_jax.tokenizer import load_tokenizer
from synthetic_gguf import tiny_gguf

CONFIG = EngineConfig(max_batch=2, max_context=64, prefill_chunk=32, warmup=False, compilation_cache=False)
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path, _ = tiny_gguf(tmp_path_factory.mktemp("tok") / "tiny.gguf")
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def target(tokenizer):
    vocab = tokenizer.vocab_size
    arch = LlamaArch(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, tie_word_embeddings=False, eos_token_ids=(),
                     max_position_embeddings=256)
    model = randomize_params(create_target(arch, dtype="float32"), seed=5)
    for layer in model.layers:
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
    texts = [tokenizer.decode([i]) for i in range(vocab)]
    ascii_ok = np.array([bool(t) and all(32 <= ord(c) < 127 for c in t) for t in texts])
    kernel = model.lm_head.kernel[...]
    model.lm_head.kernel[...] = jnp.where(jnp.asarray(ascii_ok)[None, :], 10.0 * kernel, 0.0)
    return model


def with_eos(model, eos: int):
    """The same weights with `eos` as the model's end-of-sequence token."""
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    clone.arch = LlamaArch(**{**model.arch.__dict__, "eos_token_ids": (eos,)})
    return clone


def run(engine, prompt, **params):
    outs = list(engine.submit(prompt, RequestParams(max_tokens=MAX_TOKENS, **params)))
    assert all(not o.finished for o in outs[:-1]) and outs[-1].finished
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1].finish_reason


def engine_for(model, tokenizer, draft_kind):
    draft = create_draft(DraftConfig(kind="ngram", ngram_min=1, ngram_max=3), model) if draft_kind else None
    engine = Engine(model, draft, tokenizer=tokenizer, spec=SpecParams(block_size=4) if draft else None,
                    config=CONFIG)
    engine.start()
    return engine


@pytest.mark.parametrize("draft_kind", [None, "ngram"])
def test_stops_cut_tokens_and_text_where_expected(tokenizer, target, draft_kind):
    engine = engine_for(target, tokenizer, draft_kind)
    prompt = tokenizer.encode("def add(a, b):\n    return")
    prompt += run(engine, prompt)[0]  # the target has entered its cycle: n-gram drafts are accepted from here on
    outs = list(engine.submit(prompt, RequestParams(max_tokens=MAX_TOKENS)))
    free, text = [t for o in outs for t in o.token_ids], "".join(o.text for o in outs)
    assert outs[-1].finish_reason == "length" and len(free) == MAX_TOKENS
    assert text == tokenizer.decode(free) and len(text) > 20  # streamed pieces add up to the full decode
    if draft_kind:
        assert outs[-1].stats.acceptance_length > 2  # stops below land inside multi-token rounds

    # a stop string: tokens up to the one completing its first occurrence, text up to where it starts
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = text.find(stop)
    upto = next(k for k in range(MAX_TOKENS) if stop in tokenizer.decode(free[:k + 1]))
    assert run(engine, prompt, stop=(stop, "never appears")) == (free[:upto + 1], text[:cut], "stop")
    assert run(engine, prompt, stop=("never appears",)) == (free, text, "length")

    # a stop token: kept in the tokens, not in the text
    token = free[MAX_TOKENS // 2]
    first = free.index(token)
    assert run(engine, prompt, stop_token_ids=(token,)) == (free[:first + 1], tokenizer.decode(free[:first]), "stop")
    assert engine.stats()["pages_used"] == 0
    engine.shutdown(1.0)

    # the same token as the model's EOS; ignore_eos runs to max_tokens
    engine = engine_for(with_eos(target, token), tokenizer, draft_kind)
    assert run(engine, prompt) == (free[:first + 1], tokenizer.decode(free[:first]), "stop")
    assert run(engine, prompt, ignore_eos=True) == (free, text, "length")
    engine.shutdown(1.0)
