"""`python -m dspark_jax.train --config NAME.py [--set train.steps=...] [--time-limit SECONDS]`

Trains the config's draft (dspark, dflash or eagle3) against its frozen target on train.data
(regenerated conversations) and train.text_data, resuming from train.out_dir/checkpoints if a
run was interrupted. When the last step is done the draft is exported to train.out_dir/draft
(DeepSpec layout, STS temperatures 1 until `python -m dspark_jax.train.calibrate` fits them);
a rerun after the last step leaves an existing export alone.
Prints one JSON line: the step reached, whether training finished, and the export folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dspark_jax.checkpoint.deepspec import save_deepspec_draft
from dspark_jax.config import ConfigError, load_config
from dspark_jax.loading import checkpoint_folder, load_target, load_tokenizer
from dspark_jax.train.data import DataError, prepare
from dspark_jax.train.loop import ResumeError, train
from dspark_jax.train.step import Trainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dspark_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, or a bare name from configs/")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. train.steps=2000 (repeatable)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="checkpoint and stop once this much time has passed (run again to resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        folder = checkpoint_folder(cfg, "training")
        target = load_target(cfg)
        out_dir = Path(cfg.train.out_dir)
        data = prepare(cfg.train, load_tokenizer(folder), out_dir)
        trainer = Trainer(target, cfg.draft, cfg.train)
        export = out_dir / "draft"
        exported_before = (export / "config.json").is_file()
        state, finished = train(cfg, target, data, time_limit=args.time_limit, progress=not args.no_progress,
                                trainer=trainer)
        if not finished:
            export = None
        elif not exported_before:  # a rerun after the end keeps the export (and its fitted sts.json)
            save_deepspec_draft(trainer.draft_module(target, state.params), target, export)
        print(json.dumps({"step": int(state.step), "finished": finished, "sequences": len(data.ids),
                          "heldout_prompts": len(data.heldout), "draft": str(export) if export else None}),
              flush=True)
    except (ConfigError, DataError, ResumeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
