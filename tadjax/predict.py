"""Detect actions in raw videos with a trained checkpoint: no annotation file needed.

    python -m tadjax.main --mode predict --checkpoint workdirs/demo --videos clips/ --out preds/

or, in Python:

    predictor = Predictor.from_checkpoint("workdirs/demo")     # config + EMA weights
    detections = predictor.predict(["a.mp4", "b.mkv"])         # {video_id: {segments (s), scores, labels}}
    write_outputs("preds/", detections, predictor.infos, predictor.classes)

Videos of any length and frame rate are cut exactly as evaluation cuts them (the loader's
`EvalElement`, `eval_videos`, `eval_items`: sliding windows in "window" mode, the whole video
resized in "resize" mode), run through `make_predict_step`, and post-processed by the trainer's
`predict_videos` (decode, window merge, soft-NMS, voting) with the checkpoint's eval settings.
External classifier fusion is off (it needs scores for the video ids of a benchmark).

In "window" mode one grid position is `snippet_stride` raw frames, so a model trained at 30 fps
sees a 60 fps video twice as slowly. `match_fps=30` scales the snippet stride of each video to
keep the seconds per position of training (the frame rate of its videos, e.g. ~30 for THUMOS14).

Outputs (`write_outputs`): results.json (the official ActivityNet results layout, all
detections), detections.csv (video_id,start,end,label,score), and per video <id>.srt (subtitles
of the detections above `min_score`) and <id>.png (a timeline, one row per class).
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import pathlib
import sys
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np

from tadjax.data import video as video_lib

log = logging.getLogger(__name__)

PREDICT_SPLIT = "predict"
_PREDICT_STEPS: dict = {}


# ---------------------------------------------------------------------------------------------
# Inputs


def list_videos(path: str | os.PathLike) -> list[pathlib.Path]:
    """A video file, or the video files (by extension) of a directory, sorted by name."""
    p = pathlib.Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"--videos {os.fspath(p)!r}: no such file or directory")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in video_lib.VIDEO_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{p}: no video files ({', '.join(video_lib.VIDEO_EXTENSIONS)})")
    return files


class FileSource:
    """Video files in the loader's source interface (`records`, `video(i)`, `classes`, `split`),
    so that `tadjax.data.loader`'s evaluation pipeline reads them as it reads a dataset split."""

    def __init__(self, paths: Sequence[str | os.PathLike], classes: Sequence[str]):
        self.split = PREDICT_SPLIT
        self.data_dir = "<files>"
        self.classes = list(classes)
        self.paths = [os.path.abspath(os.fspath(p)) for p in paths]
        ids = [pathlib.Path(p).stem for p in self.paths]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"several files give the same video id {dupes}: rename them")
        self.records = []
        for vid, path in zip(ids, self.paths):
            info = video_lib.video_info(path, name=path)
            if not info.fps > 0:
                raise video_lib.VideoError(path, f"frame rate {info.fps} is not positive")
            self.records.append({
                "video_id": vid, "video_path": path, "num_frames": info.num_frames,
                "fps": info.fps, "duration": info.duration, "height": info.height,
                "width": info.width, "annotation_fps": float("nan"),
                "segments": np.zeros((0, 2)), "labels": np.zeros((0,), np.int32)})

    def __len__(self):
        return len(self.records)

    def video(self, index: int) -> str:
        return self.paths[int(index)]

    def subset(self, indices: Sequence[int]) -> "FileSource":
        out = object.__new__(FileSource)
        out.split, out.data_dir, out.classes = self.split, self.data_dir, self.classes
        out.paths = [self.paths[i] for i in indices]
        out.records = [self.records[i] for i in indices]
        return out


# ---------------------------------------------------------------------------------------------
# Checkpoint


def find_checkpoints_dir(path: str | os.PathLike) -> tuple[str, int | None]:
    """(orbax checkpoints directory, step or None) for a workdir, its checkpoints/ directory or
    one step directory checkpoints/<step>."""
    p = pathlib.Path(path).resolve()
    if (p / "checkpoints").is_dir():
        return os.fspath(p / "checkpoints"), None
    if p.name.isdigit() and p.parent.is_dir():
        return os.fspath(p.parent), int(p.name)
    if p.is_dir() and any(c.name.isdigit() for c in p.iterdir()):
        return os.fspath(p), None
    raise FileNotFoundError(f"--checkpoint {os.fspath(path)!r}: not a workdir, a checkpoints "
                            "directory or a checkpoints/<step> directory")


def class_names(config) -> list[str]:
    """The class list of the run: config.data.classes, else the annotation file's, else the
    synthetic set's, else class_0 .. class_{N-1}."""
    from tadjax.data import annotations as annotations_lib

    n = int(config.model.head.num_classes)
    classes = config.data.get("classes")
    if isinstance(classes, (list, tuple)) and classes:
        names = [str(c) for c in classes]
    elif isinstance(classes, str) and os.path.isfile(classes):
        names = annotations_lib.load_class_list(classes)
    elif config.data.get("class_agnostic"):
        names = ["action"]
    elif config.data.get("annotations") == "synthetic":
        from tadjax.data import synthetic
        names = list(synthetic.CLASSES)
    elif config.data.get("annotations") and os.path.isfile(config.data.annotations):
        names = annotations_lib.load_annotations(config.data.annotations).classes
    else:
        names = []
    if len(names) != n:
        if names:
            log.warning("class list has %d names but the head has %d classes: using class_i", len(names), n)
        names = [f"class_{i}" for i in range(n)]
    return names


class Predictor:
    """A detector with its config and evaluation (EMA) weights, ready for raw videos."""

    def __init__(self, config, params, classes: Sequence[str] | None = None):
        from tadjax.train import trainer

        self.config = config
        self.params = params
        self.run = trainer.Run(config, None, with_data=False)
        self.classes = list(classes) if classes else class_names(config)
        self.infos: dict[str, dict] = {}

    @classmethod
    def from_checkpoint(cls, checkpoint: str, step: int | None = None, *,
                        classes: Sequence[str] | None = None) -> "Predictor":
        from tadjax.train import checkpoint as ckpt_lib
        from tadjax.train import state as state_lib
        from tadjax.train import trainer

        directory, dir_step = find_checkpoints_dir(checkpoint)
        step = dir_step if step is None else step
        ckpt = ckpt_lib.Checkpointer(directory, keep_best=0, async_save=False)
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint")
        config = ml_collections.ConfigDict(ckpt.restore_config(step))
        run = trainer.Run(config, None, with_data=False)
        tx, _ = run.make_tx(steps_per_epoch=1)  # the schedule does not change the state's shapes
        state = ckpt.restore(step, run.abstract_state(tx))
        ckpt.close()
        log.info("loaded %s step %d", directory, step)
        return cls(config, state_lib.eval_params(state, run.mask), classes=classes)

    def _step(self):
        # One jitted step per model (flax modules compare by value), so a new Predictor of the
        # same model, e.g. in a notebook, reuses the compiled program.
        if self.run.model not in _PREDICT_STEPS:
            from tadjax.train import state as state_lib
            _PREDICT_STEPS[self.run.model] = state_lib.make_predict_step(self.run.model)
        return _PREDICT_STEPS[self.run.model]

    def predict(self, videos: Sequence[str | os.PathLike], *, match_fps: float | None = None,
                batch_size: int | None = None, progress: bool = True) -> dict[str, dict]:
        """{video_id (file stem): {"segments" [N, 2] seconds, "scores" [N], "labels" [N]}}."""
        from tadjax.train import trainer

        source = FileSource(videos, self.classes)
        for r in source.records:
            self.infos[r["video_id"]] = {k: r[k] for k in ("video_path", "num_frames", "fps", "duration",
                                                           "height", "width")}
        results = {}
        for stride, indices in self._stride_groups(source, match_fps).items():
            config = self._predict_config(stride, batch_size)
            run = copy.copy(self.run)  # same model and points; this group's data settings
            run.config, run.sources = config, {PREDICT_SPLIT: source.subset(indices)}
            frames_per_item = int(np.prod(_input_frames(config)))
            total = _total_items(config, run.sources) * frames_per_item
            bar = FrameProgress(total, enabled=progress)
            results.update(trainer.predict_videos(run, self.params, _counting(self._step(), bar,
                                                                               frames_per_item)))
            bar.close()
        for r in source.records:  # videos without any detection still get (empty) outputs
            results.setdefault(r["video_id"], {"segments": np.zeros((0, 2)), "scores": np.zeros(0),
                                               "labels": np.zeros(0, np.int64)})
        return dict(sorted(results.items()))

    def _stride_groups(self, source, match_fps):
        d = self.config.data
        stride = int(d.snippet_stride)
        if match_fps is None or d.mode != "window":
            return {stride: list(range(len(source)))}
        scale = int(d.scale_factor)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(source.records):
            s = max(scale, int(round(stride * r["fps"] / match_fps / scale)) * scale)
            groups.setdefault(s, []).append(i)
        return groups

    def _predict_config(self, stride: int, batch_size: int | None):
        return predict_config(self.config, stride, batch_size)


