"""Tokenizers built from GGUF metadata and chat templates, against HF transformers.

transformers' GGUF table has no entry for llama.cpp's `smollm` pre-tokenizer, so its conversion
splits with the plain GPT-2 regex; llama.cpp (whose converter picks the name by matching the output
of SmolLM2's own tokenizer) first isolates every numeric character. On SmolLM2 the two differ only
where whitespace precedes digits. For `smollm` files the oracle is therefore transformers'
tokenizer with llama.cpp's split put back (`gguf_isolated_digits`, see tests/oracle/hf_tokenizer.py),
and a test checks that the split is the only thing it changes.
"""

from __future__ import annotations

import datetime
import json
import re

import jinja2
import numpy as np
import pytest

from dspark_jax.checkpoint.gguf import convert_gguf
from dspark_jax.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from synthetic_gguf import tiny_gguf

TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x * 2\n\n\tif x:  pass\n",
    "The year 2024 had 366 days; pi is about 3.14159 and 1/3 = 0.333...",
    "x =   1\ny  =  22\n\n\n   333 and a\t\t4",
    "naïve café — 日本語のテキスト, Ελληνικά, русский, ١٢٣ ٤٥",
    "emoji: 😀👍🏽 🇫🇷 ❤️‍🔥",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> and <|im_start (not special)",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "I'm sure they'll say it's John's, won't they? <think>maybe</think>",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And   33+3?\n\n  ok"}],
    [{"role": "user", "content": "Ünïcödé 😀 and a literal <|im_end|> inside"}],
]
# exercises trim_blocks / lstrip_blocks, loop controls, tojson (no HTML escaping), special-token variables
SYNTHETIC_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
    {% if m.role == 'system' %}
[SYS]{{ m.content | trim }}[/SYS]
    {% elif m.role not in ['user', 'assistant'] %}
{{ raise_exception('unknown role ' + m.role) }}
    {% else %}
<|im_start|>{{ m.role }}
{{ m.content }}{{ eos_token }}
    {% endif %}
    {% if loop.index >= 3 %}{% break %}{% endif %}
{% endfor %}
meta={{ {"k": "<é&'>", "n": [1, 2]} | tojson }}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def _isolating_digits_matters(text: str) -> bool:
    """Where SmolLM2's vocabulary tokenizes differently once digits are isolated: a whitespace run
    before a digit (GPT-2 gives its last space to the number), or whitespace before a non-ASCII digit
    (the space then merges with the digit's first UTF-8 byte)."""
    return re.search(r"\s\s\d|\s(?![0-9])\d", text) is not None


def _decode_cases(tok) -> list[list[int]]:
    cases = [tok.encode(t) for t in TEXTS if t]
    # a byte-level token sequence that splits a multi-byte character, and control tokens mid-text
    cases.append(tok.encode("😀 é")[1:])
    cases.append([tok.bos_token_id] + tok.encode("a b") + [tok.eos_token_ids[0]])
    return cases


def _check_against(ref, prefix: str, tok, decode_cases) -> None:
    for i, text in enumerate(TEXTS):
        assert tok.encode(text) == ref[f"{prefix}_encode_{i}"].tolist(), (prefix, text)
    for i, ids in enumerate(decode_cases):
        assert tok.decode(ids) == str(ref[f"{prefix}_decode_{i}"]), (prefix, ids)
        assert tok.decode(ids, skip_special_tokens=False) == str(ref[f"{prefix}_decode_special_{i}"]), (prefix, ids)
    for i, messages in enumerate(CHATS):
        assert tok.apply_chat_template(messages) == str(ref[f"{prefix}_chat_{i}"]), (prefix, i)
        assert tok.apply_chat_template(messages, add_generation_prompt=False) == str(ref[f"{prefix}_chat_nogen_{i}"])
        assert tok.apply_chat_template(messages, tokenize=True) == ref[f"{prefix}_chat_ids_{i}"].tolist()


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("pre", ["gpt2", "smollm"])
def test_synthetic_gguf_tokenizer_matches_transformers(tmp_path, oracle, pre):
    """A tiny trained byte-level BPE (with multi-digit merges, control and user-defined tokens)."""
    path, contents = tiny_gguf(tmp_path / "tiny.gguf", pre=pre, add_bos=pre == "gpt2",
                               chat_template=SYNTHETIC_TEMPLATE)
    ours = load_tokenizer(path)
    folder = convert_gguf(path, tmp_path / "hf")
    decode_cases = _decode_cases(ours)
    ref = oracle("hf_tokenizer.py", {"gguf": str(path), "folder": str(folder), "out": str(tmp_path / "ref.npz"),
                                     "texts": TEXTS, "decode": decode_cases, "chats": CHATS,
                                     "isolate_digits": pre == "smollm"})
    oracle_prefix = "gguf_isolated_digits" if pre == "smollm" else "gguf"
    _check_against(ref, oracle_prefix, ours, decode_cases)
    _check_against(ref, oracle_prefix, load_tokenizer(folder), decode_cases)
    # transformers reads the converted folder back to the same tokenizer
    _check_against(ref, "folder", ours, decode_cases)

    assert ours.vocab_size == len(contents.tokens)
    bos = contents.tokens.index("<|im_start|>")
    # add_bos_token (set for the gpt2 file) puts BOS in front of a plain encode, not of chat ids
    assert (ours.encode("x")[0] == bos) == (pre == "gpt2")
    assert ours.encode("x", add_special_tokens=False)[0] != bos
    if pre == "smollm":
        # the vocabulary has multi-digit tokens ('2024', '12'), yet numbers go digit by digit
        digit_tokens = [contents.tokens[i] for t in TEXTS for i in ours.encode(t)
                        if any(c.isdigit() for c in contents.tokens[i])]
        assert digit_tokens and all(len(t) == 1 for t in digit_tokens), digit_tokens
        assert any(len(t) > 1 and t.isdigit() for t in contents.tokens)


