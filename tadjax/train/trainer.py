"""train_and_evaluate(config, workdir) and evaluate(config, workdir): the loops behind tadjax.main.

A run lives in WORKDIR:
  checkpoints/<step>/   orbax checkpoints (state, data iterator, config); restarting resumes
  metrics.jsonl         one JSON line per logged step (and per evaluation)
  tensorboard/          TensorBoard event files
  eval/metrics.json     the last evaluation, in the layout of `tadjax.evaluation --json`
  eval/results.json     the detections, in the official ActivityNet results layout
"""
from __future__ import annotations

import json
import logging
import os
import resource
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import tadjax
from tadjax import evaluation
from tadjax.data import annotations as annotations_lib
from tadjax.data import loader as loader_lib
from tadjax.detection import postprocess
from tadjax.models import detector as detector_lib
from tadjax.train import checkpoint as ckpt_lib
from tadjax.train import optimizer as opt_lib
from tadjax.train import sharding as sharding_lib
from tadjax.train import state as state_lib
from tadjax.train import writers as writers_lib


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() if jax.local_devices() else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return None


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """One log line per call with percentage, rate and ETA (works in log files, unlike \\r bars)."""

    def __init__(self, total: int, start: int):
        self.total, self.start = total, start
        self.t0 = time.time()

    def line(self, step: int) -> str:
        done = step - self.start
        elapsed = time.time() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        width = 20
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        eta_s = _fmt_time(eta) if np.isfinite(eta) else "?"
        return f"[{bar}] {step}/{self.total} ({100.0 * step / max(self.total, 1):.0f}%) ETA {eta_s}"


