"""`python -m dspark_jax.train.slim --config NAME.py --draft IN --out OUT [--dtype bfloat16]`

Rewrites an exported draft folder for shipping: parameters cast to `--dtype`, and without the
copies of the target's embedding and lm_head that the DeepSpec layout carries (`dj.load_draft`
takes those from the target). The STS temperatures travel along.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dspark_jax.checkpoint.deepspec import load_deepspec_draft, save_deepspec_draft
from dspark_jax.config import ConfigError, load_config
from dspark_jax.loading import load_target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspark_jax.train.slim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, or a bare name from configs/ (the target)")
    parser.add_argument("--draft", type=Path, required=True, help="exported draft folder (DeepSpec layout)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    try:
        target = load_target(load_config(args.config))
        draft = load_deepspec_draft(args.draft, target, dtype=args.dtype)
        save_deepspec_draft(draft, target, args.out, shared=False)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(json.dumps({"draft": str(args.out), "bytes": size, "dtype": args.dtype}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
