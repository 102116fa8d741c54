"""Continuous batching on the host: which requests run each step, where their KV pages are.

A `Scheduler` drives one `Core` (the device slots and programs). Each `step()`:
1. grows the KV pages of every decoding request to cover the coming round (oldest first); when
   the pool is exhausted it preempts the most recently admitted request (its pages and slot are
   freed; it waits at the head of the queue and is recomputed — prompt and tokens so far
   prefilled again — when readmitted), so the oldest request always progresses;
2. admits waiting requests in arrival order while a slot is free and its prompt's pages (plus
   one page of headroom per decoding request) are;
3. packs a prefill chunk from the admitted requests still prefilling (up to `prefill_chunk`
   tokens) and launches it;
4. launches one round (a decode step, or a speculative round) over every decoding request,
   requests that just finished their prefill included, in R = the next power of two rows (a
   speculative core runs a plain step instead where past rounds say it pays more; see Scheduler);
5. reads back the previous step's outputs while this step runs on the device, and reports what
   every request received.
Reading one step late keeps the device busy; a request that finished in the unread step runs one
more (no-op) round. Pages of a retired request go back to the pool at once: later programs use
them only after the in-flight ones, which they depend on through the donated caches.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import itertools
import time

import jax
import numpy as np

from dspark_jax.cache import PageAllocator, bucket, pages_for
from dspark_jax.engine.gate import PlainGate
from dspark_jax.engine.params import RequestParams
from dspark_jax.speculative.decode import MIN_LANE, STOP_SLOTS, Core, Piece, pack_chunk


@dataclasses.dataclass(eq=False)
class Request:
    """One request's host-side record, from submission to retirement."""

    id: str
    prompt: list[int]
    params: RequestParams
    seed: int  # with `stream`, keys the request's random draws: fold_in(key(seed), stream)
    stream: int
    stop_ids: tuple[int, ...]  # token ids that end it on device (EOS unless ignore_eos, + stop_token_ids)
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated tokens read back so far
    state: str = "waiting"  # waiting → prefill → decode → finished (preemption: back to waiting)
    finish_reason: str | None = None
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)
    order: int = -1  # admission count (preemption takes the largest)
    target: int = 0  # tokens to prefill in this admission
    prefilled: int = 0
    inflight: int = 0  # launched steps whose outputs for this request are unread
    len_bound: int = 0  # ≥ the anchor's position once every launched step has run
    rounds: int = 0  # steps it took part in (the device's count, which keys its random draws)
    plain_steps: int = 0  # of them, plain steps of a speculative core
    committed: int = 0
    verified: int = 0
    first_token_at: float | None = None

    @property
    def final_len(self) -> int:
        return len(self.prompt) + self.params.max_tokens

    @property
    def known(self) -> list[int]:
        return self.prompt + self.tokens


@dataclasses.dataclass
class RoundFact:
    """One request-round, for statistics and round logs."""

    request: Request
    length: int  # draft tokens verified
    accepted: int
    committed: int
    confidence_logits: np.ndarray | None  # [γ]


@dataclasses.dataclass
class StepReport:
    """What one step read back: new tokens per request (finished ones have finish_reason set)."""

    tokens: dict[Request, list[int]] = dataclasses.field(default_factory=dict)
    finished: list[Request] = dataclasses.field(default_factory=list)
    rounds: list[RoundFact] = dataclasses.field(default_factory=list)
    preempted: list[Request] = dataclasses.field(default_factory=list)
    idle: bool = False  # nothing was launched or read: waiting requests could not be admitted
    plain_steps: int = 0  # request-steps a speculative core ran plain (see PlainGate; not in `rounds`)


@dataclasses.dataclass
class _Launched:
    """A launched step whose outputs are not read yet."""

    completing: list[Request]  # requests whose prefill the step completed, by chunk row
    prefill: object  # PrefillOutputs or None
    rows: list[Request]  # the round's requests, by row
    round: object  # RoundOutputs or None
    plain: bool  # the round is a plain step of a speculative core
    launched_at: float  # clock after the launch
    timed: bool  # the step is one round and nothing else (no prefill, nothing compiled): its time counts
    compiles: int  # programs compiled before the launch ended (a compile until the read spoils the timing)


