"""`python -m dspark_jax.serve --config NAME.py [--set a.b=value ...] --prompt "..."`

One-shot generation with the configured target and draft through the engine: prints the
completion, then one JSON line of stats (tokens, tokens/s, accepted length when a draft is used).
A config of random weights has no tokenizer: its prompt is token ids separated by spaces, and the
completion prints as token ids. A target whose weights and state do not fit this machine's
devices is refused before anything loads.

`--dry-run [--devices N] [--batch B] [--context C] [--device-memory GIB]` builds the model
abstractly (shapes only: no weights, no allocation) and prints one JSON line of sizes: parameters
(total, active per token), weight bytes, decoding-state bytes per token and per request, and
whether weights + the state of B requests of C positions fit N devices (split evenly) of the
given memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax

from dspark_jax.cache import kv_cache_bytes
from dspark_jax.checkpoint.hf import arch_from_hf_config, read_config_json
from dspark_jax.config import Config, ConfigError, DeepseekV4Arch, load_config
from dspark_jax.loading import load_draft, load_target, load_tokenizer, target_folder
from dspark_jax.models import abstract_target, parameter_counts
from dspark_jax.models.common import as_dtype
from dspark_jax.models.deepseek_v4 import DeepseekV4ForCausalLM
from dspark_jax.engine import Engine, EngineConfig, RequestParams
from dspark_jax.speculative.schedule import SpecParams


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dspark_jax.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, or a bare name from configs/")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. serve.temperature=0.7 (repeatable)")
    parser.add_argument("--prompt", help="generate one completion for this text and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the model's sizes as JSON; build nothing")
    parser.add_argument("--devices", type=int, default=1, help="dry run: devices the model is split over")
    parser.add_argument("--batch", type=int, help="dry run: concurrent requests (default serve.max_batch)")
    parser.add_argument("--context", type=int, help="dry run: positions per request (default serve.max_context)")
    parser.add_argument("--device-memory", type=float, default=80.0, metavar="GIB",
                        help="dry run: memory per device in GiB (default 80, an H100)")
    return parser.parse_args(argv)


def spec_params(cfg: Config, draft) -> SpecParams:
    block = cfg.spec.block_size or cfg.draft.block_size
    return SpecParams(block_size=block, scheduler=cfg.spec.scheduler, threshold=cfg.spec.threshold)


def prompt_ids(tokenizer, cfg: Config, prompt: str) -> list[int]:
    """The prompt's token ids: through the chat template (serve.chat) or plain encoding; without a
    tokenizer (random weights) the prompt is the token ids themselves, separated by spaces."""
    if tokenizer is None:
        try:
            return [int(t) for t in prompt.split()]
        except ValueError:
            raise ConfigError(f"--prompt {prompt!r}: this config builds random weights (target.source is empty), so "
                              "there is no tokenizer: give token ids separated by spaces, e.g. --prompt '1 2 3'") from None
    if cfg.serve.chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True)
    return tokenizer.encode(prompt)


def device_memory_gib() -> float:
    """Memory of one device (host memory for the CPU backend), in GiB."""
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] / 2 ** 30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30


def ensure_fits(cfg: Config, *, batch: int, context: int) -> None:
    """Refuse, before loading anything, a target whose weights and decoding state exceed this machine's devices."""
    devices, memory = jax.device_count(), device_memory_gib()
    sizes = dry_run(cfg, devices=devices, batch=batch, context=context, device_memory_gib=memory)
    if not sizes["fits"]:
        gib = 2 ** 30
        raise ConfigError(
            f"the target does not fit: {sizes['weight_bytes'] / gib:.1f} GiB of weights + "
            f"{sizes['draft_weight_bytes'] / gib:.1f} GiB of draft blocks + the state of {batch} request(s) of "
            f"{context} positions need {sizes['bytes_per_device'] / gib:.1f} GiB per device split over {devices} "
            f"{jax.devices()[0].device_kind} device(s) of {memory:.1f} GiB (serve --dry-run shows the sizes)")


