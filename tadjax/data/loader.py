"""Input pipeline: built TFDS datasets -> fixed-shape numpy batches for the jitted steps.

    sources = build_or_load(config.data)               # {split: VideoSource}, built once
    it = train_iterator(config.data, sources, seed=0)  # grain iterator, infinite
    batch = next(it)                                   # dict of numpy arrays (below)
    state = it.get_state(); ...; it.set_state(state)   # exact resume
    for batch in eval_batches(config.data, sources, batch_size=2): ...
    videos = eval_videos(config.data, sources)         # what batch["video_index"] refers to

Training pipeline (grain, random access so that the iterator state is just a few integers):
video indices -> shuffle(seed) -> repeat (reshuffled each epoch) -> random_map(pick a window,
decode its frames, augment; rng from (seed, element index)) -> this process's elements
(process_index::process_count) -> batch(drop_remainder) -> iterator, with `num_workers` worker
processes (0: everything in this process). The output does not depend on `num_workers`.

Training batch (B = batch_size // process_count, T = detector grid length, T_f = T * scale_factor,
S = img_size, M = max_gt):
  frames      uint8   [B, T_f, S, S, 3]
  mask        bool    [B, T]       False on padding past the end of a short video
  gt_segments float32 [B, M, 2]    grid units of the T grid, in [0, T]; zeros where not valid
  gt_labels   int32   [B, M]
  gt_valid    bool    [B, M]

Evaluation batch (every window of every video in "window" mode, one item per video in "resize"
mode; the last batch is padded and `valid` marks the real items):
  frames uint8 [B, T_f, S, S, 3], mask bool [B, T], video_index int32 [B] (into eval_videos()),
  window_start float32 [B] (raw frame of the window's first grid position), grid_start int32 [B]
  (that position on the video's snippet grid), valid bool [B].
Convert detections back to seconds with `grid_to_seconds(video, grid, grid_start)`.

Grid conventions are those of `tadjax.data.sampling`: in "window" mode grid coordinate g of a
window is raw frame (g + grid_start) * snippet_stride, i.e. time that / fps, where fps is the
annotation's frame rate (frame count / duration) when it has one, else the decoded one; in
"resize" mode g is time g / T * duration.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from typing import Any, Iterator

import grain
import ml_collections
import numpy as np

from tadjax.data import sampling
from tadjax.data import tfds_builder
from tadjax.data import transforms
from tadjax.data import video as video_lib
from tadjax.data.defaults import default_data_config  # noqa: F401  (public here too)

log = logging.getLogger(__name__)

MODES = ("window", "resize")


def grid_length(data_cfg) -> int:
    """T, the detector's grid length."""
    _check_mode(data_cfg.mode)
    return int(data_cfg.window if data_cfg.mode == "window" else data_cfg.resize_length)


def num_input_frames(data_cfg) -> int:
    """T_f = T * scale_factor, frames per clip fed to the backbone."""
    return grid_length(data_cfg) * int(data_cfg.scale_factor)


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"config.data.mode must be one of {MODES}, got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Sources


def _default_tfds_dir() -> pathlib.Path:
    root = os.environ.get("TADJAX_CACHE") or pathlib.Path.home() / ".cache" / "tadjax"
    return pathlib.Path(root) / "tfds"


