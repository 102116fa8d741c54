"""Collect eval result files into one accepted-length table.

    python train/tau_table.py --out docs/results/smollm2_tau.json dspark=runs/.../eval.json dflash=...

writes {"<drafter>": {"<dataset>": {"tau": float, "rounds": int, "accept_cond": [...]}}}, and next to
it <out>.meta.json with each eval file's settings, target, device and date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dspark_jax.eval import atomic_write_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("results", nargs="+", metavar="NAME=EVAL.json")
    args = parser.parse_args(argv)
    table, meta = {}, {}
    for item in args.results:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"{item!r}: expected NAME=PATH")
        result = json.loads(Path(path).read_text())
        table[name] = {dataset: {"tau": r["tau"], "rounds": r["rounds"], "accept_cond": r["accept_cond"]}
                       for dataset, r in result["datasets"].items()}
        meta[name] = {k: result[k] for k in ("target", "device", "date", "settings")}
    atomic_write_text(args.out, json.dumps(table, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".meta.json"), json.dumps(meta, indent=2) + "\n")
    print(json.dumps({name: {d: round(v["tau"], 3) for d, v in sets.items()} for name, sets in table.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
