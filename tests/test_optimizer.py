"""The optimizer's gradient clipping and the train step's update, against optax's own pieces.

The train step computes the gradients' global norm once (for its non-finite guard and log line)
and hands it to the clipping transformation, and scales the loss before differentiating rather
than every gradient after: both checked here against the plain formulation, built from
`optax.clip_by_global_norm` and the normalised loss differentiated as it is.
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tadjax.train import optimizer as opt_lib

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.parametrize("scale", [0.05, 3.0])   # below and above the maximum norm
def test_clip_matches_optax_with_and_without_the_norm_given(scale):
    rng = np.random.default_rng(0)
    grads = {"a": jnp.asarray(rng.normal(size=(3, 4)) * scale, jnp.float32),
             "b": {"c": jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32)}}
    ours, theirs = opt_lib.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    assert ours.init(grads) == theirs.init(grads) == optax.EmptyState()
    want, _ = theirs.update(grads, theirs.init(grads))
    got, _ = ours.update(grads, ours.init(grads))
    norm = optax.tree.norm(grads)
    given, _ = ours.update(grads, ours.init(grads), global_norm=norm)
    for out in (got, given):
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(out)):
            np.testing.assert_allclose(g, w, rtol=1e-6)
    # The given norm is the one used (a wrong one gives a different, wrong, result).
    wrong, _ = ours.update(grads, ours.init(grads), global_norm=norm * 2 + 2)
    assert not np.allclose(jax.tree.leaves(wrong)[0], jax.tree.leaves(want)[0])
    # Frozen leaves (None) pass through, as in the train step's trainable sub-tree.
    with_none, _ = ours.update({"a": grads["a"], "f": None}, optax.EmptyState(), global_norm=norm)
    assert with_none["f"] is None


def test_train_step_equals_the_plain_formulation():
    """One step of make_train_step (loss scaled before differentiating, the norm computed once
    and passed to the clipping) equals: the normalised loss differentiated, then
    optax.clip_by_global_norm, then the groups' AdamW, then the EMA."""
    sys.path.insert(0, str(HERE))
    from test_sharding import random_batches, tiny_config
    from tadjax.detection import losses as losses_lib
    from tadjax.train import state as state_lib
    from tadjax.train.trainer import Run

    config = tiny_config(batch=2)
    with config.unlocked():
        config.train.grad_clip = 0.05   # small enough that clipping acts
        config.train.warmup_epochs = 0  # the full learning rate from the first update
    run = Run(config, None, with_data=False, devices=jax.devices()[:1])
    tx, _ = run.make_tx(steps_per_epoch=4)
    state = run.init_state(tx)
    batch = {k: jnp.asarray(v) for k, v in random_batches(config, 1)[0].items()}
    m = config.model

    # The plain formulation, written out independently of make_train_step.
    trainable, frozen = opt_lib.split_trainable(state["params"], run.mask)
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

    def loss_fn(trainable):
        params = opt_lib.merge_trainable(trainable, frozen)
        out = run.model.apply({"params": params}, batch["frames"], batch["mask"], train=True,
                              rngs={"dropout": key})
        total, aux = losses_lib.detection_loss(
            out, run.points, batch["gt_segments"], batch["gt_labels"], batch["gt_valid"],
            num_classes=int(m.head.num_classes), normalizer=1.0, normalizer_momentum=None,
            label_smoothing=float(m.label_smoothing), loss_weight=float(m.loss_weight),
            center_sample_radius=float(m.center_sample_radius))
        norm = losses_lib.update_normalizer(state["loss_norm"], aux["num_pos"], 0.9)
        return total / jax.lax.stop_gradient(norm)

    # Both sides compiled with cheap LLVM code generation (as tests/test_sharding.py).
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = value_and_grad.lower(trainable).compile(compiler_options=fast)(trainable)
    clip = optax.clip_by_global_norm(float(config.train.grad_clip))
    assert float(optax.tree.norm(grads)) > float(config.train.grad_clip)   # clipping acts
    inner_tx, _ = opt_lib.make_optimizer(run.abstract_params, run.groups, grad_clip=0,
                                         warmup_steps=int(config.train.warmup_epochs * 4),
                                         total_steps=int(config.train.epochs * 4))
    clipped, _ = clip.update(grads, clip.init(grads))
    updates, want_opt = inner_tx.update(clipped, state["opt"][1], trainable)
    want = optax.apply_updates(trainable, updates)
    decay = float(config.train.ema_decay)
    want_ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], want)

    step = state_lib.make_train_step(run.model, config, tx, run.mask, run.points)
    state_copy = jax.tree.map(jnp.copy, state)
    new_state, metrics = step.lower(state_copy, batch).compile(compiler_options=fast)(
        state_copy, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)),
                               rtol=1e-5)
    # The optimizer's moments are linear (mu) and quadratic (nu) in the clipped gradients: they
    # compare them elementwise, to the scale of all of each kind (the gradient is the same up to
    # float rounding, differentiated in another order; some leaves' gradients are rounding noise
    # alone, e.g. the attention key biases', ~1e-10 where others are ~1e-2).
    flat = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
    want_leaves, got_leaves = flat(want_opt), flat(new_state["opt"][1])
    assert [jax.tree_util.keystr(k) for k, _ in want_leaves] == \
        [jax.tree_util.keystr(k) for k, _ in got_leaves]
    kind = lambda path: next((n for n in (".mu", ".nu") if n in jax.tree_util.keystr(path)), "")
    scale = {}
    for path, w in want_leaves:
        scale[kind(path)] = max(scale.get(kind(path), 0.0), float(np.abs(np.asarray(w)).max()))
    assert scale[".mu"] > 0 and scale[".nu"] > 0
    for (path, w), (_, g) in zip(want_leaves, got_leaves):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                                   atol=1e-5 * scale[kind(path)], err_msg=jax.tree_util.keystr(path))
    # The first Adam step moves each parameter by about the learning rate (m / sqrt(v) = +-1
    # where the gradient is well above eps; elements whose gradient is rounding noise, e.g. the
    # attention key biases, move by less, and by different amounts in either order), so the
    # parameters and EMA compare to a small fraction of it.
    lr = max(float(g["lr"]) for g in run.groups)
    got, _ = opt_lib.split_trainable(new_state["params"], run.mask)
    moved = 0
    for w, g, old in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(trainable)):
        np.testing.assert_allclose(g, w, rtol=0, atol=0.01 * lr)
        moved += float(np.abs(np.asarray(w) - np.asarray(old)).max()) > 0.5 * lr
    assert moved > len(jax.tree.leaves(want)) // 2
    for w, g in zip(jax.tree.leaves(want_ema), jax.tree.leaves(new_state["ema"])):
        np.testing.assert_allclose(g, w, rtol=0, atol=0.01 * lr)