class VideoSource:
    """Random access to one split of a built dataset: `len`, `[i]` -> example dict, `records`.

    `records[i]` is example i's metadata without the video (cheap, from the dataset info);
    `source[i]` reads the example itself (text as str, `video` bytes, empty in path mode).
    Pickles as (directory, split), so worker processes reopen it themselves.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, records: list[dict], classes: list[str]):
        self.data_dir = os.fspath(data_dir)
        self.split = split
        self.records = records
        self.classes = list(classes)
        self._source = None

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.builder_from_directory(self.data_dir).as_data_source(self.split)
            if len(self._source) != len(self.records):
                raise ValueError(f"{self.data_dir}: split {self.split!r} has {len(self._source)} examples "
                                 f"but its metadata lists {len(self.records)}")
        return self._source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return tfds_builder.decode_example(self._open()[int(index)])

    def video(self, index: int):
        """The video of example `index` as bytes, or its path in path mode."""
        ex = self[index]
        return ex["video"] if len(ex["video"]) else ex["video_path"]

    def __getstate__(self):
        return {"data_dir": self.data_dir, "split": self.split, "records": self.records, "classes": self.classes}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._source = None

    def __repr__(self):
        return f"VideoSource({self.data_dir!r}, split={self.split!r}, {len(self)} videos)"


def _resolve_inputs(data_cfg) -> tuple[str, str]:
    annotations, videos = data_cfg.annotations, data_cfg.videos
    if annotations == "synthetic":
        from tadjax.data import synthetic

        annotations, videos = synthetic.default_dataset()
    if not annotations:
        raise ValueError("config.data.annotations is empty: give an annotation JSON (or 'synthetic')")
    if not videos:
        raise ValueError("config.data.videos is empty: give the directory of the video files")
    return os.fspath(annotations), os.fspath(videos)


def build_or_load(data_cfg) -> dict[str, VideoSource]:
    """{split: VideoSource} for every annotation subset; builds the TFDS dataset on first use.

    The dataset goes to `<tfds_dir>/activitynet_style/<name>_<fingerprint>/1.0.0`; the
    fingerprint covers the annotation file's content and every setting that changes what is
    stored, so a changed setting builds a new dataset. The video files' content is not part of
    the fingerprint: after replacing videos under the same names, delete the dataset directory.
    With several processes sharing a file system, let one process build first.
    """
    annotations, videos = _resolve_inputs(data_cfg)
    config = tfds_builder.make_config(
        data_cfg.name, annotations=annotations, videos=videos, store_video=data_cfg.store_video,
        classes=data_cfg.classes, blocked=data_cfg.blocked or (), class_agnostic=data_cfg.class_agnostic,
        skip_bad_videos=data_cfg.skip_bad_videos, thumos_conventions=data_cfg.thumos_conventions)
    tfds_dir = data_cfg.tfds_dir or _default_tfds_dir()
    builder = tfds_builder.prepare(config, tfds_dir)
    classes = list(builder.info.metadata["classes"])
    return {split: VideoSource(builder.data_dir, split, tfds_builder.video_records(builder, split), classes)
            for split in builder.info.splits.keys()}


class UnknownSubsetError(KeyError):
    """A subset (split) the dataset does not have; prints its message without KeyError's quotes."""

    def __str__(self):
        return str(self.args[0])


def get_split(sources: dict[str, VideoSource], name: str) -> VideoSource:
    """sources[name], or the one split whose name matches case-insensitively."""
    if name in sources:
        return sources[name]
    matches = [k for k in sources if k.lower() == str(name).lower()]
    if len(matches) == 1:
        return sources[matches[0]]
    where = next(iter(sources.values())).data_dir if sources else "the dataset"
    listing = ", ".join(f"{k!r} ({len(v)} videos)" for k, v in sorted(sources.items())) or "none"
    raise UnknownSubsetError(
        f"no split {name!r} (check config.data.train_subset / eval_subset, subset names of the "
        f"annotation file); {where} has {listing}")


_split = get_split


def annotation_fps(record: dict) -> float:
    """The frame rate annotation times refer to: the annotation's if it has one, else the decoded one."""
    fps = record.get("annotation_fps")
    if fps is None or not math.isfinite(fps) or fps <= 0:
        fps = record["fps"]
    return float(fps)


# ---------------------------------------------------------------------------------------------
# Per-element transforms (run in worker processes: plain picklable objects)


