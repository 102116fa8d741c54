"""The training loop: resumable orbax checkpoints, progress bar, metrics log, final export.

out_dir holds `checkpoints/<step>/` (orbax: the TrainState and a JSON record of the step, the
data position and the config), `metrics.jsonl` (one line per logged step), TensorBoard events
when tensorboardX is installed, and `draft/` (the DeepSpec-layout export, written atomically when
the last step is done). Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a kill leaves the previous checkpoint intact; a restarted run restores the latest,
drops metric lines past it and continues with the same batches and keys — step i's batch and
key depend only on (seed, i) — giving the parameters an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from dspark_jax.config import Config, TrainConfig
from dspark_jax.train.data import Batches, TokenizedData
from dspark_jax.train.step import Trainer, TrainState

# Fields that only change how a run reports or saves; everything else must match to resume.
_RESUMABLE_CHANGES = ("out_dir", "checkpoint_every", "keep_checkpoints", "log_every")


class ResumeError(ValueError):
    """A checkpoint was written under a different recipe than the one resuming it."""


def _recipe(cfg: Config) -> dict:
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _RESUMABLE_CHANGES}
    return json.loads(json.dumps({"train": train, "draft": dataclasses.asdict(cfg.draft)}))


class Checkpoints:
    """Orbax CheckpointManager over out_dir/checkpoints holding TrainState + a JSON record."""

    def __init__(self, folder: Path, keep: int):
        self.manager = ocp.CheckpointManager(folder.absolute(), options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, record: dict) -> None:
        step = int(record["step"])
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        record=ocp.args.JsonSave(record)))

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 record=ocp.args.JsonRestore()))
        return out["state"], out["record"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class MetricsLog:
    """metrics.jsonl (+ TensorBoard if tensorboardX is importable)."""

    def __init__(self, out_dir: Path, resume_step: int):
        self.path = out_dir / "metrics.jsonl"
        if self.path.is_file():  # lines a killed run wrote past the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            self.board = None
        else:
            self.board = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.board is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.board.add_scalar(name, value, step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _host_metrics(metrics: dict) -> dict:
    out = {}
    for name, value in jax.device_get(metrics).items():
        value = np.asarray(value)
        out[name] = round(float(value), 6) if value.ndim == 0 else [round(float(v), 4) for v in value]
    return out


def step_key(seed: int, step: int):
    return jax.random.fold_in(jax.random.key(seed), step)


def train(cfg: Config, target, data: TokenizedData, *, time_limit: float | None = None, progress: bool = True,
          trainer: Trainer | None = None) -> tuple[TrainState, bool]:
    """Train (or resume) the config's draft; returns (state, finished all cfg.train.steps).

    `time_limit` (seconds) ends the run cleanly with a checkpoint once exceeded, so a long run
    can proceed in bounded commands.
    """
    tc: TrainConfig = cfg.train
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = trainer or Trainer(target, cfg.draft, tc)
    batches = Batches(data, tc)
    checkpoints = Checkpoints(out_dir / "checkpoints", tc.keep_checkpoints)
    state = trainer.init_state(target, tc.seed)
    start = checkpoints.latest()
    if start is not None:
        state, record = checkpoints.restore(start, state)
        state = jax.device_put(state, trainer.replicated)
        if record["recipe"] != _recipe(cfg):
            changed = sorted(f"{section}.{k}" for section in ("train", "draft")
                             for k in set(record["recipe"][section]) | set(_recipe(cfg)[section])
                             if record["recipe"][section].get(k) != _recipe(cfg)[section].get(k))
            raise ResumeError(f"{out_dir}: the checkpoint at step {start} was trained with different settings "
                              f"({', '.join(changed)}); use a new train.out_dir or the original settings")
    start = start or 0
    log = MetricsLog(out_dir, start)
    began = time.perf_counter()
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, dynamic_ncols=True, unit="step")
    tokens_seen, window_start = 0, time.perf_counter()
    step = start
    try:
        while step < tc.steps:
            tokens, loss_mask = batches.batch(step)
            state, metrics = trainer.step(state, tokens, loss_mask, step_key(tc.seed, step))
            step += 1
            tokens_seen += batches.tokens(step - 1)
            if step % tc.log_every == 0 or step == tc.steps:
                host = _host_metrics(metrics)
                now = time.perf_counter()
                host["tokens_per_s"] = round(tokens_seen / max(now - window_start, 1e-9), 1)
                host["epoch"] = round(step / batches.steps_per_epoch, 4)
                tokens_seen, window_start = 0, now
                log.write(step, host)
                bar.set_postfix(loss=f"{host['loss']:.4f}", tok_s=f"{host['tokens_per_s']:.0f}")
            bar.update(1)
            out_of_time = time_limit is not None and time.perf_counter() - began > time_limit
            if step % tc.checkpoint_every == 0 or step == tc.steps or out_of_time:
                epoch, index = divmod(step, batches.steps_per_epoch)
                checkpoints.save(state, {"step": step, "epoch": epoch, "batch_in_epoch": index, "seed": tc.seed,
                                         "recipe": _recipe(cfg)})
            if out_of_time:
                break
    finally:
        bar.close()
        checkpoints.close()
        log.close()
    return state, step >= tc.steps
