"""`python -m dspark_jax.serve --config NAME.py [--set a.b=value ...] [--host H] [--port P] [--api-key KEY]`

Starts the OpenAI-compatible HTTP server (dspark_jax.server) for the configured target and
draft: /v1/completions, /v1/chat/completions, /v1/models, /metrics, /health. It binds
serve.host:serve.port (127.0.0.1:8000 by default; --port 0 picks a free port), prints one JSON
line {"listening": URL}; /health turns 200 once the engine has warmed up. With --api-key (or
DSPARK_API_KEY) every route but /health needs `Authorization: Bearer KEY`. SIGTERM stops
accepting, lets running requests finish for --drain-timeout seconds, then exits.

`--prompt "..."`: one-shot generation with the configured target and draft: prints the completion, then one JSON
line of stats (tokens, tokens/s, accepted length when a draft is used).

`--dry-run [--devices N] [--batch B] [--context C] [--device-memory GIB]` builds the model
abstractly (shapes only: no weights, no allocation) and prints one JSON line of sizes: parameters
(total, active per token), weight bytes, decoding-state bytes per token and per request, and
whether weights + the state of B requests of C positions fit N devices (split evenly) of the
given memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax

from dspark_jax.cache import kv_cache_bytes
from dspark_jax.checkpoint.hf import arch_from_hf_config, read_config_json
from dspark_jax.config import Config, ConfigError, DeepseekV4Arch, load_config
from dspark_jax.loading import checkpoint_folder, load_draft, load_target, load_tokenizer, target_folder
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
    parser.add_argument("--host", help="HTTP: address to bind (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP: port to bind (default serve.port; 0 = any free port)")
    parser.add_argument("--api-key", default=os.environ.get("DSPARK_API_KEY"),
                        help="HTTP: require 'Authorization: Bearer KEY' on every route but /health "
                             "(default $DSPARK_API_KEY; none = open)")
    parser.add_argument("--served-model-name", help="HTTP: the model id clients name (default: the target "
                        "source's file or folder name, or the config's name for random weights)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="HTTP: on SIGTERM, how long running requests may take to finish (default 30)")
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


def refuse_v4(cfg: Config, folder: Path | None) -> None:
    """Generation drives dense targets only; say so before loading any weights."""
    arch = cfg.target.arch if folder is None else arch_from_hf_config(read_config_json(folder))
    if isinstance(arch, DeepseekV4Arch):
        what = "target.arch is DeepSeek-V4" if folder is None else \
            f"target.source={cfg.target.source!r} is a DeepSeek-V4 checkpoint"
        raise ConfigError(f"{what}: generation drives dense targets only so far; V4 offers --dry-run "
                          "(and dspark_jax.models.deepseek_v4.v4_step)")


def run_prompt(cfg: Config, prompt: str) -> dict:
    folder = checkpoint_folder(cfg, "--prompt")
    refuse_v4(cfg, folder)
    target = load_target(cfg)
    tokenizer = load_tokenizer(folder)
    draft = load_draft(cfg, target)
    if cfg.serve.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
    else:
        ids = tokenizer.encode(prompt)
    sampling = SamplingParams(temperature=cfg.serve.temperature, top_k=cfg.serve.top_k, top_p=cfg.serve.top_p)
    res = generate(target, draft, [ids], max_new_tokens=cfg.serve.max_new_tokens, sampling=sampling,
                   spec=spec_params(cfg, draft) if draft is not None else None, seed=cfg.serve.seed,
                   page_size=cfg.serve.page_size, prefill_chunk=cfg.serve.prefill_chunk, kernels=cfg.serve.kernels)
    print(tokenizer.decode(res.tokens[0]), flush=True)
    new = len(res.tokens[0])
    stats = {
        "prompt_tokens": len(ids), "new_tokens": new, "seconds": round(res.seconds, 3),
        "tokens_per_s": round(new / res.seconds, 2),
        "decode_tokens_per_s": round((new - 1) / res.decode_seconds, 2) if res.decode_seconds > 0 else None,
        "device": jax.devices()[0].device_kind, "draft": cfg.draft.kind,
    }
    if draft is not None:
        stats.update(acceptance_length=round(res.stats.acceptance_length, 3), rounds=res.stats.rounds,
                     verified_tokens=res.stats.verified_tokens, scheduler=cfg.spec.scheduler)
    return stats


def run_http(cfg: Config, args: argparse.Namespace) -> int:
    """Load the target, tokenizer (none for random weights) and draft, and serve them over HTTP."""
    # here, not at the top: fastapi/uvicorn are the `serve` extra, which --prompt and --dry-run do without
    from dspark_jax.server import ServedModel, create_app, run_server

    folder = target_folder(cfg)
    refuse_v4(cfg, folder)
    target = load_target(cfg)
    tokenizer = load_tokenizer(folder) if folder is not None else None
    draft = load_draft(cfg, target)
    engine = Engine(target, draft, tokenizer=tokenizer, spec=spec_params(cfg, draft) if draft is not None else None,
                    config=EngineConfig.from_serve(cfg.serve))
    name = args.served_model_name or Path(cfg.target.source).name or Path(args.config).stem
    served = ServedModel(name=name, tokenizer=tokenizer, vocab_size=target.arch.vocab_size,
                         max_context=cfg.serve.max_context, defaults=cfg.serve)
    app = create_app(engine, served, api_key=args.api_key, drain_timeout=args.drain_timeout)
    return run_server(app, host=args.host or cfg.serve.host, port=cfg.serve.port if args.port is None else args.port,
                      drain_timeout=args.drain_timeout)


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
            return run_http(cfg, args)
        print(json.dumps(run_prompt(cfg, args.prompt)), flush=True)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
