"""`python -m dspark_jax.eval --config NAME.py --draft PATH --prompts FILE.jsonl [...] --out result.json`

Runs the target with a draft over prompt sets (`{"turns": [...]}` JSONL; the first turn, no
system prompt, rendered with the chat template, as DeepSpec evaluates) and reports per dataset:
- accepted length τ = mean over request-rounds of the committed tokens (accepted drafts + 1, the
  bonus counted; a round whose accepted drafts include EOS counts only those drafts — DeepSpec's
  rule, which is what the decode round commits);
- conditional acceptance P(x_k accepted | x_<k accepted, x_k verified) and survival P(≥ k
  accepted) per position; verify efficiency = committed / verified tokens;
- for drafts with a confidence head, calibration of the survival estimates a_k = Π σ(z_i/T_i)
  against "≥ k drafts accepted" over every verified (round, k): ECE (20 equal-width bins),
  AUROC and Brier, before (T = 1) and after STS (the draft's fitted temperatures), plus a
  reliability diagram PNG.
Everything goes into one JSON file; the plot next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

from dspark_jax.config import ConfigError, load_config
from dspark_jax.loading import checkpoint_folder, load_draft, load_target, load_tokenizer
from dspark_jax.speculative.calibrate import apply_sts, expected_calibration_error, survival_labels
from dspark_jax.speculative.decode import RoundLog
from dspark_jax.engine import generate
from dspark_jax.speculative.sampling import SamplingParams
from dspark_jax.speculative.schedule import SpecParams

NUM_BINS = 20


# --------------------------------------------------------------------------------------------
# prompts and rollouts


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
    return records


def jsonl_files(paths) -> list[Path]:
    """Files named directly, plus every *.jsonl inside named folders (sorted)."""
    files = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise ValueError(f"{path}: a folder without *.jsonl files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files


def read_prompt_sets(paths, limit: int | None = None) -> dict[str, list[list[str]]]:
    """{dataset name (file stem): turns of each prompt} from JSONL files or folders of them."""
    sets = {}
    for path in jsonl_files(paths):
        records = read_jsonl(path)[:limit]
        for number, record in enumerate(records, 1):
            turns = record.get("turns")
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
                raise ValueError(f"{path}:{number}: expected {{\"turns\": [text, ...]}}")
        if path.stem in sets:
            raise ValueError(f"{path}: a second prompt set named {path.stem!r}")
        sets[path.stem] = [r["turns"] for r in records]
    return sets


def first_turn_ids(tokenizer, turns: list[str]) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": turns[0]}], add_generation_prompt=True,
                                         tokenize=True)


def rollout(target, draft, prompts: list[list[int]], *, gamma: int, sampling: SamplingParams, max_new_tokens: int,
            batch: int, seed: int = 0, kernels: str = "auto") -> tuple[RoundLog, list[list[int]]]:
    """Every request-round of generating all prompts `batch` at a time (fixed γ), and the outputs."""
    logs, outputs = [], []
    for start in range(0, len(prompts), batch):
        res = generate(target, draft, prompts[start:start + batch], max_new_tokens=max_new_tokens, sampling=sampling,
                       spec=SpecParams(block_size=gamma), seed=seed + start, kernels=kernels, record_rounds=True)
        logs.append(dataclasses.replace(res.rounds, request=res.rounds.request + start))
        outputs.extend(res.tokens)
    return concat_logs(logs), outputs


def concat_logs(logs: list[RoundLog]) -> RoundLog:
    conf = [log.confidence_logits for log in logs]
    return RoundLog(*(np.concatenate([getattr(log, f) for log in logs]) for f in
                      ("request", "lengths", "accepted", "committed")),
                    confidence_logits=None if any(c is None for c in conf) else np.concatenate(conf))


# --------------------------------------------------------------------------------------------
# metrics


def auroc(scores, labels) -> float | None:
    """Area under the ROC curve (Mann–Whitney with average ranks for ties); None without both classes."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    bounds = np.flatnonzero(np.diff(sorted_scores)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(scores)]])):
        ranks[order[lo:hi]] = (lo + hi + 1) / 2.0  # 1-based average rank of the tie group
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def reliability(probs, labels, num_bins: int = NUM_BINS) -> list[dict]:
    """Non-empty equal-width bins: mean predicted survival, observed frequency, count."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    bins = np.minimum((probs * num_bins).astype(int), num_bins - 1)
    out = []
    for b in range(num_bins):
        sel = bins == b
        if sel.any():
            out.append({"bin": b, "predicted": float(probs[sel].mean()), "observed": float(labels[sel].mean()),
                        "count": int(sel.sum())})
    return out


def calibration(conf_logits, accepted, lengths, temps) -> dict:
    """ECE / AUROC / Brier / reliability bins of a_k = Π_{i≤k} σ(z_i/T_i) over verified (round, k)."""
    gamma = conf_logits.shape[1]
    a = np.cumprod(apply_sts(conf_logits, temps), axis=1)
    labels, observed = survival_labels(accepted, lengths, gamma)
    probs, truth = a[observed], labels[observed]
    return {"ece": expected_calibration_error(probs, truth, NUM_BINS), "auroc": auroc(probs, truth.astype(bool)),
            "brier": float(np.mean((probs - truth) ** 2)) if probs.size else None, "pairs": int(probs.size),
            "temperatures": [float(t) for t in temps], "reliability": reliability(probs, truth)}


def summarize(log: RoundLog, gamma: int, temps=None) -> dict:
    """Acceptance and calibration metrics of a set of request-rounds (see the module doc)."""
    rounds = len(log.accepted)
    if rounds == 0:
        raise ValueError("no speculative rounds to summarize (every prompt ended at its first token?)")
    k = np.arange(gamma)[None, :]
    accepted, lengths = log.accepted[:, None], log.lengths[:, None]
    reached = (lengths > k) & (accepted >= k)  # x_{k+1} verified with every earlier draft accepted
    passed = accepted > k
    out = {
        "tau": float(log.committed.mean()),
        "rounds": rounds,
        "accept_cond": [float(p) / max(int(r), 1) for p, r in zip(passed.sum(0), reached.sum(0))],
        "survival": [float(p) / rounds for p in passed.sum(0)],
        "verify_efficiency": float(log.committed.sum() / (log.lengths + 1).sum()),
        "committed_tokens": int(log.committed.sum()),
        "verified_tokens": int((log.lengths + 1).sum()),
    }
    if log.confidence_logits is not None:
        conf = log.confidence_logits[:, :gamma]
        out["calibration"] = {"before_sts": calibration(conf, log.accepted, log.lengths, np.ones(gamma))}
        if temps is not None:
            out["calibration"]["after_sts"] = calibration(conf, log.accepted, log.lengths, np.asarray(temps[:gamma]))
    return out


def reliability_plot(results: dict, path: Path) -> Path | None:
    """One reliability diagram per dataset (before and after STS); None when nothing has a confidence."""
    named = {name: r["calibration"] for name, r in results.items() if "calibration" in r}
    if not named:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(named), figsize=(4 * len(named), 4), squeeze=False)
    for ax, (name, cal) in zip(axes[0], named.items()):
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        for key, style in (("before_sts", "o-"), ("after_sts", "s-")):
            if key in cal:
                bins = cal[key]["reliability"]
                ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], style, markersize=3,
                        label=f"{key.replace('_', ' ')} (ECE {cal[key]['ece']:.3f})")
        ax.set(title=name, xlabel="predicted survival a_k", ylabel="observed P(≥ k accepted)", xlim=(0, 1),
               ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dspark_jax.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, or a bare name from configs/ (the target)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    parser.add_argument("--draft", help="DeepSpec-layout draft folder or 'ngram' (default: the config's draft)")
    parser.add_argument("--prompts", action="append", required=True, help="prompt JSONL file or folder (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each set")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--block-size", type=int, default=0, help="draft tokens per round (0 = the draft's)")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=0, help="prompts generated together (0 = serve.max_batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("eval_result.json"),
                        help="result JSON (written after each prompt set; a rerun with the same settings resumes)")
    return parser.parse_args(argv)


def evaluate(args) -> dict:
    """Evaluate every prompt set, writing args.out after each; sets already in args.out from a run with
    the same draft and settings are kept, so an interrupted evaluation resumes."""
    cfg = load_config(args.config, args.set)
    folder = checkpoint_folder(cfg, "evaluation")
    target = load_target(cfg)
    tokenizer = load_tokenizer(folder)
    draft = load_draft(args.draft if args.draft else cfg, target)
    if draft is None:
        raise ConfigError("no draft: pass --draft PATH or set draft.kind in the config")
    gamma = args.block_size or draft.config.block_size
    sampling = SamplingParams(temperature=args.temperature)
    temps = getattr(draft, "sts_temperatures", None)
    result = {"draft": args.draft or cfg.draft.source or cfg.draft.kind, "kind": draft.config.kind,
              "target": cfg.target.source, "device": jax.devices()[0].device_kind,
              "date": datetime.date.today().isoformat(),
              "settings": {"temperature": args.temperature, "block_size": gamma,
                           "max_new_tokens": args.max_new_tokens, "limit": args.limit, "seed": args.seed,
                           "scheduler": "fixed", "turns": "first", "sts_temperatures": temps and list(temps)},
              "reliability_png": None, "datasets": {}}
    identity = ("draft", "kind", "target", "settings")
    if args.out.is_file():
        earlier = json.loads(args.out.read_text())
        if all(earlier.get(k) == result[k] for k in identity):
            result["datasets"] = earlier["datasets"]
    for name, prompts in read_prompt_sets(args.prompts, args.limit).items():
        if name in result["datasets"]:
            continue
        ids = [first_turn_ids(tokenizer, turns) for turns in prompts]
        log, _ = rollout(target, draft, ids, gamma=gamma, sampling=sampling, max_new_tokens=args.max_new_tokens,
                         batch=args.batch or cfg.serve.max_batch, seed=args.seed, kernels=cfg.serve.kernels)
        result["datasets"][name] = {"prompts": len(ids), **summarize(log, gamma, temps)}
        atomic_write_text(args.out, json.dumps(result, indent=2))
        print(json.dumps({"dataset": name, "tau": round(result["datasets"][name]["tau"], 4),
                          "rounds": result["datasets"][name]["rounds"]}), flush=True)
    plot = reliability_plot(result["datasets"], args.out.with_suffix(".png"))
    result["reliability_png"] = str(plot) if plot else None
    atomic_write_text(args.out, json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **{n: round(r["tau"], 4) for n, r in result["datasets"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
