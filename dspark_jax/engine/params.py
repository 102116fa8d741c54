"""What goes into and comes out of the engine: request parameters, outputs, settings, errors."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dspark_jax.config import ServeConfig
from dspark_jax.kernels import BACKENDS

SEED_LIMIT = 2 ** 32


class EngineFull(RuntimeError):
    """`max_waiting` requests are waiting already; retry later (HTTP 429)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down (or stopped, or failed) and takes no new requests (HTTP 503)."""


def _fail(name: str, value, expected: str):
    raise ValueError(f"RequestParams.{name}={value!r}; expected {expected}")


@dataclasses.dataclass(frozen=True)
class RequestParams:
    """How one request is sampled and when it stops.

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. `seed` keys the request's
    own random stream (None: a fresh random seed): with a seed, the output does not depend on the
    other requests in the batch (for the fixed and threshold schedulers and plain decoding; the
    causal and async schedulers share verify budgets across requests). It stops at a stop string
    (cut from the text), one of `stop_token_ids` or the model's EOS (unless `ignore_eos`; the token
    is kept in token_ids), or after `max_tokens` tokens.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        for name in ("stop", "stop_token_ids"):
            if isinstance(getattr(self, name), (list, str)):
                value = getattr(self, name)
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            _fail("max_tokens", self.max_tokens, "an integer >= 1")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not self.temperature >= 0:
            _fail("temperature", self.temperature, "a number >= 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            _fail("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            _fail("top_p", self.top_p, "a number in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < SEED_LIMIT):
            _fail("seed", self.seed, "None or an integer in [0, 2**32)")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            _fail("stop", self.stop, "non-empty strings")
        if not isinstance(self.stop_token_ids, tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", self.stop_token_ids, "token ids (integers >= 0)")
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", self.ignore_eos, "true or false")

    @property
    def filters(self) -> bool:
        """Sampled with top-k or top-p (greedy rows never need the filter sort)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0)


@dataclasses.dataclass(frozen=True)
class RequestStats:
    """What one finished request cost (on its final output)."""

    rounds: int  # decode steps or speculative rounds it took part in
    committed_tokens: int  # tokens those rounds committed (the first token comes from the prefill)
    verified_tokens: int  # tokens the target verified for it
    acceptance_length: float | None  # committed / rounds over its speculative rounds (None without any)
    time_to_first_token: float | None  # seconds from submission (None when it produced none)
    seconds: float  # submission to finish
    plain_steps: int = 0  # of `rounds`, the steps a speculative engine ran plain (one token each)


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """New tokens and text of one request since its previous output; the last one has finished=True."""

    request_id: str
    token_ids: list[int]
    text: str  # "" without a tokenizer; a stop string and what follows it are cut
    finished: bool
    finish_reason: Literal["stop", "length", "abort"] | None
    prompt_tokens: int
    completion_tokens: int  # running total
    stats: RequestStats | None = None  # final output only


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine shapes and limits (from cfg.serve via `from_serve`).

    max_batch slots run at once; a request's prompt + max_tokens ≤ max_context. num_pages KV pages
    of page_size positions are shared by all requests (0: enough for every slot at max_context);
    fewer pages admit fewer requests and preempt (recompute) when running ones outgrow the pool.
    prefill_chunk tokens of prompts are prefilled per step (rounded down to a power of two).
    max_waiting requests may wait for a slot before submit raises EngineFull. warmup compiles every
    program shape at start; compilation_cache keeps compiled programs on disk across runs.
    """

    max_batch: int = 16
    max_context: int = 4096
    page_size: int = 16
    num_pages: int = 0
    prefill_chunk: int = 512
    max_waiting: int = 256
    kernels: str = "auto"
    warmup: bool = True
    compilation_cache: bool = True

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r}; expected {expected}")
        need(self.max_batch >= 1, "max_batch", ">= 1")
        need(self.page_size >= 1 and self.page_size & (self.page_size - 1) == 0, "page_size", "a power of two")
        need(self.max_context >= 2, "max_context", ">= 2")
        need(self.num_pages >= 0, "num_pages", ">= 0 (0 = enough for every slot)")
        need(self.prefill_chunk >= 16, "prefill_chunk", ">= 16")
        need(self.max_waiting >= 1, "max_waiting", ">= 1")
        need(self.kernels in BACKENDS, "kernels", f"one of {list(BACKENDS)}")

    @classmethod
    def from_serve(cls, serve: ServeConfig) -> "EngineConfig":
        return cls(max_batch=serve.max_batch, max_context=serve.max_context, page_size=serve.page_size,
                   num_pages=serve.num_pages, prefill_chunk=serve.prefill_chunk, max_waiting=serve.max_waiting,
                   kernels=serve.kernels, warmup=serve.warmup, compilation_cache=serve.compilation_cache)
