"""Where compile time goes: tracing, lowering (Pallas kernels are built here) and XLA compilation.

    python serve/bench_compile.py --out compile.json [--cases pallas:4:1,xla:36:1,...] [--budget-s 540]

A case is `backend:layers:rows[:cache]`: a Qwen3-4B-shaped target (random bf16 weights) cut to
`layers` decoder layers, with the 5-layer DSpark draft of configs/qwen3_4b.py, serving `rows`
requests of a 1,024-token context. Each case runs in a fresh process (so nothing is cached in
memory) and times: placing the requests (a prefill program), the first plain decode step, the
first speculative round (γ = 7, fixed, every draft token verified), then the steady step and
round (medians). XLA_FLAGS in the environment (e.g. --xla_gpu_autotune_level=0) apply to every case. JAX's compile events
are summed per program and phase. `cache` names a persistent compilation cache folder (under
--cache-root) shared by the cases that name it: the second case on one folder measures a warm cache. Cases run in order
and each gets what is left of --budget-s; a case cut short is recorded as such.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "compile",
          "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read"}


def run_case(backend: str, layers: int, rows: int, cache: str | None) -> dict:
    import jax

    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    phases = collections.defaultdict(float)
    programs = collections.defaultdict(lambda: collections.defaultdict(float))

    def listen(event, duration, **kw):
        if event in EVENTS:
            phases[EVENTS[event]] += duration
            programs[kw.get("fun_name", "?")][EVENTS[event]] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)

    import dataclasses

    import numpy as np

    import dspark_jax as dj
    from dspark_jax.cache import pages_for
    from dspark_jax.drafts import create_draft
    from dspark_jax.models import create_target
    from dspark_jax.speculative.decode import Core
    from dspark_jax.speculative.profile import place_rows
    from dspark_jax.speculative.schedule import SpecParams
    sys.path.insert(0, os.path.dirname(__file__))
    from timing import timed

    cfg = dj.load_config("qwen3_4b.py")
    arch = dataclasses.replace(cfg.target.arch, num_layers=layers)
    ids = cfg.draft.target_layer_ids if layers == cfg.target.arch.num_layers else tuple(range(min(5, layers - 1)))
    target = create_target(arch, dtype="bfloat16")
    draft = create_draft(dataclasses.replace(cfg.draft, target_layer_ids=ids), target)
    out = {"backend": backend, "layers": layers, "rows": rows, "cache": bool(cache),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "device": jax.devices()[0].device_kind}

    def stage(name, fn):
        before = dict(phases)
        start = time.perf_counter()
        result = fn()
        out[f"{name}_s"] = round(time.perf_counter() - start, 3)
        out[f"{name}_compile_phases_s"] = {k: round(v - before.get(k, 0.0), 3) for k, v in phases.items()}
        print(json.dumps({name: out[f"{name}_s"], **out[f"{name}_compile_phases_s"]}), flush=True)
        return result

    context, gamma = 1024, 7
    max_context = context + 512

    def core_of(draft_or_none, prefix):
        """A core with `rows` requests at `context` positions (its first prefill program compiled)."""
        spec = SpecParams(block_size=gamma, scheduler="fixed") if draft_or_none is not None else None
        core = Core(target, draft_or_none, spec, slots=rows, max_context=max_context, page_size=16,
                    num_pages=rows * pages_for(max_context + gamma, 16), backend=backend)
        table = np.arange(rows * core.pages_per_row, dtype=np.int32).reshape(rows, core.pages_per_row)
        slots = stage(f"{prefix}_prefill", lambda: place_rows(core, rows, context, table, np.random.default_rng(0)))
        jax.block_until_ready(core.state)
        return core, slots, table

    plain, slots, table = core_of(None, "plain")

    def plain_step():
        return plain.decode(slots, table, False).count

    stage("plain_first_step", lambda: jax.block_until_ready(plain_step()))
    out["plain_step_ms"] = round(timed(plain_step, repeats=20) * 1e3, 3)
    del plain
    spec, slots, table = core_of(draft, "spec")

    def spec_round():
        return spec.fused_round(slots, table, False, rows * gamma, rows * (gamma + 1)).count

    stage("first_round", lambda: jax.block_until_ready(spec_round()))
    out["round_ms"] = round(timed(spec_round, repeats=10) * 1e3, 3)
    out["programs"] = {name: {k: round(v, 3) for k, v in p.items()} for name, p in programs.items()}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="pallas:4:1:a,pallas:4:1:a,xla:36:1,pallas:36:1")
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--cache-root", help="folder of the named compilation caches (default: a new temp folder)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.case:
        backend, layers, rows, cache = json.loads(args.case)
        with open(args.out, "w") as f:
            json.dump(run_case(backend, layers, rows, cache), f)
        return

    deadline = time.monotonic() + args.budget_s
    cache_root = args.cache_root or tempfile.mkdtemp(prefix="jaxcache_")
    results = []
    for spec in args.cases.split(","):
        backend, layers, rows, *name = spec.split(":")
        cache = None
        if name:
            cache = os.path.join(cache_root, name[0])
        left = deadline - time.monotonic()
        row = {"case": spec}
        if left < 20:
            row["skipped"] = "budget spent"
        else:
            part = f"{args.out}.{len(results)}.json"
            cmd = [sys.executable, __file__, "--out", part, "--case", json.dumps([backend, int(layers), int(rows), cache])]
            print(f"== {spec} ({left:.0f} s left)", flush=True)
            start = time.monotonic()
            try:
                proc = subprocess.run(cmd, timeout=left, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                row.update(json.load(open(part)) if proc.returncode == 0 else {"failed": proc.returncode})
            except subprocess.TimeoutExpired:
                row["timed_out_after_s"] = round(time.monotonic() - start, 1)
        results.append(row)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(f"{'case':18s} {'plain pre':>9s} {'1st step':>9s} {'step ms':>9s} {'spec pre':>9s} {'1st round':>9s} "
          f"{'round ms':>9s}")
    for r in results:
        cells = [r.get(k, "-") for k in ("plain_prefill_s", "plain_first_step_s", "plain_step_ms", "spec_prefill_s",
                                         "first_round_s", "round_ms")]
        note = r.get("skipped") or (f"timed out {r['timed_out_after_s']} s" if "timed_out_after_s" in r else "")
        print(f"{r['case']:18s} " + " ".join(f"{c:>9}" for c in cells) + f" {note}")


if __name__ == "__main__":
    main()