class Run:
    """Everything a training or evaluation run needs, built once from the config."""

    def __init__(self, config, workdir: str | None, *, with_data: bool = True, devices=None):
        """`devices`: the devices of the mesh (default: all devices of all processes)."""
        self.config = config
        self.workdir = workdir
        self.model = detector_lib.build_detector(config)
        self.points = detector_lib.points_for(config)
        self.sources = loader_lib.build_or_load(config.data) if with_data else None
        self.groups = [dict(g) for g in config.train.param_groups]
        rng = jax.random.key(int(config.seed))
        self.init_rng, self.state_rng = jax.random.split(rng)
        self.abstract_params = jax.eval_shape(
            lambda r: state_lib.init_params(self.model, config, r), self.init_rng)
        self.mask = opt_lib.trainable_mask(self.abstract_params, self.groups)
        self.mesh = sharding_lib.make_mesh(config.mesh, devices)

    def class_names(self) -> list[str]:
        return self.eval_source().classes

    def eval_source(self):
        return loader_lib.get_split(self.sources, self.config.data.eval_subset)

    def eval_ground_truth(self) -> annotations_lib.AnnotationSet:
        """The evaluation subset's ground truth, as stored in the built dataset."""
        source = self.eval_source()
        videos = {}
        for r in source.records:
            videos[r["video_id"]] = annotations_lib.VideoAnnotation(
                video_id=r["video_id"], subset=source.split, duration=float(r["duration"]),
                fps=loader_lib.annotation_fps(r), num_frames=int(r["num_frames"]),
                segments=np.asarray(r["segments"], np.float64).reshape(-1, 2),
                labels=np.asarray(r["labels"], np.int32))
        return annotations_lib.AnnotationSet(classes=list(source.classes),
                                             videos=dict(sorted(videos.items())),
                                             source=source.data_dir)

    # -- schedule -----------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        source = loader_lib.get_split(self.sources, self.config.data.train_subset)
        n = len(loader_lib.train_indices(self.config.data, source))
        return max(n // int(self.config.data.batch_size), 1)

    def make_tx(self, steps_per_epoch: int | None = None):
        spe = steps_per_epoch or self.steps_per_epoch()
        t = self.config.train
        return opt_lib.make_optimizer(self.abstract_params, self.groups,
                                      warmup_steps=int(t.warmup_epochs * spe),
                                      total_steps=int(t.epochs * spe), grad_clip=float(t.grad_clip))

    def _init_fn(self, tx):
        def init(rng_init, rng_state):
            params = state_lib.init_params(self.model, self.config, rng_init)
            return state_lib.create_state(params, tx, self.mask, rng=rng_state,
                                          init_loss_norm=float(self.config.model.init_loss_norm))
        return init

    def state_shardings(self, tx):
        """NamedShardings of the train state from config.mesh.rules (params, opt, EMA alike)."""
        shapes = jax.eval_shape(self._init_fn(tx), self.init_rng, self.state_rng)
        return sharding_lib.tree_shardings(self.mesh, self.config.mesh, shapes)

    def init_state(self, tx):
        """A fresh train state, each array created directly in its sharding."""
        return jax.jit(self._init_fn(tx), out_shardings=self.state_shardings(tx))(
            self.init_rng, self.state_rng)

    def abstract_state(self, tx):
        """ShapeDtypeStructs of the train state, with shardings (the checkpoint restore target)."""
        shapes = jax.eval_shape(self._init_fn(tx), self.init_rng, self.state_rng)
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            shapes, self.state_shardings(tx))

    # -- sharded steps and batches ------------------------------------------------------------
    def abstract_batch(self, batch_size: int | None = None) -> dict:
        """ShapeDtypeStructs of a global training batch (see tadjax.data.loader)."""
        b = int(batch_size or self.config.data.batch_size)
        frames, mask = detector_lib.input_shapes(self.config, b)
        m = int(self.config.data.max_gt)
        return {"frames": jax.ShapeDtypeStruct(frames, jnp.uint8),
                "mask": jax.ShapeDtypeStruct(mask, jnp.bool_),
                "gt_segments": jax.ShapeDtypeStruct((b, m, 2), jnp.float32),
                "gt_labels": jax.ShapeDtypeStruct((b, m), jnp.int32),
                "gt_valid": jax.ShapeDtypeStruct((b, m), jnp.bool_)}

    def batch_shardings(self) -> dict:
        if getattr(self, "_batch_shardings", None) is None:
            self._batch_shardings = sharding_lib.batch_shardings(
                self.mesh, self.config.mesh, self.abstract_batch())
        return self._batch_shardings

    def accum_steps(self) -> int:
        """Micro-steps per step: global batch / (train.per_device_batch x batch devices)."""
        per_device = int(self.config.train.get("per_device_batch", 0) or 0)
        batch = int(self.config.data.batch_size)
        dp = sharding_lib.data_parallel_size(self.mesh, self.config.mesh)
        if batch % dp:
            raise ValueError(f"config.data.batch_size={batch} is not divisible by the {dp} devices "
                             f"of config.mesh.batch_axes {tuple(self.config.mesh.batch_axes)}")
        if per_device <= 0:
            return 1
        if (batch // dp) % per_device:
            raise ValueError(f"config.train.per_device_batch={per_device} does not divide the "
                             f"{batch // dp} videos per device (batch {batch} over {dp} devices)")
        return batch // dp // per_device

    def make_train_step(self, tx):
        return state_lib.make_train_step(
            self.model, self.config, tx, self.mask, self.points,
            shardings=(self.state_shardings(tx), self.batch_shardings()),
            accum_steps=self.accum_steps())

    def make_predict_step(self, batch_size: int):
        """Predict step for evaluation batches of `batch_size` (every process feeds all of them;
        the batch and snippet axes split them where they divide)."""
        frames, mask = detector_lib.input_shapes(self.config, batch_size)
        sh = sharding_lib.batch_shardings(
            self.mesh, self.config.mesh, {"frames": jax.ShapeDtypeStruct(frames, jnp.uint8),
                                          "mask": jax.ShapeDtypeStruct(mask, jnp.bool_)},
            strict=False)
        params_sh = sharding_lib.tree_shardings(self.mesh, self.config.mesh, self.abstract_params,
                                                params_path=None)
        step = state_lib.make_predict_step(self.model,
                                           shardings=(params_sh, sh["frames"], sh["mask"]))

        def predict(params, frames, mask):
            # Every process holds the whole evaluation batch: global shape = local shape.
            frames = jax.make_array_from_process_local_data(sh["frames"], np.asarray(frames),
                                                            frames.shape)
            mask = jax.make_array_from_process_local_data(sh["mask"], np.asarray(mask), mask.shape)
            with jax.set_mesh(self.mesh):  # traced under the mesh: the row_axes constraints apply
                return step(params, frames, mask)
        return predict

    def data_shard(self) -> tuple[int, int]:
        """(index, count) of this process's share of each global training batch."""
        return sharding_lib.batch_shard_of_process(self.mesh, self.config.mesh)

    def global_batch(self, local_batch: dict) -> dict:
        """Global arrays in the training batch shardings from this process's share."""
        return sharding_lib.global_batch(local_batch, self.batch_shardings(),
                                         int(self.config.data.batch_size))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def tiou_thresholds(spec: str) -> np.ndarray:
    if spec in evaluation.THRESHOLDS:
        return np.asarray(evaluation.THRESHOLDS[spec], np.float64)
    start, stop, num = spec.split(":")
    return np.linspace(float(start), float(stop), int(num))


def predict_videos(run: Run, params, predict_step=None) -> dict[str, dict]:
    """Detections (seconds) for every video of the eval subset, after post-processing."""
    cfg, ecfg = run.config, run.config.eval
    if predict_step is None:
        predict_step = run.make_predict_step(int(ecfg.batch_size))
    per_video: dict[str, list] = {}
    videos = loader_lib.eval_videos(cfg.data, run.sources)
    for batch in loader_lib.eval_batches(cfg.data, run.sources, int(ecfg.batch_size)):
        out = jax.device_get(predict_step(params, batch["frames"], batch["mask"]))
        for i in range(out["reg"].shape[0]):
            if not batch["valid"][i]:
                continue
            meta = videos[int(batch["video_index"][i])]
            if "tem" in out:  # ETAD head
                from tadjax.detection import etad_postprocess
                det = etad_postprocess.decode(out["tem"][i], out["anchors"][i], out["iou"][i],
                                              out["reg"][i],
                                              out["cls_logits"][i] if "cls_logits" in out else None,
                                              pre_nms_topk=int(ecfg.pre_nms_topk))
            else:
                det = postprocess.decode(out["cls_logits"][i], out["reg"][i], run.points,
                                         out["point_mask"][i],
                                         pre_nms_thresh=float(ecfg.pre_nms_thresh),
                                         pre_nms_topk=int(ecfg.pre_nms_topk))
            segs = loader_lib.grid_to_seconds(meta, det.segments, int(batch["grid_start"][i]))
            segs = np.clip(segs, 0.0, meta["duration"])
            per_video.setdefault(meta["video_id"], []).append((segs, det.scores, det.labels))
    classifier = load_classifier(ecfg.classifier, run.class_names()) if ecfg.classifier else None
    results = {}
    for vid, parts in per_video.items():
        segs = np.concatenate([p[0] for p in parts])
        scs = np.concatenate([p[1] for p in parts])
        labs = np.concatenate([p[2] for p in parts])
        det = postprocess.soft_nms(
            segs, scs, labs, sigma=float(ecfg.nms_sigma), min_score=float(ecfg.min_score),
            max_segments=int(ecfg.max_segments),
            class_agnostic=ecfg.nms_mode == "class_agnostic")
        ksegs, kscs, klabs = det.segments, det.scores, det.labels
        if ecfg.voting_thresh > 0:
            ksegs = postprocess.iou_voting(ksegs, segs, scs, threshold=float(ecfg.voting_thresh))
        if classifier is not None:
            if vid not in classifier:
                raise KeyError(f"{ecfg.classifier}: no classifier scores for video {vid!r}")
            ksegs, kscs, klabs = postprocess.fuse_video_classifier(
                ksegs, kscs, classifier[vid], topk=int(ecfg.classifier_topk),
                mode=ecfg.classifier_mode,
                max_outputs=int(ecfg.max_predictions) or len(kscs) * int(ecfg.classifier_topk))
        elif ecfg.max_predictions:
            ksegs, kscs, klabs = (ksegs[: int(ecfg.max_predictions)],
                                  kscs[: int(ecfg.max_predictions)],
                                  klabs[: int(ecfg.max_predictions)])
        results[vid] = {"segments": np.asarray(ksegs), "scores": np.asarray(kscs),
                        "labels": np.asarray(klabs)}
    return results


def load_classifier(path: str, classes: list[str]) -> dict[str, np.ndarray]:
    """External video-level classifier JSON (CUHK layout: {"class": [names], "results":
    {video_id: [scores]}}) -> {video_id: scores in `classes` order}."""
    with open(path) as f:
        data = json.load(f)
    for field in ("class", "results"):
        if field not in data:
            raise KeyError(f"{path}: classifier JSON has no {field!r} field")
    names = list(data["class"])
    missing = [c for c in classes if c not in names]
    if missing:
        raise KeyError(f"{path}: classifier has no scores for classes {missing[:10]}")
    order = np.asarray([names.index(c) for c in classes])
    out = {}
    for vid, scores in data["results"].items():
        scores = np.asarray(scores, np.float64)
        if scores.shape != (len(names),):
            raise ValueError(f"{path}: video {vid!r} has {scores.shape} scores, expected {len(names)}")
        vid = vid[2:] if vid.startswith("v_") and vid[2:] not in data["results"] else vid
        out[vid] = scores[order]
    return out


def evaluate_params(run: Run, params, *, out_dir: str, predict_step=None) -> dict:
    t0 = time.time()
    predictions = predict_videos(run, params, predict_step)
    gt = run.eval_ground_truth()
    os.makedirs(out_dir, exist_ok=True)
    evaluation.write_results(os.path.join(out_dir, "results.json"), predictions, gt.classes)
    result = evaluation.evaluate_detection(gt, predictions, tiou_thresholds(run.config.eval.tious))
    summary = {"mAP": result["mAP"], "average_mAP": result["average_mAP"],
               "seconds": time.time() - t0}
    tmp = os.path.join(out_dir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "metrics.json"))
    logging.info("evaluation on %d videos:\n%s", len(gt.videos), evaluation.format_table(result))
    return summary


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

