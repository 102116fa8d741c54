"""`python -m dspark_jax.serve --config NAME.py [--set a.b=value ...] [--host H] [--port P] [--api-key KEY]`

Starts the OpenAI-compatible HTTP server (dspark_jax.server) for the configured target and
draft: /v1/completions, /v1/chat/completions, /v1/models, /metrics, /health. It binds
serve.host:serve.port (127.0.0.1:8000 by default; --port 0 picks a free port), prints one JSON
line {"listening": URL}; /health turns 200 once the engine has warmed up. With --api-key (or
DSPARK_API_KEY) every route but /health needs `Authorization: Bearer KEY`. SIGTERM stops
accepting, lets running requests finish for --drain-timeout seconds, then exits.

`--prompt "..."`: one-shot generation with the configured target and draft through the engine:
prints the completion, then one JSON line of stats (tokens, tokens/s, and with a draft the accepted
length and each draft position's acceptance rate given every earlier one was accepted). A config of random weights has no tokenizer: its prompt is token ids separated by
spaces, and the completion prints as token ids.

Serving and --prompt refuse, before anything loads, a target whose weights and decoding state do
not fit the mesh's devices.

`--dry-run [--devices N] [--batch B] [--context C] [--device-memory GIB]` builds the model
abstractly (shapes only: no weights, no allocation) and prints one JSON line of sizes: parameters
(total, active per token), weight bytes, decoding-state bytes per token and per request, and
the bytes one device holds — weights and the state of B requests of C positions, each array
counted by its real partitioning on the device mesh — and whether that fits the given memory.

The mesh: `serve.mesh` = (data, tensor, expert) sizes, or N devices all on "tensor" with
`--devices N`; one device without either. A mesh that does not divide the model is refused.
With a mesh the target is loaded straight onto it (the first devices of every process; a
multi-process job — JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or SLURM / Open
MPI — is joined first, and every process runs the same command). Process 0 then serves (opens the
HTTP port, or generates and prints the --prompt's completion); the others open nothing, run
process 0's engine steps in lockstep (dspark_jax.engine.lockstep) and exit 0 when it stops. A
SIGTERM to one of them is ignored: it stops with process 0, which drains on its own SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

import jax

from dspark_jax.cache import kv_cache_bytes
from dspark_jax.checkpoint.hf import arch_from_hf_config, read_config_json
from dspark_jax.config import Config, ConfigError, DeepseekV4Arch, load_config
from dspark_jax.loading import load_draft, load_target, load_tokenizer, target_folder
from dspark_jax.models import abstract_target, parameter_counts
from dspark_jax.models.common import as_dtype
from dspark_jax.models.deepseek_v4 import DeepseekV4ForCausalLM
from dspark_jax.engine import Engine, EngineConfig, RequestParams
from dspark_jax.sharding import (KV_PAGES, abstract_mesh, bytes_per_device, initialize_distributed, make_mesh,
                                 shard_shape)
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
    parser.add_argument("--devices", type=int,
                        help="devices of the mesh (default: as many as serve.mesh spans, else 1); "
                             "without serve.mesh all on 'tensor'")
    parser.add_argument("--batch", type=int, help="dry run: concurrent requests (default serve.max_batch)")
    parser.add_argument("--context", type=int, help="dry run: positions per request (default serve.max_context)")
    parser.add_argument("--device-memory", type=float, default=80.0, metavar="GIB",
                        help="dry run: memory per device in GiB (default 80, an H100)")
    return parser.parse_args(argv)


def spec_params(cfg: Config, draft) -> SpecParams:
    block = cfg.spec.block_size or cfg.draft.block_size
    sps = None
    if cfg.spec.sps_profile:
        table = json.loads(Path(cfg.spec.sps_profile).read_text())
        if not isinstance(table, dict) or not isinstance(table.get("sps"), list):
            raise ConfigError(f"spec.sps_profile={cfg.spec.sps_profile!r} holds no \"sps\" list; expected a JSON "
                              "object like the tables profile_sps caches")
        sps = table["sps"]
    return SpecParams(block_size=block, scheduler=cfg.spec.scheduler, threshold=cfg.spec.threshold, sps=sps,
                      plain_steps=cfg.spec.plain_steps)


def mesh_devices(cfg: Config, devices: int | None) -> int:
    """How many devices the mesh spans: --devices, else serve.mesh's product, else 1."""
    if devices is not None and devices < 1:
        raise ConfigError(f"--devices={devices}; expected >= 1")
    if devices is not None:
        return devices
    return math.prod(cfg.serve.mesh) if cfg.serve.mesh else 1


