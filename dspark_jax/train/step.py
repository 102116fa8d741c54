"""The jitted training step: frozen target features → draft objective → AdamW, data parallel.

State is explicit: `TrainState(params, opt_state, step)` holds the draft's fp32 master weights
(the nnx.Param state of the draft module) and the Optax state. Each step the master weights are
cast to the compute dtype and merged into the draft's graph built in that dtype, so the very
modules used for inference run the training forward. The target is frozen: its parameters are
an input, never differentiated; its embedding and lm_head serve the draft as at inference.

A step takes `grad_accum` micro-batches [A, m, S] (one length bucket) and a step key. Anchors /
masks of all micro-batches are drawn first, so the loss is normalised by the step's global
supervised count; gradients are summed over the micro-batches with `lax.scan`. On a mesh the
micro-batch axis `m` is sharded over the "data" axis and XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dspark_jax.config import TrainConfig
from dspark_jax.drafts import create_draft
from dspark_jax.models import split_static
from dspark_jax.models.attention import DenseCausal
from dspark_jax.models.common import as_dtype
from dspark_jax.train import losses
from dspark_jax.train.losses import LossWeights


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: nnx.State  # fp32 master weights of every nnx.Param of the draft
    opt_state: optax.OptState
    step: jax.Array  # int32 optimizer steps taken


def learning_rate_schedule(cfg: TrainConfig):
    """Linear warmup over warmup_fraction of the steps, then cosine to 0 (DeepSpec)."""
    warmup = int(round(cfg.warmup_fraction * cfg.steps))
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
                                              decay_steps=cfg.steps, end_value=0.0)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay))


def loss_weights(cfg: TrainConfig) -> LossWeights:
    return LossWeights(ce=cfg.loss_ce, l1=cfg.loss_l1, conf=cfg.loss_conf, position_decay=cfg.position_decay,
                       step_decay=cfg.step_decay, chunk_rows=cfg.logits_chunk)


def target_features(target, tokens, capture: tuple[int, ...]):
    """(features [B, S, n·H] of the captured layers, final-normed hidden [B, S, H]) of whole sequences."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, captured = target(tokens, positions, DenseCausal(positions), capture=capture)
    return jnp.concatenate([captured[i] for i in capture], axis=-1), hidden


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh with a "data" axis over the given (default: all local) devices."""
    devices = devices if devices is not None else jax.local_devices()
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


class Trainer:
    """Builds the optimizer and the jitted step for one draft kind against one frozen target."""

    def __init__(self, target, draft_config, cfg: TrainConfig, *, mesh=None):
        if draft_config.kind not in ("dspark", "dflash", "eagle3"):
            raise ValueError(f"DraftConfig.kind={draft_config.kind!r} cannot be trained; expected dspark, dflash "
                             "or eagle3")
        self.cfg = cfg
        self.kind = draft_config.kind
        self.gamma = draft_config.block_size
        self.mesh = mesh or data_mesh()
        devices = self.mesh.devices.size
        if cfg.batch_size % devices:
            raise ValueError(f"TrainConfig.batch_size={cfg.batch_size}; expected a multiple of the {devices} "
                             "devices of the data mesh")
        self.target_graph, target_params = split_static(target)
        self.target_params = jax.device_put(target_params, self.replicated)
        compute = as_dtype(cfg.compute_dtype)
        self.draft_config = draft_config
        abstract = nnx.eval_shape(lambda: create_draft(draft_config, target, dtype=compute))
        self.draft_graph = nnx.graphdef(abstract)  # merged with the trained nnx.Param state alone
        self.capture = tuple(draft_config.target_layer_ids)
        self.weights = loss_weights(cfg)
        self.optimizer = make_optimizer(cfg)
        self.schedule = learning_rate_schedule(cfg)
        self._step = jax.jit(self._step_impl, donate_argnums=(0,))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(None, "data"))

    def init_state(self, target, seed: int) -> TrainState:
        """Fresh fp32 master weights (N(0, 0.02) linears, unit norms; DeepSpec's init) and Optax state."""
        draft = create_draft(dataclasses.replace(self.draft_config, seed=seed), target, dtype=jnp.float32)
        return self.state_of(draft)

    def state_of(self, draft) -> TrainState:
        params = nnx.state(draft, nnx.Param)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
        state = TrainState(params=params, opt_state=self.optimizer.init(params), step=jnp.zeros((), jnp.int32))
        return jax.device_put(state, self.replicated)

    def draft_module(self, target, params, dtype=None):
        """The draft as an NNX module holding these parameters (the target's dtype by default), for export."""
        dtype = as_dtype(dtype or target.dtype)
        graphdef = nnx.split(nnx.eval_shape(lambda: create_draft(self.draft_config, target, dtype=dtype)))[0]
        return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(x, dtype), jax.device_get(params)))

    def step(self, state: TrainState, tokens, loss_mask, key) -> tuple[TrainState, dict]:
        """One optimizer step on micro-batches tokens/loss_mask [A, m, S] (host arrays)."""
        tokens = jax.device_put(np.asarray(tokens, np.int32), self.batch_sharding)
        loss_mask = jax.device_put(np.asarray(loss_mask, bool), self.batch_sharding)
        return self._step(state, self.target_params, tokens, loss_mask, key)

    # ----------------------------------------------------------------------------------------

    def _plan(self, keys, tokens, loss_mask):
        anchors = min(self.cfg.anchors_per_sequence, tokens.shape[-1])
        if self.kind == "eagle3":
            return losses.eagle3_plan(keys, tokens, loss_mask, self.gamma, anchors)
        return losses.block_plan(keys, loss_mask, anchors, self.gamma, tokens)

    def _counts(self, plan):
        return losses.eagle3_counts(plan) if self.kind == "eagle3" else losses.block_counts(plan)

    def _sums(self, draft, target, tokens, features, final_hidden, plan):
        fn = losses.eagle3_sums if self.kind == "eagle3" else losses.dspark_sums
        return fn(draft, target, tokens, features, final_hidden, plan, self.weights)

    def _step_impl(self, state: TrainState, target_params, tokens, loss_mask, key):
        accum, micro = tokens.shape[:2]
        seq_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(accum * micro))
        plans = jax.vmap(self._plan)(seq_keys.reshape(accum, micro), tokens, loss_mask)
        counts = jnp.sum(jax.vmap(self._counts)(plans), axis=0)
        target = self.target_graph.merge(target_params)
        compute = as_dtype(self.cfg.compute_dtype)

        def loss_fn(master, batch):
            toks, plan, features, final_hidden = batch
            params = jax.tree.map(lambda x: x.astype(compute), master)
            draft = nnx.merge(self.draft_graph, params)
            sums = self._sums(draft, target, toks, features, final_hidden, plan)
            return losses.combine(self.kind, sums, counts, self.weights)[0], sums

        def micro_step(grads, batch):
            toks, plan = batch
            features, final_hidden = jax.lax.stop_gradient(target_features(target, toks, self.capture))
            (loss, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params,
                                                                        (toks, plan, features, final_hidden))
            return jax.tree.map(jnp.add, grads, g), (loss, sums)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (loss, sums) = jax.lax.scan(micro_step, zeros, (tokens, plans))
        sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
        _, means = losses.combine(self.kind, sums, counts, self.weights)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": jnp.sum(loss), "grad_norm": optax.tree.norm(grads),
                   "learning_rate": self.schedule(state.step), "supervised": jnp.sum(counts), **means}
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics
