"""The OpenAI-compatible HTTP app in front of an Engine.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent
events ending in `data: [DONE]`), GET /v1/models, GET /metrics (Prometheus text: the engine's
registry, to which the HTTP request counter is added), GET /health (never needs the API key).

A request's prompt is tokenized here and submitted to the engine; its outputs are read as they
come (`async for` on the handle, fed from the engine thread through the event loop). Streaming
and non-streaming answers are assembled from that same sequence of outputs. A client that goes
away cancels its request, so its pages return to the pool at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark_jax.config import ServeConfig
from dspark_jax.engine import Engine, EngineClosed, EngineFull, RequestParams
from dspark_jax.server.metrics import HTTPMetrics
from dspark_jax.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, ResponseShape,
                                        SamplingRequest, chat_messages, error_body)
from dspark_jax.tokenizer import Tokenizer, TokenizerError

DONE = format_sse_event(data_str="[DONE]")
# keys apply_chat_template sets itself
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "tokenize")


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP layer knows of the model behind the engine."""

    name: str  # the one model id /v1/models lists and requests may name
    tokenizer: Tokenizer | None  # None (random weights): token-id prompts only, no text out
    vocab_size: int
    max_context: int  # prompt + completion positions per request
    defaults: ServeConfig  # sampling values for the fields a request leaves out


def _sse(payload: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(payload, ensure_ascii=False, separators=(",", ":")))


