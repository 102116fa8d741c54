"""The tokenizer a GGUF file describes, rebuilt with the `tokenizers` library.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, the BPE merges, a type per
token and the name of its pre-tokenizer (`tokenizer.ggml.pre`) as metadata. This module turns
that metadata back into a `tokenizers.Tokenizer` plus the tokenizer_config.json fields (special
tokens, BOS/EOS flags, chat template).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from dspark_jax.checkpoint.tensors import CheckpointError

# No split of our own: the byte-level step's regex (`use_regex=True`) is GPT-2's.
_GPT2 = ()
# Every numeric character (`\p{N}`) on its own first, then the GPT-2 split: numbers go digit by digit.
_DIGITS_THEN_GPT2 = (pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),)

# llama.cpp's `tokenizer.ggml.pre` names that we rebuild, with the splits that run before the
# byte-level step (the digit-isolating families share one regex list in llama.cpp's llama-vocab.cpp).
PRE_TOKENIZERS = {
    "gpt2": _GPT2,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
}

# `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
CONTROL = int(gguf.TokenType.CONTROL)
USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

_SPECIAL_IDS = {
    "bos_token": gguf.Keys.Tokenizer.BOS_ID,
    "eos_token": gguf.Keys.Tokenizer.EOS_ID,
    "unk_token": gguf.Keys.Tokenizer.UNK_ID,
    "pad_token": gguf.Keys.Tokenizer.PAD_ID,
}


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata field as a Python value (strings decoded, arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _required(meta: dict, key: str, where: str):
    if key not in meta:
        raise CheckpointError(f"{where}: GGUF metadata has no {key!r}; a tokenizer needs it")
    return meta[key]


def _pre_tokenizer(pre: str, where: str):
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{where}: {gguf.Keys.Tokenizer.PRE}={pre!r} is not supported; "
                              f"supported: {sorted(PRE_TOKENIZERS)}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    splits = PRE_TOKENIZERS[pre]
    return pre_tokenizers.Sequence([*splits, byte_level]) if splits else byte_level


def _post_processor(bos: str | None, eos: str | None, vocab: dict[str, int]):
    """Puts `bos` before and `eos` after a plain `encode` (llama.cpp's add_bos_token / add_eos_token)."""
    template = ([bos] if bos else []) + ["$A"] + ([eos] if eos else [])
    return processors.TemplateProcessing(single=template,
                                         special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])


def tokenizer_from_metadata(meta: dict[str, Any], where: str = "GGUF") -> tuple[Tokenizer, dict[str, Any]]:
    """(byte-level BPE tokenizer, tokenizer_config.json dict) from GGUF metadata.

    Control tokens (type 3) become special added tokens and user-defined ones (type 4) plain added
    tokens, so both are matched whole in text (as llama.cpp does) instead of being cut into bytes.
    """
    kind = meta.get(gguf.Keys.Tokenizer.MODEL)
    if kind != "gpt2":
        raise CheckpointError(f"{where}: {gguf.Keys.Tokenizer.MODEL}={kind!r} is not supported; "
                              "supported: ['gpt2'] (byte-level BPE)")
    tokens = _required(meta, gguf.Keys.Tokenizer.LIST, where)
    merges = _required(meta, gguf.Keys.Tokenizer.MERGES, where)
    types = meta.get(gguf.Keys.Tokenizer.TOKEN_TYPE) or [int(gguf.TokenType.NORMAL)] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{where}: {gguf.Keys.Tokenizer.TOKEN_TYPE} has {len(types)} entries; "
                              f"expected one per token ({len(tokens)})")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        repeated = sorted(t for t, n in Counter(tokens).items() if n > 1)
        raise CheckpointError(f"{where}: {gguf.Keys.Tokenizer.LIST} repeats tokens {repeated[:10]}")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m, p in zip(merges, pairs) if len(p) != 2]
    if bad:
        raise CheckpointError(f"{where}: {gguf.Keys.Tokenizer.MERGES} entries {bad[:5]} are not 'left right'")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(_required(meta, gguf.Keys.Tokenizer.PRE, where), where)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, token_type in zip(tokens, types) if token_type == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, token_type in zip(tokens, types) if token_type == USER_DEFINED])

    config: dict[str, Any] = {}
    for name, key in _SPECIAL_IDS.items():
        token_id = meta.get(key)
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise CheckpointError(f"{where}: {key}={token_id} is outside the vocabulary [0, {len(tokens)})")
        config[name] = tokens[token_id]
    config["add_bos_token"] = bool(meta.get(gguf.Keys.Tokenizer.ADD_BOS, False))
    config["add_eos_token"] = bool(meta.get(gguf.Keys.Tokenizer.ADD_EOS, False))
    for flag, name in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
        if config[flag] and name not in config:
            raise CheckpointError(f"{where}: {flag} is set but the file names no {name}")
    added_bos = config["bos_token"] if config["add_bos_token"] else None
    added_eos = config["eos_token"] if config["add_eos_token"] else None
    if added_bos or added_eos:
        tokenizer.post_processor = _post_processor(added_bos, added_eos, vocab)
    # byte-level decoding restores the text exactly; HF's space clean-up would alter it
    config["clean_up_tokenization_spaces"] = False
    if gguf.Keys.Tokenizer.CHAT_TEMPLATE in meta:
        config["chat_template"] = meta[gguf.Keys.Tokenizer.CHAT_TEMPLATE]
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return tokenizer, config


def eos_token_ids(meta: dict[str, Any]) -> tuple[int, ...]:
    """Every token that ends generation: EOS, and end-of-turn / end-of-message where the file names them.

    llama.cpp stops at all of these; chat models often mark the end of a turn with EOT, not EOS.
    """
    keys = (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID, gguf.Keys.Tokenizer.EOM_ID)
    return tuple(dict.fromkeys(int(meta[k]) for k in keys if meta.get(k) is not None))


def tokenizer_from_gguf(path: str | Path) -> tuple[Tokenizer, dict[str, Any]]:
    """`tokenizer_from_metadata` for a .gguf file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    return tokenizer_from_metadata(read_metadata(gguf.GGUFReader(path)), where=str(path))
