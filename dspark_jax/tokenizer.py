"""Tokenizers and chat templates: an HF `tokenizers` backend plus the folder's tokenizer_config.json.

`load_tokenizer` reads an HF model folder (tokenizer.json, tokenizer_config.json, optionally
chat_template.jinja and generation_config.json) or a .gguf file, whose metadata describes the
tokenizer. Chat templates render in a sandboxed Jinja2 environment set up the way HF transformers
sets it up, so a template written for HF renders the same text here.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import gguf
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from dspark_jax.checkpoint.gguf_tokenizer import eos_token_ids, read_metadata, tokenizer_from_metadata


class TokenizerError(ValueError):
    """A tokenizer folder is incomplete or a chat template cannot be rendered."""


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as a serialized AddedToken."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def chat_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja2 environment chat templates are written against (HF transformers' conventions)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class Tokenizer:
    """Text <-> token ids, special tokens, and chat-template rendering."""

    def __init__(self, backend: Backend, config: dict[str, Any], *, extra_eos_ids: tuple[int, ...] = (),
                 chat_template: str | None = None, source: str = ""):
        self.backend = backend
        self.config = config
        self.source = source
        self.special_tokens = {name: _token_text(config.get(name))
                               for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                               if _token_text(config.get(name)) is not None}
        for name, text in self.special_tokens.items():
            if backend.token_to_id(text) is None:
                raise TokenizerError(f"{source}: tokenizer_config.json {name}={text!r} is not in the vocabulary")
        self.bos_token_id = self._id("bos_token")
        eos = self._id("eos_token")
        self.eos_token_ids = tuple(dict.fromkeys(([eos] if eos is not None else []) + list(extra_eos_ids)))
        self.chat_template = chat_template
        self._template = None if chat_template is None else chat_environment().from_string(chat_template)

    def _id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds the BOS/EOS the tokenizer is configured to add."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """Render `messages` with the chat template; `tokenize=True` returns token ids instead.

        The special-token strings (bos_token, ...) are visible to the template, as in HF; extra
        keyword arguments (tools, documents, enable_thinking, ...) are passed through.
        """
        if self._template is None:
            raise TokenizerError(f"{self.source}: no chat template (expected `chat_template` in "
                                 "tokenizer_config.json or a chat_template.jinja file)")
        context = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        # the template already wrote every special token the conversation needs
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _chat_template(config: dict, folder: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        if "default" not in named:
            raise TokenizerError(f"{folder}: tokenizer_config.json chat_template lists {sorted(named)}; "
                                 "expected one named 'default'")
        return named["default"]
    if template is None and (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    return template


def _generation_eos_ids(folder: Path) -> tuple[int, ...]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return ()
    value = json.loads(path.read_text()).get("eos_token_id")
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A Tokenizer from an HF model folder or a .gguf file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        meta = read_metadata(gguf.GGUFReader(path))
        backend, config = tokenizer_from_metadata(meta, where=str(path))
        return Tokenizer(backend, config, extra_eos_ids=eos_token_ids(meta),
                         chat_template=config.get("chat_template"), source=str(path))
    if not path.is_dir():
        raise TokenizerError(f"{path}: expected an HF model folder or a .gguf file")
    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json (an HF folder needs it)")
    config_json = path / "tokenizer_config.json"
    if not config_json.is_file():
        raise TokenizerError(f"{path}: no tokenizer_config.json (it names the special tokens)")
    config = json.loads(config_json.read_text())
    return Tokenizer(Backend.from_file(str(tokenizer_json)), config, extra_eos_ids=_generation_eos_ids(path),
                     chat_template=_chat_template(config, path), source=str(path))