def serving_mesh(cfg: Config, devices: int | None):
    """The mesh the target is loaded onto (None on one device)."""
    count = mesh_devices(cfg, devices)
    if count > jax.device_count():
        raise ConfigError(f"the mesh spans {count} devices; {jax.device_count()} are available")
    return make_mesh(cfg.serve.mesh, jax.devices()[:count]) if count > 1 else None


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
    """Memory of one of this process's devices (host memory for the CPU backend), in GiB."""
    stats = jax.local_devices()[0].memory_stats()  # another process's devices tell nothing
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] / 2 ** 30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30


def ensure_fits(cfg: Config, *, batch: int, context: int, devices: int) -> None:
    """Refuse, before loading anything, a target whose weights and decoding state exceed the mesh's devices."""
    memory = device_memory_gib()
    sizes = dry_run(cfg, devices=devices, batch=batch, context=context, device_memory_gib=memory)
    if not sizes["fits"]:
        gib = 2 ** 30
        raise ConfigError(
            f"the target does not fit: {sizes['weight_bytes'] / gib:.1f} GiB of weights + "
            f"{sizes['draft_weight_bytes'] / gib:.1f} GiB of draft blocks + the state of {batch} request(s) of "
            f"{context} positions need {sizes['bytes_per_device'] / gib:.1f} GiB per device split over {devices} "
            f"{jax.devices()[0].device_kind} device(s) of {memory:.1f} GiB (serve --dry-run shows the sizes)")


def follow(engine: Engine) -> None:
    """A process but 0 of a multi-process job: run process 0's engine steps until it stops."""
    logging.basicConfig(level="INFO", format=f"%(levelname)s:     [process {jax.process_index()}] %(name)s: %(message)s")
    log = logging.getLogger("dspark_jax.serve")
    # Dying on a job-wide SIGTERM would leave process 0 draining inside collectives nobody joins.
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: this process stops when process 0 does"))
    engine.follow()
    log.info("process 0 stopped; exiting")


def run_prompt(cfg: Config, prompt: str, devices: int | None = None) -> dict | None:
    """Generate the completion of `prompt` and print it; its stats (None on a follower process)."""
    folder = target_folder(cfg)
    tokenizer = load_tokenizer(folder) if folder is not None else None
    ids = prompt_ids(tokenizer, cfg, prompt)
    serve = cfg.serve
    params = RequestParams(max_tokens=serve.max_new_tokens, temperature=serve.temperature, top_k=serve.top_k,
                           top_p=serve.top_p, seed=serve.seed)
    # One request: an engine of one slot sized to it, compiling only the shapes this request meets.
    config = dataclasses.replace(EngineConfig.from_serve(serve), max_batch=1, num_pages=0, warmup=False,
                                 max_context=min(serve.max_context, len(ids) + params.max_tokens))
    ensure_fits(cfg, batch=1, context=config.max_context, devices=mesh_devices(cfg, devices))
    target = load_target(cfg, mesh=serving_mesh(cfg, devices))
    draft = load_draft(cfg, target)
    engine = Engine(target, draft, tokenizer=tokenizer, spec=spec_params(cfg, draft) if draft is not None else None,
                    config=config)
    if not engine.leader:
        follow(engine)
        return None
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
                     plain_steps=took.plain_steps, verified_tokens=took.verified_tokens, scheduler=cfg.spec.scheduler,
                     position_acceptance=[round(p, 3) for p in engine.metrics.position_acceptance()])
    return stats


