"""`generate`: a batch of token-id prompts decoded to completion, plainly or speculatively."""

from __future__ import annotations

import dataclasses

from dspark_jax.cache import bucket
from dspark_jax.speculative.decode import GenerateResult, Session
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
    tokens, schedules how many to verify and verifies them losslessly. Request i's random stream
    depends only on (seed, i) and its own progress, so its output does not depend on the rest of
    the batch.
    `kernels` picks the kernel backend ("auto", "pallas", "xla", "interpret"; see dspark_jax.kernels).
    `record_rounds` keeps every request-round's lengths, acceptances and confidence logits
    (`result.rounds`), read back once at the end.
    """
    spec = spec or SpecParams()
    if draft is not None and spec.scheduler in ("causal", "async") and spec.sps is None:
        spec = dataclasses.replace(spec, sps=profile_sps(target, draft, rows=bucket(len(prompts)),
                                                         gamma=spec.block_size))
    session = Session(target, draft, prompts, max_new_tokens=max_new_tokens, sampling=sampling or SamplingParams(),
                      spec=spec, seed=seed, page_size=page_size, prefill_chunk=prefill_chunk, backend=kernels,
                      record_rounds=record_rounds)
    if draft is None:
        for step in range(max_new_tokens - 1):
            if step % 8 == 0 and session.sync():
                break
            session.plain_step()
    else:
        for step in range(max_new_tokens):
            if step % 4 == 0 and session.sync():
                break
            session.spec_round()
    return session.result()
