"""Lockstep serving (dspark_jax.engine.lockstep) inside one process.

The broadcast's encoding, `sharding.broadcast_bytes_from_leader` on one process, and a leader and
a follower Scheduler connected directly (each over its own Core of a tiny target): replaying the
leader's Syncs gives the follower the same launches and tokens, and any difference in the
replayed state is caught by the fingerprint before the next step. Two real processes:
test_server_multihost.py.
"""

from __future__ import annotations

import collections
import queue
import threading
import time

import numpy as np
import pytest

from conftest import randomize_params
from dspark_jax import sharding
from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.engine import Engine, EngineConfig, RequestParams
from dspark_jax.engine.lockstep import Divergence, Lockstep, Sync, decode, encode, request_fields, request_from_fields
from dspark_jax.engine.scheduler import Request, Scheduler
from dspark_jax.models import create_target
from dspark_jax.speculative.decode import Core
from dspark_jax.speculative.schedule import SpecParams

ARCH = LlamaArch(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, eos_token_ids=(), max_position_embeddings=256)


def request(i: int, prompt, max_tokens: int, stops: bool = True) -> Request:
    """Request `r{i}`, sampled (with filters) from its own seed; `stops`: stop strings and ids too."""
    params = RequestParams(max_tokens=max_tokens, temperature=0.7, top_k=5, top_p=0.9, seed=2 ** 32 - 1 - i,
                           stop=("ab", "\n") if stops else (), stop_token_ids=(3, 9) if stops else ())
    return Request(id=f"r{i}", prompt=[int(t) for t in prompt], params=params, seed=params.seed, stream=i,
                   stop_ids=params.stop_token_ids[::-1])


def test_a_sync_and_its_requests_survive_encoding():
    original = request(1, [5, 0, 63], 12)
    sync = Sync([["add", request_fields(original)], ["retire", "r0", "abort"]], "step", "00ff", [[4, True, 0.0125]])
    back = decode(encode(sync))
    assert back == sync
    copy = request_from_fields(back.events[0][1])
    assert copy.params == original.params and request_fields(copy) == request_fields(original)
    assert isinstance(copy.params.stop, tuple) and isinstance(copy.stop_ids, tuple)
    with pytest.raises(ValueError, match="Sync.action='jump'"):
        decode(encode(Sync([], "jump", "", [])))


@pytest.mark.parametrize("length", [0, 1, 255, 256, 257, 5000])
def test_broadcast_bytes_in_one_process_returns_them(length):
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    assert sharding.broadcast_bytes_from_leader(data) == data
    assert Lockstep(leader=True).share({"sps": [0.0, 1.5, 1e-3], "closing": False}) == {
        "sps": [0.0, 1.5, 1e-3], "closing": False}


class Pipe:
    """A leader's and a follower's broadcast connected directly, with an optional tamperer in between."""

    def __init__(self, tamper=lambda sync: sync):
        self.queue = collections.deque()
        self.tamper = tamper

    def leader(self, data: bytes) -> bytes:
        self.queue.append(encode(self.tamper(decode(data))))
        return data

    def follower(self, data: bytes) -> bytes:
        return self.queue.popleft()


@pytest.fixture(scope="module")
def target():
    return randomize_params(create_target(ARCH, dtype="float32"), seed=4)


def pair(target, tamper=lambda sync: sync):
    def scheduler():
        core = Core(target, None, None, slots=2, max_context=64, page_size=16, num_pages=3, backend="xla")
        return Scheduler(core, prefill_chunk=16)
    pipe = Pipe(tamper)
    return scheduler(), Lockstep(True, pipe.leader), scheduler(), Lockstep(False, pipe.follower)


def add(scheduler: Scheduler, lockstep: Lockstep, r: Request) -> None:
    scheduler.add(r)
    lockstep.added(r)


def test_a_follower_replaying_the_leader_launches_the_same_steps(target):
    lead, lead_sync, follow, follow_sync = pair(target)
    # more requests than the 2 slots; r0 and r1 outgrow the 3 pages together (r1 is preempted, recomputed)
    shapes = [(10, 14), (12, 14), (5, 6), (20, 8)]
    mine = {f"r{i}": request(i, np.arange(n) * (i + 1) % 60, m, stops=False) for i, (n, m) in enumerate(shapes)}
    for r in list(mine.values())[:3]:
        add(lead, lead_sync, r)
    steps, replayed = 0, {}
    while lead.has_work() and steps < 100:
        steps += 1
        if steps == 3:
            add(lead, lead_sync, mine["r3"])
            lead.retire(mine["r2"], "abort")  # a cancel while it waits
            lead_sync.retired(mine["r2"], "abort")
        lead_sync.send("step", lead)
        assert follow_sync.receive(follow).action == "step"
        replayed.update(follow_sync._requests)
        lead.step()
        follow_sync.finished(follow.step().finished)
    lead_sync.send("stop", lead)
    assert follow_sync.receive(follow).action == "stop"
    assert not lead.has_work() and not follow.has_work() and not follow_sync._requests
    assert sorted(replayed) == sorted(mine)
    for i, r in mine.items():  # the same seeds drew the same tokens
        assert (replayed[i].tokens, replayed[i].finish_reason) == (r.tokens, r.finish_reason)
    assert mine["r2"].finish_reason == "abort"
    assert [len(mine[i].tokens) for i in ("r0", "r1", "r3")] == [14, 14, 8]
    assert lead.preemptions > 0 and follow.preemptions == lead.preemptions


