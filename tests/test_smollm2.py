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

# questions whose greedy answers run past 128 new tokens; the first is the README's main prompt
QUESTIONS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain why the sky is blue.",
]
LONG_NEW_TOKENS = 256
# ordinary chats: code, a letter, another language, and a multi-turn conversation with a system prompt
# (SmolLM2's template adds its default system prompt to the others)
LONG_CHATS = {
    "code": [{"role": "user", "content": "Write a Python class for a singly linked list with insert, delete and "
                                         "search methods. Include docstrings and a short usage example."}],
    # an fp32 run with TF32 matmuls (XLA's GPU default) leaves transformers at new token 9 (top-2 gap 3.7e-3)
    "email": [{"role": "user", "content": "Write a polite email to my landlord asking to fix the heating, which "
                                          "has been broken for 3 days."}],
    "chinese": [{"role": "user", "content": "请用中文介绍一下长城的历史，以及它为什么这么有名。"}],
    "multi-turn": [
        {"role": "system", "content": "You are a friendly travel assistant."},
        {"role": "user", "content": "Hi! I'm planning a trip to Japan in April."},
        {"role": "assistant", "content": "That sounds wonderful! April is cherry blossom season in Japan, so you'll "
                                         "see sakura in Tokyo, Kyoto and many other cities. How long will you stay?"},
        {"role": "user", "content": "About 10 days. I like food, temples and hiking."},
        {"role": "assistant", "content": "Great mix! You could spend 3 days in Tokyo for food, 4 days in Kyoto and "
                                         "Nara for temples, and 3 days near Hakone or the Kumano Kodo for hiking."},
        {"role": "user", "content": "What should I eat in Osaka?"},
        {"role": "assistant", "content": "Osaka is famous for takoyaki (octopus balls), okonomiyaki (savory "
                                         "pancakes) and kushikatsu (fried skewers). Dotonbori is the best street "
                                         "to try them."},
        {"role": "user", "content": "Can you write me a detailed day-by-day itinerary for the whole trip, with "
                                    "budget estimates in yen?"}],
}
# Where greedy decoding may pick the other of two tokens: both implementations compute in fp32 but
# round differently, and their logits (up to ~40) differ by at most 1.3e-4 over 13 chats x 512 new
# tokens (contexts up to 3.8k), so only a top-2 gap below twice that can flip; 5e-4 leaves headroom.
TIE_TOLERANCE = 5e-4

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


def test_long_greedy_chat_continuations_match_transformers(tmp_path, oracle, smollm2, smollm2_gguf):
    """fp32 greedy continuations of LONG_NEW_TOKENS on ordinary chats equal transformers' token for
    token, except where transformers' two best logits tie within TIE_TOLERANCE."""
    tok, model = smollm2
    prompts = [tok.apply_chat_template(chat, tokenize=True) for chat in LONG_CHATS.values()]
    ours = generate(model("float32"), None, prompts, max_new_tokens=LONG_NEW_TOKENS).tokens
    ref = oracle("hf_gguf.py", {"gguf": str(smollm2_gguf), "out": str(tmp_path / "ref.npz"), "dtypes": ["float32"],
                                "generate": prompts, "max_new_tokens": LONG_NEW_TOKENS})
    eos = set(tok.eos_token_ids)
    for i, name in enumerate(LONG_CHATS):
        expected = ref[f"generated_{i}"].tolist()
        assert len(expected) == LONG_NEW_TOKENS or expected[-1] in eos, (name, len(expected))
        if ours[i] == expected:
            continue
        at = next((k for k, (a, b) in enumerate(zip(ours[i], expected)) if a != b), None)
        assert at is not None, (name, "one continuation stops early", len(ours[i]), len(expected))
        ours_logits = np.asarray(forward(model("float32"), [prompts[i] + ours[i][:at]])[0][0, -1])
        ours_ids = np.argsort(-ours_logits)[:2]
        hf_values, hf_ids = ref[f"top2_values_{i}"][at], ref[f"top2_ids_{i}"][at]
        report = (f"{name}: first divergence at new token {at} after {tok.decode(expected[:at])[-200:]!r}: "
                  f"ours {ours[i][at]}, transformers {expected[at]}; transformers' top-2 {hf_ids} = {hf_values}, "
                  f"ours {ours_ids} = {ours_logits[ours_ids]}")
        assert hf_values[0] - hf_values[1] <= TIE_TOLERANCE, report
        assert {ours[i][at], expected[at]} == set(hf_ids.tolist()) == set(ours_ids.tolist()), report


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


def test_shipped_dspark_draft_is_lossless_and_reaches_its_documented_acceptance(smollm2):
    """The embedded default's trained draft, run as the README's main command runs it (its config's
    block size and scheduler, greedy, 128 new tokens): output equal to plain decoding token for token;
    on the README's prompt (QUESTIONS[0]) an accepted length of at least the 1.92 docs/benchmarks.md
    reports for that command, less 0.08 for another CPU's roundings; on both
    questions well above a random draft's ~1.0."""
    from dspark_jax.config import load_config
    from dspark_jax.loading import load_draft
    from dspark_jax.speculative.schedule import SpecParams

    tok, model = smollm2
    cfg = load_config("smollm2_dspark.py")
    target = model(cfg.target.dtype)
    draft = load_draft(cfg, target)
    spec = SpecParams(block_size=cfg.spec.block_size or cfg.draft.block_size, scheduler=cfg.spec.scheduler)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in QUESTIONS]
    new_tokens = cfg.serve.max_new_tokens
    plain = generate(target, None, prompts, max_new_tokens=new_tokens).tokens
    res = generate(target, draft, prompts, max_new_tokens=new_tokens, spec=spec, record_rounds=True)
    assert res.tokens == plain
    readme_prompt = res.rounds.committed[res.rounds.request == 0]
    assert len(res.tokens[0]) == new_tokens and readme_prompt.sum() == new_tokens - 1  # the first comes from prefill
    assert readme_prompt.mean() >= 1.92 - 0.08, readme_prompt.mean()
    assert res.stats.acceptance_length > 1.2, res.stats.acceptance_length
