"""Single-device regression check of sharding: the Qwen3-4B decode step with the model and its KV
cache placed on a one-device mesh (`sharding.place_model`, `init_kv_caches(mesh=...)`) against the
same model and cache not placed. Placement must cost nothing on one device.

    python serve/bench_mesh.py --out mesh.json [--batches 1,32] [--context 1024] [--set FIELD=VALUE ...]

One process, the first device, random bf16 weights of configs/qwen3_4b.py (the same values in both
copies). A step feeds one token per request at position `--context` of a paged cache and takes
the greedy next token; both copies must produce the same tokens. Each time is the median of
synchronised steps after warm-up, measured twice in alternation (unplaced, placed, unplaced,
placed) and the faster median kept; "met" means placed ≤ 1.03 × unplaced (timer noise).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import dspark_jax as dj
from dspark_jax import sharding
from dspark_jax.cache import init_kv_caches, pages_for, ragged_layout
from dspark_jax.models import create_target, split_static
from dspark_jax.models.attention import PagedKV
from timing import timed  # serve/timing.py (serve/ is the script's folder)

PAGE_SIZE = 16
TOLERANCE = 1.03


@functools.partial(jax.jit, static_argnames=("graph",), donate_argnames=("caches",))
def decode_step(graph, params, caches, tokens, lens, page_table):
    """One token per request at positions `lens`: (greedy next tokens, caches)."""
    model = graph.merge(params)
    rows, pages = page_table.shape
    layout = ragged_layout(page_table, lens, jnp.ones((rows,), jnp.int32), num_tokens=rows, max_q_len=1,
                           page_size=PAGE_SIZE, num_slots=rows * pages * PAGE_SIZE)
    attn = PagedKV(caches, layout.meta)
    hidden, _ = model(tokens, layout.positions, attn)
    return jnp.argmax(model.logits(hidden), axis=-1).astype(jnp.int32), attn.caches


class Decoder:
    """A batch of requests `context` positions deep, stepped greedily."""

    def __init__(self, model, batch: int, context: int, mesh=None):
        self.graph, self.params = split_static(model)
        pages = pages_for(context + 64, PAGE_SIZE)
        self.table = jnp.arange(batch * pages, dtype=jnp.int32).reshape(batch, pages)
        self.caches = init_kv_caches(model.kv_heads_and_dims(), num_pages=batch * pages, page_size=PAGE_SIZE,
                                     dtype=model.dtype, mesh=mesh)
        self.tokens = jnp.arange(batch, dtype=jnp.int32) % model.arch.vocab_size
        self.lens = jnp.full((batch,), context, jnp.int32)

    def step(self):
        # The position stays put: every timed step does the same work (and overwrites the same slot).
        self.tokens, self.caches = decode_step(self.graph, self.params, self.caches, self.tokens, self.lens,
                                               self.table)
        return self.tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per median")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of configs/qwen3_4b.py (e.g. a smaller arch for a smoke test)")
    args = parser.parse_args()

    arch = dj.load_config("qwen3_4b.py", args.set).target.arch
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    unplaced = create_target(arch, dtype="bfloat16")
    placed = sharding.place_model(create_target(arch, dtype="bfloat16"), mesh)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
               "context": args.context, "rows": []}
    for batch in map(int, args.batches.split(",")):
        runs = {"unplaced": Decoder(unplaced, batch, args.context),
                "placed": Decoder(placed, batch, args.context, mesh)}
        tokens = {name: [np.asarray(run.step()).tolist() for _ in range(4)] for name, run in runs.items()}
        medians = {name: [] for name in runs}
        for _ in range(2):
            for name, run in runs.items():
                medians[name].append(timed(run.step, repeats=args.steps))
        unplaced_ms, placed_ms = (1e3 * min(medians[name]) for name in ("unplaced", "placed"))
        row = {"batch": batch, "unplaced_ms": unplaced_ms, "placed_ms": placed_ms, "ratio": placed_ms / unplaced_ms,
               "same_tokens": tokens["unplaced"] == tokens["placed"],
               "cache_sharding": str(runs["placed"].caches[0][0].sharding)}
        row["met"] = row["same_tokens"] and row["ratio"] <= TOLERANCE
        results["rows"].append(row)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(f"{'batch':>5} {'unplaced ms':>12} {'placed ms':>10} {'ratio':>6} {'tokens':>7} met")
    for row in results["rows"]:
        print(f"{row['batch']:5d} {row['unplaced_ms']:12.3f} {row['placed_ms']:10.3f} {row['ratio']:6.3f} "
              f"{'same' if row['same_tokens'] else 'DIFFER':>7} {row['met']}")


if __name__ == "__main__":
    main()
