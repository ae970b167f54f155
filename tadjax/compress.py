"""Progressive Block Drop (spec blockdrop): select, drop, add LoRA, align, merge; repeat.

  python -m tadjax.main --config configs/blockdrop_demo.py --mode compress --workdir workdirs/bd

Inputs: a trained uncompressed model M0 (`config.compress.teacher`: a tadjax training workdir,
whose latest checkpoint's EMA weights are used, or a `.npz` of {path: array} written by this
module), and the config it was trained with (`model`, `data`, `train` sections unchanged, so its
checkpoint restores). Each round t = 1, 2, ...:

  select  every remaining block k is skipped in turn (the ViT's runtime `block_mask`: one compiled
          function scores every candidate) and the model is scored on the **training** split
          (`compress.selection.metric`: "mAP" = average mAP over the config's tIoUs; "loss" = the
          detection loss; "feature_mse" = MSE of the backbone features against the unskipped
          model); the block whose removal scores best is dropped (ties: lowest index).
  drop    `surgery.drop_blocks` (kept blocks keep their original index; see tadjax.blockdrop).
  lora    fresh LoRA on attn/qkv and attn/proj of every kept block (A ~ N(0, 1/r), B = 0).
  align   train LoRA, block norms, patch embedding, adapters and the head
          (`compress.param_groups`) against the frozen full-depth teacher M0 with
              w_feat · mean_{i kept} MSE(student block i, teacher block i)     (cross-depth)
            + w_cls  · T² · KL(softmax(t/T) || softmax(s/T))   over valid points (batchmean)
            + w_reg  · mean over GT-positive points of (1 - DIoU(student seg, teacher seg))
            + w_det  · detection loss (focal + DIoU, the EMA normaliser as in training)
  merge   `surgery.merge_lora` on the EMA weights; the merged tree is the next round's start and
          runs on `surgery.reduced_config(config, kept)`.

The loop stops at `compress.target` = "blocks:N" (N blocks left), "flops:F" (backbone FLOPs at
most F x M0's) or "map_drop:D" (stop before the round whose training-split average mAP falls more
than D below M0's; that round's model is kept on disk but not reported as the result).

WORKDIR/
  round_00/round.json                 M0: kept blocks, FLOPs, forward time, mAP (eval split)
  round_TT/selection.json             the candidates' scores and the dropped block (written first)
  round_TT/checkpoints/               the alignment run (state + data iterator; resumes)
  round_TT/params.npz                 merged EMA parameters of the round ({path: array})
  round_TT/round.json                 written last: the round is complete
  report.json, report.md              the per-round table
Re-running the same command resumes: complete rounds are skipped, a started round continues
from its latest checkpoint with the same selection.

Differences from the reference (documented choices): the next round starts from the merged EMA
weights for both raw and EMA parameters (the reference carries them separately); no test-split
checkpoint selection inside a round (the reference keeps the best test mAP); the AdaTAD adapters,
absent from the reference pipeline, are trained with the LoRA.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tadjax import blockdrop
from tadjax import tree as tree_lib
from tadjax.config import HEAD_NO_DECAY
from tadjax.detection import assignment
from tadjax.detection import losses as losses_lib
from tadjax.models import detector as detector_lib
from tadjax.models import vit

SELECTION_METRICS = ("mAP", "loss", "feature_mse")


# ---------------------------------------------------------------------------------------------
# Config


def compress_config(*, teacher: str = "", target: str = "blocks:9", lora_rank: int = 96,
                    epochs: int = 60, warmup_epochs: int = 5, horizon_epochs: int = 65,
                    backbone_lr: float = 1e-4, head_lr: float = 1e-4) -> ml_collections.ConfigDict:
    """The `compress` section (defaults: spec blockdrop §4.5, THUMOS ViT-S)."""
    c = ml_collections.ConfigDict()
    c.teacher = teacher                 # M0: training workdir (latest checkpoint, EMA) or .npz
    c.target = target                   # "blocks:N" | "flops:F" | "map_drop:D"
    c.max_rounds = 0                    # 0: no limit besides the target
    c.lora_rank = lora_rank
    c.seed = 0
    c.selection = ml_collections.ConfigDict(dict(
        metric="mAP",                   # one of SELECTION_METRICS, on the training split
        max_videos=0,                   # 0: all training videos ("mAP"); else the first N
        batches=4,                      # "loss" / "feature_mse": training batches scored
    ))
    c.align = ml_collections.ConfigDict(dict(
        feature=1.0, cls_kd=1.0, reg_kd=1.0, detection=1.0, temperature=3.5))
    c.epochs = epochs                   # training epochs per round
    c.warmup_epochs = warmup_epochs
    c.horizon_epochs = horizon_epochs   # cosine schedule length (training stops at `epochs`)
    c.checkpoint_every_steps = 200
    c.log_every_steps = 10
    c.ema_decay = 0.999
    c.param_groups = [
        dict(name="lora", regex=r"^backbone/.*/lora_[ab]$", lr=backbone_lr, weight_decay=0.05,
             no_decay=()),
        dict(name="norm", regex=r"^backbone/blocks_\d+/norm[12]/", lr=backbone_lr,
             weight_decay=0.05, no_decay=()),
        dict(name="patch_embed", regex=r"^backbone/patch_embed/", lr=backbone_lr,
             weight_decay=0.05, no_decay=()),
        dict(name="adapter", regex=r"^backbone/.*adapter", lr=backbone_lr, weight_decay=0.05,
             no_decay=()),
        dict(name="head", regex=r"^head/", lr=head_lr, weight_decay=0.05, no_decay=HEAD_NO_DECAY),
    ]
    c.timing_repeats = 3                # backbone forward timings per round (median)
    return c


def parse_target(target: str) -> tuple[str, float]:
    kind, _, value = str(target).partition(":")
    if kind not in ("blocks", "flops", "map_drop") or not value:
        raise ValueError(f"config.compress.target must be 'blocks:N', 'flops:F' or 'map_drop:D', "
                         f"got {target!r}")
    return kind, float(value)


def student_config(config, kept, lora_rank: int):
    """The reduced config of a student: `kept` blocks, LoRA, and a backbone mode in which LoRA,
    norms and patch embedding receive gradients (which of them train is the optimizer's call)."""
    new = blockdrop.reduced_config(config, kept, lora_rank=lora_rank)
    mode = new.model.backbone.adapter_mode
    with new.unlocked():
        if mode == "adapter":
            new.model.backbone.adapter_mode = "adapter_full"
        elif mode in ("frozen", "none"):
            new.model.backbone.adapter_mode = "full"
        elif mode == "side":
            raise ValueError("block drop does not support adapter_mode='side'")
    return new


def selection_config(config):
    """The config whose "evaluation" runs over the training split (block selection)."""
    new = config.copy_and_resolve_references()
    with new.unlocked():
        new.data.eval_subset = new.data.train_subset
    new.lock()
    return new


# ---------------------------------------------------------------------------------------------
# Forward passes with a runtime block mask


def _forward(det, frames, mask, block_mask, train):
    """Detector.__call__ with the backbone's runtime skip mask (an `apply` method)."""
    x = frames.astype(jnp.float32)
    x = (x - jnp.asarray(detector_lib.MEAN, jnp.float32)) / jnp.asarray(detector_lib.STD, jnp.float32)
    feats = det.backbone(x.astype(det.dtype), train=train, block_mask=block_mask)
    feats = vit.resize_features(feats.astype(jnp.float32), det.feature_length)
    return det.head(feats, mask, train=train), feats


def make_masked_predict(model) -> Callable:
    """jitted (params, frames, mask, block_mask) -> (outputs, features); one compile for every mask."""
    def predict(params, frames, mask, block_mask):
        out, feats = model.apply({"params": params}, frames, mask, block_mask, False,
                                 method=_forward)
        return ({"cls_logits": out["cls_logits"].astype(jnp.float32),
                 "reg": out["reg"].astype(jnp.float32), "point_mask": out["point_mask"]}, feats)
    return jax.jit(predict)


def _subset_sources(sources, split: str, max_videos: int):
    """`sources` with split `split` cut to its first `max_videos` videos (0: unchanged)."""
    if not max_videos:
        return sources
    from tadjax.data import loader as loader_lib

    class FirstVideos(loader_lib.VideoSource):
        """The first records of a split; reads go to the whole split (same indices)."""

        def _open(self):
            if self._source is None:
                import tensorflow_datasets as tfds
                self._source = tfds.builder_from_directory(self.data_dir).as_data_source(self.split)
            return self._source

    src = loader_lib.get_split(sources, split)
    small = FirstVideos(src.data_dir, src.split, src.records[:int(max_videos)], src.classes)
    return {**sources, src.split: small}


def score_blocks(config, params, candidates, *, metric: str, batches=None, run=None,
                 predict=None) -> dict[int, float]:
    """{block: score of the model with that block skipped} (higher is better), plus the unskipped
    model's score under key -1. `params` is the current (merged) tree; `config` its reduced config.

    "mAP": average mAP on the training split (`run` = a trainer.Run of `selection_config`);
    "loss": minus the detection loss on `batches`; "feature_mse": minus the MSE of the backbone
    features against the unskipped model on `batches`.
    """
    from tadjax.train import trainer
    if metric not in SELECTION_METRICS:
        raise ValueError(f"config.compress.selection.metric must be one of {SELECTION_METRICS}, "
                         f"got {metric!r}")
    depth = blockdrop.config_depth(config)
    kept = blockdrop.kept_blocks(params)
    model = detector_lib.build_detector(config)
    predict = predict or make_masked_predict(model)
    points = detector_lib.points_for(config)
    m = config.model
    scores: dict[int, float] = {}
    reference_feats = None
    for k in [-1] + list(candidates):
        mask = blockdrop.block_mask(depth, [i for i in kept if i != k])
        if metric == "mAP":
            step = lambda p, f, msk, mask=mask: predict(p, f, msk, mask)[0]
            preds = trainer.predict_videos(run, params, step)
            from tadjax import evaluation
            result = evaluation.evaluate_detection(run.eval_ground_truth(), preds,
                                                   trainer.tiou_thresholds(config.eval.tious))
            score = float(result["average_mAP"])
        else:
            total, feats_all = 0.0, []
            for batch in batches:
                out, feats = predict(params, batch["frames"], batch["mask"], mask)
                if metric == "loss":
                    loss, _ = losses_lib.detection_loss(
                        out, jnp.asarray(points), batch["gt_segments"], batch["gt_labels"],
                        batch["gt_valid"], num_classes=int(m.head.num_classes),
                        label_smoothing=float(m.label_smoothing), loss_weight=float(m.loss_weight),
                        center_sample_radius=float(m.center_sample_radius))
                    total += float(loss)
                feats_all.append(np.asarray(feats))
            if metric == "loss":
                score = -total / len(batches)
            else:
                if reference_feats is None:
                    reference_feats = feats_all
                score = -float(np.mean([np.mean((a - b) ** 2)
                                        for a, b in zip(feats_all, reference_feats)]))
        scores[k] = score
        logging.info("selection: %s %s = %.4f", "no block skipped" if k < 0 else f"block {k} skipped",
                     metric, score)
    return scores


def choose_block(scores: dict[int, float]) -> int:
    """The candidate with the highest score; ties go to the lowest index (key -1 ignored)."""
    cands = sorted(k for k in scores if k >= 0)
    return max(cands, key=lambda k: (scores[k], -k))


# ---------------------------------------------------------------------------------------------
# Cross-depth alignment


def alignment_losses(student_out, teacher_out, student_feats: dict, teacher_feats: dict, points,
                     batch, *, config, loss_norm):
    """(total, aux) of one batch; see the module docstring. `*_feats` map "i" (original block
    index) to block outputs; only the student's keys are aligned."""
    a = config.compress.align
    m = config.model
    temperature = float(a.temperature)
    keys = sorted(student_feats, key=int)
    feature = sum(jnp.mean(jnp.square(student_feats[k].astype(jnp.float32)
                                      - jax.lax.stop_gradient(teacher_feats[k]).astype(jnp.float32)))
                  for k in keys) / len(keys)

    valid = student_out["point_mask"].astype(jnp.float32)
    s_logits = student_out["cls_logits"].astype(jnp.float32) / temperature
    t_logits = jax.lax.stop_gradient(teacher_out["cls_logits"]).astype(jnp.float32) / temperature
    t_prob = jax.nn.softmax(t_logits, -1)
    kl = jnp.sum(t_prob * (jax.nn.log_softmax(t_logits, -1) - jax.nn.log_softmax(s_logits, -1)), -1)
    cls_kd = temperature ** 2 * jnp.sum(kl * valid) / jnp.maximum(valid.sum(), 1.0)

    cls_targets, _ = assignment.assign_targets_batch(
        points, batch["gt_segments"], batch["gt_labels"], batch["gt_valid"],
        int(m.head.num_classes), float(m.center_sample_radius))
    positive = ((cls_targets.sum(-1) > 0) & student_out["point_mask"]).astype(jnp.float32)
    s_seg = losses_lib.decode_offsets(points, student_out["reg"].astype(jnp.float32))
    t_seg = losses_lib.decode_offsets(points, jax.lax.stop_gradient(teacher_out["reg"]).astype(jnp.float32))
    reg_kd = jnp.sum(losses_lib.diou_loss(s_seg, t_seg) * positive) / jnp.maximum(positive.sum(), 1.0)

    det, det_aux = losses_lib.detection_loss(
        student_out, points, batch["gt_segments"], batch["gt_labels"], batch["gt_valid"],
        num_classes=int(m.head.num_classes), normalizer=loss_norm, normalizer_momentum=0.9,
        label_smoothing=float(m.label_smoothing), loss_weight=float(m.loss_weight),
        center_sample_radius=float(m.center_sample_radius))
    total = (float(a.feature) * feature + float(a.cls_kd) * cls_kd + float(a.reg_kd) * reg_kd
             + float(a.detection) * det)
    aux = {"feature": feature, "cls_kd": cls_kd, "reg_kd": reg_kd, "detection": det,
           "normalizer": det_aux["normalizer"]}
    return total, aux


def make_align_step(student, teacher, config, tx, mask, points) -> Callable:
    """jitted (state, teacher_params, batch) -> (state, metrics); the state is a tadjax train state
    over the student's tree (see tadjax.train.state), donated."""
    from tadjax.train import optimizer as opt_lib
    ema_decay = float(config.compress.ema_decay)
    points = jnp.asarray(points)

    def loss_fn(trainable, frozen, teacher_params, batch, key, loss_norm):
        params = opt_lib.merge_trainable(trainable, frozen)
        t_out, t_vars = teacher.apply({"params": teacher_params}, batch["frames"], batch["mask"],
                                      train=False, mutable=["intermediates"])
        s_out, s_vars = student.apply({"params": params}, batch["frames"], batch["mask"],
                                      train=True, rngs={"dropout": key}, mutable=["intermediates"])
        t_feats = t_vars["intermediates"]["backbone"]["block_outputs"][0]
        s_feats = s_vars["intermediates"]["backbone"]["block_outputs"][0]
        return alignment_losses(s_out, jax.lax.stop_gradient(t_out), s_feats, t_feats, points,
                                batch, config=config, loss_norm=loss_norm)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state, teacher_params, batch):
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        trainable, frozen = opt_lib.split_trainable(state["params"], mask)
        (loss, aux), grads = grad_fn(trainable, frozen, teacher_params, batch, key,
                                     state["loss_norm"])
        updates, opt_state = tx.update(grads, state["opt"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                           state["ema"], new_trainable)
        new_state = dict(state, step=step + 1, params=opt_lib.merge_trainable(new_trainable, frozen),
                         opt=opt_state, ema=ema, loss_norm=aux["normalizer"])
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        new_state["step"] = step + 1
        return new_state, {"loss": loss, **{k: v for k, v in aux.items() if k != "normalizer"},
                           "finite": finite}

    return jax.jit(step_fn, donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Cost of the backbone


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def backbone_cost(config, params=None, *, repeats: int = 3, batch_size: int = 1,
                  compiler_options=None) -> dict:
    """FLOPs (XLA cost analysis) and measured wall time of the backbone forward in eval mode, for
    the config's input (batch `batch_size`). `params`: the backbone subtree (random if None)."""
    from tadjax.models.detector import build_backbone, input_shapes, DTYPES
    # Unrolled: XLA's cost analysis counts a scan body once, not once per block; remat does
    # nothing in a forward pass.
    backbone = build_backbone(config.model.backbone, DTYPES[config.model.dtype]).clone(
        scan_blocks=False, remat_policy="none")
    frames_shape, _ = input_shapes(config, batch_size)
    x = jax.ShapeDtypeStruct(frames_shape, jnp.float32)
    if params is None:
        params = jax.jit(lambda r: backbone.init(r, jnp.zeros(frames_shape, jnp.float32))["params"])(
            jax.random.key(0))
    fn = jax.jit(lambda p, x: backbone.apply({"params": p}, x, train=False))
    t0 = time.time()
    compiled = fn.lower(params, x).compile(compiler_options=compiler_options or {})
    compile_s = time.time() - t0
    frames = jax.random.normal(jax.random.key(1), frames_shape, jnp.float32)
    jax.block_until_ready(compiled(params, frames))  # warm-up
    times = []
    for _ in range(max(int(repeats), 1)):
        t0 = time.time()
        jax.block_until_ready(compiled(params, frames))
        times.append(time.time() - t0)
    return {"flops": _flops(compiled), "forward_seconds": statistics.median(times),
            "forward_seconds_all": times, "compile_seconds": compile_s,
            "frames_shape": list(frames_shape), "blocks": len(backbone.kept_blocks())}


# ---------------------------------------------------------------------------------------------
# Parameter files


def save_params(path: str, params) -> None:
    flat = {k: np.asarray(v) for k, v in tree_lib.flatten(jax.device_get(params)).items()}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_params(path: str):
    with np.load(path) as data:
        return tree_lib.unflatten({k: jnp.asarray(data[k]) for k in data.files})


def load_teacher(config) -> Any:
    """M0's parameters (EMA weights for the trainable leaves) from `config.compress.teacher`."""
    src = config.compress.teacher
    if not src:
        raise ValueError("config.compress.teacher is empty: give the workdir of the trained "
                         "uncompressed model (or a .npz of its parameters)")
    if src.endswith(".npz"):
        if not os.path.exists(src):
            raise FileNotFoundError(f"config.compress.teacher: {src} does not exist")
        return load_params(src)
    from tadjax.train import checkpoint as ckpt_lib
    from tadjax.train import state as state_lib
    from tadjax.train import trainer
    run = trainer.Run(config, None, with_data=False)
    steps = 100  # the optimizer state's structure does not depend on the schedule length
    tx, _ = run.make_tx(steps_per_epoch=steps)
    ckpt = ckpt_lib.Checkpointer(os.path.join(src, "checkpoints"))
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"config.compress.teacher: no checkpoint in {src}/checkpoints")
    state = ckpt.restore(None, run.abstract_state(tx))
    ckpt.close()
    return jax.device_get(state_lib.eval_params(state, run.mask))


# ---------------------------------------------------------------------------------------------
# The loop


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _round_dir(workdir: str, t: int) -> str:
    return os.path.join(workdir, f"round_{t:02d}")


def _train_map(config, params) -> float:
    """Average mAP of `params` (all held blocks) on the training split."""
    from tadjax.train import trainer
    sel = selection_config(config)
    run = trainer.Run(sel, None)
    run.sources = _subset_sources(run.sources, sel.data.train_subset,
                                  int(config.compress.selection.max_videos))
    scores = score_blocks(config, params, [], metric="mAP", run=run)
    return scores[-1]


def measure_round(config, params, round_dir: str, *, kept, dropped, extra=None) -> dict:
    """Evaluate a merged model (eval split mAP) and its backbone cost; write round.json."""
    from tadjax.train import trainer
    run = trainer.Run(config, None)
    summary = trainer.evaluate_params(run, params, out_dir=os.path.join(round_dir, "eval"))
    cost = backbone_cost(config, params["backbone"], repeats=int(config.compress.timing_repeats))
    record = {"kept": list(kept), "dropped": list(dropped), "blocks": len(kept),
              "flops": cost["flops"], "forward_seconds": cost["forward_seconds"],
              "forward_seconds_all": cost["forward_seconds_all"],
              "average_mAP": summary["average_mAP"], "mAP": summary["mAP"], **(extra or {})}
    _write_json(os.path.join(round_dir, "round.json"), record)
    return record


_STEP_CACHE: dict = {}


def align_round(config, teacher_params, start_params, kept, round_dir: str, *, round_index: int,
                stop_at_step: int | None = None):
    """Train one round's student (fresh LoRA on `start_params` minus the dropped block, already
    removed) against the teacher; resumes from round_dir/checkpoints. Returns the merged EMA tree,
    or None if stopped early at `stop_at_step`."""
    from tadjax.data import loader as loader_lib
    from tadjax.train import checkpoint as ckpt_lib
    from tadjax.train import optimizer as opt_lib
    from tadjax.train import state as state_lib
    c = config.compress
    scfg = student_config(config, kept, int(c.lora_rank))
    student = detector_lib.build_detector(scfg)
    teacher = detector_lib.build_detector(config)
    points = detector_lib.points_for(config)
    sources = loader_lib.build_or_load(config.data)
    n_train = len(loader_lib.train_indices(config.data, loader_lib.get_split(sources, config.data.train_subset)))
    spe = max(n_train // int(config.data.batch_size), 1)
    end_step = int(c.epochs) * spe
    groups = [dict(g) for g in c.param_groups]
    rng = jax.random.fold_in(jax.random.key(int(c.seed)), round_index)
    lora_rng, state_rng = jax.random.split(rng)
    # A copy: the state is donated to the step, and the teacher may share these arrays.
    params = jax.tree.map(jnp.array, blockdrop.add_lora(start_params, lora_rng, int(c.lora_rank)))
    # Groups that match nothing (no adapters in this model, say) are left out, not an error.
    paths = list(tree_lib.flatten(params))
    groups = [g for g in groups if any(re.search(g["regex"], p) for p in paths)]
    # One compiled step per (student, teacher, settings) in this process: a resumed or repeated
    # round does not compile again.
    cache_key = (student, teacher, config.to_json_best_effort(), repr(groups), spe,
                 jax.tree.structure(params))
    if cache_key not in _STEP_CACHE:
        mask = opt_lib.trainable_mask(params, groups)
        tx, _ = opt_lib.make_optimizer(
            params, groups, warmup_steps=int(c.warmup_epochs) * spe,
            total_steps=int(c.horizon_epochs) * spe, grad_clip=float(config.train.grad_clip))
        _STEP_CACHE.clear()
        _STEP_CACHE[cache_key] = (mask, tx, make_align_step(student, teacher, config, tx, mask, points))
    mask, tx, step_fn = _STEP_CACHE[cache_key]

    def init(params):
        return state_lib.create_state(params, tx, mask, rng=state_rng,
                                      init_loss_norm=float(config.model.init_loss_norm))

    ckpt = ckpt_lib.Checkpointer(os.path.join(round_dir, "checkpoints"), keep=1, keep_best=0)
    train_iter = loader_lib.train_iterator(config.data, sources,
                                           seed=int(config.seed) + 1000 * round_index)
    if ckpt.latest_step() is not None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                jax.eval_shape(init, params))
        state = ckpt.restore(None, abstract, data_iterator=train_iter)
        logging.info("round %d: resumed alignment at step %d", round_index, int(state["step"]))
    else:
        state = init(params)
    teacher_params = jax.device_put(teacher_params)
    step = int(state["step"])
    logging.info("round %d: aligning blocks %s for %d steps (%d per epoch)", round_index,
                 list(kept), end_step, spe)
    log_rows = []
    while step < end_step:
        if stop_at_step is not None and step >= stop_at_step:
            ckpt.save(step, state, data_iterator=train_iter)
            ckpt.close()
            return None
        batch = {k: jnp.asarray(v) for k, v in next(train_iter).items()
                 if k in ("frames", "mask", "gt_segments", "gt_labels", "gt_valid")}
        state, metrics = step_fn(state, teacher_params, batch)
        step += 1
        if step % int(c.log_every_steps) == 0 or step == end_step:
            row = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
            log_rows.append(row)
            logging.info("round %d step %d/%d: %s", round_index, step, end_step,
                         " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"))
        if step % int(c.checkpoint_every_steps) == 0 and step < end_step:
            ckpt.save(step, state, data_iterator=train_iter)
    ckpt.save(step, state, data_iterator=train_iter)
    ckpt.close()
    with open(os.path.join(round_dir, "train_log.jsonl"), "a") as f:
        for row in log_rows:
            f.write(json.dumps(row) + "\n")
    return jax.device_get(blockdrop.merge_lora(state_lib.eval_params(state, mask)))