def run_prompt(cfg: Config, prompt: str) -> dict:
    folder = target_folder(cfg)
    tokenizer = load_tokenizer(folder) if folder is not None else None
    ids = prompt_ids(tokenizer, cfg, prompt)
    serve = cfg.serve
    params = RequestParams(max_tokens=serve.max_new_tokens, temperature=serve.temperature, top_k=serve.top_k,
                           top_p=serve.top_p, seed=serve.seed)
    # One request: an engine of one slot sized to it, compiling only the shapes this request meets.
    config = dataclasses.replace(EngineConfig.from_serve(serve), max_batch=1, num_pages=0, warmup=False,
                                 max_context=min(serve.max_context, len(ids) + params.max_tokens))
    ensure_fits(cfg, batch=1, context=config.max_context)
    target = load_target(cfg)
    draft = load_draft(cfg, target)
    engine = Engine(target, draft, tokenizer=tokenizer, spec=spec_params(cfg, draft) if draft is not None else None,
                    config=config)
    engine.start()
    try:
        new = []
        for out in engine.submit(ids, params):
            print(out.text, end="", flush=True)
            new += out.token_ids
    finally:
        engine.shutdown(drain_timeout=0)
    print("" if tokenizer is not None else " ".join(map(str, new)), flush=True)  # ids when there is no text
    if out.finish_reason == "abort":
        raise RuntimeError("the engine failed while generating (its log says why)")
    took = out.stats
    decode_seconds = took.seconds - took.time_to_first_token
    stats = {
        "prompt_tokens": len(ids), "new_tokens": len(new), "seconds": round(took.seconds, 3),
        "tokens_per_s": round(len(new) / took.seconds, 2),
        "decode_tokens_per_s": round((len(new) - 1) / decode_seconds, 2) if decode_seconds > 0 else None,
        "device": jax.devices()[0].device_kind, "draft": cfg.draft.kind,
    }
    if draft is not None:
        stats.update(acceptance_length=round(took.acceptance_length or 0.0, 3), rounds=took.rounds,
                     verified_tokens=took.verified_tokens, scheduler=cfg.spec.scheduler)
    return stats


def dry_run(cfg: Config, *, devices: int, batch: int, context: int, device_memory_gib: float) -> dict:
    """Sizes of the configured target (and the draft blocks it carries) from shapes alone."""
    for name, value in (("--devices", devices), ("--batch", batch), ("--context", context)):
        if value < 1:
            raise ConfigError(f"{name}={value}; expected >= 1")
    if device_memory_gib <= 0:
        raise ConfigError(f"--device-memory={device_memory_gib}; expected > 0 (GiB)")
    folder = target_folder(cfg)
    arch = cfg.target.arch if folder is None else arch_from_hf_config(read_config_json(folder))
    dtype = cfg.target.dtype
    model = abstract_target(arch, dtype=dtype)
    counts = parameter_counts(model)
    routed_fraction = arch.num_experts_per_tok / arch.n_routed_experts if isinstance(arch, DeepseekV4Arch) else 1.0
    if isinstance(model, DeepseekV4ForCausalLM):
        # The state grows by one compressed entry per ratio tokens; the windows are a fixed cost.
        per_request = model.state_bytes(context)
        per_token = (model.state_bytes(context + 2 ** 20) - model.state_bytes(context)) / 2 ** 20
    else:
        per_token = kv_cache_bytes(model.kv_heads_and_dims(), 1, as_dtype(dtype))
        per_request = per_token * context
    total_bytes = counts["bytes"] + counts["draft_bytes"] + batch * per_request
    per_device = -(-total_bytes // devices)
    memory = int(device_memory_gib * 2 ** 30)
    return {
        "params_total": counts["total"],
        "params_active": round(counts["total"] - counts["routed"] * (1 - routed_fraction)),
        "weight_bytes": counts["bytes"],
        "kv_bytes_per_token": round(per_token),
        "bytes_per_device": per_device,
        "fits": per_device <= memory,
        "params_draft": counts["draft"],
        "draft_weight_bytes": counts["draft_bytes"],
        "kv_bytes_per_request": per_request,
        "devices": devices, "batch": batch, "context": context, "device_memory_bytes": memory,
        "dtype": dtype, "arch": type(arch).__name__,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.dry_run:
            batch = cfg.serve.max_batch if args.batch is None else args.batch
            context = cfg.serve.max_context if args.context is None else args.context
            print(json.dumps(dry_run(cfg, devices=args.devices, batch=batch, context=context,
                                     device_memory_gib=args.device_memory)), flush=True)
            return 0
        if args.prompt is None:
            raise ConfigError("nothing to do: pass --prompt TEXT (HTTP serving is not available yet)")
        print(json.dumps(run_prompt(cfg, args.prompt)), flush=True)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