class NonFiniteError(RuntimeError):
    """Training stopped after `config.train.max_bad_steps` non-finite steps in a row."""


class NonFiniteGuard:
    """Counts the steps whose update the train step skipped (metrics["finite"] False).

    The flag of step N is read when step N+1 has been dispatched (or at the next log/checkpoint,
    which sync anyway), so that watching it does not stall the device queue.
    """

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = int(max_bad_steps)
        self.consecutive = 0       # current streak
        self.total = 0             # skipped steps of this process's run
        self.streak_start = None
        self._pending = None

    def push(self, step: int, metrics: dict):
        previous, self._pending = self._pending, (step, metrics["finite"])
        if previous is not None:
            self._count(*previous)

    def flush(self):
        if self._pending is not None:
            self._count(*self._pending)
            self._pending = None

    def _count(self, step: int, finite):
        if bool(jax.device_get(finite)):
            if self.consecutive:
                logging.info("step %d: finite again after %d skipped steps", step, self.consecutive)
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.consecutive == 1:
            self.streak_start = step
        logging.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d "
                        "in total; the limit is config.train.max_bad_steps=%d)", step,
                        self.consecutive, self.total, self.max_bad_steps)

    @property
    def exhausted(self) -> bool:
        return self.max_bad_steps > 0 and self.consecutive >= self.max_bad_steps


