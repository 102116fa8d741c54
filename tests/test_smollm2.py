"""The real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) against HF transformers loading the same file."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from dspark_jax.checkpoint.hf import load_hf_target
from dspark_jax.models import forward
from dspark_jax.engine import generate
from dspark_jax.tokenizer import load_tokenizer

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

MAX_NEW_TOKENS = 48
# questions whose greedy answers run past MAX_NEW_TOKENS, so every comparison is full length
QUESTIONS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain why the sky is blue.",
    "Give me three tips for learning a new language, with a short explanation for each.",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is a prime number?"},
     {"role": "assistant", "content": "A prime number is a whole number greater than 1 whose only divisors are 1 "
                                      "and itself. Examples are 2, 3, 5, 7 and 11; 4 is not prime: it is 2 times 2."}],
    [{"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Sunlight is scattered by the molecules of the air, and short wavelengths "
                                      "scatter much more strongly than long ones (Rayleigh scattering)."}],
    [{"role": "user", "content": "Write a loop in Python."},
     {"role": "assistant", "content": "```python\nfor i in range(10):\n    print(i * i)\n```\nThis prints the "
                                      "squares of the numbers from 0 to 9."}],
]


@pytest.fixture(scope="module")
def smollm2(smollm2_folder):
    """(tokenizer, dtype -> model), each model loaded once per module."""
    return load_tokenizer(smollm2_folder), functools.cache(
        lambda dtype: load_hf_target(smollm2_folder, dtype=dtype))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_greedy_chat_continuations_match_transformers(tmp_path, oracle, smollm2, smollm2_gguf):
    tok, model = smollm2
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in QUESTIONS]
    ours = generate(model("float32"), None, prompts, max_new_tokens=MAX_NEW_TOKENS).tokens
    ref = oracle("hf_gguf.py", {"gguf": str(smollm2_gguf), "out": str(tmp_path / "ref.npz"), "dtypes": ["float32"],
                                "generate": prompts, "max_new_tokens": MAX_NEW_TOKENS})
    for i, question in enumerate(QUESTIONS):
        expected = ref[f"generated_{i}"].tolist()
        assert len(expected) == MAX_NEW_TOKENS, (question, tok.decode(expected))
        assert ours[i] == expected, (question, tok.decode(ours[i]), tok.decode(expected))


def test_logits_match_transformers_in_float32_and_bfloat16(tmp_path, oracle, smollm2, smollm2_gguf):
    """fp32: within 1e-3 of transformers (logits reach ~40). bf16: the RMS error against transformers'
    fp32 logits is at most twice transformers' own bf16 error (measured: 0.19 vs 0.26)."""
    tok, model = smollm2
    sequences = [tok.apply_chat_template(c, add_generation_prompt=False, tokenize=True) for c in CONVERSATIONS]
    length = min(map(len, sequences))
    sequences = [s[:length] for s in sequences]
    ref = oracle("hf_gguf.py", {"gguf": str(smollm2_gguf), "out": str(tmp_path / "ref.npz"), "inputs": sequences,
                                "dtypes": ["float32", "bfloat16"]})
    hf32, hf16 = ref["logits_float32"], ref["logits_bfloat16"]
    ours32 = np.asarray(forward(model("float32"), sequences)[0])
    ours16 = np.asarray(forward(model("bfloat16"), sequences)[0])

    assert np.abs(hf32).max() > 10.0
    np.testing.assert_allclose(ours32, hf32, atol=1e-3, rtol=0)
    ours_error, hf_error = _rms(ours16 - hf32), _rms(hf16 - hf32)
    assert 0.0 < ours_error <= 2.0 * hf_error, (ours_error, hf_error)


def test_shipped_dspark_draft_is_lossless_and_accepts_more_than_one_token(smollm2):
    """The embedded default's trained draft: greedy output equals plain decoding token for token, and
    it accepts well above a random draft's ~1.0 tokens per round."""
    from dspark_jax.config import load_config
    from dspark_jax.loading import load_draft
    from dspark_jax.speculative.schedule import SpecParams

    tok, model = smollm2
    target = model("float32")
    draft = load_draft(load_config("smollm2_dspark.py"), target)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in QUESTIONS]
    plain = generate(target, None, prompts, max_new_tokens=MAX_NEW_TOKENS).tokens
    res = generate(target, draft, prompts, max_new_tokens=MAX_NEW_TOKENS, spec=SpecParams(block_size=7))
    assert res.tokens == plain
    assert res.stats.acceptance_length > 1.2, res.stats.acceptance_length