def compress(config, workdir: str, *, stop_at_step: int | None = None) -> dict | None:
    """Run (or resume) the progressive loop; returns the report (None if stopped early)."""
    os.makedirs(workdir, exist_ok=True)
    c = config.compress
    kind, value = parse_target(c.target)
    depth = blockdrop.config_depth(config)
    teacher_params = load_teacher(config)
    m0_kept = blockdrop.kept_blocks(teacher_params)
    if len(m0_kept) != depth:
        raise ValueError(f"the teacher has blocks {list(m0_kept)}; block drop starts from a "
                         f"full-depth model ({depth} blocks)")

    # Round 0: the uncompressed model.
    d0 = _round_dir(workdir, 0)
    os.makedirs(d0, exist_ok=True)
    if not os.path.exists(os.path.join(d0, "round.json")):
        extra = {"round": 0}
        if kind == "map_drop":
            extra["train_average_mAP"] = _train_map(config, teacher_params)
        measure_round(config, teacher_params, d0, kept=m0_kept, dropped=[], extra=extra)
    rounds = [_read_json(os.path.join(d0, "round.json"))]
    params = teacher_params

    t = 1
    while True:
        rdir = _round_dir(workdir, t)
        done = os.path.join(rdir, "round.json")
        if os.path.exists(done):
            rounds.append(_read_json(done))
            params = load_params(os.path.join(rdir, "params.npz"))
            t += 1
            continue
        last = rounds[-1]
        if _target_reached(kind, value, rounds, depth) or (c.max_rounds and t > int(c.max_rounds)):
            break
        if last["blocks"] <= 1:
            break
        os.makedirs(rdir, exist_ok=True)
        cur_config = blockdrop.reduced_config(config, last["kept"])
        sel_path = os.path.join(rdir, "selection.json")
        if os.path.exists(sel_path):
            selection = _read_json(sel_path)
        else:
            selection = select_block(cur_config, params)
            _write_json(sel_path, selection)
        k = int(selection["block"])
        kept = [i for i in last["kept"] if i != k]
        logging.info("round %d: dropping block %d (scores %s); keeping %s", t, k,
                     selection["scores"], kept)
        merged = align_round(config, teacher_params, blockdrop.drop_blocks(params, [k]), kept,
                             rdir, round_index=t, stop_at_step=stop_at_step)
        if merged is None:
            return None
        save_params(os.path.join(rdir, "params.npz"), merged)
        new_config = blockdrop.reduced_config(config, kept)
        extra = {"round": t, "selection_metric": selection["metric"],
                 "selection_score": selection["scores"][str(k)]}
        if kind == "map_drop":
            extra["train_average_mAP"] = _train_map(new_config, merged)
        rounds.append(measure_round(new_config, merged, rdir, kept=kept, dropped=last["dropped"] + [k],
                                    extra=extra))
        params = merged
        t += 1
    report = write_report(workdir, rounds, kind=kind, value=value)
    return report