class PreemptionWatch:
    """SIGTERM (what Cloud TPU and SLURM send before taking the machine) -> `requested()` True.

    One process: a SIGTERM handler sets a flag that the loop reads once per step, so the
    checkpoint is written between steps, never from inside the handler. Several processes
    (jax.distributed): JAX's preemption service already watches for SIGTERM and agrees on a
    step at which every process saves (`multihost_utils.reached_preemption_sync_point`).
    """

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self.received = True

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _compile_in_background(run, train_step, state):
    """A future of train_step lowered and compiled (under the run's mesh) for the state's and
    the training batch's shapes and shardings."""
    import concurrent.futures
    batch = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         run.abstract_batch(), run.batch_shardings())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=a.sharding, weak_type=getattr(a, "weak_type", False)), state)

    def compile_step():
        with jax.set_mesh(run.mesh):
            return train_step.lower(abstract, batch).compile()

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile")
    future = pool.submit(compile_step)
    pool.shutdown(wait=False)
    return future


def _compiled_or(train_step, future):
    """The background-compiled step; the jitted one (compiling at its first call) if that
    failed, with the reason in the log."""
    try:
        compiled = future.result()
    except Exception as e:  # noqa: BLE001 - a fallback, not a silent one
        logging.warning("compiling the train step in the background failed (%s: %s); "
                        "compiling it at the first step instead", type(e).__name__, e)
        return train_step
    # What compiling freed would otherwise stay resident all run (hundreds of MB for a
    # long-video step on CPU hosts).
    tadjax.release_freed_memory()

    use = [compiled]

    def step(state, batch):
        if use[0] is not None:
            try:
                return use[0](state, batch)
            except (TypeError, ValueError) as e:  # arguments unlike the compiled ones
                logging.warning("the background-compiled train step rejected the arguments "
                                "(%s); compiling it again", e)
                use[0] = None
        return train_step(state, batch)
    return step


