"""`python -m dspark_jax.serve --config NAME.py [--set a.b=value ...] --prompt "..."`

One-shot generation with the configured target and draft: prints the completion, then one JSON
line of stats (tokens, tokens/s, accepted length when a draft is used).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from dspark_jax.config import Config, ConfigError, load_config
from dspark_jax.loading import load_draft, load_target, load_tokenizer, target_folder
from dspark_jax.spec.decode import generate
from dspark_jax.spec.sampling import SamplingParams
from dspark_jax.spec.schedule import SpecParams


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dspark_jax.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, or a bare name from configs/")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. serve.temperature=0.7 (repeatable)")
    parser.add_argument("--prompt", help="generate one completion for this text and exit")
    return parser.parse_args(argv)


def spec_params(cfg: Config, draft) -> SpecParams:
    block = cfg.spec.block_size or cfg.draft.block_size
    return SpecParams(block_size=block, scheduler=cfg.spec.scheduler, threshold=cfg.spec.threshold)


def run_prompt(cfg: Config, prompt: str) -> dict:
    folder = target_folder(cfg)
    if folder is None:
        raise ConfigError("--prompt needs a tokenizer: set target.source to a checkpoint (this config builds "
                          "random weights)")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.prompt is None:
            raise ConfigError("nothing to do: pass --prompt TEXT (HTTP serving is not available yet)")
        print(json.dumps(run_prompt(cfg, args.prompt)), flush=True)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
