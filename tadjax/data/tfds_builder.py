"""TFDS builder for ActivityNet-style temporal action detection datasets.

One generic builder, ``activitynet_style``, serves THUMOS14, ActivityNet-1.3 and the synthetic
set: the annotation JSON (``{"database": {video_id: {"subset", "duration", "annotations": ...}}}``)
says which videos exist and in which subset, and a directory of video files (TFDS calls this
"manual data") holds the videos. Each annotation subset becomes one split.

The dataset is written as ``array_record`` and read back with ``builder.as_data_source(split)``,
which needs no TensorFlow: every feature here is a numpy scalar, a numpy array, text or raw
bytes. With ``store_video="bytes"`` (the default) each example carries the encoded video file,
so the built dataset is self-contained; with ``store_video="path"`` it carries only the absolute
path of the file.

Examples keep a fixed order (sorted by video id, shuffling disabled), so example ``i`` of a split
is ``info.metadata["videos"][split][i]``: the per-video metadata (everything but the bytes) is
stored beside the records so a loader can plan windows without reading any video.

Every setting that changes the content (annotation file content, class list, blocked list, ...)
enters the config name through a fingerprint, so a changed setting builds a new dataset instead of
silently reusing a stale one. TFDS writes into a temporary ``incomplete.*`` directory and renames
it when done, so a crash mid-build never leaves a directory that looks complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sys
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from tadjax.data import annotations as annotations_lib
from tadjax.data import video as video_lib

log = logging.getLogger(__name__)

BUILDER_NAME = "activitynet_style"
STORE_MODES = ("bytes", "path")
_SPLIT_NAME = re.compile(r"^\w+$")
_CONFIG_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# A file is "shorter than its annotations" when it ends before the annotated duration and before
# the last annotated segment's end by more than this much (seconds, fraction of the duration;
# both must be exceeded: the doctor's duration tolerance).
SHORT_VIDEO_TOLERANCE = (0.5, 0.01)
MAX_LOGGED_ISSUES = 20


@dataclasses.dataclass(eq=False)
class ActivityNetStyleConfig(tfds.core.BuilderConfig):
    """Which annotation file and video directory make the dataset, and how.

    Attributes:
      annotations: path of the ActivityNet-style annotation JSON.
      videos: directory holding the video files (looked up with ``video.find_video``).
      store_video: "bytes" (encoded file in every example) or "path" (absolute path only).
      classes: None (sorted label set of the file), a list of class names, or a path to a list.
      blocked: video ids to leave out, or a path to such a list.
      class_agnostic: every label becomes 0.
      skip_bad_videos: a missing or undecodable video is skipped with a warning instead of
        failing the build.
      thumos_conventions: forwarded to ``annotations.load_annotations``.
    """

    annotations: str = ""
    videos: str = ""
    store_video: str = "bytes"
    classes: Any = None
    blocked: Any = ()
    class_agnostic: bool = False
    skip_bad_videos: bool = False
    thumos_conventions: Any = None


def _file_digest(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_or_value(value):
    """Content hash for a path-valued setting, the value itself otherwise."""
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        return {"file_sha1": _file_digest(os.fspath(value))}
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return value


def fingerprint(*, annotations, videos, store_video, classes, blocked, class_agnostic,
                skip_bad_videos, thumos_conventions) -> str:
    """Short hash of everything that changes the built content."""
    if not os.path.isfile(annotations):
        raise FileNotFoundError(f"annotation file {annotations!r} does not exist")
    content = {
        "annotations": _file_digest(os.fspath(annotations)),
        "videos": os.path.abspath(os.fspath(videos)),
        "store_video": store_video,
        "classes": _digest_or_value(classes),
        "blocked": _digest_or_value(blocked),
        "class_agnostic": bool(class_agnostic),
        "skip_bad_videos": bool(skip_bad_videos),
        "thumos_conventions": thumos_conventions,
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def make_config(name: str, *, annotations, videos, store_video: str = "bytes", classes=None,
                blocked=(), class_agnostic: bool = False, skip_bad_videos: bool = False,
                thumos_conventions=None) -> ActivityNetStyleConfig:
    """A config whose name is ``{name}_{fingerprint}``."""
    if not _CONFIG_NAME.match(name):
        raise ValueError(f"dataset name {name!r} must match {_CONFIG_NAME.pattern}")
    if store_video not in STORE_MODES:
        raise ValueError(f"store_video must be one of {STORE_MODES}, got {store_video!r}")
    if not os.path.isdir(videos):
        raise FileNotFoundError(f"video directory {videos!r} does not exist")
    blocked = tuple(blocked) if isinstance(blocked, (list, tuple)) else blocked
    classes = tuple(classes) if isinstance(classes, (list, tuple)) else classes
    settings = dict(annotations=os.fspath(annotations), videos=os.fspath(videos),
                    store_video=store_video, classes=classes, blocked=blocked or (),
                    class_agnostic=bool(class_agnostic), skip_bad_videos=bool(skip_bad_videos),
                    thumos_conventions=thumos_conventions)
    digest = fingerprint(**settings)
    return ActivityNetStyleConfig(
        name=f"{name}_{digest}",
        description=f"{name} from {settings['annotations']} and {settings['videos']}",
        **settings,
    )


def _optional_float(value) -> float:
    return float("nan") if value is None else float(value)


def _optional_int(value) -> int:
    return -1 if value is None else int(value)


class ActivityNetStyle(tfds.core.GeneratorBasedBuilder):
    """ActivityNet-style temporal action detection dataset from local videos.

    Construct with ``config=make_config(...)`` and ``data_dir=...``; ``download_and_prepare``
    (``file_format="array_record"``) builds it once, ``as_data_source(split)`` reads it.
    """

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the video directory as `videos` in the builder config."

    # Nothing is downloaded, so there are no URL checksums to look up. TFDS's own lookup goes
    # through `code_path`, which needs the `importlib_resources` backport for builders defined in
    # a package; skipping it avoids that dependency.
    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        # tf.train.Example keeps floats as float32: float64 values are stored as raw bytes.
        exact = dict(encoding=tfds.features.Encoding.BYTES)
        features = tfds.features.FeaturesDict({
            "video_id": tfds.features.Text(),
            "subset": tfds.features.Text(),
            "filename": tfds.features.Text(),
            "video_path": tfds.features.Text(),
            # Seconds, as written in the annotation.
            "duration": tfds.features.Tensor(shape=(), dtype=np.float64, **exact),
            # What decoding the file reports.
            "fps": tfds.features.Tensor(shape=(), dtype=np.float64, **exact),
            "num_frames": tfds.features.Scalar(np.int64),
            "height": tfds.features.Scalar(np.int32),
            "width": tfds.features.Scalar(np.int32),
            # What the annotation says (nan / -1 where it says nothing).
            "annotation_fps": tfds.features.Tensor(shape=(), dtype=np.float64, **exact),
            "annotation_num_frames": tfds.features.Scalar(np.int64),
            "segments": tfds.features.Tensor(shape=(None, 2), dtype=np.float64, **exact),
            "labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            # Encoded video file (empty when store_video="path").
            "video": tfds.features.Scalar(np.object_),
        })
        return tfds.core.DatasetInfo(
            builder=self,
            description="ActivityNet-style temporal action detection dataset (video + segments).",
            features=features,
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _load_annotations(self) -> annotations_lib.AnnotationSet:
        cfg = self.builder_config
        return annotations_lib.load_annotations(
            cfg.annotations,
            classes=list(cfg.classes) if isinstance(cfg.classes, tuple) else cfg.classes,
            blocked=list(cfg.blocked) if isinstance(cfg.blocked, tuple) else cfg.blocked,
            class_agnostic=cfg.class_agnostic,
            thumos_conventions=cfg.thumos_conventions,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        if not isinstance(cfg, ActivityNetStyleConfig) or not cfg.annotations:
            raise ValueError("ActivityNetStyle needs config=make_config(...) to be built")
        annset = self._load_annotations()
        by_subset: dict[str, list[str]] = {}
        for video_id, ann in annset.videos.items():
            by_subset.setdefault(ann.subset, []).append(video_id)
        if not by_subset:
            raise ValueError(f"{cfg.annotations}: no videos left after filtering")
        for subset in by_subset:
            if not _SPLIT_NAME.match(subset):
                raise ValueError(f"{cfg.annotations}: subset name {subset!r} is not a valid "
                                 "split name (letters, digits and _ only)")
        for line in annset.issues[:MAX_LOGGED_ISSUES]:
            log.warning("%s", line)
        if len(annset.issues) > MAX_LOGGED_ISSUES:
            log.warning("%s: %d more annotation warnings like these", cfg.annotations,
                        len(annset.issues) - MAX_LOGGED_ISSUES)
        self.info.metadata["classes"] = list(annset.classes)
        self.info.metadata["annotations"] = os.path.abspath(cfg.annotations)
        self.info.metadata["store_video"] = cfg.store_video
        self.info.metadata["videos"] = {}
        self.info.metadata["skipped"] = {}
        return {subset: self._generate_examples(annset, subset, sorted(ids))
                for subset, ids in sorted(by_subset.items())}

    def _read_video(self, ann) -> tuple[str, bytes, Any]:
        """(path, bytes or b"", VideoInfo) for one annotated video; raises naming the file."""
        cfg = self.builder_config
        path = video_lib.find_video(cfg.videos, ann.video_id, ann.filename)
        path = os.path.abspath(os.fspath(path))
        data = b""
        if cfg.store_video == "bytes":
            with open(path, "rb") as f:
                data = f.read()
        # Decoding the first and last frames catches most truncated files at build time.
        info = video_lib.probe_video(data if data else path, name=path)
        _check_covers_annotations(ann, info, path)
        return path, data, info

    def _generate_examples(self, annset, subset: str, video_ids: Sequence[str]
                           ) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        records = self.info.metadata["videos"].setdefault(subset, [])
        skipped = self.info.metadata["skipped"].setdefault(subset, [])
        for key, video_id in enumerate(video_ids):
            ann = annset.videos[video_id]
            try:
                path, data, info = self._read_video(ann)
            except (video_lib.VideoError, OSError) as e:
                if not cfg.skip_bad_videos:
                    # One "video ID:" prefix: the inner message names the file (or this id).
                    reason = str(e)
                    if isinstance(e, video_lib.VideoError):
                        reason = e.reason if e.name == video_id else f"{e.name}: {e.reason}"
                    elif reason.startswith(f"video {video_id}: "):
                        reason = reason[len(f"video {video_id}: "):]
                    raise video_lib.VideoError(
                        video_id, f"{reason} (annotation {cfg.annotations}, subset {subset!r}; "
                        "set skip_bad_videos=True to leave it out)") from e
                log.warning("skipping video %r (subset %r): %s", video_id, subset, e)
                skipped.append({"video_id": video_id, "error": str(e)})
                continue
            segments = np.asarray(ann.segments, np.float64).reshape(-1, 2)
            labels = np.asarray(ann.labels, np.int32).reshape(-1)
            meta = {
                "video_id": video_id,
                "subset": subset,
                "filename": os.path.basename(path),
                "video_path": path,
                "duration": float(ann.duration),
                "fps": float(info.fps),
                "num_frames": int(info.num_frames),
                "height": int(info.height),
                "width": int(info.width),
                "annotation_fps": _optional_float(ann.fps),
                "annotation_num_frames": _optional_int(ann.num_frames),
            }
            json_meta = dict(meta, segments=segments.tolist(), labels=labels.tolist())
            for k in ("annotation_fps",):  # JSON has no nan
                if math.isnan(json_meta[k]):
                    json_meta[k] = None
            records.append(json_meta)
            yield key, dict(meta, segments=segments, labels=labels, video=data)


def _check_covers_annotations(ann, info, path: str):
    """VideoError when the file ends well before its annotation (a truncated or wrong file)."""
    segments = np.asarray(ann.segments, np.float64).reshape(-1, 2)
    if not len(segments):
        return
    last_end = float(segments[:, 1].max())
    seconds, fraction = SHORT_VIDEO_TOLERANCE
    tol = max(seconds, fraction * float(ann.duration))
    if ann.duration - info.duration > tol and last_end - info.duration > tol:
        raise video_lib.VideoError(
            ann.video_id,
            f"file {path} lasts {info.duration:.2f} s ({info.num_frames} frames at "
            f"{info.fps:.4g} fps) but its annotation says duration {ann.duration:.2f} s, with "
            f"segments up to {last_end:.2f} s: the file is shorter than its annotations "
            "(truncated, or another file)")


def prepare(config: ActivityNetStyleConfig, data_dir: str) -> ActivityNetStyle:
    """Builds the dataset if it is not there yet, and returns its builder."""
    builder = ActivityNetStyle(config=config, data_dir=os.fspath(data_dir),
                               file_format="array_record")
    if not is_prepared(builder):
        tfds.display_progress_bar(False)
        log.info("building %s into %s", config.name, builder.data_dir)
        # TFDS prints its progress to stdout; keep stdout for the caller (e.g. --json output).
        with contextlib.redirect_stdout(sys.stderr):
            builder.download_and_prepare(file_format="array_record")
        builder = ActivityNetStyle(config=config, data_dir=os.fspath(data_dir),
                                   file_format="array_record")
    return builder


def is_prepared(builder: ActivityNetStyle) -> bool:
    """True when the final (renamed) directory holds a written dataset_info.json."""
    return (builder.data_path / "dataset_info.json").exists()


def video_records(builder: ActivityNetStyle, split: str) -> list[dict]:
    """Per-example metadata of a split, in data-source order (no video bytes)."""
    videos = builder.info.metadata.get("videos", {})
    if split not in videos:
        raise KeyError(f"{builder.data_dir}: no split {split!r}; splits: {sorted(videos)}")
    out = []
    for r in videos[split]:
        r = dict(r)
        r["segments"] = np.asarray(r["segments"], np.float64).reshape(-1, 2)
        r["labels"] = np.asarray(r["labels"], np.int32).reshape(-1)
        if r.get("annotation_fps") is None:
            r["annotation_fps"] = float("nan")
        out.append(r)
    return out


def decode_example(example: dict) -> dict:
    """A data-source example with text fields as ``str``."""
    out = dict(example)
    for k in ("video_id", "subset", "filename", "video_path"):
        if isinstance(out.get(k), bytes):
            out[k] = out[k].decode("utf-8")
    return out
