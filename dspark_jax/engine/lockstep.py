"""Serving from several processes: the leader's request loop, replayed step by step by the followers.

A multi-process job (`sharding.initialize_distributed`) runs every program over one global mesh,
so every process must launch the same jitted programs on the same inputs in the same order.
Process 0, the leader, runs the engine as one host does: the HTTP server, the request queue, the
Scheduler. Every other process, a follower, runs the same Scheduler with no requests of its own.
Before each step the leader broadcasts (`sharding.broadcast_bytes_from_leader`) a `Sync`: the
scheduler mutations it made since the previous one (requests added, with their ids, prompts,
parameters and seeds; requests retired: cancelled, ended by a stop string, aborted at shutdown)
and what to do next: a step, nothing (a heartbeat about every HEARTBEAT_SECONDS while idle, so
followers wait inside a collective and hear a shutdown), stop, or fail.

The Scheduler is a function of those mutations and of what the steps read back from the device
(the same values on every process), so a follower replaying them launches what the leader
launches. Whatever depends on a clock or on local files is decided by the leader and travels in
the broadcast: shutdown deadlines (as retirements), the end of an interrupted warm-up, the SPS
table the causal and async schedulers read (`share`), the step times the PlainGate decides from
(in each Sync). Each Sync carries the leader's `Scheduler.fingerprint()` taken after its
mutations; a follower whose own differs raises Divergence instead of launching a different program.
"""

from __future__ import annotations

import dataclasses
import json

from dspark_jax.engine.params import RequestParams
from dspark_jax.engine.scheduler import Request, Scheduler
from dspark_jax.sharding import broadcast_bytes_from_leader

HEARTBEAT_SECONDS = 1.0  # the longest an idle leader leaves its followers waiting for a Sync
ACTIONS = ("step", "idle", "stop", "fail")


class Divergence(RuntimeError):
    """A follower's scheduler is not the leader's: it would launch other programs than the leader's."""


@dataclasses.dataclass(frozen=True)
class Sync:
    """One broadcast of the leader: its scheduler mutations since the previous one, then the action."""

    events: list  # ["add", request fields] | ["retire", request id, reason], in the order they were made
    action: str  # one of ACTIONS
    fingerprint: str  # the leader's Scheduler.fingerprint() after the events
    timings: list  # [row bucket, plain, seconds] the leader's PlainGate observed since the previous Sync


def encode(sync: Sync) -> bytes:
    return json.dumps(dataclasses.asdict(sync), separators=(",", ":")).encode()


def decode(data: bytes) -> Sync:
    sync = Sync(**json.loads(data))
    if sync.action not in ACTIONS:
        raise ValueError(f"Sync.action={sync.action!r}; expected one of {list(ACTIONS)}")
    return sync


def request_fields(request: Request) -> dict:
    """What a follower needs to schedule `request` as the leader does (JSON values: lists, not tuples)."""
    params = request.params
    return {"id": request.id, "prompt": request.prompt,
            "params": {**dataclasses.asdict(params), "stop": list(params.stop),
                       "stop_token_ids": list(params.stop_token_ids)},
            "seed": request.seed, "stream": request.stream, "stop_ids": list(request.stop_ids)}


def request_from_fields(fields: dict) -> Request:
    return Request(id=fields["id"], prompt=list(fields["prompt"]), params=RequestParams(**fields["params"]),
                   seed=fields["seed"], stream=fields["stream"], stop_ids=tuple(fields["stop_ids"]))


class Lockstep:
    """One engine's end of the broadcast: the leader records and sends, a follower receives and replays.

    `broadcast(data) -> data`: the leader's bytes on every process (tests connect two ends directly).
    """

    def __init__(self, leader: bool, broadcast=broadcast_bytes_from_leader):
        self.leader = leader
        self._transport = broadcast
        self.messages = 0  # broadcasts completed
        self.broken = False  # a broadcast raised: the processes may be out of step, send nothing more
        self._events: list = []  # leader: mutations not sent yet
        self._requests: dict[str, Request] = {}  # follower: the unfinished requests it replays, by id

    # -- the leader

    def added(self, request: Request) -> None:
        self._events.append(["add", request_fields(request)])

    def retired(self, request: Request, reason: str) -> None:
        self._events.append(["retire", request.id, reason])

    def send(self, action: str, scheduler: Scheduler) -> None:
        """Broadcast the recorded mutations and `action`, with `scheduler`'s fingerprint."""
        if action not in ACTIONS:
            raise ValueError(f"action={action!r}; expected one of {list(ACTIONS)}")
        timings = scheduler.gate.take_timings() if scheduler.gate is not None else []
        sync = Sync(self._events, action, scheduler.fingerprint(), timings)
        self._events = []
        self._broadcast(encode(sync))

    # -- a follower

    def receive(self, scheduler: Scheduler) -> Sync:
        """The leader's next Sync, its mutations applied to `scheduler`; Divergence if the result is not the leader's."""
        sync = decode(self._broadcast(b""))
        for event in sync.events:
            if event[0] == "add":
                request = request_from_fields(event[1])
                self._requests[request.id] = request
                scheduler.add(request)
            elif event[0] == "retire":
                _, request_id, reason = event
                if request_id not in self._requests:
                    raise Divergence(f"message {self.messages}: the leader retires request {request_id} ({reason}), "
                                     "which this process does not run")
                scheduler.retire(self._requests.pop(request_id), reason)
            else:
                raise ValueError(f"message {self.messages}: event {event[0]!r}; expected 'add' or 'retire'")
        if sync.timings and scheduler.gate is None:
            raise Divergence(f"message {self.messages}: the leader times plain steps; this process runs none")
        for rows, plain, seconds in sync.timings:
            scheduler.gate.observe_seconds(rows, plain, seconds)
        mine = scheduler.fingerprint()
        if mine != sync.fingerprint:
            raise Divergence(f"message {self.messages} ({sync.action}): the leader's scheduler has fingerprint "
                             f"{sync.fingerprint}, this process's {mine}: the processes would launch different "
                             "programs")
        return sync

    def finished(self, requests) -> None:
        """Forget requests the scheduler finished by itself (a stop token, the length)."""
        for request in requests:
            self._requests.pop(request.id, None)

    # -- both

    def share(self, value):
        """The leader's `value` (anything JSON holds) on every process; followers pass anything."""
        return json.loads(self._broadcast(json.dumps(value).encode() if self.leader else b""))

    def _broadcast(self, data: bytes) -> bytes:
        self.broken = True
        data = self._transport(data)
        self.broken = False
        self.messages += 1
        return data
