"""OpenAI request models and response bodies (completions and chat completions).

Requests are pydantic models: types and ranges are checked on parse, and a failure names the
field. Fields OpenAI clients send that this server cannot honour (logprobs, penalties, tools, ...)
are accepted only with values that ask for nothing; anything else is refused naming the field,
never silently dropped. Fields nobody acts on (user, metadata, ...) are ignored. Extensions, as in
vLLM: top_k, stop_token_ids, ignore_eos, return_token_ids, chat_template_kwargs.

Responses are plain dicts in OpenAI's shapes, built here so the streaming and non-streaming paths
agree on them.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.TYPES.get(self.status, "server_error"), self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _asks_nothing(value: Any, harmless: tuple) -> bool:
    # type-exact, so that completions' logprobs=0 (one logprob per token) is not taken for False
    return value is None or any(type(value) is type(h) and value == h for h in harmless)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    # field -> the values of it that ask for nothing this server lacks (accepted and ignored)
    NOT_SUPPORTED: ClassVar[dict[str, tuple]] = {
        "best_of": (1,), "echo": (False,), "suffix": ("",), "logit_bias": ({},),
        "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
    }

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; 0 and -1 both mean off
    seed: int | None = Field(None, ge=0, lt=2 ** 32)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False  # each choice (and each streamed delta) carries its token ids

    best_of: Any = None
    echo: Any = None
    suffix: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    logprobs: Any = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def check_supported(self) -> None:
        """Raise APIError(400) naming the first field asking for something this server does not do."""
        for name, harmless in self.NOT_SUPPORTED.items():
            value = getattr(self, name)
            if not _asks_nothing(value, harmless):
                raise APIError(400, f"{name}={value!r} is not supported by this server", param=name,
                               code="unsupported_parameter")
        if self.n != 1:
            raise APIError(400, f"n={self.n}: only n=1 is supported (send one request per completion)", param="n")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")

    def stop_strings(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(s == "" for s in stops):
            raise APIError(400, f"stop={self.stop!r}: stop strings must not be empty", param="stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    NOT_SUPPORTED: ClassVar[dict[str, tuple]] = {**SamplingRequest.NOT_SUPPORTED, "logprobs": ()}

    # one prompt: text, or token ids; a list holding exactly one of either is taken as that prompt
    prompt: str | list[int] | list[str] | list[list[int]]


class ChatCompletionRequest(SamplingRequest):
    NOT_SUPPORTED: ClassVar[dict[str, tuple]] = {
        **SamplingRequest.NOT_SUPPORTED, "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
        "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none",),
        "response_format": ({"type": "text"},),
    }

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    chat_template_kwargs: dict[str, Any] | None = None  # passed to the template (vLLM's extension)

    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: content a string (text parts joined), roles checked."""
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str):
            raise APIError(400, f"messages[{i}].role={role!r}; expected a string such as 'user'",
                           param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise APIError(400, f"messages[{i}].content[{j}] is of type {kind!r}; only text parts "
                                   "are supported", param=f"messages[{i}].content[{j}]")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content={content!r}; expected a string or a list of text parts",
                           param=f"messages[{i}].content")
        out.append({**message, "content": content if content is not None else ""})
    return out


# --------------------------------------------------------------------------------------------
# Response bodies


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
    """The envelope of one endpoint's responses and stream chunks (completion or chat)."""

    def __init__(self, kind: Literal["completion", "chat"], request_id: str, model: str,
                 return_token_ids: bool):
        self.kind = kind
        self.id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.return_token_ids = return_token_ids

    def _envelope(self, object_: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _choice(self, text: str, token_ids: list[int], finish_reason: str | None, *, delta: bool,
                first: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "completion":
            choice.update(text=text or "", logprobs=None)
        elif delta:
            # the first delta names the role; later ones carry content only when there is some
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
            choice["logprobs"] = None
        else:
            choice.update(message={"role": "assistant", "content": text}, logprobs=None)
        choice["finish_reason"] = finish_reason
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def full(self, text: str, token_ids: list[int], finish_reason: str, prompt_tokens: int,
             completion_tokens: int) -> dict:
        """The whole answer of a non-streaming request."""
        object_ = "text_completion" if self.kind == "completion" else "chat.completion"
        return self._envelope(object_, [self._choice(text, token_ids, finish_reason, delta=False)],
                              usage=usage(prompt_tokens, completion_tokens))

    def chunk(self, text: str, token_ids: list[int], finish_reason: str | None, *, first: bool = False,
              with_usage_field: bool = False) -> dict:
        """One streamed delta; with include_usage every chunk carries "usage": null until the last."""
        object_ = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        extra = {"usage": None} if with_usage_field else {}
        return self._envelope(object_, [self._choice(text, token_ids, finish_reason, delta=True, first=first)],
                              **extra)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The stream's last chunk when include_usage is set: no choices, the request's usage."""
        object_ = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return self._envelope(object_, [], usage=usage(prompt_tokens, completion_tokens))
