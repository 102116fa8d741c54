"""The HTTP server over a predictable random-weight target whose draft replays an acceptance profile.

    python serve/replay_server.py --replay 0.8,0.75,0.7 --config qwen3_4b.py [dspark_jax.serve's arguments]

A random draft is never accepted, so serving a random-weight target measures what speculation
costs and never what it gains. This starts `python -m dspark_jax.serve`'s HTTP server after
serve/replay_draft.py has made the target predictable and wrapped its draft (if any: with
draft.kind=none it serves the same predictable target plainly, the fair baseline), so greedy
requests are accepted at the profile's rates per draft position. One device, greedy requests only
(sampled ones are served, but their acceptance follows no profile). serve/bench_serve.py --replay
starts its servers through this.
"""

from __future__ import annotations

import argparse
import sys

from dspark_jax import serve
from dspark_jax.config import load_config
from dspark_jax.loading import load_draft, load_target
from replay_draft import ReplayDraft, make_predictable  # serve/ (the script's folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replay", required=True, help="conditional acceptance rates per draft position")
    ours, rest = parser.parse_known_args(argv)
    rates = tuple(float(r) for r in ours.replay.split(","))
    args = serve.parse_args(rest)
    cfg = load_config(args.config, args.set)
    if cfg.target.source or args.prompt is not None or args.dry_run:
        parser.error("--replay serves random-weight targets over HTTP only (it zeroes the target's attention outputs)")
    target = load_target(cfg)
    table = make_predictable(target)
    draft = load_draft(cfg, target)
    return serve.run_http(cfg, args, models=(target, None, ReplayDraft(draft, table, rates) if draft is not None else None))


if __name__ == "__main__":
    sys.exit(main())