def test_a_follower_takes_the_leaders_step_times_for_plain_steps(target):
    """Plain-step choices (PlainGate) depend on the leader's clock: the follower, without one, is fed
    the leader's timings in each Sync and makes the same choices (else the fingerprint would differ)."""
    draft = randomize_params(create_draft(DraftConfig(kind="dspark", num_layers=1, target_layer_ids=(0,),
                                                      mask_token_id=63, markov_rank=8, block_size=4), target), seed=5)
    spec = SpecParams(block_size=4, scheduler="causal", sps=tuple(1.0 / (1 + 0.05 * b) for b in range(11)))

    def scheduler(clock):
        core = Core(target, draft, spec, slots=2, max_context=64, page_size=16, num_pages=8, backend="xla")
        return Scheduler(core, prefill_chunk=16, plain_steps=True, clock=clock)
    pipe = Pipe()
    lead, follow = scheduler(time.perf_counter), scheduler(None)
    lead.gate.outbox = []
    lead_sync, follow_sync = Lockstep(True, pipe.leader), Lockstep(False, pipe.follower)
    mine = [request(i, np.arange(n) * (i + 1) % 60, m, stops=False) for i, (n, m) in enumerate([(6, 40), (9, 40)])]
    for r in mine:
        add(lead, lead_sync, r)
    replayed = {}
    while lead.has_work():
        lead_sync.send("step", lead)
        follow_sync.receive(follow)
        replayed.update(follow_sync._requests)
        lead.step()
        follow_sync.finished(follow.step().finished)
    lead_sync.send("stop", lead)
    follow_sync.receive(follow)  # the last timings, checked by the fingerprint
    assert lead.gate.seconds and follow.gate.state() == lead.gate.state()
    assert [replayed[r.id].tokens for r in mine] == [r.tokens for r in mine] and all(len(r.tokens) == 40 for r in mine)


def test_divergence_is_caught_before_the_next_step(target):
    def drop_first_add(sync):
        return Sync(sync.events[1:], sync.action, sync.fingerprint, sync.timings)

    lead, lead_sync, follow, follow_sync = pair(target, drop_first_add)
    add(lead, lead_sync, request(0, [1, 2, 3], 4))
    add(lead, lead_sync, request(1, [4, 5], 4))
    lead_sync.send("step", lead)
    with pytest.raises(Divergence, match="fingerprint"):
        follow_sync.receive(follow)

    lead, lead_sync, follow, follow_sync = pair(target)
    ours = request(0, [1, 2, 3], 4)
    add(lead, lead_sync, ours)
    lead_sync.send("step", lead)
    follow_sync.receive(follow)
    lead.step()
    follow.step()
    follow.retire(follow.active[0], "abort")  # something only the follower did
    lead_sync.send("step", lead)
    with pytest.raises(Divergence, match="fingerprint"):
        follow_sync.receive(follow)

    lead, lead_sync, follow, follow_sync = pair(target)
    lead_sync.retired(ours, "stop")  # a request the follower never saw
    lead_sync.send("idle", lead)
    with pytest.raises(Divergence, match="retires request r0"):
        follow_sync.receive(follow)


def test_engines_in_lockstep_serve_cancel_idle_and_stop_together(target):
    """A leader Engine and a follower Engine (on a thread) connected directly: requests, a cancel, an
    idle heartbeat and the shutdown all reach the follower, whose replay never diverges."""
    syncs, seen = queue.Queue(), []

    def leader_end(data):
        syncs.put(data)
        return data

    def follower_end(data):
        data = syncs.get(timeout=60)  # a leader that stops talking fails the test, not hangs it
        seen.append(decode(data).action)
        return data

    config = EngineConfig(max_batch=2, max_context=64, page_size=16, num_pages=3, prefill_chunk=16, warmup=False,
                          compilation_cache=False, kernels="xla")  # the Cores above: their programs compiled
    leader, follower = Engine(target, None, config=config), Engine(target, None, config=config)
    leader._lockstep = Lockstep(True, leader_end)
    follower.leader, follower._lockstep = False, Lockstep(False, follower_end)
    failure = []

    def follow():
        try:
            follower.follow()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failure.append(e)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    leader.start()
    handles = [leader.submit(np.arange(n) * (i + 1) % 60, RequestParams(max_tokens=m, temperature=0.7, top_k=5, top_p=0.9, seed=i))
               for i, (n, m) in enumerate([(10, 14), (12, 14), (5, 6), (20, 8)])]
    handles[2].cancel()
    finals = [list(h)[-1] for h in handles]
    assert [f.finish_reason for f in finals] == ["length", "length", "abort", "length"]
    time.sleep(1.5)  # idle: a heartbeat
    leader.shutdown(drain_timeout=5)
    thread.join(timeout=60)
    assert not thread.is_alive() and not failure, failure
    assert seen[-1] == "stop" and "idle" in seen and seen.count("step") > 10
    assert not follower.scheduler.has_work() and not follower._lockstep._requests


def test_one_process_is_the_leader_and_cannot_follow(target):
    engine = Engine(target, None, config=EngineConfig(max_batch=1, max_context=32, warmup=False,
                                                      compilation_cache=False, kernels="xla"))
    assert engine.leader
    with pytest.raises(RuntimeError, match="follow"):
        engine.follow()
