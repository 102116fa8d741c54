"""`python -m dspark_jax.train.regenerate --config NAME.py --prompts DIR --out DIR [...]`

Answers every prompt (`{"turns": [...]}` JSONL files or folders) with the config's target through
our own batched generation — the data a draft learns from should be what its target says
(DeepSpec samples at T 0.7, top-p 0.8, top-k 20: the defaults). Multi-turn prompts are answered
turn by turn, each answer becoming context for the next turn.

Prompts are sorted by length and cut into batches; batch i is written as `part-<i>.jsonl`
(atomically) with records `{"source", "index", "messages", "finished"}` (`finished` = the answer
ended with EOS rather than the token budget), and its sampling seed is `seed + i`. A rerun skips
the parts that exist, so the job resumes after a kill or a `--time-limit` stop; `settings.json`
records the settings and a rerun with different ones is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dspark_jax.config import ConfigError, load_config
from dspark_jax.eval import atomic_write_text, read_prompt_sets
from dspark_jax.loading import checkpoint_folder, load_target, load_tokenizer
from dspark_jax.engine import generate
from dspark_jax.speculative.sampling import SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dspark_jax.train.regenerate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, or a bare name from configs/ (the target)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    parser.add_argument("--prompts", action="append", required=True, help="prompt JSONL file or folder (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (part-*.jsonl + settings.json)")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each file")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts are skipped")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="stop after the batch that crosses this much time (run again to resume)")
    return parser.parse_args(argv)


def answer(target, tokenizer, conversations: list[list[dict]], turns: list[list[str]], *, max_new_tokens: int,
           sampling: SamplingParams, seed: int, kernels: str) -> list[bool]:
    """Append the target's answer to each conversation for every one of its turns; returns `finished` flags."""
    finished = [True] * len(conversations)
    eos = set(target.arch.eos_token_ids) | set(tokenizer.eos_token_ids)
    for turn in range(max(len(t) for t in turns)):
        active = [i for i, t in enumerate(turns) if turn < len(t)]
        prompts = []
        for i in active:
            conversations[i].append({"role": "user", "content": turns[i][turn]})
            prompts.append(tokenizer.apply_chat_template(conversations[i], add_generation_prompt=True, tokenize=True))
        res = generate(target, None, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed + 7919 * turn,
                       kernels=kernels)
        for i, tokens in zip(active, res.tokens):
            ended = bool(tokens) and tokens[-1] in eos
            conversations[i].append({"role": "assistant",
                                     "content": tokenizer.decode(tokens[:-1] if ended else tokens)})
            finished[i] &= ended
    return finished


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        folder = checkpoint_folder(cfg, "regeneration")
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        settings = {"target": cfg.target.source, "dtype": cfg.target.dtype, "prompts": [str(p) for p in args.prompts],
                    "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                    "max_prompt_tokens": args.max_prompt_tokens, "batch": args.batch, "temperature": args.temperature,
                    "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
        settings_path = args.out / "settings.json"
        if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
            old = json.loads(settings_path.read_text())
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ConfigError(f"{args.out} was generated with other settings ({', '.join(changed)}); "
                              "use a new --out folder")
        atomic_write_text(settings_path, json.dumps(settings, indent=2))
        tokenizer = load_tokenizer(folder)
        target = load_target(cfg)
        items, skipped = [], 0
        for name, prompts in read_prompt_sets(args.prompts, args.limit).items():
            for index, turns in enumerate(prompts):
                length = len(tokenizer.apply_chat_template([{"role": "user", "content": turns[0]}], tokenize=True))
                if length > args.max_prompt_tokens:
                    skipped += 1
                else:
                    items.append((length, name, index, turns))
        items.sort(key=lambda item: (item[0], item[1], item[2]))
        batches = [items[i:i + args.batch] for i in range(0, len(items), args.batch)]
        began, written = time.perf_counter(), 0
        for number, batch in enumerate(batches):
            part = args.out / f"part-{number:05d}.jsonl"
            if part.is_file():
                continue
            conversations = [[] for _ in batch]
            finished = answer(target, tokenizer, conversations, [turns for *_, turns in batch],
                              max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed + number,
                              kernels=cfg.serve.kernels)
            lines = [json.dumps({"source": name, "index": index, "messages": messages, "finished": done})
                     for (_, name, index, _), messages, done in zip(batch, conversations, finished)]
            atomic_write_text(part, "".join(line + "\n" for line in lines))
            written += 1
            if args.time_limit is not None and time.perf_counter() - began > args.time_limit:
                break
        done = sum((args.out / f"part-{i:05d}.jsonl").is_file() for i in range(len(batches)))
        print(json.dumps({"out": str(args.out), "parts_done": done, "parts": len(batches), "written_now": written,
                          "conversations": len(items), "skipped_long_prompts": skipped,
                          "complete": done == len(batches)}), flush=True)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
