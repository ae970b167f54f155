"""The train state (a plain dict pytree) and the jitted train / predict steps.

state = {
  "step":      int32 scalar
  "params":    full parameter tree (frozen and trainable leaves)
  "opt":       optimizer state over the trainable sub-tree (frozen leaves are None)
  "ema":       EMA of the trainable sub-tree (evaluation merges it with the frozen leaves)
  "loss_norm": the ActionFormer EMA loss normaliser
  "rng":       base PRNG key data (uint32[2]); each step folds in its step number
}
Steps take their shardings as arguments (`make_train_step(..., shardings=...)`) so the scale work can
shard them without a rewrite.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tadjax.detection import losses as losses_lib
from tadjax.train import optimizer as opt_lib


def init_params(model, config, rng):
    """Parameter tree for `model` (call under jax.jit / eval_shape)."""
    from tadjax.models.detector import input_shapes
    frames_shape, mask_shape = input_shapes(config, 1)
    variables = model.init({"params": rng, "dropout": rng},
                           jnp.zeros(frames_shape, jnp.uint8), jnp.ones(mask_shape, bool),
                           train=False)
    return variables["params"]


def create_state(params, tx, mask, *, rng, init_loss_norm: float):
    trainable, _ = opt_lib.split_trainable(params, mask)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt": tx.init(trainable),
        "ema": jax.tree.map(jnp.copy, trainable),
        "loss_norm": jnp.asarray(init_loss_norm, jnp.float32),
        "rng": jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
    }


def eval_params(state, mask):
    """EMA weights for the trainable leaves, the (never changing) frozen leaves as they are."""
    _, frozen = opt_lib.split_trainable(state["params"], mask)
    return opt_lib.merge_trainable(state["ema"], frozen)


def _global_norm(tree):
    leaves = [x for x in jax.tree.leaves(tree) if x is not None]
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def make_train_step(model, config, tx, mask, points: np.ndarray, *, shardings=None) -> Callable:
    """jitted (state, batch) -> (state, metrics). `shardings` = (state_sharding, batch_sharding)."""
    m = config.model
    ema_decay = float(config.train.ema_decay)
    points = jnp.asarray(points)

    def step_fn(state, batch):
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        trainable, frozen = opt_lib.split_trainable(state["params"], mask)

        def loss_fn(trainable):
            params = opt_lib.merge_trainable(trainable, frozen)
            out = model.apply({"params": params}, batch["frames"], batch["mask"], train=True,
                              rngs={"dropout": key})
            # The EMA normaliser is updated with this batch's positives before the loss, as the
            # reference does; positives are counted over the global batch, not per device.
            return losses_lib.detection_loss(
                out, points, batch["gt_segments"], batch["gt_labels"], batch["gt_valid"],
                num_classes=int(m.head.num_classes), normalizer=state["loss_norm"],
                normalizer_momentum=0.9, label_smoothing=float(m.label_smoothing),
                loss_weight=float(m.loss_weight),
                center_sample_radius=float(m.center_sample_radius))

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, state["opt"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                           state["ema"], new_trainable)
        new_state = dict(state, step=step + 1,
                         params=opt_lib.merge_trainable(new_trainable, frozen),
                         opt=opt_state, ema=ema, loss_norm=aux["normalizer"])
        metrics = {"loss": loss, "cls_loss": aux["cls_loss"], "reg_loss": aux["reg_loss"],
                   "num_pos": aux["num_pos"], "grad_norm": _global_norm(grads)}
        return new_state, metrics

    if shardings is None:
        return jax.jit(step_fn, donate_argnums=(0,))
    state_sh, batch_sh = shardings
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=(0,))


def make_predict_step(model, *, shardings=None) -> Callable:
    """jitted (params, frames, mask) -> {cls_logits [B,P,C], reg [B,P,2], point_mask [B,P]}."""
    def predict(params, frames, mask):
        out = model.apply({"params": params}, frames, mask, train=False)
        return {"cls_logits": out["cls_logits"].astype(jnp.float32),
                "reg": out["reg"].astype(jnp.float32), "point_mask": out["point_mask"]}
    if shardings is None:
        return jax.jit(predict)
    params_sh, batch_sh = shardings
    return jax.jit(predict, in_shardings=(params_sh, batch_sh, batch_sh))