@pytest.mark.oracle
@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(tmp_path, oracle, smollm2_gguf, smollm2_folder):
    """The real SmolLM2 GGUF: encode, decode and chat rendering, from the .gguf and from the converted folder."""
    from_gguf = load_tokenizer(smollm2_gguf)
    from_folder = load_tokenizer(smollm2_folder)
    decode_cases = _decode_cases(from_gguf)
    ref = oracle("hf_tokenizer.py", {"gguf": str(smollm2_gguf), "folder": str(smollm2_folder),
                                     "out": str(tmp_path / "ref.npz"), "texts": TEXTS, "decode": decode_cases,
                                     "chats": CHATS, "isolate_digits": True})
    for tok in (from_gguf, from_folder):
        _check_against(ref, "gguf_isolated_digits", tok, decode_cases)
        assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    _check_against(ref, "folder", from_gguf, decode_cases)

    # llama.cpp's split changes transformers' tokens only next to digits
    differs = [ref[f"gguf_encode_{i}"].tolist() != ref[f"gguf_isolated_digits_encode_{i}"].tolist()
               for i in range(len(TEXTS))]
    assert differs == [_isolating_digits_matters(t) for t in TEXTS]
    assert any(differs)
    chat = from_gguf.apply_chat_template(CHATS[0])
    assert chat == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_public_loader_takes_asset_names_and_configs(smollm2_folder):
    """dj.load_tokenizer takes what dj.load_target takes; a random-weight config has no tokenizer."""
    import dspark_jax as dj
    from dspark_jax.config import ConfigError

    by_name = dj.load_tokenizer("smollm2-135m-instruct")
    assert by_name.encode(TEXTS[0]) == load_tokenizer(smollm2_folder).encode(TEXTS[0])
    assert dj.load_tokenizer(dj.load_config("smollm2_dspark.py")).source == by_name.source
    with pytest.raises(ConfigError, match="target.source"):
        dj.load_tokenizer(dj.load_config("qwen3_4b.py"))


def test_template_helpers_and_errors(tmp_path):
    path, _ = tiny_gguf(tmp_path / "tiny.gguf", chat_template=SYNTHETIC_TEMPLATE)
    tok = load_tokenizer(path)
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    text = tok.apply_chat_template(CHATS[1], add_generation_prompt=False)
    assert text.startswith("<|im_start|>\n[SYS]You are terse.[/SYS]\n<|im_start|>user\n2+2?<|im_end|>\n")
    assert "And   33+3" not in text  # the loop stopped after three messages
    assert 'meta={"k": "<é&\'>", "n": [1, 2]}' in text

    dated = Tokenizer(tok.backend, tok.config, chat_template="{{ strftime_now('%Y') }}")
    assert dated.apply_chat_template([]) == str(datetime.date.today().year)

    no_template, _ = tiny_gguf(tmp_path / "plain.gguf")
    with pytest.raises(TokenizerError, match="no chat template"):
        load_tokenizer(no_template).apply_chat_template(CHATS[0])

    folder = convert_gguf(path, tmp_path / "hf")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        load_tokenizer(folder)
    with pytest.raises(TokenizerError, match="expected an HF model folder or a .gguf file"):
        load_tokenizer(tmp_path / "missing")


def test_hf_folder_variants(tmp_path):
    """Where HF folders keep the template and special tokens: a .jinja file, named templates,
    AddedToken dicts, and extra EOS ids in generation_config.json."""
    path, _ = tiny_gguf(tmp_path / "tiny.gguf", chat_template=SYNTHETIC_TEMPLATE)
    expected = load_tokenizer(path).apply_chat_template(CHATS[1])
    folder = convert_gguf(path, tmp_path / "hf")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = config.pop("chat_template")

    config["eos_token"] = {"content": config["eos_token"], "special": True}
    config_path.write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(template)
    tok = load_tokenizer(folder)
    assert tok.apply_chat_template(CHATS[1]) == expected
    # EOS plus the end-of-turn id the GGUF named, via generation_config.json
    assert tok.eos_token_ids == (tok.backend.token_to_id("<|im_end|>"), tok.backend.token_to_id("<|endoftext|>"))

    (folder / "chat_template.jinja").unlink()
    config_path.write_text(json.dumps(config | {"chat_template": [{"name": "tool_use", "template": "x"},
                                                                  {"name": "default", "template": template}]}))
    assert load_tokenizer(folder).apply_chat_template(CHATS[1]) == expected
    config_path.write_text(json.dumps(config | {"chat_template": [{"name": "tool_use", "template": "x"}]}))
    with pytest.raises(TokenizerError, match=r"chat_template lists \['tool_use'\]; expected one named 'default'"):
        load_tokenizer(folder)
    config_path.write_text(json.dumps(config | {"pad_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="pad_token='<nope>' is not in the vocabulary"):
        load_tokenizer(folder)
    config_path.unlink()
    with pytest.raises(TokenizerError, match=r"no tokenizer_config\.json"):
        load_tokenizer(folder)


def test_tokenizer_round_trips_text(tmp_path):
    """decode(encode(text)) gives the text back for arbitrary unicode (byte-level BPE is lossless)."""
    path, _ = tiny_gguf(tmp_path / "tiny.gguf")
    tok = load_tokenizer(path)
    rng = np.random.default_rng(0)
    alphabet = list("ab 12\n\t😀é東<>|_") + ["<|im_end|>", "<think>"]
    for _ in range(50):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 30))))
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
