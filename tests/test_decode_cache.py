"""Paged-cache decoding equals the cache-free full forward, and steady state does not recompile."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomize_params
from dspark_jax.cache import init_kv_caches, ragged_layout
from dspark_jax.config import LlamaArch
from dspark_jax.models import create_target, forward
from dspark_jax.models.attention import PagedKV
from dspark_jax.engine import generate
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

ARCH = LlamaArch(vocab_size=211, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=6,
                 num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=False, eos_token_ids=(),
                 model_type="qwen3", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def model():
    return randomize_params(create_target(ARCH, dtype="float32"), seed=3)


def greedy_reference(model, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        logits, _ = forward(model, jnp.asarray([seq]))
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


def test_chunked_paged_forward_matches_full_forward(model):
    """Three requests advance through the cache in interleaved chunks of uneven sizes (incl. 1)."""
    rng = np.random.default_rng(0)
    lengths = [23, 9, 31]
    seqs = [rng.integers(0, ARCH.vocab_size, n) for n in lengths]
    schedules = [[5, 1, 7, 1, 1, 8], [1, 1, 4, 3], [16, 1, 2, 12]]
    page_size, per_req = 4, 8
    caches = init_kv_caches(model.kv_heads_and_dims(), num_pages=3 * per_req, page_size=page_size,
                            dtype=jnp.float32)
    table = np.arange(3 * per_req, dtype=np.int32).reshape(3, per_req)
    done = [0, 0, 0]
    got = [np.zeros((n, ARCH.vocab_size), np.float32) for n in lengths]
    for step in range(max(map(len, schedules))):
        q_lens = [s[step] if step < len(s) else 0 for s in schedules]
        tokens = np.zeros(32, np.int32)
        flat = np.concatenate([seqs[r][done[r]:done[r] + q_lens[r]] for r in range(3)])
        tokens[:len(flat)] = flat
        layout = ragged_layout(table, np.array(done), np.array(q_lens), num_tokens=32, max_q_len=16,
                               page_size=page_size, num_slots=3 * per_req * page_size)
        attn = PagedKV(caches, layout.meta)
        hidden, _ = model(jnp.asarray(tokens), layout.positions, attn)
        caches = attn.caches
        logits = np.asarray(model.logits(hidden))
        offset = 0
        for r in range(3):
            got[r][done[r]:done[r] + q_lens[r]] = logits[offset:offset + q_lens[r]]
            offset += q_lens[r]
            done[r] += q_lens[r]
    for r in range(3):
        ref, _ = forward(model, jnp.asarray([seqs[r]]))
        np.testing.assert_allclose(got[r], np.asarray(ref[0]), rtol=2e-5, atol=2e-5)


def test_generate_greedy_matches_full_forward(model):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, ARCH.vocab_size, n).tolist() for n in (3, 18, 41)]
    res = generate(model, None, prompts, max_new_tokens=12, page_size=4, prefill_chunk=16)
    for prompt, out in zip(prompts, res.tokens):
        assert out == greedy_reference(model, prompt, 12)
    assert res.stats.committed_tokens == 3 * 11 and res.stats.rounds == 3 * 11


def test_eos_stops_each_request(model):
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, ARCH.vocab_size, n).tolist() for n in (4, 9)]
    free = generate(model, None, prompts, max_new_tokens=10)
    eos = free.tokens[0][3]
    arch = LlamaArch(**{**ARCH.__dict__, "eos_token_ids": (eos,)})
    stopped = generate(with_arch(model, arch), None, prompts, max_new_tokens=10)
    first = free.tokens[0].index(eos)
    assert stopped.tokens[0] == free.tokens[0][:first + 1]
    cut = [i for i, t in enumerate(free.tokens[1]) if t == eos]
    assert stopped.tokens[1] == (free.tokens[1][:cut[0] + 1] if cut else free.tokens[1])


def with_arch(model, arch):
    """The same weights under another (compatible) architecture record, e.g. other EOS ids."""
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    clone.arch = arch
    return clone


def ragged_attention_by_hand(q, k_pages, v_pages, table, kv_lens, cu, scale, window=None):
    """Per request, per query: gather its keys and do a plain softmax in float64."""
    out = np.zeros(q.shape, np.float64)
    heads, kv_heads = q.shape[1], k_pages.shape[2]
    for r in range(len(kv_lens)):
        n = cu[r + 1] - cu[r]
        keys = np.concatenate([k_pages[p] for p in table[r]])[:kv_lens[r]].astype(np.float64)
        vals = np.concatenate([v_pages[p] for p in table[r]])[:kv_lens[r]].astype(np.float64)
        for i in range(n):
            pos = kv_lens[r] - n + i
            lo = 0 if window is None else max(0, pos - window + 1)
            for h in range(heads):
                kh = h // (heads // kv_heads)
                s = keys[lo:pos + 1, kh] @ q[cu[r] + i, h].astype(np.float64) * scale
                w = np.exp(s - s.max())
                out[cu[r] + i, h] = (w / w.sum()) @ vals[lo:pos + 1, kh]
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_ragged_paged_attention_reference_by_hand(window):
    rng = np.random.default_rng(4)
    page_size, num_pages, heads, kv_heads, dim = 4, 24, 6, 3, 8
    kv_lens = np.array([7, 1, 13, 0, 20], np.int32)
    q_lens = np.array([3, 1, 5, 0, 1], np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    table = rng.permutation(num_pages)[:20].reshape(5, 4).astype(np.int32)
    q = rng.standard_normal((16, heads, dim)).astype(np.float32)
    k_pages = rng.standard_normal((num_pages, page_size, kv_heads, dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, kv_heads, dim)).astype(np.float32)
    out = ragged_paged_attention_reference(jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages),
                                           jnp.asarray(table), jnp.asarray(kv_lens), jnp.asarray(cu),
                                           max_q_len=8, scale=0.3, sliding_window=window)
    ref = ragged_attention_by_hand(q, k_pages, v_pages, table, kv_lens, cu, 0.3, window)
    np.testing.assert_allclose(np.asarray(out)[:cu[-1]], ref[:cu[-1]], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[cu[-1]:] == 0)


def test_no_recompilation_in_steady_state(model, compile_counter):
    rng = np.random.default_rng(5)
    warm = [rng.integers(0, ARCH.vocab_size, n).tolist() for n in (5, 11, 7)]
    generate(model, None, warm, max_new_tokens=40, page_size=16, prefill_chunk=32)
    compile_counter.count = 0
    # Different prompts and budget in the same buckets: every program is already compiled.
    other = [rng.integers(0, ARCH.vocab_size, n).tolist() for n in (6, 10, 9)]
    res = generate(model, None, other, max_new_tokens=35, page_size=16, prefill_chunk=32)
    assert res.stats.rounds == 3 * 34
    assert compile_counter.count == 0
