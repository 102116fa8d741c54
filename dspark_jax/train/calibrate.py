"""`python -m dspark_jax.train.calibrate --config NAME.py --draft PATH --prompts HELDOUT.jsonl [...]`

Fits Sequential Temperature Scaling for a trained DSpark draft: runs the draft with its target
over held-out prompts (never the training or evaluation prompts; training writes its held-out
conversations' user turns to out_dir/heldout_prompts.jsonl), records every round's confidence
logits, verified lengths and acceptances, fits one temperature per position left to right
(`dspark_jax.speculative.calibrate.fit_sts`) and writes them to PATH/sts.json (atomically; the weights
are untouched). Prints the survival ECE before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from dspark_jax.config import ConfigError, load_config
from dspark_jax.eval import atomic_write_text, first_turn_ids, read_prompt_sets, rollout
from dspark_jax.loading import checkpoint_folder, load_draft, load_target, load_tokenizer
from dspark_jax.speculative.calibrate import fit_sts, survival_ece
from dspark_jax.speculative.decode import RoundLog
from dspark_jax.speculative.sampling import SamplingParams


def fit(log: RoundLog, gamma: int) -> dict:
    """STS temperatures [γ] from recorded rounds, with the survival ECE before and after."""
    if log.confidence_logits is None:
        raise ValueError("this draft has no confidence head; STS calibrates confidence logits")
    if len(log.accepted) == 0:
        raise ValueError("no speculative rounds were recorded; give more or longer held-out prompts")
    conf = log.confidence_logits[:, :gamma]
    temps = fit_sts(conf, log.accepted, log.lengths)
    return {"temperatures": [float(t) for t in temps], "rounds": int(len(log.accepted)),
            "ece_before": survival_ece(conf, log.accepted, log.lengths),
            "ece_after": survival_ece(conf, log.accepted, log.lengths, temps)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dspark_jax.train.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, or a bare name from configs/ (the target)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    parser.add_argument("--draft", type=Path, required=True, help="the exported draft folder (DeepSpec layout)")
    parser.add_argument("--prompts", action="append", required=True, help="held-out prompt JSONL (repeatable)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rounds")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=0, help="prompts generated together (0 = serve.max_batch)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        folder = checkpoint_folder(cfg, "calibration")
        target = load_target(cfg)
        tokenizer = load_tokenizer(folder)
        draft = load_draft(str(args.draft), target)
        gamma = draft.config.block_size
        prompts = [first_turn_ids(tokenizer, turns)
                   for turns_list in read_prompt_sets(args.prompts, args.limit).values() for turns in turns_list]
        log, _ = rollout(target, draft, prompts, gamma=gamma, sampling=SamplingParams(temperature=args.temperature),
                         max_new_tokens=args.max_new_tokens, batch=args.batch or cfg.serve.max_batch, seed=args.seed,
                         kernels=cfg.serve.kernels)
        result = fit(log, gamma)
        result["settings"] = {"prompts": [str(p) for p in args.prompts], "limit": args.limit,
                              "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
                              "seed": args.seed, "block_size": gamma}
        atomic_write_text(args.draft / "sts.json", json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "settings"}), flush=True)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