def predict_config(config, stride: int | None = None, batch_size: int | None = None):
    """A copy of a run's config that evaluates the PREDICT_SPLIT of FileSource sources."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.eval_subset = PREDICT_SPLIT
    if stride is not None:
        c.data.snippet_stride = int(stride)
    c.eval.classifier = ""
    if batch_size:
        c.eval.batch_size = int(batch_size)
    return c


def _input_frames(config):
    from tadjax.data import loader as loader_lib
    return (loader_lib.num_input_frames(config.data),)


def _total_items(config, sources) -> int:
    from tadjax.data import loader as loader_lib
    return sum(len(v["grid_starts"]) for v in loader_lib.eval_videos(config.data, sources))


def _counting(predict_step, bar: "FrameProgress", frames_per_item: int):
    """predict_step that advances `bar` by the frames of the batch's real (non-padding) items."""
    def step(params, frames, mask):
        out = predict_step(params, frames, mask)
        bar.update(int(np.asarray(mask).any(axis=1).sum()) * frames_per_item)
        return out
    return step


class FrameProgress:
    """A one-line progress bar over decoded frames on stderr: [#####.....] 1,536/3,072 frames."""

    def __init__(self, total: int, *, enabled: bool = True, stream=None, width: int = 30):
        self.total, self.done, self.enabled, self.width = max(int(total), 1), 0, enabled, width
        self.stream = stream or sys.stderr
        self.t0 = time.time()

    def update(self, n: int):
        self.done += n
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        rate = self.done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        filled = int(self.width * frac)
        eta_s = f"{eta:5.0f}s" if math.isfinite(eta) else "    ?"
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{self.done:,}/{self.total:,} frames {rate:7.1f} frames/s ETA {eta_s}")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------
# Outputs


def srt_time(seconds: float) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def _shown(det: dict, min_score: float, top_k: int):
    """Indices of the detections to show (score >= min_score, best top_k), by start time."""
    scores = np.asarray(det["scores"], np.float64)
    keep = np.flatnonzero(scores >= min_score)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:top_k]
    return keep[np.argsort(np.asarray(det["segments"])[keep, 0], kind="stable")]


