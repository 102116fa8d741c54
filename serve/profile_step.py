"""Where a decode step's (or speculative round's) time goes on the GPU: kernels, counts, idle gaps.

    python serve/profile_step.py --out profile.json [--rows 1,64] [--round] [--backend pallas] [--layers 36]

Profiles `--steps` plain decode steps (and, with --round, as many fixed-γ DSpark rounds) of the
Qwen3-4B-shaped target (random bf16 weights, 1,024-token context) with jax.profiler, reads the
device plane of the captured XSpace, and reports per step: wall time synchronised after every
step, time per step when steps are dispatched back to back (pipelined: host work overlaps the
GPU), GPU busy time (union of kernel intervals), kernel launches, and the kernels that cost most
(grouped by name). Busy well below pipelined means gaps between kernels; pipelined well below
synchronised means host dispatch time. Programs match serve/bench_compile.py's, so a persistent
compilation cache filled by one serves the other.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

import dspark_jax as dj
from dspark_jax.drafts import create_draft
from dspark_jax.models import create_target
from dspark_jax.speculative.decode import Session
from dspark_jax.speculative.sampling import SamplingParams
from dspark_jax.speculative.schedule import SpecParams

sys.path.insert(0, os.path.dirname(__file__))
from timing import timed  # noqa: E402  (serve/timing.py, beside this script)


def device_events(trace_dir: str):
    """(name, start_ns, duration_ns) of every kernel/memcpy on the first GPU plane of the trace."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(paths[0])
    for plane in data.planes:
        if plane.name.startswith("/device:GPU:0"):
            events = []
            for line in plane.lines:
                if "stream" in line.name.lower():  # skip the derived "XLA Ops"/"Steps" lines
                    events.extend((e.name, e.start_ns, e.duration_ns) for e in line.events)
            return events
    raise RuntimeError("no /device:GPU:0 plane in the trace (is this a GPU?)")


def busy_ns(events) -> float:
    """Length of the union of the kernels' intervals."""
    total, end = 0.0, -1.0
    for _, start, duration in sorted(events, key=lambda e: e[1]):
        stop = start + duration
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def kernel_family(name: str) -> str:
    """Group instances of one kernel: strip fusion numbering and template arguments."""
    return re.sub(r"(_\d+)+$", "", re.sub(r"<.*>", "<…>", name))[:90]


def profile(fn, steps: int) -> dict:
    timed(fn, repeats=3)
    wall = timed(fn, repeats=steps)
    trace_dir = tempfile.mkdtemp(prefix="trace_")
    jax.block_until_ready(fn())
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            out = fn()
        jax.block_until_ready(out)
    events = device_events(trace_dir)
    span = (max(start + duration for _, start, duration in events) - min(start for _, start, _ in events)) / steps
    families = collections.defaultdict(lambda: [0, 0.0])
    for name, _, duration in events:
        fam = families[kernel_family(name)]
        fam[0] += 1
        fam[1] += duration
    top = sorted(families.items(), key=lambda kv: -kv[1][1])[:25]
    return {"wall_ms": wall * 1e3, "pipelined_ms": span / 1e6, "busy_ms": busy_ns(events) / steps / 1e6,
            "launches": len(events) / steps,
            "kernels": [{"name": n, "per_step": c / steps, "us_per_step": d / steps / 1e3} for n, (c, d) in top]}


def show(label: str, row: dict) -> None:
    print(f"\n{label}: wall {row['wall_ms']:.3f} ms synchronised, {row['pipelined_ms']:.3f} ms pipelined, "
          f"GPU busy {row['busy_ms']:.3f} ms, {row['launches']:.0f} launches/step")
    for k in row["kernels"][:15]:
        print(f"  {k['us_per_step']:9.1f} us  {k['per_step']:6.1f}x  {k['name']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default="1,64")
    parser.add_argument("--round", action="store_true", help="also profile fixed-γ DSpark rounds")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--layers", type=int, default=0, help="cut the target to this many layers (0 = all)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    cfg = dj.load_config("qwen3_4b.py")
    arch = cfg.target.arch if not args.layers else dataclasses.replace(cfg.target.arch, num_layers=args.layers)
    ids = cfg.draft.target_layer_ids if not args.layers else tuple(range(min(5, args.layers - 1)))
    target = create_target(arch, dtype="bfloat16")
    draft = create_draft(dataclasses.replace(cfg.draft, target_layer_ids=ids), target)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
               "backend": args.backend, "layers": arch.num_layers, "runs": []}
    common = dict(sampling=SamplingParams(), seed=0, page_size=16, prefill_chunk=2048, backend=args.backend)
    for rows in map(int, args.rows.split(",")):
        prompts = [np.random.default_rng(r).integers(0, arch.vocab_size, 1024).tolist() for r in range(rows)]
        plain = Session(target, None, prompts, max_new_tokens=256, spec=SpecParams(), **common)

        def step():
            plain.plain_step()
            return plain.state.lens

        row = {"kind": "plain", "rows": rows, **profile(step, args.steps)}
        show(f"plain step, B={rows}", row)
        results["runs"].append(row)
        if args.round:
            spec = Session(target, draft, prompts, max_new_tokens=512, spec=SpecParams(block_size=7),
                           **common)

            def spec_round():
                spec.spec_round()
                return spec.state.lens

            row = {"kind": "round", "rows": rows, **profile(spec_round, args.steps)}
            show(f"DSpark round (γ=7, fixed), R={rows}", row)
            results["runs"].append(row)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