class Scheduler:
    """`min_rows`: rounds never run fewer rows (padding the rest). The engine keeps 1, so a round
    costs what its live requests need; `generate` runs its whole batch's bucket, compiling one
    round program per batch instead of one per row bucket the batch passes through.

    `plain_steps`: where the core allows them (`Core.plain_steps`), run plain steps wherever a
    PlainGate says rounds pay less (the engine does; `generate`, which measures acceptance, does
    not). The gate learns step times from `clock`: a step runs from the later of its launch and
    the previous read until its own outputs are read (the device runs steps in order), and is
    timed only when the step launched meanwhile is of its kind (plain or round, no prefill). With
    clock=None (a follower of a multi-process job) it is fed the leader's timings instead.
    """

    def __init__(self, core: Core, *, prefill_chunk: int, min_rows: int = 1, plain_steps: bool = False,
                 clock=time.perf_counter):
        self.core = core
        self.clock = clock
        self.gate = PlainGate() if plain_steps and core.draft is not None and core.plain_steps else None
        self._last_read = 0.0
        self.min_rows = min_rows
        self.allocator = PageAllocator(core.num_pages)
        self.chunk_tokens = core.chunk_tokens(prefill_chunk)
        self.width = core.gamma + 1  # positions a round may write past the anchor
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []  # prefilling and decoding, in admission order
        self._free_slots = list(range(core.slots))
        self._admissions = itertools.count()
        self._launched: _Launched | None = None
        self._capacity: int | None = None  # async: the capacity the latest read round computed
        self.preemptions = 0

    # -- queue

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.active or self._launched)

    @property
    def running(self) -> int:
        return len(self.active)

    def fingerprint(self) -> str:
        """A short hash of everything the next step's launches depend on: processes that run the same
        scheduler in lockstep (dspark_jax.engine.lockstep) compare it to catch a divergence."""
        state = ([(r.id, len(r.tokens)) for r in self.waiting],
                 [(r.id, r.state, r.slot, r.pages, r.order, r.target, r.prefilled, r.inflight, r.len_bound,
                   r.tokens[-1:], len(r.tokens)) for r in self.active],
                 self._free_slots, self.allocator.free_pages, self._launched is not None, self._capacity,
                 self.gate.state() if self.gate is not None else None)
        return hashlib.blake2b(repr(state).encode(), digest_size=8).hexdigest()

    def retire(self, request: Request, reason: str) -> None:
        """Finish a request now (cancelled, a stop string, shutdown): its slot and pages are freed."""
        if request.state == "finished":
            return
        if request.state == "waiting":
            self.waiting.remove(request)
        else:
            self._release(request)
            self.active.remove(request)
        request.state, request.finish_reason = "finished", reason

    def _release(self, request: Request) -> None:
        self.allocator.release(request.pages)
        request.pages = []
        heapq.heappush(self._free_slots, request.slot)
        request.slot = None

    def _preempt(self, request: Request, report: StepReport) -> None:
        self._release(request)
        self.active.remove(request)
        request.state, request.prefilled = "waiting", 0
        self.waiting.appendleft(request)
        self.preemptions += 1
        report.preempted.append(request)

    # -- pages

    def _positions(self, request: Request) -> int:
        """Cache positions the next round may write: up to γ past the anchor (never past the request's end)."""
        return min(request.len_bound, request.final_len - 2) + self.width

    def _grow(self, request: Request, positions: int, report: StepReport) -> bool:
        """Give `request` pages for `positions` positions, preempting the youngest requests if needed.

        False when the request itself was the youngest and got preempted.
        """
        need = pages_for(positions, self.core.geometry.page_size) - len(request.pages)
        while need > self.allocator.free_pages:
            victim = max(self.active, key=lambda r: r.order)
            self._preempt(victim, report)
            if victim is request:
                return False
        if need > 0:
            request.pages += self.allocator.allocate(need)
        return True

    def _page_row(self, request: Request) -> np.ndarray:
        row = self.core.scratch_row.copy()
        row[:len(request.pages)] = request.pages
        return row

    # -- one step

    def step(self) -> StepReport:
        report = StepReport()
        for request in [r for r in self.active if r.state == "decode"]:
            if request.state == "decode":  # not preempted by an older request's growth
                self._grow(request, self._positions(request), report)
        self._admit()
        completing, prefill = self._prefill()
        rows = [r for r in self.active if r.state == "decode"]
        pending, plain, compiles = None, False, self.core.compiles.count
        if rows:
            width = self._row_bucket(len(rows))
            slots, table = self.core.padding_rows(width)
            for i, request in enumerate(rows):
                slots[i], table[i] = request.slot, self._page_row(request)
                request.inflight += 1
                request.len_bound += self.width
            plain = self.gate is not None and self.gate.choose(width)
            pending = self.core.begin_round(slots, table, any(r.params.filters for r in rows), self._capacity, plain)
        report.idle = self._launched is None and prefill is None and pending is None
        if self._launched is not None:
            # The previous step's time holds this step's launch: it counts only when the launch is of its kind.
            alike = prefill is None and (pending is None or plain == self._launched.plain)
            self._read(self._launched, report, alike)
            self._launched = None
        if prefill is not None or pending is not None:
            timed = prefill is None and pending is not None and self.core.compiles.count == compiles
            self._launched = _Launched(completing, prefill, rows,
                                       self.core.finish_round(pending) if pending is not None else None, plain,
                                       self.clock() if self.clock is not None else 0.0, timed,
                                       self.core.compiles.count)
        return report

    def _row_bucket(self, requests: int) -> int:
        return max(bucket(requests), self.min_rows)

    def _admit(self) -> None:
        decoding = sum(r.state == "decode" for r in self.active)
        while self.waiting and self._free_slots:
            request = self.waiting[0]
            if request.inflight:  # preempted with outputs still unread: readmit once its tokens are known
                break
            # Prefill the known tokens but the last generated one (the anchor), then one round.
            request.target = request.len_bound = len(request.prompt) + max(len(request.tokens) - 1, 0)
            need = pages_for(max(request.target, self._positions(request)), self.core.geometry.page_size)
            headroom = decoding if self.active else 0
            if need + headroom > self.allocator.free_pages:
                break
            self.waiting.popleft()
            request.pages = self.allocator.allocate(need)
            request.slot = heapq.heappop(self._free_slots)
            request.state, request.order, request.prefilled = "prefill", next(self._admissions), 0
            self.active.append(request)

    def _prefill(self) -> tuple[list[Request], object]:
        """Pack and launch this step's prefill chunk; returns (requests it completes, by row; outputs)."""
        candidates = [r for r in self.active if r.state == "prefill"]
        if not candidates:
            return [], None
        best = None
        for n in range(1, len(candidates) + 1):
            rows = bucket(n)
            lane_max = self.chunk_tokens // rows
            if lane_max < MIN_LANE:
                break
            take = [min(r.target - r.prefilled, lane_max) for r in candidates[:n]]
            lane = bucket(max(take), minimum=MIN_LANE)
            key = (sum(take), -rows * lane, -n)  # most tokens, then the smaller program, then fewer pieces
            if best is None or key > best[0]:
                best = (key, take, rows, lane)
        _, take, rows, lane = best
        pieces, completing = [], []
        for request, count in zip(candidates, take):
            known, start = request.known, request.prefilled
            end = start + count
            completes = end == request.target
            admission = None
            if start == 0:
                p = request.params
                admission = dict(seed=request.seed, stream=request.stream, temperature=p.temperature, top_k=p.top_k,
                                 top_p=p.top_p, max_new=p.max_tokens, stop_ids=request.stop_ids,
                                 rounds=request.rounds)
            generated = len(request.tokens)
            pieces.append(Piece(slot=request.slot, tokens=known[start:end], start=start,
                                page_row=self._page_row(request), next_token=known[end] if end < len(known) else 0,
                                admission=admission, completes=completes, generated=generated,
                                anchor=request.tokens[-1] if generated else 0))
            request.prefilled = end
            if completes:
                request.state = "decode"
                request.inflight += 1
            completing.append(request if completes else None)
        chunk = pack_chunk(pieces, rows=rows, lane=lane, slots=self.core.slots, scratch_row=self.core.scratch_row)
        return completing, self.core.prefill(chunk, lane)

    # -- reading back

    def _read(self, launched: _Launched, report: StepReport, alike: bool) -> None:
        prefill, outputs = jax.device_get((launched.prefill, launched.round))
        now = time.perf_counter()
        if self.clock is not None:
            read_at = self.clock()
            if (self.gate is not None and launched.timed and alike
                    and self.core.compiles.count == launched.compiles):
                self.gate.observe_seconds(self._row_bucket(len(launched.rows)), launched.plain,
                                          read_at - max(launched.launched_at, self._last_read))
            self._last_read = read_at
        for i, request in enumerate(launched.completing):
            if request is None:
                continue
            request.inflight -= 1
            if request.state == "finished" or request.tokens:  # retired meanwhile, or a recomputed request
                continue
            self._receive(request, [int(prefill.anchors[i])], bool(prefill.done[i]), now, report)
        if outputs is not None:
            for i, request in enumerate(launched.rows):
                request.inflight -= 1
                if request.state == "finished" or not outputs.live[i]:
                    continue
                count = int(outputs.count[i])
                request.rounds += 1
                request.committed += count
                request.verified += int(outputs.lengths[i]) + 1
                if launched.plain:
                    request.plain_steps += 1
                    report.plain_steps += 1
                else:
                    conf = None if outputs.confidence_logits is None else outputs.confidence_logits[i]
                    report.rounds.append(RoundFact(request, int(outputs.lengths[i]), int(outputs.accepted[i]), count,
                                                   conf))
                self._receive(request, outputs.tokens[i, :count].tolist(), bool(outputs.done[i]), now, report)
            live = outputs.live[:len(launched.rows)]
            if self.gate is not None and not launched.plain and live.any():
                accepted = outputs.accepted[:len(launched.rows)][live]
                self.gate.observe_round(self._row_bucket(len(launched.rows)), float(np.mean(accepted)) + 1.0)
            if self.core.scheduler == "async" and not launched.plain:
                self._capacity = int(outputs.next_capacity)

    def _receive(self, request: Request, tokens: list[int], done: bool, now: float, report: StepReport) -> None:
        if tokens:
            if request.first_token_at is None:
                request.first_token_at = now
            request.tokens += tokens
            report.tokens.setdefault(request, []).extend(tokens)
        if done:
            reason = "stop" if request.tokens and request.tokens[-1] in request.stop_ids else "length"
            self.retire(request, reason)
            report.finished.append(request)
        elif request.state == "decode":
            # The anchor's exact position is known now; launched rounds may move it by `width` each.
            anchor = len(request.prompt) + len(request.tokens) - 1
            request.len_bound = anchor + request.inflight * self.width