def write_srt(path, det: dict, classes: Sequence[str], *, min_score: float, top_k: int) -> int:
    """SRT subtitles, one cue per shown detection: "Label (0.87)". Returns the number of cues."""
    segs = np.asarray(det["segments"], np.float64).reshape(-1, 2)
    lines = []
    shown = _shown(det, min_score, top_k)
    for n, i in enumerate(shown, 1):
        s, e = segs[i]
        e = max(e, s + 0.001)
        lines += [str(n), f"{srt_time(s)} --> {srt_time(e)}",
                  f"{classes[int(det['labels'][i])]} ({float(det['scores'][i]):.2f})", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return len(shown)


def write_timeline(path, video_id: str, det: dict, classes: Sequence[str], duration: float, *,
                   min_score: float, top_k: int):
    """PNG timeline: one row per class with a shown detection, bars shaded by score."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = _shown(det, min_score, top_k)
    labels = sorted({int(det["labels"][i]) for i in shown})
    rows = {c: r for r, c in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.35 * max(len(labels), 1)), dpi=100)
    cmap = plt.get_cmap("viridis")
    for i in shown:
        s, e = (float(x) for x in det["segments"][i])
        score = float(det["scores"][i])
        ax.broken_barh([(s, max(e - s, 1e-3))], (rows[int(det["labels"][i])] - 0.4, 0.8),
                       facecolors=cmap(score), alpha=0.35 + 0.65 * score)
    ax.set_xlim(0, max(duration, 1e-3))
    ax.set_ylim(-0.6, max(len(labels), 1) - 0.4)
    ax.set_yticks(range(len(labels)), [classes[c] for c in labels])
    ax.set_xlabel("seconds")
    title = f"{video_id}: {len(shown)} detections with score >= {min_score:g}"
    ax.set_title(title if shown.size else f"{video_id}: no detection with score >= {min_score:g}",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_outputs(out_dir, detections: dict[str, dict], infos: dict[str, dict],
                  classes: Sequence[str], *, min_score: float = 0.3, top_k: int = 50) -> dict:
    """results.json, detections.csv and, per video, <id>.srt and <id>.png; returns the paths."""
    from tadjax import evaluation

    os.makedirs(out_dir, exist_ok=True)
    paths = {"results": os.path.join(out_dir, "results.json"),
             "csv": os.path.join(out_dir, "detections.csv"), "videos": {}}
    evaluation.write_results(paths["results"], detections, classes)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "start", "end", "label", "score"])
        for vid in sorted(detections):
            det = detections[vid]
            order = np.argsort(-np.asarray(det["scores"]), kind="stable")
            for i in order:
                s, e = det["segments"][i]
                w.writerow([vid, f"{s:.3f}", f"{e:.3f}", classes[int(det["labels"][i])],
                            f"{float(det['scores'][i]):.5f}"])
    for vid in sorted(detections):
        srt = os.path.join(out_dir, f"{vid}.srt")
        png = os.path.join(out_dir, f"{vid}.png")
        write_srt(srt, detections[vid], classes, min_score=min_score, top_k=top_k)
        write_timeline(png, vid, detections[vid], classes, infos[vid]["duration"],
                       min_score=min_score, top_k=top_k)
        paths["videos"][vid] = {"srt": srt, "png": png}
    with open(os.path.join(out_dir, "videos.json"), "w") as f:
        json.dump(infos, f, indent=1)
    return paths


def run_predict(checkpoint: str, videos: str, out_dir: str, *, step: int | None = None,
                match_fps: float | None = None, min_score: float = 0.3, top_k: int = 50,
                batch_size: int | None = None, progress: bool = True) -> dict:
    """The `--mode predict` command: checkpoint + videos (file or directory) -> out_dir."""
    predictor = Predictor.from_checkpoint(checkpoint, step)
    files = list_videos(videos)
    log.info("predicting %d videos with %s", len(files), checkpoint)
    detections = predictor.predict(files, match_fps=match_fps, batch_size=batch_size, progress=progress)
    paths = write_outputs(out_dir, detections, predictor.infos, predictor.classes,
                          min_score=min_score, top_k=top_k)
    n = sum(len(d["scores"]) for d in detections.values())
    log.info("wrote %d detections for %d videos to %s", n, len(detections), out_dir)
    return paths