@dataclasses.dataclass(frozen=True)
class _Settings:
    mode: str
    grid_length: int
    snippet_stride: int
    scale_factor: int
    trunc_thresh: float
    crop_ratio: tuple[float, float] | None
    min_relative_length: float
    max_gt: int
    img_size: int
    train_short_side: int
    eval_short_side: int
    augment: transforms.TrainAugment

    @classmethod
    def from_config(cls, c) -> "_Settings":
        _check_mode(c.mode)
        crop = tuple(float(x) for x in c.crop_ratio) if c.crop_ratio is not None else None
        return cls(
            mode=c.mode, grid_length=grid_length(c), snippet_stride=int(c.snippet_stride),
            scale_factor=int(c.scale_factor), trunc_thresh=float(c.trunc_thresh), crop_ratio=crop,
            min_relative_length=float(c.min_relative_length), max_gt=int(c.max_gt),
            img_size=int(c.img_size), train_short_side=int(c.train_short_side),
            eval_short_side=int(c.eval_short_side),
            augment=transforms.TrainAugment(
                short_side=int(c.train_short_side), out_size=int(c.img_size),
                area_range=tuple(float(x) for x in c.rrc_scale), flip_prob=0.5 if c.flip else 0.0,
                color_jitter=bool(c.color_jitter)))

    @property
    def num_frames(self) -> int:
        return self.grid_length * self.scale_factor


def train_window(settings: _Settings, record: dict, rng: np.random.Generator) -> sampling.Window:
    """The training window of one video (ground truth in grid units of the window)."""
    if settings.mode == "window":
        segs = sampling.seconds_to_grid(record["segments"], fps=annotation_fps(record),
                                        snippet_stride=settings.snippet_stride)
        return sampling.train_window(
            record["num_frames"], segs, record["labels"], rng, window_size=settings.grid_length,
            snippet_stride=settings.snippet_stride, scale_factor=settings.scale_factor,
            trunc_thresh=settings.trunc_thresh, crop_ratio=settings.crop_ratio)
    return sampling.resize_window(
        record["num_frames"], settings.num_frames, settings.grid_length, record["segments"],
        record["labels"], duration=record["duration"], min_relative_length=settings.min_relative_length)