def _param(loc: tuple) -> str | None:
    """'messages[0]' for a pydantic location ('body', 'messages', 0, ...): the field and its indices."""
    path = ""
    for part in loc[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif path:
            break  # a union member's tag or a nested key the message already names
        else:
            path = str(part)
    return path or None


def validation_error_body(exc: RequestValidationError) -> dict:
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return error_body(f"the request body is not valid JSON: {errors[0]['ctx']['error']}",
                          "invalid_request_error")
    messages = []
    for error in errors:
        param = _param(error["loc"])
        got = "" if error["type"] == "missing" else f" (got {error['input']!r})"
        messages.append(f"{param or 'body'}: {error['msg']}{got}")
    return error_body("; ".join(messages), "invalid_request_error", _param(errors[0]["loc"]) if errors else None)


def create_app(engine: Engine, served: ServedModel, *, api_key: str | None = None,
               drain_timeout: float = 30.0) -> FastAPI:
    """The app; its lifespan starts the engine (which warms up in the background) and shuts it down, draining."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()  # warms up on its own thread: /health answers 503 until it is ready
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, drain_timeout)

    app = FastAPI(title="dspark_jax", lifespan=lifespan)
    app.add_middleware(HTTPMetrics, registry=engine.registry)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return JSONResponse(validation_error_body(exc), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}",
                                       "invalid_request_error", code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # logged by uvicorn; the client gets the shape
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    bearer = HTTPBearer(auto_error=False)

    async def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        stats = engine.stats()
        status = "failed" if stats["failed"] else "ok" if stats["ready"] else "starting"
        return JSONResponse({"status": status, **stats}, status_code=200 if status == "ok" else 503)

    api = APIRouter(dependencies=[Depends(require_api_key)])

    @api.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "dspark_jax", "max_model_len": served.max_context}]}

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_common(body)
        ids = _completion_prompt(body.prompt)
        return await _answer("completion", body, ids, "prompt", request)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_common(body)
        ids = _chat_prompt(body)
        return await _answer("chat", body, ids, "messages", request)

    app.include_router(api)

    def _check_common(body: SamplingRequest) -> None:
        if body.model is not None and body.model != served.name:
            raise APIError(404, f"model={body.model!r} is not served here; this server serves {served.name!r}",
                           param="model", code="model_not_found")
        body.check_supported()

    def _token_ids(ids: list, param: str, *, allow_empty: bool = False) -> list[int]:
        if not ids and not allow_empty:
            raise APIError(400, f"{param}: empty; expected at least one token", param=param)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < served.vocab_size]
        if bad:
            raise APIError(400, f"{param}: token ids must be integers in [0, {served.vocab_size}); got {bad[0]!r}",
                           param=param)
        return list(ids)

    def _completion_prompt(prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if served.tokenizer is None:
                raise APIError(400, "prompt: this server has no tokenizer (a random-weight config); send the "
                               "prompt as a list of token ids", param="prompt")
            return _token_ids(served.tokenizer.encode(prompt), "prompt")
        if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt) and prompt:
            raise APIError(400, f"prompt: a batch of {len(prompt)} prompts; send one request per prompt",
                           param="prompt")
        if not isinstance(prompt, list):
            raise APIError(400, f"prompt={prompt!r}; expected a string or a list of token ids", param="prompt")
        return _token_ids(prompt, "prompt")

    def _chat_prompt(body: ChatCompletionRequest) -> list[int]:
        tokenizer = served.tokenizer
        if tokenizer is None or tokenizer.chat_template is None:
            why = "no tokenizer (a random-weight config)" if tokenizer is None else "a tokenizer without a chat template"
            raise APIError(400, f"messages: this server has {why}; use /v1/completions", param="messages")
        kwargs = body.chat_template_kwargs or {}
        reserved = [k for k in RESERVED_TEMPLATE_KWARGS if k in kwargs]
        if reserved:
            raise APIError(400, f"chat_template_kwargs: {reserved} are set by the server", param="chat_template_kwargs")
        try:
            ids = tokenizer.apply_chat_template(chat_messages(body.messages), add_generation_prompt=True,
                                                tokenize=True, **kwargs)
        except (TokenizerError, jinja2.TemplateError) as e:
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        return _token_ids(ids, "messages")

    def _params(body: SamplingRequest, prompt_len: int, prompt_param: str) -> RequestParams:
        room = served.max_context - prompt_len
        if room < 1:
            raise APIError(400, f"{prompt_param}: the prompt has {prompt_len} tokens, which leaves no room to "
                           f"generate in this server's context of {served.max_context} (serve.max_context)",
                           param=prompt_param, code="context_length_exceeded")
        requested = body.requested_max_tokens()
        if requested is None:
            max_tokens = min(served.defaults.max_new_tokens, room)
        elif requested > room:
            name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise APIError(400, f"{name}={requested}: with a prompt of {prompt_len} tokens at most {room} fit in "
                           f"this server's context of {served.max_context}", param=name,
                           code="context_length_exceeded")
        else:
            max_tokens = requested
        stops = body.stop_strings()
        if stops and served.tokenizer is None:
            raise APIError(400, "stop: stop strings need a tokenizer and this server has none; use stop_token_ids",
                           param="stop")
        stop_token_ids = _token_ids(body.stop_token_ids or [], "stop_token_ids", allow_empty=True)
        defaults = served.defaults
        try:
            return RequestParams(
                max_tokens=max_tokens,
                temperature=defaults.temperature if body.temperature is None else body.temperature,
                top_k=defaults.top_k if body.top_k is None else max(body.top_k, 0),
                top_p=defaults.top_p if body.top_p is None else body.top_p,
                seed=body.seed, stop=stops, stop_token_ids=tuple(stop_token_ids),
                ignore_eos=body.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def _submit(ids: list[int], params: RequestParams):
        try:
            return engine.submit(ids, params, loop=asyncio.get_running_loop())
        except EngineFull:
            raise APIError(429, "the server is at its admission limit (serve.max_waiting requests waiting); "
                           "retry later", code="rate_limit_exceeded") from None
        except EngineClosed:
            raise APIError(503, "the server is shutting down", code="service_unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def _answer(kind: str, body: SamplingRequest, ids: list[int], prompt_param: str, request: Request):
        handle = _submit(ids, _params(body, len(ids), prompt_param))
        shape = ResponseShape(kind, handle.request_id, served.name,
                              body.return_token_ids or served.tokenizer is None)
        if body.stream:
            return EventSourceResponse(_stream(handle, shape, body.include_usage),
                                       headers={"Cache-Control": "no-cache"})
        outputs = await _collect(handle, request)
        if outputs is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        final = outputs[-1]
        if final.finish_reason == "abort":
            raise APIError(503, "the request was aborted: the server is shutting down", code="service_unavailable")
        text = "".join(out.text for out in outputs)
        token_ids = [t for out in outputs for t in out.token_ids]
        return shape.full(text, token_ids, final.finish_reason, final.prompt_tokens, final.completion_tokens)

    return app


async def _stream(handle, shape: ResponseShape, include_usage: bool):
    """SSE events of one request: a chunk per engine output, the usage chunk if asked, then [DONE]."""
    finished, first = False, True
    try:
        async for out in handle:
            finished = out.finished
            if out.finish_reason == "abort":
                yield _sse(error_body("the request was aborted: the server is shutting down", "server_error",
                                      code="service_unavailable"))
                break
            if out.text or out.token_ids or out.finished or first:
                yield _sse(shape.chunk(out.text, out.token_ids, out.finish_reason, first=first,
                                       with_usage_field=include_usage))
                first = False
            if out.finished and include_usage:
                yield _sse(shape.usage_chunk(out.prompt_tokens, out.completion_tokens))
        yield DONE
    finally:
        if not finished:  # the client disconnected (or the server cancelled us): free the request's pages
            handle.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(handle, request: Request) -> list | None:
    """Every output of a non-streaming request, or None if the client disconnected first (then cancelled)."""

    async def outputs():
        return [out async for out in handle]

    gathering = asyncio.ensure_future(outputs())
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait((gathering, disconnect), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not gathering.done():
            handle.cancel()
            gathering.cancel()
    return gathering.result() if gathering in done else None
