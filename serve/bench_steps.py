"""Decode-step and speculative-round timings next to their bytes-moved floors.

    python serve/bench_steps.py --out steps.json [--models smollm2,qwen3_4b] [--batches 1,32]
                                [--round-rows 1,16,64] [--context 1024] [--smollm2-source DIR]

Measures on the current device, in one process: the copy bandwidth ceiling; the plain decode step
of each model at each batch (floor = weight bytes + KV bytes read, over that bandwidth); and, for
the Qwen3-4B-architecture target with a 5-layer DSpark draft, a breakdown of one round — draft
backbone, Markov loop, scheduling, verify (target pass + acceptance), commit (+ draft ingest) —
against the whole fused round, the plain decode step at the same batch and the speculative core's
own plain step (a decode that stashes the draft's inputs, plus its share of the flush that ingests
them every STASH_POSITIONS steps). Weights are random (timings depend on shapes only) unless
--smollm2-source names the converted real model. Every time is the median of synchronised repeats
after warm-up; plain steps are timed as runs of STASH_POSITIONS steps launched back to back (as a
server runs them), per step.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dspark_jax as dj
from dspark_jax.cache import kv_cache_bytes, pages_for, ragged_layout
from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.models import create_target
from dspark_jax.models.attention import PagedKV
from dspark_jax.speculative.decode import STASH_POSITIONS, Core, _commit, _gather, _merge, _round_keys
from dspark_jax.speculative.profile import place_rows
from dspark_jax.speculative.sampling import ACCEPT_STREAM, DRAFT_STREAM, position_keys
from dspark_jax.speculative.schedule import SpecParams, schedule_prefix, survival
from dspark_jax.speculative.verify import verify
from timing import copy_bandwidth, timed  # serve/timing.py (serve/ is the script's folder)

SMOLLM2 = LlamaArch()  # the defaults are SmolLM2-135M's


def param_bytes(model) -> int:
    return sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def core_at(target, draft, rows: int, context: int, gamma: int = 0):
    """A Core of `rows` slots, each holding a request at `context` positions (room for 256 more)."""
    max_context = context + 256 + gamma + 1
    per_row = pages_for(max_context + gamma, 16)
    core = Core(target, draft, SpecParams(block_size=gamma) if draft is not None else None, slots=rows,
                max_context=max_context, page_size=16, num_pages=rows * per_row)
    table = np.arange(rows * per_row, dtype=np.int32).reshape(rows, per_row)
    return core, place_rows(core, rows, context, table, np.random.default_rng(0)), table


def plain_step_seconds(core: Core, slots, table) -> float:
    """Seconds per plain step over runs of STASH_POSITIONS steps (a speculative core's ends with its flush)."""
    def run():
        for _ in range(STASH_POSITIONS):
            out = core.decode(slots, table, filters=False)
        if core.draft is not None:
            core.flush(slots, table)
        return out.count
    return timed(run, repeats=8, warmup=2) / STASH_POSITIONS


def bench_decode(name: str, target, batch: int, context: int, bandwidth: float) -> dict:
    core, slots, table = core_at(target, None, batch, context)
    seconds = plain_step_seconds(core, slots, table)
    kv = kv_cache_bytes(target.kv_heads_and_dims(), batch * (context + 10 * STASH_POSITIONS), target.dtype)
    floor = (param_bytes(target) + kv) / bandwidth
    return {"model": name, "batch": batch, "context": context, "step_ms": seconds * 1e3, "floor_ms": floor * 1e3,
            "floor_fraction": floor / seconds, "tokens_per_s": batch / seconds}


def bench_round(target, draft, rows: int, context: int, gamma: int) -> dict:
    """Each part of one DSpark round, timed on its own, plus the whole fused round."""
    sps = tuple(1.0 / (1.0 + 1e-3 * b) for b in range(rows * (gamma + 1) + 1))
    core, slots, table = core_at(target, draft, rows, context, gamma)
    state = _gather(core.state, jnp.asarray(slots), False)
    graphdefs, params, geometry = core.graphdefs, core.params, core.geometry
    budget = rows * (gamma + 1)

    @jax.jit
    def backbone(params, dstate, state):
        target, draft = _merge(graphdefs, params)
        hidden = draft.backbone(target, dstate, state.anchors, state.lens, table, gamma)
        return hidden, target.logits(hidden)

    @jax.jit
    def markov(params, hidden, base, state):
        _, draft = _merge(graphdefs, params)
        keys = _round_keys(state.keys, state.rounds, DRAFT_STREAM, gamma)
        return draft.sample_block(hidden, base, state.anchors, state.sampling, keys)

    @jax.jit
    def schedule(params, conf_logits):
        _, draft = _merge(graphdefs, params)
        return schedule_prefix(survival(draft.calibrated_confidence(conf_logits)), jnp.asarray(sps))

    @functools.partial(jax.jit, donate_argnums=(1,))
    def verify_pass(params, caches, state, tokens, probs, lengths):
        target, draft = _merge(graphdefs, params)
        layout = ragged_layout(table, state.lens, lengths + 1, num_tokens=budget, max_q_len=gamma + 1,
                               page_size=geometry.page_size, num_slots=geometry.num_slots)
        block = jnp.concatenate([state.anchors[:, None], tokens], axis=1)
        attn = PagedKV(caches, layout.meta)
        hidden, captured = target(block[layout.token_req, layout.token_slot], layout.positions, attn,
                                  capture=draft.capture_layers)
        logits = target.logits(hidden)
        grid = jnp.clip(layout.meta.cu_q_lens[:-1, None] + jnp.arange(gamma + 1)[None, :], 0, budget - 1)
        accepted, nxt = verify(logits[grid], tokens, probs, lengths,
                               position_keys(state.keys, state.rounds, ACCEPT_STREAM), state.sampling)
        features = jnp.concatenate([captured[i] for i in draft.capture_layers], axis=-1)
        return accepted, nxt, features, attn.caches

    @functools.partial(jax.jit, donate_argnums=(1,))
    def commit(params, dstate, state, history, tokens, accepted, nxt, features):
        target, draft = _merge(graphdefs, params)
        padded = jnp.concatenate([tokens, jnp.zeros_like(tokens[:, :1])], axis=1)
        candidates = jnp.where(jnp.arange(gamma + 1)[None, :] == accepted[:, None], nxt[:, None], padded)
        new_state, _, _ = _commit(state, history, candidates, accepted)
        layout = ragged_layout(table, state.lens, accepted + 1, num_tokens=budget, max_q_len=gamma + 1,
                               page_size=geometry.page_size, num_slots=geometry.num_slots)
        source = jnp.clip(layout.meta.cu_q_lens[layout.token_req] + layout.token_slot, 0, budget - 1)
        dstate = draft.ingest(target, dstate, features[source], candidates[layout.token_req, layout.token_slot],
                              layout, state.slots)
        return new_state, dstate

    hidden, base = backbone(params, core.dstate, state)
    tokens, probs, conf = markov(params, hidden, base, state)
    lengths = jnp.full((rows,), gamma, jnp.int32)
    parts = {
        "draft_backbone": timed(lambda: backbone(params, core.dstate, state)),
        "markov_loop": timed(lambda: markov(params, hidden, base, state)),
        "schedule": timed(lambda: schedule(params, conf)),
    }

    def run_verify():
        out = verify_pass(params, core.caches, state, tokens, probs, lengths)
        core.caches = out[-1]
        return out[0]

    parts["verify"] = timed(run_verify)
    accepted, nxt, features, core.caches = verify_pass(params, core.caches, state, tokens, probs, lengths)

    def run_commit():
        new_state, core.dstate = commit(params, core.dstate, state, core.state.history, tokens, accepted, nxt,
                                        features)
        return new_state.lens

    parts["commit"] = timed(run_commit)

    def run_round():
        return core.fused_round(slots, table, False, capacity=rows * gamma, budget=budget).count

    whole = timed(run_round)
    plain = plain_step_seconds(core, slots, table)  # the plain step of this speculative core
    total_parts = sum(parts.values())
    return {"rows": rows, "context": context, "gamma": gamma, "verify_tokens": budget,
            **{f"{k}_ms": v * 1e3 for k, v in parts.items()}, "round_ms": whole * 1e3,
            "spec_plain_step_ms": plain * 1e3,
            "parts_sum_ms": total_parts * 1e3,
            "draft_and_schedule_fraction": (parts["draft_backbone"] + parts["markov_loop"] + parts["schedule"])
            / total_parts, "markov_fraction": parts["markov_loop"] / total_parts}


def save(results: dict, path: str) -> None:
    """Rewrite the results after every measurement, so a run cut short keeps what it measured."""
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="smollm2,qwen3_4b")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--round-rows", default="1,16,64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--gamma", type=int, default=7)
    parser.add_argument("--smollm2-source", default="", help="converted SmolLM2 folder (else random weights)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of configs/qwen3_4b.py (e.g. a smaller arch for a smoke test)")
    args = parser.parse_args()

    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    results["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
    bandwidth = results["copy_bandwidth_GBps"] * 1e9
    print(f"device {results['device']}, copy bandwidth {results['copy_bandwidth_GBps']:.0f} GB/s", flush=True)

    qwen = dj.load_config("qwen3_4b.py", args.set)
    models = {}
    for name in args.models.split(","):
        if name == "smollm2":
            models[name] = (dj.load_target(args.smollm2_source, dtype="bfloat16") if args.smollm2_source
                            else create_target(SMOLLM2, dtype="bfloat16"))
        elif name == "qwen3_4b":
            models[name] = create_target(qwen.target.arch, dtype="bfloat16")
    results["decode"] = []
    for name, model in models.items():
        for batch in map(int, args.batches.split(",")):
            row = bench_decode(name, model, batch, args.context, bandwidth)
            results["decode"].append(row)
            save(results, args.out)
            print(f"decode {name:9s} B={batch:3d} ctx={args.context}: {row['step_ms']:.3f} ms "
                  f"(floor {row['floor_ms']:.3f} ms, {100 * row['floor_fraction']:.0f}%)", flush=True)

    results["rounds"] = []
    if "qwen3_4b" in models:
        target = models["qwen3_4b"]
        draft = create_draft(DraftConfig(**{**qwen.draft.__dict__, "block_size": args.gamma}), target)
        for rows in map(int, args.round_rows.split(",")):
            row = bench_round(target, draft, rows, args.context, args.gamma)
            plain = next((d for d in results["decode"] if d["model"] == "qwen3_4b" and d["batch"] == rows), None)
            row["plain_step_ms"] = plain["step_ms"] if plain else bench_decode(
                "qwen3_4b", target, rows, args.context, bandwidth)["step_ms"]
            results["rounds"].append(row)
            save(results, args.out)
            print(json.dumps(row), flush=True)
    save(results, args.out)


if __name__ == "__main__":
    main()