def train_and_evaluate(config, workdir: str, *, stop_at_step: int | None = None) -> dict | None:
    """Train (resuming from WORKDIR's latest checkpoint) and evaluate; returns the last summary.

    `stop_at_step` ends the run early at that step with a checkpoint, as a preemption would
    (tests and debugging); the next call continues from there. A SIGTERM does the same at the
    current step (returns None; `tadjax.main` then exits 0). Killed outright (SIGKILL, power
    loss), a run loses the steps since its last complete checkpoint and resumes from it exactly.
    A step with a non-finite loss or gradient is skipped (see `state.make_train_step`);
    `config.train.max_bad_steps` of them in a row raise `NonFiniteError`, and no checkpoint is
    written during such a streak, so the latest one is the last good state.
    """
    with PreemptionWatch() as preemption:
        return _train_and_evaluate(config, workdir, stop_at_step, preemption)


def _train_and_evaluate(config, workdir, stop_at_step, preemption):
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    run = Run(config, workdir)
    check_eval_subset(config.data, run.sources)  # fail now, not at the first evaluation
    writer = writers_lib.create_writer(workdir, just_logging=not is_main)
    tx, schedules = run.make_tx()
    spe = run.steps_per_epoch()
    end_step = int(config.train.end_epoch * spe)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=int(config.train.keep_checkpoints),
                                 keep_best=int(config.train.keep_best))
    shard_index, shard_count = run.data_shard()
    train_iter = loader_lib.train_iterator(config.data, run.sources, seed=int(config.seed),
                                           process_index=shard_index, process_count=shard_count)
    logging.info("mesh %s; %d micro-step(s) per step", sharding_lib.describe(run.mesh),
                 run.accum_steps())
    latest = ckpt.latest_step()
    if latest is not None:
        state = ckpt.restore(latest, run.abstract_state(tx), data_iterator=train_iter)
        logging.info("resumed from %s at step %d", ckpt.directory, latest)
    else:
        state = run.init_state(tx)
        if config.model.get("pretrained"):
            from tadjax import surgery
            # Back into the run's shardings: with the loaded arrays' own placement the first
            # step would be traced and compiled once more at the second.
            state = jax.device_put(surgery.start_from_pretrained(state, tx, run.mask, config),
                                   run.state_shardings(tx))
        if is_main:
            from clu import parameter_overview
            logging.info("parameters:\n%s", parameter_overview.get_parameter_overview(
                state["params"], include_stats=False))
    n_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.abstract_params))
    n_train = sum(int(np.prod(x.shape)) for x, m in zip(jax.tree.leaves(run.abstract_params),
                                                          jax.tree.leaves(run.mask)) if m)
    logging.info("parameters: %s total, %s trainable; %d steps per epoch, training to step %d",
                 f"{n_total:,}", f"{n_train:,}", spe, end_step)
    train_step = run.make_train_step(tx)
    predict_step = run.make_predict_step(int(config.eval.batch_size))
    step = int(state["step"])
    # The train step compiles in a background thread (XLA releases the GIL) while this one
    # evaluates the starting weights, builds the first batch, etc. (only if a step will run).
    will_train = step < end_step and (stop_at_step is None or step < stop_at_step)
    compiling = _compile_in_background(run, train_step, state) if will_train else None
    config_json = config.to_json_best_effort()

    progress = Progress(end_step, step)
    frames_per_batch = int(np.prod(detector_lib.input_shapes(config, int(config.data.batch_size))[0][:2]))
    t_log, n_log = time.time(), 0
    summary = None
    eval_steps = {int(e * spe) for e in range(int(config.train.eval_start_epoch) + 1,
                                                int(config.train.end_epoch) + 1)
                  if (e - int(config.train.eval_start_epoch) - 1) % int(config.train.eval_every_epochs) == 0}
    eval_steps.add(end_step)
    guard = NonFiniteGuard(config.train.get("max_bad_steps", 0))
    if step == 0 and config.train.get("eval_at_start", False):
        # A baseline: the starting weights (pre-trained backbone, fresh adapters and head),
        # logged as the eval/ scalars of step 0; the compiled predict step is reused later.
        start = evaluate_params(run, state_lib.eval_params(state, run.mask),
                                out_dir=os.path.join(workdir, "eval"), predict_step=predict_step)
        _write_eval(writer, 0, start)
    while step < end_step:
        preempted = preemption.requested(step)
        if preempted or (stop_at_step is not None and step >= stop_at_step):
            if preempted:
                logging.warning("SIGTERM: saving a checkpoint at step %d and stopping; run the "
                                "same command again to resume", step)
            guard.flush()
            if ckpt.latest_step() != step:
                ckpt.save(step, state, data_iterator=train_iter, config_json=config_json)
            ckpt.close()
            writer.close()
            return None
        batch = next(train_iter)
        batch = run.global_batch(batch)
        if compiling is not None:
            train_step = _compiled_or(train_step, compiling)
            compiling = None
        # Traced under the mesh, so that the backbone's row_axes constraints apply.
        with jax.set_mesh(run.mesh):
            state, metrics = train_step(state, batch)
        step += 1
        n_log += 1
        guard.push(step, metrics)
        if guard.exhausted:
            _stop_non_finite(guard, step, ckpt, writer)
        if step % int(config.train.log_every_steps) == 0 or step == end_step:
            metrics = jax.device_get(metrics)
            guard.flush()
            metrics["skipped_steps"] = guard.total
            dt = time.time() - t_log
            scalars = {k: float(v) for k, v in metrics.items()}
            scalars["lr_" + next(iter(schedules))] = float(next(iter(schedules.values()))(step))
            scalars["frames_per_second"] = n_log * frames_per_batch / max(dt, 1e-9)
            scalars["peak_rss_gb"] = peak_rss_bytes() / 1e9
            dev = device_peak_bytes()
            if dev is not None:
                scalars["device_peak_gb"] = dev / 1e9
            writer.write_scalars(step, scalars)
            logging.info("%s loss %.4f (cls %.4f reg %.4f) %.1f frames/s peak %.2f GB",
                         progress.line(step), scalars["loss"], scalars["cls_loss"],
                         scalars["reg_loss"], scalars["frames_per_second"], scalars["peak_rss_gb"])
            t_log, n_log = time.time(), 0
        eval_now = step in eval_steps
        if eval_now:
            summary = evaluate_params(run, state_lib.eval_params(state, run.mask),
                                      out_dir=os.path.join(workdir, "eval"),
                                      predict_step=predict_step)
            _write_eval(writer, step, summary)
        if eval_now or step % int(config.train.checkpoint_every_steps) == 0:
            guard.flush()
            if guard.exhausted:
                _stop_non_finite(guard, step, ckpt, writer)
            if guard.consecutive:
                logging.warning("step %d: no checkpoint during a run of %d skipped steps", step,
                                guard.consecutive)
                continue
            ckpt.save(step, state, data_iterator=train_iter, config_json=config_json,
                      metrics={"average_mAP": summary["average_mAP"]} if eval_now else None)
    guard.flush()
    ckpt.close()
    writer.flush()
    writer.close()
    if summary is None:  # resumed after the last step: report the saved figures
        summary = evaluate(config, workdir)
    return summary