def select_block(config, params) -> dict:
    """Score every held block of `params` (reduced `config`) on the training split."""
    from tadjax.data import loader as loader_lib
    from tadjax.train import trainer
    c = config.compress
    metric = c.selection.metric
    kept = blockdrop.kept_blocks(params)
    t0 = time.time()
    if metric == "mAP":
        sel = selection_config(config)
        run = trainer.Run(sel, None)
        run.sources = _subset_sources(run.sources, sel.data.train_subset, int(c.selection.max_videos))
        scores = score_blocks(config, params, kept, metric=metric, run=run)
    else:
        sources = loader_lib.build_or_load(config.data)
        it = loader_lib.train_iterator(config.data, sources, seed=int(c.seed))
        batches = [{k: jnp.asarray(v) for k, v in next(it).items()}
                   for _ in range(int(c.selection.batches))]
        scores = score_blocks(config, params, kept, metric=metric, batches=batches)
    block = choose_block(scores)
    return {"metric": metric, "block": block, "scores": {str(k): v for k, v in scores.items()},
            "seconds": time.time() - t0}


def _target_reached(kind: str, value: float, rounds: list[dict], depth: int) -> bool:
    last, first = rounds[-1], rounds[0]
    if kind == "blocks":
        return last["blocks"] <= int(value)
    if kind == "flops":
        return last["flops"] <= value * first["flops"]
    # map_drop: a round whose training mAP fell too far ends the loop (see the docstring).
    return first["train_average_mAP"] - last["train_average_mAP"] > value