def run_http(cfg: Config, args: argparse.Namespace, models: tuple | None = None) -> int:
    """Serve over HTTP the configured target, its tokenizer (none for random weights) and draft, loaded
    here, or the (target, tokenizer, draft) a caller already built (`models`)."""
    # here, not at the top: fastapi/uvicorn are the `serve` extra, which --prompt and --dry-run do without
    from dspark_jax.server import ServedModel, create_app, run_server

    ensure_fits(cfg, batch=cfg.serve.max_batch, context=cfg.serve.max_context,
                devices=mesh_devices(cfg, args.devices))
    if models is None:
        folder = target_folder(cfg)
        target = load_target(cfg, mesh=serving_mesh(cfg, args.devices))
        models = (target, load_tokenizer(folder) if folder is not None else None, load_draft(cfg, target))
    target, tokenizer, draft = models
    engine = Engine(target, draft, tokenizer=tokenizer, spec=spec_params(cfg, draft) if draft is not None else None,
                    config=EngineConfig.from_serve(cfg.serve))
    if not engine.leader:
        follow(engine)
        return 0
    name = args.served_model_name or Path(cfg.target.source).name or Path(args.config).stem
    served = ServedModel(name=name, tokenizer=tokenizer, vocab_size=target.arch.vocab_size,
                         max_context=cfg.serve.max_context, defaults=cfg.serve)
    app = create_app(engine, served, api_key=args.api_key, drain_timeout=args.drain_timeout)
    if jax.process_count() > 1:
        # uvicorn raises the SIGTERM it handled again once it has shut down: by default that would kill
        # process 0 before it leaves the job (jax.distributed.shutdown at exit), and the others with it
        signal.signal(signal.SIGTERM, lambda *_: None)
    return run_server(app, host=args.host or cfg.serve.host, port=cfg.serve.port if args.port is None else args.port,
                      drain_timeout=args.drain_timeout)


def dry_run(cfg: Config, *, devices: int, batch: int, context: int, device_memory_gib: float) -> dict:
    """Sizes of the configured target (and the draft blocks it carries) from shapes alone."""
    for name, value in (("--batch", batch), ("--context", context)):
        if value < 1:
            raise ConfigError(f"{name}={value}; expected >= 1")
    if device_memory_gib <= 0:
        raise ConfigError(f"--device-memory={device_memory_gib}; expected > 0 (GiB)")
    mesh = abstract_mesh(cfg.serve.mesh, devices)
    folder = target_folder(cfg)
    arch = cfg.target.arch if folder is None else arch_from_hf_config(read_config_json(folder))
    dtype = cfg.target.dtype
    model = abstract_target(arch, dtype=dtype)
    counts = parameter_counts(model)
    weights_per_device = bytes_per_device(model, mesh)  # refuses a mesh that does not divide the model
    routed_fraction = arch.num_experts_per_tok / arch.n_routed_experts if isinstance(arch, DeepseekV4Arch) else 1.0
    if isinstance(model, DeepseekV4ForCausalLM):
        # The state grows by one compressed entry per ratio tokens; the windows are a fixed cost. It
        # has no head axis (one K=V head), so every device holds all of it.
        per_request = model.state_bytes(context)
        per_token = (model.state_bytes(context + 2 ** 20) - model.state_bytes(context)) / 2 ** 20
        state_per_device = batch * per_request
    else:
        heads_and_dims = model.kv_heads_and_dims()
        per_token = kv_cache_bytes(heads_and_dims, 1, as_dtype(dtype))
        per_request = per_token * context
        # K and V of every layer, split by KV head like the cache pages.
        state_per_device = 2 * as_dtype(dtype).itemsize * sum(
            math.prod(shard_shape((batch * context, kvh, d), KV_PAGES[1:], mesh)) for kvh, d in heads_and_dims)
    per_device = weights_per_device + state_per_device
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
        "weight_bytes_per_device": weights_per_device, "state_bytes_per_device": state_per_device,
        "mesh": dict(mesh.shape), "devices": devices, "batch": batch, "context": context,
        "device_memory_bytes": memory,
        "dtype": dtype, "arch": type(arch).__name__,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if not args.dry_run:
            initialize_distributed()
        if args.dry_run:
            batch = cfg.serve.max_batch if args.batch is None else args.batch
            context = cfg.serve.max_context if args.context is None else args.context
            sizes = dry_run(cfg, devices=mesh_devices(cfg, args.devices), batch=batch, context=context,
                            device_memory_gib=args.device_memory)
            print(json.dumps(sizes), flush=True)
            return 0
        if args.prompt is None:
            return run_http(cfg, args)
        stats = run_prompt(cfg, args.prompt, args.devices)
        if stats is not None:
            print(json.dumps(stats), flush=True)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
