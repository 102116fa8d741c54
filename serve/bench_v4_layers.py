"""Step times of a few DeepSeek-V4 layers at real width, with quantized weights, against their floors.

    python serve/bench_v4_layers.py --out v4_layers.json [--config v4_flash.py] [--layers 4]
        [--prefill 4096] [--batches 1,16,64] [--context 8192] [--verify 6]

Builds a random-weight stack of the first kinds of the configured architecture (default: V4-Flash,
FP8 linears and FP4 routed experts kept quantized, dequantized inside each jitted step) — by
default [window-only, CSA, HCA, CSA] — and measures on the current device, in one process:
- the copy bandwidth ceiling (an elementwise pass, read + write bytes);
- prefill: one request of `--prefill` tokens from an empty state, per layer and for the whole stack;
- decode (1 token per request) and verification (`--verify` tokens per request) at each batch, every
  request already holding `--context` positions, per layer and for the whole stack (embedding,
  layers, final collapse and head).
Each step's floor is the bytes it must move (weights it reads, including the routed experts the
batch touches, expected under uniform routing; decoding state it reads) over the measured bandwidth.
Prefill also reports the matmul + attention FLOP rate. Every time is the median of synchronised
repeats after warm-up. Sized for one 80 GB H100 at the defaults (~19 GB of weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.config import DeepseekV4Arch, load_config
from dspark_jax.models import create_target, split_static
from dspark_jax.models.deepseek_v4 import V4Context, V4State, v4_layout
from dspark_jax.models.quant import FP4_GROUP, FP8_BLOCK
from timing import copy_bandwidth, timed  # serve/timing.py (serve/ is the script's folder)

KINDS = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")


def stack_arch(base: DeepseekV4Arch, layers: int) -> DeepseekV4Arch:
    """`layers` layers cycling window-only, CSA, HCA, CSA, HCA, ...; hash routing in the first; no draft blocks."""
    kinds = tuple(KINDS[0] if i == 0 else KINDS[1 + (i - 1) % 2] for i in range(layers))
    return dataclasses.replace(base, num_layers=layers, layer_types=kinds, num_hash_layers=min(1, layers),
                               dspark_block_size=0, dspark_noise_token_id=-1, dspark_target_layer_ids=(),
                               dspark_markov_rank=0)


# --------------------------------------------------------------------------------------------
# floors


def _fp8_bytes(out_dim: int, in_dim: int) -> int:
    return out_dim * in_dim + -(-out_dim // FP8_BLOCK) * -(-in_dim // FP8_BLOCK)


def _expert_bytes(a: DeepseekV4Arch) -> int:
    h, i = a.hidden_size, a.moe_intermediate_size
    return 2 * (i * h // 2 + i * h // FP4_GROUP) + (h * i // 2 + h * i // FP4_GROUP)


def layer_weight_bytes(a: DeepseekV4Arch, kind: str, experts_touched: float) -> float:
    """Bytes of the weights one step of this layer reads (quantized as stored)."""
    h, hd, bf16 = a.hidden_size, a.head_dim, 2
    total = (_fp8_bytes(a.q_lora_rank, h) + _fp8_bytes(a.num_heads * hd, a.q_lora_rank) + _fp8_bytes(hd, h)
             + _fp8_bytes(a.o_groups * a.o_lora_rank, a.num_heads * hd // a.o_groups)
             + _fp8_bytes(h, a.o_groups * a.o_lora_rank))
    if kind == KINDS[2]:
        total += 2 * hd * h * bf16
    if kind == KINDS[1]:
        c = a.index_head_dim
        total += 2 * 2 * hd * h * bf16 + 2 * 2 * c * h * bf16 + a.index_n_heads * h * bf16
        total += _fp8_bytes(a.index_n_heads * c, a.q_lora_rank)
    total += a.n_routed_experts * h * bf16 + 3 * _fp8_bytes(a.moe_intermediate_size, h)  # router, shared expert
    return total + experts_touched * _expert_bytes(a)


def state_read_bytes(a: DeepseekV4Arch, kind: str, batch: int, queries: int, context: int) -> float:
    """Decoding-state bytes a step reads: the window, and the compressed entries attention needs."""
    hd, bf16 = a.head_dim, 2
    total = batch * (min(context, a.sliding_window) + queries) * hd * bf16
    if kind == KINDS[2]:
        total += batch * (context // a.hca_ratio) * hd * bf16
    if kind == KINDS[1]:
        entries = context // a.csa_ratio
        total += batch * entries * a.index_head_dim * bf16  # every indexer key is scored
        total += batch * queries * min(a.index_topk, entries) * hd * bf16  # the selected entries
    return total


def expected_experts(a: DeepseekV4Arch, tokens: int) -> float:
    """Distinct experts `tokens` tokens touch when each picks top-k of E uniformly."""
    return a.n_routed_experts * (1 - (1 - a.num_experts_per_tok / a.n_routed_experts) ** tokens)


def prefill_flops(a: DeepseekV4Arch, kind: str, tokens: int) -> float:
    """Matmul and attention FLOPs of one layer over a prompt of `tokens` tokens (approximate: every
    query counted with a full window and half the compressed entries of the prompt)."""
    h, hd = a.hidden_size, a.head_dim
    linear = (a.q_lora_rank * h + a.num_heads * hd * a.q_lora_rank + hd * h
              + a.o_groups * a.o_lora_rank * a.num_heads * hd // a.o_groups + h * a.o_groups * a.o_lora_rank
              + a.n_routed_experts * h + 3 * a.moe_intermediate_size * h * (1 + a.num_experts_per_tok))
    keys = min(tokens, a.sliding_window)  # per query, roughly (the window fills after W tokens)
    if kind == KINDS[1]:
        c = a.index_head_dim
        linear += 2 * 2 * hd * h + 2 * 2 * c * h + a.index_n_heads * h + a.index_n_heads * c * a.q_lora_rank
        keys += min(a.index_topk, tokens // a.csa_ratio)
        indexer = 2 * a.index_n_heads * c * tokens * (tokens // a.csa_ratio) / 2
    else:
        indexer = 0.0
    if kind == KINDS[2]:
        linear += 2 * hd * h
        keys += tokens // a.hca_ratio / 2
    return 2 * linear * tokens + 4 * a.num_heads * hd * keys * tokens + indexer


# --------------------------------------------------------------------------------------------
# steps


@functools.partial(jax.jit, static_argnames=("graph",), donate_argnames=("layer_state",))
def run_layer(graph, params, layer_state, streams, tokens, layout):
    """One layer's step on its own state (layers of one kind share a graph, so they compile once)."""
    block = graph.merge(params)
    ctx = V4Context(layout, V4State([layer_state], rollback=0))
    return block(streams, tokens, ctx, 0), ctx.new_state().layers[0]