def result_round(rounds: list[dict], kind: str, value: float) -> dict:
    """The compressed model the loop delivers: the last round, except for map_drop, where the
    last round within the allowed drop."""
    if kind != "map_drop":
        return rounds[-1]
    ok = [r for r in rounds if rounds[0]["train_average_mAP"] - r["train_average_mAP"] <= value]
    return ok[-1]


def format_table(rounds: list[dict]) -> str:
    first = rounds[0]
    lines = ["| round | dropped | blocks kept | backbone GFLOPs | FLOPs ratio | forward (s) | time ratio | avg mAP | mAP@0.5 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        map50 = r["mAP"].get("0.50", r["mAP"].get("0.5", float("nan")))
        lines.append(
            f"| {r.get('round', 0)} | {r['dropped'][-1] if r['dropped'] else '-'} | "
            f"{r['blocks']} ({','.join(map(str, r['kept']))}) | {r['flops'] / 1e9:.2f} | "
            f"{r['flops'] / first['flops']:.3f} | {r['forward_seconds']:.4f} | "
            f"{r['forward_seconds'] / first['forward_seconds']:.3f} | "
            f"{100 * r['average_mAP']:.2f} | {100 * map50:.2f} |")
    return "\n".join(lines)


def write_report(workdir: str, rounds: list[dict], *, kind: str, value: float) -> dict:
    result = result_round(rounds, kind, value)
    report = {"rounds": rounds, "result_round": result.get("round", 0),
              "target": f"{kind}:{value:g}"}
    _write_json(os.path.join(workdir, "report.json"), report)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(format_table(rounds) + "\n")
    logging.info("block drop report:\n%s", format_table(rounds))
    return report