def stop_ids_of(eos_ids, params: RequestParams) -> tuple[int, ...]:
    """The token ids that end a request on device: EOS (unless ignore_eos) and its stop_token_ids."""
    ids = tuple(dict.fromkeys((() if params.ignore_eos else tuple(eos_ids)) + params.stop_token_ids))
    if len(ids) > STOP_SLOTS:
        raise ValueError(f"RequestParams.stop_token_ids has {len(params.stop_token_ids)} ids; with the model's "
                         f"{len(eos_ids)} EOS ids at most {STOP_SLOTS} fit")
    return ids


def check_prompt(prompt, params: RequestParams, *, vocab: int, max_context: int, num_pages: int, page_size: int,
                 gamma: int, where: str = "prompt") -> list[int]:
    """The prompt as ints, or a ValueError naming what does not fit."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError(f"{where} is empty; a request needs at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{where} has token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    bad = [t for t in params.stop_token_ids if t >= vocab]
    if bad:
        raise ValueError(f"RequestParams.stop_token_ids has ids {bad[:5]} outside the vocabulary [0, {vocab})")
    if len(prompt) + params.max_tokens > max_context:
        raise ValueError(f"{where} has {len(prompt)} tokens; with max_tokens={params.max_tokens} it exceeds "
                         f"max_context={max_context}")
    pages = pages_for(len(prompt) + params.max_tokens - 1 + gamma, page_size)
    if pages > num_pages:
        raise ValueError(f"{where} has {len(prompt)} tokens; with max_tokens={params.max_tokens} it needs {pages} KV "
                         f"pages and the engine has num_pages={num_pages}")
    return prompt
