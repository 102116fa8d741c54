"""`generate`: a batch of token-id prompts decoded to completion, plainly or speculatively.

It is the engine's own machinery run synchronously: one Scheduler over a Core with a slot per
prompt (the row bucket of the batch), every prompt submitted as a request, stepped until all are
done. Every round runs the whole bucket (finished requests ride along as padding): one round
program per batch size, where the engine sizes each round to its live requests.
"""

from __future__ import annotations

import time

import numpy as np

from dspark_jax.cache import bucket, pages_for
from dspark_jax.engine.params import RequestParams
from dspark_jax.engine.scheduler import Request, RoundFact, Scheduler, check_prompt, stop_ids_of
from dspark_jax.speculative.decode import Core, GenerateResult, RoundLog, SpecStats
from dspark_jax.speculative.profile import profile_sps
from dspark_jax.speculative.sampling import SamplingParams
from dspark_jax.speculative.schedule import SpecParams


def generate(target, draft, prompts, max_new_tokens: int = 128,
             sampling: SamplingParams | list[SamplingParams] | None = None,
             spec: SpecParams | None = None, seed: int = 0, *, page_size: int = 16, prefill_chunk: int = 512,
             kernels: str = "auto", record_rounds: bool = False) -> GenerateResult:
    """Generate continuations for a batch of token-id prompts of any lengths.

    `sampling` is one SamplingParams for all prompts or one per prompt (a batch may mix greedy and
    sampled requests). draft=None decodes plainly; otherwise each round drafts `spec.block_size`
    tokens, schedules how many to verify and verifies them losslessly. Prompt i draws from the
    random stream (seed, i) — the stream an engine request with this seed gets for i = 0 — and its
    own progress, so its output does not depend on the rest of the batch (with the fixed and
    threshold schedulers; causal and async share verify budgets across requests).
    `kernels` picks the kernel backend ("auto", "pallas", "xla", "interpret"; see dspark_jax.kernels).
    `record_rounds` keeps every request-round's lengths, acceptances and confidence logits
    (`result.rounds`). Causal and async scheduling without `spec.sps` profile this device once
    (cached on disk).
    """
    t0 = time.perf_counter()
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 1")
    count = len(prompts)
    per_request = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling or SamplingParams()] * count
    if len(per_request) != count:
        raise ValueError(f"sampling: {len(per_request)} SamplingParams for {count} prompts; pass one, or one each")
    spec = (spec or SpecParams()) if draft is not None else None
    gamma = spec.block_size if spec is not None else 0
    limit = target.arch.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) + max_new_tokens + gamma + 1 > limit:
            raise ValueError(f"prompts[{i}] has {len(p)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                             f"model's context of {limit} positions")

    slots = bucket(count)
    max_context = bucket(max(len(p) for p in prompts) + max_new_tokens, minimum=16)
    num_pages = slots * pages_for(max_context + gamma, page_size)
    core = Core(target, draft, spec, slots=slots, max_context=max_context, page_size=page_size, num_pages=num_pages,
                backend=kernels)
    if core.needs_sps:
        core.use_sps(profile_sps(target, draft, rows=slots, gamma=gamma, backend=kernels))
    scheduler = Scheduler(core, prefill_chunk=prefill_chunk, min_rows=slots)
    requests = []
    for i, (prompt, s) in enumerate(zip(prompts, per_request)):
        params = RequestParams(max_tokens=max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                               seed=seed)
        prompt = check_prompt(prompt, params, vocab=target.arch.vocab_size, max_context=max_context,
                              num_pages=num_pages, page_size=page_size, gamma=gamma, where=f"prompts[{i}]")
        requests.append(Request(id=str(i), prompt=prompt, params=params, seed=seed, stream=i,
                                stop_ids=stop_ids_of(core.eos_ids, params)))
        scheduler.add(requests[-1])
    facts: list[RoundFact] = []
    while scheduler.has_work():
        facts += scheduler.step().rounds
    end = time.perf_counter()
    t_first = max(r.first_token_at for r in requests)
    return GenerateResult(tokens=[r.tokens for r in requests], stats=spec_stats(facts, gamma), seconds=end - t0,
                          decode_seconds=end - t_first, rounds=round_log(facts) if record_rounds else None)


def spec_stats(facts: list[RoundFact], gamma: int) -> SpecStats:
    lengths = np.array([f.length for f in facts], np.int64)
    accepted = np.array([f.accepted for f in facts], np.int64)
    committed = sum(f.committed for f in facts)
    position = np.arange(gamma)[None, :]
    reached = ((lengths[:, None] > position) & (accepted[:, None] >= position)).sum(0)
    accepted_at = (accepted[:, None] > position).sum(0)
    rounds = max(len(facts), 1)
    return SpecStats(acceptance_length=committed / rounds,
                     accept_rate_per_position=[float(a) / max(int(r), 1) for a, r in zip(accepted_at, reached)],
                     survival_per_position=[float(a) / rounds for a in accepted_at],
                     verified_tokens=int(lengths.sum()) + len(facts), committed_tokens=committed, rounds=len(facts))


def round_log(facts: list[RoundFact]) -> RoundLog:
    def column(get):
        return np.array([get(f) for f in facts], np.int32)
    has_conf = bool(facts) and facts[0].confidence_logits is not None
    return RoundLog(request=column(lambda f: f.request.stream), lengths=column(lambda f: f.length),
                    accepted=column(lambda f: f.accepted), committed=column(lambda f: f.committed),
                    confidence_logits=np.stack([f.confidence_logits for f in facts]).astype(np.float32)
                    if has_conf else None)