@functools.partial(jax.jit, static_argnames=("graph",), donate_argnames=("state",))
def run_stack(graph, params, state, tokens, layout):
    """The whole step: embedding, every layer, collapse, norm, head (logits of each request's last token)."""
    model = graph.merge(params)
    ctx = V4Context(layout, state)
    hidden, _ = model(tokens, layout.positions, ctx)
    last = jnp.maximum(layout.cu_q_lens[1:] - 1, 0)
    return model.logits(hidden[last]), ctx.new_state()


class Bench:
    def __init__(self, arch: DeepseekV4Arch, repeats: int, seed: int = 0):
        self.arch, self.repeats = arch, repeats
        self.model = create_target(arch, dtype="bfloat16", seed=seed)
        self.graph, self.params = split_static(self.model)
        self.layers = [split_static(layer) for layer in self.model.layers]
        self.rng = np.random.default_rng(seed)

    def _inputs(self, batch: int, queries: int, context: int):
        tokens = jnp.asarray(self.rng.integers(0, self.arch.vocab_size, batch * queries), jnp.int32)
        layout = v4_layout(np.full(batch, context), np.full(batch, queries), np.arange(batch),
                           num_tokens=batch * queries, max_q_len=queries, max_len=context + queries)
        streams = self.model.embed_streams(tokens)
        return tokens, layout, streams

    def measure(self, batch: int, queries: int, context: int) -> dict:
        """Per-layer and whole-stack seconds of one step: `queries` tokens for each of `batch` requests."""
        state = self.model.init_state(batch, context + queries)
        tokens, layout, streams = self._inputs(batch, queries, context)
        per_layer = []
        for i, (graph, params) in enumerate(self.layers):
            holder = {"state": state.layers[i]}

            def step(graph=graph, params=params, holder=holder):
                out, holder["state"] = run_layer(graph, params, holder["state"], streams, tokens, layout)
                return out

            per_layer.append(timed(step, self.repeats))
            state.layers[i] = holder["state"]
        holder = {"state": state}

        def whole():
            logits, holder["state"] = run_stack(self.graph, self.params, holder["state"], tokens, layout)
            return logits

        return {"layers": per_layer, "stack": timed(whole, self.repeats)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--config", default="v4_flash.py", help="config whose target arch is the base")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=4096, help="prompt tokens of the prefill step (0 = skip)")
    parser.add_argument("--batches", default="1,16,64", help="decode/verify batch sizes")
    parser.add_argument("--context", type=int, default=8192, help="positions each request already holds")
    parser.add_argument("--verify", type=int, default=6, help="tokens per request in a verification step (γ+1)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    base = load_config(args.config).target.arch
    if not isinstance(base, DeepseekV4Arch):
        parser.error(f"--config {args.config}: expected a DeepSeek-V4 target, got {type(base).__name__}")
    arch = stack_arch(base, args.layers)
    device = jax.devices()[0]
    bandwidth = copy_bandwidth()
    bench = Bench(arch, args.repeats)
    results = {"command": " ".join(["python", "serve/bench_v4_layers.py", *(argv if argv is not None else sys.argv[1:])]),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": device.device_kind, "jax": jax.__version__, "bandwidth_bytes_per_s": bandwidth,
               "layer_types": list(arch.layer_types), "weight_format": arch.weight_format, "steps": []}
    header = f"{'step':<10}{'batch':>6}{'tokens':>8}{'layer':>6}  {'kind':<30}{'ms':>9}{'floor ms':>10}{'x floor':>9}"
    print(f"device {device.device_kind}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, layers {arch.layer_types}")
    print(header)

    def record(name: str, batch: int, queries: int, context: int, timing: dict):
        tokens = batch * queries
        touched = expected_experts(arch, tokens)
        floors = []
        for i, kind in enumerate(arch.layer_types):
            moved = layer_weight_bytes(arch, kind, touched) + state_read_bytes(arch, kind, batch, queries, context)
            floors.append(moved / bandwidth)
            entry = {"step": name, "batch": batch, "queries": queries, "context": context, "layer": i, "kind": kind,
                     "seconds": timing["layers"][i], "floor_seconds": floors[-1], "bytes_moved": moved}
            if name == "prefill":
                entry["tflops"] = prefill_flops(arch, kind, tokens) / timing["layers"][i] / 1e12
            results["steps"].append(entry)
            print(f"{name:<10}{batch:>6}{tokens:>8}{i:>6}  {kind:<30}{1e3 * timing['layers'][i]:>9.3f}"
                  f"{1e3 * floors[-1]:>10.3f}{timing['layers'][i] / floors[-1]:>9.2f}")
        head = (2 * arch.vocab_size * arch.hidden_size) / bandwidth
        results["steps"].append({"step": name, "batch": batch, "queries": queries, "context": context,
                                 "layer": "stack", "seconds": timing["stack"],
                                 "floor_seconds": sum(floors) + head, "sum_of_layers": sum(timing["layers"])})
        print(f"{name:<10}{batch:>6}{tokens:>8}{'all':>6}  {'embed+layers+head':<30}{1e3 * timing['stack']:>9.3f}"
              f"{1e3 * (sum(floors) + head):>10.3f}{timing['stack'] / (sum(floors) + head):>9.2f}")
        with open(args.out, "w") as f:  # after every measurement, so a cut-off run keeps what it has
            json.dump(results, f, indent=2)

    if args.prefill:
        record("prefill", 1, args.prefill, 0, bench.measure(1, args.prefill, 0))
    for batch in (int(b) for b in args.batches.split(",") if b):
        record("decode", batch, 1, args.context, bench.measure(batch, 1, args.context))
        record("verify", batch, args.verify, args.context, bench.measure(batch, args.verify, args.context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
