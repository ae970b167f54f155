"""Temporal action annotations in ActivityNet-style JSON.

Three dialects of the same layout are read, and may be mixed within one file::

    {"database": {VIDEO_ID: {"subset": "...", "duration": SECONDS,
                             "annotations": [{"label": NAME, "segment": [T0, T1]}, ...],
                             ...dialect fields...}}}

* official ActivityNet-1.3 (`activity_net.v1-3.min.json`): also `url`, `resolution`; a
  top-level `taxonomy` (ignored). Subsets `training` / `validation` / `testing`.
* ActionFormer / THUMOS (`thumos14.json`): `fps` per video, `label_id` and
  `segment(frames)` per annotation (the latter is ignored). Subsets `Validation` / `Test`.
* OpenTAD (`thumos_14_anno.json`): `frame` (frame count) per video; fps = frame / duration.

Times are seconds throughout. Class maps come from an explicit list (argument, or a file), else
from a top-level `"classes"` list (written by `write_annotations`), else they are derived from
every video of the file (all subsets, so indices do not depend on the subset chosen): ordered by
`label_id` when every annotation has one, otherwise sorted by name (OpenTAD's rule).

Clean-up applied to each selected video, in this order (counts land in `AnnotationSet.stats`):

1. THUMOS conventions (`thumos_conventions=None` turns them on when every label is a THUMOS14
   class or "Ambiguous"): "Ambiguous" annotations are dropped; every `CliffDiving` segment
   also exists as `Diving` (THUMOS annotates cliff dives under both), and a missing copy is added.
2. Invalid annotations: `start >= end` and labels outside the class map raise `ValueError`
   naming the file, video and annotation (`on_error="raise"`, the default), or are dropped and
   counted (`on_error="warn"`; dropping zero/negative-length GT is what OpenTAD/ActionFormer do).
3. Segments reaching outside [0, duration] are never an error: the training pipeline clips them
   to its window, and the reference evaluators score them unchanged, so they are kept as written
   and counted in `stats["outside_duration"]` (each named in `AnnotationSet.issues`).
4. Duplicates: an annotation with the same label as an earlier one of the video and both ends
   within 1e-3 s is removed (OpenTAD `remove_duplicate_annotations`).

On `/work/shared/data/thumos14.json` the `Test` subset gives 212 videos and 3,358 segments: the
file has no "Ambiguous" label, no duplicates and no zero-length segment, and each of its 217
CliffDiving test segments already has its Diving copy, so steps 1, 2 and 4 change nothing.
26 test segments end past their video's duration and are counted, not changed: 22 of the 29
segments of `video_test_0000270` (which OpenTAD drops as wrongly annotated), 3 of
`video_test_0000814` and 1 of `video_test_0001081`. See `third_party/README.md`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Sequence

import numpy as np

PathLike = str | os.PathLike

THUMOS14_CLASSES = (
    "BaseballPitch", "BasketballDunk", "Billiards", "CleanAndJerk", "CliffDiving",
    "CricketBowling", "CricketShot", "Diving", "FrisbeeCatch", "GolfSwing", "HammerThrow",
    "HighJump", "JavelinThrow", "LongJump", "PoleVault", "Shotput", "SoccerPenalty",
    "TennisSwing", "ThrowDiscus", "VolleyballSpiking",
)
THUMOS_AMBIGUOUS = "Ambiguous"
DUPLICATE_TOLERANCE = 1e-3  # seconds; OpenTAD's duplicate-GT rule
STAT_KEYS = ("ambiguous_removed", "diving_added", "invalid_dropped", "unknown_label_dropped",
             "outside_duration", "duplicates_removed", "blocked_removed")


@dataclasses.dataclass
class VideoAnnotation:
    video_id: str
    subset: str                 # as written in the file
    duration: float             # seconds
    fps: float | None           # 'fps' field, or frame/duration (OpenTAD 'frame'), else None
    num_frames: int | None      # 'frame' / 'num_frames' field if present
    segments: np.ndarray        # float64 [N, 2], seconds
    labels: np.ndarray          # int32 [N], index into AnnotationSet.classes
    filename: str | None = None  # file name of the video if the JSON gives one ('filename')


@dataclasses.dataclass
class AnnotationSet:
    classes: list[str]
    videos: dict[str, VideoAnnotation]   # sorted by video id
    source: str                          # path it came from
    # Video ids of the file removed by the block list (evaluation ignores predictions on them).
    excluded: tuple[str, ...] = ()
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    issues: list[str] = dataclasses.field(default_factory=list)  # one line per counted warning
    thumos_conventions: bool = False

    @property
    def num_segments(self) -> int:
        return int(sum(len(v.labels) for v in self.videos.values()))

    @property
    def subsets(self) -> dict[str, int]:
        """Subset name -> number of videos."""
        return dict(sorted(collections.Counter(v.subset for v in self.videos.values()).items()))

    def subset(self, names: str | Sequence[str]) -> "AnnotationSet":
        wanted = _resolve_subsets(names, self.subsets, self.source)
        videos = {k: v for k, v in self.videos.items() if v.subset in wanted}
        return dataclasses.replace(self, videos=videos, stats=dict(self.stats),
                                   issues=list(self.issues))

    def class_counts(self) -> np.ndarray:
        """Number of segments per class, int64 [len(classes)]."""
        labels = [v.labels for v in self.videos.values()]
        flat = np.concatenate(labels) if labels else np.zeros(0, np.int32)
        return np.bincount(flat, minlength=len(self.classes))


def load_class_list(path: PathLike) -> list[str]:
    """One class name per line (blank lines and `#` comments skipped).

    Lines of the form `<integer> <name>` (THUMOS `Class Index_Detection.txt`) keep their line
    order and drop the integer. A `.json` file holds a list of names or a {name: index} dict.
    """
    path = os.fspath(path)
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict):
            names = [k for k, _ in sorted(data.items(), key=lambda kv: kv[1])]
        elif isinstance(data, list):
            names = [str(x) for x in data]
        else:
            raise ValueError(f"{path}: expected a list of class names or a {{name: index}} dict")
    else:
        with open(path) as f:
            lines = [ln.split("#", 1)[0].strip() for ln in f]
        lines = [ln for ln in lines if ln]
        if lines and all(re.match(r"^\d+\s+\S", ln) for ln in lines):
            lines = [ln.split(None, 1)[1] for ln in lines]
        names = lines
    if not names:
        raise ValueError(f"{path}: empty class list")
    dupes = [n for n, c in collections.Counter(names).items() if c > 1]
    if dupes:
        raise ValueError(f"{path}: class names listed twice: {dupes}")
    return names


def load_video_list(path: PathLike) -> list[str]:
    """A block / missing-video list: text, one entry a line (`#` comments), or a JSON list/dict."""
    path = os.fspath(path)
    with open(path) as f:
        if path.endswith(".json"):
            data = json.load(f)
            return [str(x) for x in (data.keys() if isinstance(data, dict) else data)]
        return [ln.split("#", 1)[0].strip() for ln in f if ln.split("#", 1)[0].strip()]


def load_annotations(path: PathLike,
                     subset: str | Sequence[str] | None = None,
                     *,
                     classes: Sequence[str] | PathLike | None = None,
                     blocked: Sequence[str] | PathLike = (),
                     class_agnostic: bool = False,
                     on_error: str = "raise",
                     thumos_conventions: bool | None = None) -> AnnotationSet:
    """Reads an ActivityNet-style annotation file (see the module docstring for the rules).

    Args:
      path: the JSON file.
      subset: subset name(s) to keep, as written in the file; a case-insensitive match is accepted
        when it is unique. None keeps all. An unknown name raises, listing the subsets present.
      classes: class names (list), or a class-list file; None derives them from the file.
      blocked: video ids to drop (list), or a block/missing-video list file. Entries may carry a
        `v_` prefix, a directory or a file extension (`v_ID.mp4` matches video `ID`).
      class_agnostic: every label becomes 0 and `classes` becomes ["action"] (applied after the
        duplicate removal, which therefore still compares the original labels).
      on_error: "raise" or "warn" for invalid segments and unknown labels.
      thumos_conventions: None auto-detects (every label a THUMOS14 class or "Ambiguous").
    """
    if on_error not in ("raise", "warn"):
        raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
    source = os.fspath(path)
    with open(source) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("database"), dict):
        raise ValueError(f"{source}: missing top-level field 'database' (a dict of videos)")
    database = data["database"]

    # Pass 1 over every video: subsets, labels, label ids (the class map must not depend on
    # the subset chosen).
    subset_counts: collections.Counter = collections.Counter()
    label_ids: dict[str, set] = collections.defaultdict(set)
    all_have_ids = True
    for vid, entry in database.items():
        where = f"{source}: video {vid!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        if "subset" not in entry:
            raise ValueError(f"{where}: missing field 'subset'")
        subset_counts[str(entry["subset"])] += 1
        anns = entry.get("annotations", [])
        if not isinstance(anns, list):
            raise ValueError(f"{where}: field 'annotations' must be a list")
        for i, ann in enumerate(anns):
            if not isinstance(ann, dict) or "label" not in ann:
                raise ValueError(f"{where}, annotation {i}: missing field 'label'")
            if "label_id" in ann:
                label_ids[str(ann["label"])].add(ann["label_id"])
            else:
                all_have_ids = False
                label_ids.setdefault(str(ann["label"]), set())

    file_labels = set(label_ids)
    if thumos_conventions is None:
        thumos_conventions = bool(file_labels) and file_labels <= (
            set(THUMOS14_CLASSES) | {THUMOS_AMBIGUOUS})

    if classes is None and isinstance(data.get("classes"), list):
        classes = [str(c) for c in data["classes"]]
    if classes is None:
        class_list = _derive_classes(label_ids, all_have_ids, thumos_conventions, source)
    elif isinstance(classes, (str, os.PathLike)):
        class_list = load_class_list(classes)
    else:
        class_list = [str(c) for c in classes]
        dupes = [n for n, c in collections.Counter(class_list).items() if c > 1]
        if dupes:
            raise ValueError(f"class names listed twice: {dupes}")
    class_index = {name: i for i, name in enumerate(class_list)}

    wanted = None if subset is None else _resolve_subsets(subset, subset_counts, source)
    blocked_ids = _resolve_blocked(blocked, database)

    stats = {k: 0 for k in STAT_KEYS}
    issues: list[str] = []
    videos: dict[str, VideoAnnotation] = {}
    excluded = []
    for vid in sorted(database):
        entry = database[vid]
        if wanted is not None and str(entry["subset"]) not in wanted:
            continue
        if vid in blocked_ids:
            stats["blocked_removed"] += 1
            excluded.append(vid)
            continue
        videos[vid] = _parse_video(vid, entry, source, class_index, thumos_conventions,
                                   on_error, stats, issues)

    if class_agnostic:
        class_list = ["action"]
        for v in videos.values():
            v.labels = np.zeros_like(v.labels)
    return AnnotationSet(classes=list(class_list), videos=videos, source=source,
                         excluded=tuple(excluded), stats=stats, issues=issues,
                         thumos_conventions=bool(thumos_conventions))


def write_annotations(path: PathLike, annset: AnnotationSet, version: str = "tadjax") -> None:
    """Writes ActivityNet-style JSON that `load_annotations` reads back to an equal set.

    Each video gets `subset`, `duration`, `annotations` ({label, label_id, segment}), and `fps`,
    `frame` (frame count) and `filename` when known; the class list is stored under "classes".
    """
    database = {}
    for vid, v in annset.videos.items():
        entry = {"subset": v.subset, "duration": float(v.duration)}
        if v.fps is not None:
            entry["fps"] = float(v.fps)
        if v.num_frames is not None:
            entry["frame"] = int(v.num_frames)
        if v.filename is not None:
            entry["filename"] = v.filename
        entry["annotations"] = [
            {"label": annset.classes[int(lab)], "label_id": int(lab),
             "segment": [float(s), float(e)]}
            for (s, e), lab in zip(np.asarray(v.segments).reshape(-1, 2), v.labels)]
        database[vid] = entry
    with open(os.fspath(path), "w") as f:
        json.dump({"version": version, "classes": list(annset.classes), "database": database}, f)


# ----------------------------------------------------------------------------------------------

def _derive_classes(label_ids, all_have_ids, thumos, source):
    names = [n for n in label_ids if not (thumos and n == THUMOS_AMBIGUOUS)]
    if all_have_ids and names:
        ids = {}
        for n in names:
            if len(label_ids[n]) != 1:
                raise ValueError(f"{source}: label {n!r} has several label_id values "
                                 f"{sorted(label_ids[n])}")
            ids[n] = next(iter(label_ids[n]))
        clash = [i for i, c in collections.Counter(ids.values()).items() if c > 1]
        if clash:
            raise ValueError(f"{source}: label_id {clash} used by several labels")
        try:
            return sorted(names, key=lambda n: float(ids[n]))
        except (TypeError, ValueError):
            raise ValueError(f"{source}: label_id values must be numbers") from None
    return sorted(names)


def _resolve_subsets(names, present, source) -> set[str]:
    if isinstance(names, str):
        names = [names]
    present = dict(present)
    listing = ", ".join(f"{k!r} ({n} videos)" for k, n in sorted(present.items())) or "none"
    out = set()
    for name in names:
        if name in present:
            out.add(name)
            continue
        folded = [k for k in present if k.lower() == str(name).lower()]
        if len(folded) != 1:
            raise ValueError(f"{source}: unknown subset {name!r}; subsets present: {listing}")
        out.add(folded[0])
    return out


def _resolve_blocked(blocked, database) -> set[str]:
    if isinstance(blocked, (str, os.PathLike)):
        blocked = load_video_list(blocked)
    out = set()
    for entry in blocked:
        entry = str(entry).strip()
        base = os.path.basename(entry)
        stem = os.path.splitext(base)[0]
        for cand in (entry, base, stem):
            for c in (cand, cand[2:] if cand.startswith("v_") else None):
                if c and c in database:
                    out.add(c)
    return out


def _number(value, where, field):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: field {field!r} must be a number, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{where}: field {field!r} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{where}: field {field!r} must be finite, got {value!r}")
    return x


def _parse_video(vid, entry, source, class_index, thumos, on_error, stats, issues):
    where = f"{source}: video {vid!r}"
    if "duration" not in entry:
        raise ValueError(f"{where}: missing field 'duration'")
    duration = _number(entry["duration"], where, "duration")
    if duration <= 0:
        raise ValueError(f"{where}: field 'duration' must be positive, got {duration}")
    num_frames = None
    for field in ("frame", "num_frames"):
        if field in entry and entry[field] is not None:
            num_frames = int(_number(entry[field], where, field))
            break
    fps = None
    if entry.get("fps") is not None:
        fps = _number(entry["fps"], where, "fps")
        if fps <= 0:
            raise ValueError(f"{where}: field 'fps' must be positive, got {fps}")
    elif num_frames is not None:
        fps = num_frames / duration
    filename = entry.get("filename")

    kept: list[tuple[float, float, str]] = []
    for i, ann in enumerate(entry.get("annotations", [])):
        awhere = f"{where}, annotation {i}"
        label = str(ann["label"])
        if "segment" not in ann:
            raise ValueError(f"{awhere}: missing field 'segment'")
        seg = ann["segment"]
        if not isinstance(seg, (list, tuple)) or len(seg) != 2:
            raise ValueError(f"{awhere}: field 'segment' must be [start, end], got {seg!r}")
        start, end = (_number(x, awhere, "segment") for x in seg)
        if thumos and label == THUMOS_AMBIGUOUS:
            stats["ambiguous_removed"] += 1
            continue
        problem = None
        if label not in class_index:
            problem, counter = f"label {label!r} is not in the class list", "unknown_label_dropped"
        elif start >= end:
            problem, counter = f"segment start {start} >= end {end}", "invalid_dropped"
        if problem:
            if on_error == "raise":
                raise ValueError(f"{awhere}: {problem}")
            stats[counter] += 1
            issues.append(f"{awhere}: {problem} (dropped)")
            continue
        if start < 0 or end > duration:
            stats["outside_duration"] += 1
            issues.append(f"{awhere}: segment [{start}, {end}] reaches outside "
                          f"[0, duration {duration}] (kept)")
        kept.append((start, end, label))

    if thumos and "CliffDiving" in class_index and "Diving" in class_index:
        for start, end, label in list(kept):
            if label == "CliffDiving" and not any(
                    l2 == "Diving" and _same(start, end, s2, e2) for s2, e2, l2 in kept):
                kept.append((start, end, "Diving"))
                stats["diving_added"] += 1

    unique: list[tuple[float, float, str]] = []
    for start, end, label in kept:
        if any(l2 == label and _same(start, end, s2, e2) for s2, e2, l2 in unique):
            stats["duplicates_removed"] += 1
            continue
        unique.append((start, end, label))

    segments = np.array([(s, e) for s, e, _ in unique], np.float64).reshape(-1, 2)
    labels = np.array([class_index[l] for _, _, l in unique], np.int32)
    return VideoAnnotation(video_id=vid, subset=str(entry["subset"]), duration=duration, fps=fps,
                           num_frames=num_frames, segments=segments, labels=labels,
                           filename=None if filename is None else str(filename))


def _same(s1, e1, s2, e2):
    return abs(s1 - s2) <= DUPLICATE_TOLERANCE and abs(e1 - e2) <= DUPLICATE_TOLERANCE
