"""Optimizer: AdamW parameter groups chosen by regex on parameter paths, warm-up + cosine per step.

A parameter belongs to the first group whose regex matches its '/'-joined path; parameters that no
group matches are frozen: they get no gradient, no optimizer state and no EMA (see `trainable_mask`).
Inside a group, `no_decay` regexes name the parameters without weight decay (biases, norms, scales).
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from tadjax import tree as tree_lib

FROZEN = "frozen"


def warmup_cosine(base_lr: float, *, warmup_steps: int, total_steps: int, end_lr: float = 1e-8):
    """AdaTAD's LinearWarmupCosineAnnealingLR, stepped per iteration.

    Warm-up: lr_t = t * base / (W - 1) for t < W (exactly 0 at t = 0). Then cosine from base at
    t = W down to end_lr at t = total_steps. Training may stop earlier than total_steps (THUMOS
    lays the schedule out over 100 epochs and stops at 60): that is the caller's end step.
    """
    warmup_steps = int(warmup_steps)
    total_steps = int(total_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if warmup_steps > 1:
            warm = step * base_lr / (warmup_steps - 1)
        else:
            warm = jnp.full_like(step, base_lr)
        span = max(total_steps - warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
        cos = end_lr + 0.5 * (base_lr - end_lr) * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warm, cos)

    return schedule


def group_labels(params, groups: Sequence[Any]):
    """Tree of group names (or FROZEN) by first matching regex."""
    rules = [(g["regex"], g["name"]) for g in groups]
    return tree_lib.map_with_path(lambda p, _: tree_lib.match_rules(p, rules, FROZEN), params)


def trainable_mask(params, groups):
    return jax.tree.map(lambda l: l != FROZEN, group_labels(params, groups))


def split_trainable(params, mask):
    """(trainable, frozen) trees; the missing side of each leaf is None."""
    trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
    return trainable, frozen


def merge_trainable(trainable, frozen):
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen,
                        is_leaf=lambda x: x is None)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm` (the same rule, the same empty state) that takes the global
    norm as the extra argument `global_norm=` when the caller has it already.

    The train step computes the norm anyway (its non-finite guard and its log line need it);
    optax's transformation computed it a second time inside the update, one more reduction
    kernel per trainable leaf in the compiled step (XLA:CPU keeps every kernel's code and HLO
    resident for the run: the README's tour of the code). Without `global_norm` it computes the
    norm as optax does.
    """
    def update_fn(updates, state, params=None, *, global_norm=None, **extra_args):
        del params, extra_args
        g_norm = optax.tree.norm(updates) if global_norm is None else jnp.asarray(global_norm)
        trigger = g_norm < max_norm

        def clip(t):
            if t is None:
                return None
            return jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)
        return jax.tree.map(clip, updates, is_leaf=lambda x: x is None), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(params, groups: Sequence[Any], *, warmup_steps: int, total_steps: int,
                   grad_clip: float = 1.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   end_lr: float = 1e-8):
    """optax transformation over the *trainable* sub-tree (frozen leaves are None).

    Its `update` takes the gradients' global norm as the optional extra argument `global_norm=`
    (see `clip_by_global_norm`).

    Returns (tx, schedules) where schedules maps group name -> lr schedule (for logging).
    """
    if not groups:
        raise ValueError("config.train.param_groups is empty: nothing would be trained")
    labels = group_labels(params, groups)
    names = {g["name"] for g in groups}
    used = set(jax.tree.leaves(labels))
    unused = sorted(names - used)
    if unused:
        raise ValueError(f"parameter groups {unused} match no parameter path; check their regexes")
    mask = jax.tree.map(lambda l: l != FROZEN, labels)
    train_labels, _ = split_trainable(labels, mask)
    transforms, schedules = {}, {}
    for g in groups:
        sched = warmup_cosine(g["lr"], warmup_steps=warmup_steps, total_steps=total_steps,
                              end_lr=end_lr)
        no_decay = [re.compile(p) for p in g.get("no_decay", ())]
        decay_mask = lambda tree, no_decay=no_decay: tree_lib.map_with_path(
            lambda p, x: x is not None and not any(r.search(p) for r in no_decay), tree)
        transforms[g["name"]] = optax.adamw(sched, b1=b1, b2=b2, eps=eps,
                                            weight_decay=g.get("weight_decay", 0.0),
                                            mask=decay_mask)
        schedules[g["name"]] = sched
    tx = optax.multi_transform(transforms, train_labels)
    if grad_clip and grad_clip > 0:
        tx = optax.chain(clip_by_global_norm(grad_clip), tx)
    return tx, schedules