def pad_ground_truth(segments: np.ndarray, labels: np.ndarray, max_gt: int, length: int,
                     where: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gt_segments float32 [M, 2], gt_labels int32 [M], gt_valid bool [M]), clipped to [0, length]."""
    segments = np.clip(np.asarray(segments, np.float64).reshape(-1, 2), 0.0, length)
    labels = np.asarray(labels, np.int32).reshape(-1)
    if len(segments) > max_gt:
        log.warning("%s: %d ground-truth segments in a window, keeping the first max_gt=%d",
                    where, len(segments), max_gt)
        order = np.argsort(segments[:, 0], kind="stable")[:max_gt]
        segments, labels = segments[np.sort(order)], labels[np.sort(order)]
    n = len(segments)
    out_segments = np.zeros((max_gt, 2), np.float32)
    out_labels = np.zeros((max_gt,), np.int32)
    out_segments[:n] = segments
    out_labels[:n] = labels
    return out_segments, out_labels, np.arange(max_gt) < n


class TrainElement:
    """random_map transform: record index -> one augmented training example."""

    def __init__(self, settings: _Settings, source: VideoSource):
        self.settings = settings
        self.source = source

    def __call__(self, index, rng: np.random.Generator) -> dict:
        s = self.settings
        index = int(index)
        record = self.source.records[index]
        window = train_window(s, record, rng)
        size = video_lib.output_size(record["height"], record["width"], s.train_short_side)
        frames = video_lib.read_frames(self.source.video(index), window.frame_indices, size=size,
                                       name=record["video_id"])
        frames = transforms.train_augment(frames, rng, s.augment)
        gt_segments, gt_labels, gt_valid = pad_ground_truth(
            window.segments, window.labels, s.max_gt, s.grid_length, where=f"video {record['video_id']}")
        return {"frames": frames, "mask": window.mask.astype(bool), "gt_segments": gt_segments,
                "gt_labels": gt_labels, "gt_valid": gt_valid}


def _read_options():
    # Parallelism comes from worker processes; one reader thread and a short buffer keep the
    # memory of in-flight clips (T_f x S x S x 3 bytes each) small.
    return grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)


def _maybe_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    if num_workers < 0:
        raise ValueError(f"config.data.num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        return ds
    # grain reads absl flags when it starts workers; outside an absl app (tests, notebooks,
    # benchmarks) nobody parsed them, so take the defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=1))


def train_indices(data_cfg, source: VideoSource) -> list[int]:
    """Videos used for training: those with ground truth (in resize mode, with an instance
    longer than `min_relative_length` of the video, the others would give empty targets)."""
    min_rel = float(data_cfg.min_relative_length) if data_cfg.mode == "resize" else 0.0
    keep = []
    for i, r in enumerate(source.records):
        lengths = r["segments"][:, 1] - r["segments"][:, 0]
        if len(lengths) and (min_rel <= 0 or (lengths / r["duration"] > min_rel).any()):
            keep.append(i)
    if not keep:
        raise ValueError(f"{source.data_dir}: split {source.split!r} has no video with ground truth")
    return keep


def train_dataset(data_cfg, sources: dict[str, VideoSource], *, seed: int | None = None,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The training pipeline as a grain IterDataset (see the module docstring)."""
    if data_cfg.batch_size % process_count:
        raise ValueError(f"config.data.batch_size={data_cfg.batch_size} is not divisible by "
                         f"process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    seed = int(data_cfg.seed if seed is None else seed)
    source = get_split(sources, data_cfg.train_subset)
    settings = _Settings.from_config(data_cfg)
    ds = grain.MapDataset.source(train_indices(data_cfg, source))
    ds = ds.shuffle(seed=seed).repeat()
    # Augmentation randomness depends on (seed, global element index) only, before sharding.
    ds = ds.random_map(TrainElement(settings, source), seed=seed)
    ds = ds[process_index::process_count]
    ds = ds.batch(data_cfg.batch_size // process_count, drop_remainder=True)
    return _maybe_workers(ds.to_iter_dataset(_read_options()), int(data_cfg.num_workers))


def train_iterator(data_cfg, sources: dict[str, VideoSource], *, seed: int | None = None,
                   process_index: int = 0, process_count: int = 1):
    """Infinite iterator of training batches; `get_state()` / `set_state()` resume exactly."""
    return iter(train_dataset(data_cfg, sources, seed=seed, process_index=process_index,
                              process_count=process_count))


# ---------------------------------------------------------------------------------------------
# Evaluation


def eval_videos(data_cfg, sources: dict[str, VideoSource]) -> list[dict]:
    """One dict per evaluation video, in `video_index` order, with what converting grid units to
    seconds needs: video_id, duration, fps, num_frames, mode, snippet_stride, scale_factor,
    grid_length, and `grid_starts` (the windows' first positions; [0] in resize mode)."""
    settings = _Settings.from_config(data_cfg)
    source = get_split(sources, data_cfg.eval_subset)
    videos = []
    for i, r in enumerate(source.records):
        if settings.mode == "window":
            n = sampling.num_snippets(r["num_frames"], settings.snippet_stride)
            starts = sampling.sliding_window_starts(n, settings.grid_length, float(data_cfg.test_overlap))
        else:
            starts = [0]
        videos.append({
            "video_index": i, "video_id": r["video_id"], "duration": float(r["duration"]),
            "fps": annotation_fps(r), "decoded_fps": float(r["fps"]), "num_frames": int(r["num_frames"]),
            "mode": settings.mode, "snippet_stride": settings.snippet_stride,
            "scale_factor": settings.scale_factor, "grid_length": settings.grid_length,
            "grid_starts": [int(s) for s in starts],
        })
    return videos


def grid_to_seconds(video: dict, grid, grid_start=0) -> np.ndarray:
    """Grid coordinates of a window (float array) -> seconds, for one `eval_videos()` entry."""
    if video["mode"] == "window":
        return sampling.grid_to_seconds(grid, fps=video["fps"], snippet_stride=video["snippet_stride"],
                                        window_start=grid_start)
    return sampling.resized_to_seconds(grid, duration=video["duration"], length=video["grid_length"])


class EvalElement:
    """map transform: (video index, grid start, valid) -> one centre-cropped clip."""

    def __init__(self, settings: _Settings, source: VideoSource, test_overlap: float):
        self.settings = settings
        self.source = source
        self.test_overlap = test_overlap

    def window(self, record: dict, grid_start: int) -> sampling.Window:
        s = self.settings
        if s.mode == "window":
            n = sampling.num_snippets(record["num_frames"], s.snippet_stride)
            valid = min(s.grid_length, n - grid_start)
            return sampling.Window(
                start=grid_start, length=s.grid_length,
                frame_indices=sampling.window_frame_indices(
                    record["num_frames"], grid_start, s.grid_length, snippet_stride=s.snippet_stride,
                    scale_factor=s.scale_factor, valid=valid),
                mask=np.arange(s.grid_length) < valid,
                segments=np.zeros((0, 2)), labels=np.zeros((0,), np.int32))
        return sampling.resize_window(record["num_frames"], s.num_frames, s.grid_length)

    def __call__(self, item) -> dict:
        s = self.settings
        video_index, grid_start, valid = (int(x) for x in item)
        t, size = s.num_frames, s.img_size
        if not valid:
            return {"frames": np.zeros((t, size, size, 3), np.uint8),
                    "mask": np.zeros((s.grid_length,), bool), "video_index": np.int32(video_index),
                    "window_start": np.float32(0), "grid_start": np.int32(0), "valid": np.bool_(False)}
        record = self.source.records[video_index]
        window = self.window(record, grid_start)
        hw = video_lib.output_size(record["height"], record["width"], s.eval_short_side)
        frames = video_lib.read_frames(self.source.video(video_index), window.frame_indices, size=hw,
                                       name=record["video_id"])
        frames = transforms.eval_augment(frames, size)
        return {"frames": frames, "mask": window.mask.astype(bool), "video_index": np.int32(video_index),
                "window_start": np.float32(grid_start * s.snippet_stride if s.mode == "window" else 0),
                "grid_start": np.int32(grid_start), "valid": np.bool_(True)}


def eval_items(data_cfg, sources: dict[str, VideoSource], batch_size: int) -> np.ndarray:
    """int64 [N, 3] rows (video_index, grid_start, valid), padded to a multiple of batch_size."""
    items = [(v["video_index"], s, 1) for v in eval_videos(data_cfg, sources) for s in v["grid_starts"]]
    pad = -len(items) % batch_size
    items += [(items[-1][0] if items else 0, 0, 0)] * pad
    return np.asarray(items, np.int64).reshape(-1, 3)


def eval_dataset(data_cfg, sources: dict[str, VideoSource], batch_size: int, *,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Evaluation batches as a grain IterDataset. With several processes, each gets every
    process_count-th batch (the item list is padded so that all get the same number)."""
    if batch_size <= 0:
        raise ValueError(f"eval batch_size must be positive, got {batch_size}")
    source = get_split(sources, data_cfg.eval_subset)
    items = eval_items(data_cfg, sources, batch_size * process_count)
    ds = grain.MapDataset.source(list(items))
    ds = ds.map(EvalElement(_Settings.from_config(data_cfg), source, float(data_cfg.test_overlap)))
    ds = ds.batch(batch_size, drop_remainder=False)
    ds = ds[process_index::process_count]
    return _maybe_workers(ds.to_iter_dataset(_read_options()), int(data_cfg.num_workers))


def eval_batches(data_cfg, sources: dict[str, VideoSource], batch_size: int, *,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, Any]]:
    """Every evaluation window once, in fixed-shape batches (padded last batch, `valid` flag)."""
    it = iter(eval_dataset(data_cfg, sources, batch_size, process_index=process_index,
                           process_count=process_count))
    try:
        yield from it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
