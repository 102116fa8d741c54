"""The serving engine: a request queue and a step loop on a background thread.

`submit` validates a request and queues it (bounded: EngineFull beyond `max_waiting` waiting
requests); the loop thread moves new requests and cancellations into the Scheduler, runs one
step, and turns what the step read back into RequestOutputs: text through each request's
TextStream (stop strings end a request here), metrics, and delivery to the request's handle
(an asyncio queue filled through the caller's loop, or a blocking queue). Only the loop thread
touches the Scheduler and the device. `shutdown` stops admitting, lets the running requests
finish until the drain timeout, aborts the rest and joins the thread.

In a multi-process job (several hosts) process 0, the leader, runs all of the above; the other
processes call `follow` instead, which replays the leader's steps (dspark_jax.engine.lockstep).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import queue
import secrets
import threading
import time
import uuid

import jax

from dspark_jax.cache import pages_for
from dspark_jax.checkpoint.assets import cache_dir
from dspark_jax.engine.lockstep import HEARTBEAT_SECONDS, Lockstep
from dspark_jax.engine.metrics import EngineMetrics
from dspark_jax.engine.params import (SEED_LIMIT, EngineClosed, EngineConfig, EngineFull, RequestOutput,
                                      RequestParams, RequestStats)
from dspark_jax.engine.scheduler import Request, Scheduler, StepReport, check_prompt, stop_ids_of
from dspark_jax.engine.text import TextStream
from dspark_jax.sharding import is_leader
from dspark_jax.speculative.decode import Core
from dspark_jax.speculative.profile import profile_sps
from dspark_jax.speculative.schedule import SpecParams

log = logging.getLogger("dspark_jax.engine")


def use_compilation_cache() -> None:
    """Keep compiled programs on disk under the cache folder, unless a JAX cache folder is set already.

    GPU backends only: with XLA:CPU (jax 0.11.2) a process once segfaulted reading an entry back (CI, two
    workers sharing the folder), and CPU compiles are short enough not to need it.
    """
    if jax.default_backend() == "cpu":
        log.info("compilation cache: off on the CPU backend")
        return
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


class RequestHandle:
    """One submitted request: iterate over its outputs (`async for` when submitted with a loop, else `for`)."""

    def __init__(self, request_id: str, engine: "Engine", loop: asyncio.AbstractEventLoop | None):
        self.request_id = request_id
        self._engine = engine
        self._loop = loop
        self._queue = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self._done = False

    def cancel(self) -> None:
        """Abort the request (a client went away): its pages are freed at the next step."""
        self._engine._cancel(self.request_id)

    def _put(self, output: RequestOutput) -> None:
        if self._loop is None:
            self._queue.put(output)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, output)
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            self.cancel()

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this request was submitted with an event loop: use `async for`")
        while not self._done:
            output = self._queue.get()
            self._done = output.finished
            yield output

    async def __aiter__(self):
        if self._loop is None:
            raise TypeError("this request was submitted without an event loop: use `for`")
        while not self._done:
            output = await self._queue.get()
            self._done = output.finished
            yield output


@dataclasses.dataclass
class _Stream:
    """The output side of one request."""

    handle: RequestHandle
    text: TextStream | None
    count: int = 0  # tokens delivered
    last: float | None = None  # when the last tokens were delivered


class Engine:
    """Continuous batching of requests over `config.max_batch` device slots (see the module doc).

    `leader`: this process takes requests (`start`, `submit`): the only one, or process 0 of a
    multi-process job, whose other processes `follow`.
    """

    def __init__(self, target, draft, *, tokenizer=None, spec: SpecParams | None = None,
                 config: EngineConfig = EngineConfig()):
        if config.compilation_cache:
            use_compilation_cache()
        spec = (spec or SpecParams()) if draft is not None else None
        gamma = spec.block_size if spec is not None else 0
        num_pages = config.num_pages or config.max_batch * pages_for(config.max_context + gamma, config.page_size)
        self.config = config
        self.core = Core(target, draft, spec, slots=config.max_batch, max_context=config.max_context,
                         page_size=config.page_size, num_pages=num_pages, backend=config.kernels)
        self.leader = is_leader()
        multi = jax.process_count() > 1
        # followers take the leader's step times (lockstep), so every process makes the same plain-step choices
        self.scheduler = Scheduler(self.core, prefill_chunk=config.prefill_chunk, plain_steps=True,
                                   clock=time.perf_counter if self.leader else None)
        if multi and self.leader and self.scheduler.gate is not None:
            self.scheduler.gate.outbox = []
        self.tokenizer = tokenizer
        extra_eos = tuple(tokenizer.eos_token_ids) if tokenizer is not None else ()
        self.eos_ids = tuple(dict.fromkeys(self.core.eos_ids + extra_eos))
        self.metrics = EngineMetrics(gamma=gamma, pages_total=num_pages)
        self._lockstep = Lockstep(self.leader) if multi else None
        self.registry = self.metrics.registry
        self.ready = False
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: set[str] = set()
        self._closing = False
        self._deadline: float | None = None
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._requests: dict[str, Request] = {}  # loop thread only
        self._streams: dict[str, _Stream] = {}  # loop thread only
        self._handles: dict[str, RequestHandle] = {}  # submitted, not yet taken by the loop
        self._warm_compiles = 0
        self._reported_compiles = 0

    # -- client side (any thread)

    def submit(self, prompt_ids, params: RequestParams, *, loop: asyncio.AbstractEventLoop | None = None
               ) -> RequestHandle:
        """Queue a request; its outputs arrive through the returned handle.

        Raises ValueError (a bad prompt or parameters, naming the field), EngineFull (max_waiting
        requests are waiting) or EngineClosed (shutting down, stopped or failed).
        """
        if not isinstance(params, RequestParams):
            raise TypeError(f"params: expected RequestParams, got {type(params).__name__}")
        core = self.core
        prompt = check_prompt(prompt_ids, params, vocab=core.target.arch.vocab_size, max_context=core.max_context,
                              num_pages=core.num_pages, page_size=core.geometry.page_size, gamma=core.gamma)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"RequestParams.stop={params.stop!r}: stop strings need a tokenizer and this engine has "
                             "none; use stop_token_ids")
        seed = params.seed if params.seed is not None else secrets.randbelow(SEED_LIMIT)
        request = Request(id=uuid.uuid4().hex, prompt=prompt, params=params, seed=seed, stream=0,
                          stop_ids=stop_ids_of(self.eos_ids, params))
        handle = RequestHandle(request.id, self, loop)
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine failed" if self._failure is not None else "the engine is shutting down")
            if len(self._inbox) + len(self.scheduler.waiting) >= self.config.max_waiting:
                raise EngineFull(f"{self.config.max_waiting} requests are waiting (max_waiting); retry later")
            self._inbox.append(request)
            self._handles[request.id] = handle
            self._cond.notify()
        return handle

    def _cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancels.add(request_id)
            self._cond.notify()

    def stats(self) -> dict:
        """Counts for /health and logs (read without locking: a snapshot, not a transaction)."""
        return {"ready": self.ready, "running": self.scheduler.running,
                "waiting": len(self._inbox) + len(self.scheduler.waiting),
                "pages_used": self.scheduler.allocator.used_pages, "pages_total": self.core.num_pages,
                "compiles_after_warmup": self.compiles_after_warmup, "preemptions": self.scheduler.preemptions,
                "failed": self._failure is not None}

    @property
    def compiles_after_warmup(self) -> int:
        return self.core.compiles.count - self._warm_compiles if self.ready else 0

    def start(self) -> None:
        """Start the loop thread: it warms up (compiles; `ready` turns true), then serves. Returns at once."""
        if not self.leader:
            raise RuntimeError(f"process {jax.process_index()} of a multi-process job follows process 0, which "
                               "takes the requests: call follow(), not start()")
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dspark-engine", daemon=True)
                self._thread.start()

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting; running and queued requests may finish for `drain_timeout` seconds, then the
        rest are aborted; the loop thread is joined. Idempotent."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + max(drain_timeout, 0.0)
            thread = self._thread
            self._cond.notify_all()
        if thread is None:  # never started: nothing ran; whatever was queued is aborted
            with self._cond:
                queued, self._inbox = self._inbox, []
            for request in queued:
                self._handles.pop(request.id)._put(self._final(request, "abort", []))
            return
        thread.join()

    # -- the loop thread

    def _run(self) -> None:
        try:
            self._warm_up()
            self._warm_compiles = self.core.compiles.count
            self.ready = True
            log.info("engine ready: %d slots, %d KV pages", self.core.slots, self.core.num_pages)
            while self._step():
                pass
            if self._lockstep is not None:
                self._lockstep.send("stop", self.scheduler)
        except BaseException as e:  # noqa: BLE001 - every client must hear the end of its request
            log.exception("engine loop failed")
            self._fail(e)
            if self._lockstep is not None and self.ready and not self._lockstep.broken:
                self._lockstep.send("fail", self.scheduler)  # the followers wait for a step that never comes

    def follow(self) -> None:
        """Run the leader's steps on this process (not process 0 of a multi-process job) until it stops.

        Warms up as the leader does, then replays every broadcast step (dspark_jax.engine.lockstep);
        returns when the leader's engine stops, raises when it failed or this process diverged.
        """
        if self._lockstep is None or self.leader:
            raise RuntimeError("follow() is for the processes but 0 of a multi-process job; this process takes "
                               "the requests: call start()")
        self._warm_up()
        self._warm_compiles = self.core.compiles.count
        self.ready = True
        log.info("engine ready, following process 0: %d slots, %d KV pages", self.core.slots, self.core.num_pages)
        while True:
            sync = self._lockstep.receive(self.scheduler)
            if sync.action == "fail":
                raise RuntimeError("the leader's engine (process 0) failed; its log says why")
            if sync.action == "stop":
                return
            if sync.action == "step":
                self._lockstep.finished(self.scheduler.step().finished)
                self._account()

    def _agreed(self, value):
        """`value` in one process; the leader's `value` on every process of a multi-process job."""
        return value if self._lockstep is None else self._lockstep.share(value)

    def _warm_up(self) -> None:
        core, start = self.core, time.perf_counter()
        if core.needs_sps:
            core.use_sps(self._sps_table())
        if self.config.warmup:  # every process compiles the same programs and stops where the leader does
            core.compile_all(self.config.prefill_chunk, stop=lambda: self._agreed(self._closing))
        log.info("warm-up: %d programs compiled in %.1f s", core.compiles.count, time.perf_counter() - start)

    def _sps_table(self) -> list[float]:
        core = self.core
        profile = functools.partial(profile_sps, core.target, core.draft, rows=max(core.row_buckets()),
                                    gamma=core.gamma, core=core)
        if self._lockstep is None:
            return profile()
        # Profiling runs programs on every device: every process takes the leader's cached table, or
        # all measure together and keep the leader's timings.
        table = self._agreed(profile(cached_only=True) if self.leader else None)
        return table if table is not None else self._agreed(profile(refresh=True))

    def _step(self) -> bool:
        with self._cond:
            while not (self._inbox or self._cancels or self.scheduler.has_work()):
                if self._closing:
                    return False
                if not self._cond.wait(HEARTBEAT_SECONDS if self._lockstep is not None else None):
                    break  # several processes: idle for a heartbeat's time
            new, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
            handles = {r.id: self._handles.pop(r.id) for r in new}
            expired = self._closing and time.monotonic() >= self._deadline
        for request in new:
            self._requests[request.id] = request
            self.metrics.prompt_tokens.inc(len(request.prompt))
            text = TextStream(self.tokenizer, request.prompt, request.params.stop) if self.tokenizer else None
            self._streams[request.id] = _Stream(handles[request.id], text)
            self.scheduler.add(request)
            if self._lockstep is not None:
                self._lockstep.added(request)
        for request_id in cancels:
            if request_id in self._requests:
                self._abort(self._requests[request_id])
        if expired:
            for request in list(self._requests.values()):
                self._abort(request)
        if self._lockstep is not None:
            idle = not (new or cancels or self.scheduler.has_work())
            self._lockstep.send("idle" if idle else "step", self.scheduler)
            if idle:
                return True
        report = self.scheduler.step()
        self._deliver(report)
        self._account()
        if report.idle:  # nothing can move until a request ends or arrives: do not spin
            with self._cond:
                self._cond.wait(0.1)
        return True

    def _abort(self, request: Request) -> None:
        self._retire(request, "abort")
        self._finish(request, "abort", [], "")

    def _retire(self, request: Request, reason: str) -> None:
        if self._lockstep is not None and request.state != "finished":
            self._lockstep.retired(request, reason)
        self.scheduler.retire(request, reason)

    def _deliver(self, report: StepReport) -> None:
        for fact in report.rounds:
            self.metrics.observe_round(fact)
        self.metrics.preemptions.inc(len(report.preempted))
        self.metrics.plain_steps.inc(report.plain_steps)
        finished = set(report.finished)
        for request, tokens in report.tokens.items():
            self._emit(request, tokens, request in finished)
        for request in report.finished:
            if request not in report.tokens:
                self._emit(request, [], True)

    def _emit(self, request: Request, tokens: list[int], finished: bool) -> None:
        stream = self._streams.get(request.id)
        if stream is None:  # finished here already (a stop string, a cancel) while its step ran
            return
        reason = request.finish_reason if finished else None
        if stream.text is not None:
            for i, token in enumerate(tokens):
                if reason == "stop" and i == len(tokens) - 1 and token in request.stop_ids:
                    break  # a stop token ends the text without text of its own
                if stream.text.push(token):  # a stop string: the request ends at this token
                    tokens, finished, reason = tokens[:i + 1], True, "stop"
                    self._retire(request, "stop")
                    break
        now = time.perf_counter()
        if tokens:
            self.metrics.generation_tokens.inc(len(tokens))
            if stream.last is None:
                self.metrics.ttft.observe(now - request.arrival)
            else:
                for _ in tokens:
                    self.metrics.itl.observe((now - stream.last) / len(tokens))
            stream.last = now
            stream.count += len(tokens)
        text = stream.text.take(final=finished) if stream.text is not None else ""
        if finished:
            self._finish(request, reason, tokens, text)
        elif tokens:
            stream.handle._put(RequestOutput(request.id, tokens, text, False, None, len(request.prompt),
                                             stream.count))

    def _final(self, request: Request, reason: str, tokens: list[int], text: str = "", count: int = 0
               ) -> RequestOutput:
        now = time.perf_counter()
        speculative = request.rounds - request.plain_steps  # a plain step commits one token
        stats = RequestStats(rounds=request.rounds, committed_tokens=request.committed,
                             verified_tokens=request.verified, plain_steps=request.plain_steps,
                             acceptance_length=(request.committed - request.plain_steps) / speculative
                             if speculative else None,
                             time_to_first_token=(request.first_token_at - request.arrival
                                                  if request.first_token_at is not None else None),
                             seconds=now - request.arrival)
        return RequestOutput(request.id, tokens, text, True, reason, len(request.prompt), count, stats)

    def _finish(self, request: Request, reason: str, tokens: list[int], text: str) -> None:
        stream = self._streams.pop(request.id)
        del self._requests[request.id]
        request.finish_reason = reason
        output = self._final(request, reason, tokens, text, stream.count)
        self.metrics.requests.labels(reason).inc()
        self.metrics.latency.observe(output.stats.seconds)
        stream.handle._put(output)

    def _account(self) -> None:
        self.metrics.running.set(self.scheduler.running)
        self.metrics.waiting.set(len(self._inbox) + len(self.scheduler.waiting))
        self.metrics.pages_used.set(self.scheduler.allocator.used_pages)
        if self.scheduler.gate is not None:
            self.metrics.observe_gate(self.scheduler.gate)
        new = self.compiles_after_warmup - self._reported_compiles
        if new > 0:
            log.log(logging.WARNING if self.config.warmup else logging.INFO, "compiled after warm-up: %s",
                    ", ".join(self.core.compiles.shapes[-new:]))
            self.metrics.compiles.inc(new)
            self._reported_compiles += new

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._failure = error
            self._closing = True
            queued, self._inbox = self._inbox, []
            handles = dict(self._handles)
            self._handles.clear()
        for request in queued:
            handles[request.id]._put(self._final(request, "abort", []))
        for request in list(self._requests.values()):
            stream = self._streams.pop(request.id)
            stream.handle._put(self._final(request, "abort", [], "", stream.count))
        self._requests.clear()