@pytest.mark.parametrize("grad_clip", [0, 1.0])
def test_make_optimizer_takes_the_norm_with_and_without_clipping(grad_clip):
    """The train step always passes `global_norm=`; without clipping (grad_clip=0) the groups'
    AdamW ignores it. The frozen leaf gets no update and no state."""
    params = {"backbone": {"blocks_0": {"adapter": jnp.ones((3,))}, "w": jnp.ones((2,))},
              "head": {"b": jnp.full((4,), 2.0)}}
    groups = [{"name": "adapter", "regex": "^backbone/.*adapter", "lr": 1e-3},
              {"name": "head", "regex": "^head/", "lr": 1e-2}]
    trainable, _ = opt_lib.split_trainable(params, opt_lib.trainable_mask(params, groups))
    tx, _ = opt_lib.make_optimizer(params, groups, warmup_steps=0, total_steps=10,
                                   grad_clip=grad_clip)
    grads = jax.tree.map(lambda x: None if x is None else 10.0 * x, trainable,
                         is_leaf=lambda x: x is None)
    updates, _ = tx.update(grads, tx.init(trainable), trainable,
                           global_norm=optax.tree.norm(grads))
    assert updates["backbone"]["w"] is None
    # The first AdamW step moves every element by its group's learning rate (m / sqrt(v) = 1).
    np.testing.assert_allclose(updates["backbone"]["blocks_0"]["adapter"], -1e-3, rtol=1e-4)
    np.testing.assert_allclose(updates["head"]["b"], -1e-2, rtol=1e-4)