def _write_eval(writer, step: int, summary: dict):
    # Tags eval/mAP_0.30 etc.: "@" is no legal TensorBoard tag.
    writer.write_scalars(step, {"eval/average_mAP": summary["average_mAP"],
                                **{f"eval/mAP_{k}": v for k, v in summary["mAP"].items()}})


def check_eval_subset(data_cfg, sources):
    """ValueError when the evaluation subset has no video or no ground-truth segment."""
    source = loader_lib.get_split(sources, data_cfg.eval_subset)
    segments = sum(len(r["segments"]) for r in source.records)
    if len(source) == 0 or segments == 0:
        raise ValueError(
            f"config.data.eval_subset={data_cfg.eval_subset!r} of "
            f"{data_cfg.annotations}: {len(source)} videos with {segments} ground-truth "
            "segments, so evaluation (mAP) is impossible; choose a subset with annotations "
            "(all its videos may have been blocked or skipped as unreadable)")


def _stop_non_finite(guard: NonFiniteGuard, step: int, ckpt, writer):
    ckpt.close()  # let in-flight saves complete: the latest checkpoint stays the last good one
    writer.flush()
    writer.close()
    latest = ckpt.latest_step()
    where = (f"the last good checkpoint is step {latest} in {ckpt.directory}, untouched; "
             "running the same command again resumes from it" if latest is not None else
             f"no checkpoint was written yet ({ckpt.directory} is empty)")
    raise NonFiniteError(
        f"training stopped at step {step}: {guard.consecutive} steps in a row (from step "
        f"{guard.streak_start}) had a non-finite loss or gradient and were skipped "
        f"(config.train.max_bad_steps={guard.max_bad_steps}); {where}. Lower the learning rate, "
        "check the input data, or raise config.train.max_bad_steps.")


def evaluate(config, workdir: str, step: int | None = None) -> dict:
    """Evaluate a checkpoint of WORKDIR (latest unless `step`) with its EMA weights."""
    run = Run(config, workdir)
    tx, _ = run.make_tx()
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    state = ckpt.restore(step, run.abstract_state(tx))
    ckpt.close()
    return evaluate_params(run, state_lib.eval_params(state, run.mask),
                           out_dir=os.path.join(workdir, "eval"))
