"""Post-processing of ActionFormer outputs on the host (numpy): decode, soft-NMS, voting,
conversion to seconds, merging of sliding windows and fusion with a video-level classifier.

Pipelines of the reference (OpenTAD) configs:

* THUMOS14 (sliding windows): `decode` each window (threshold 0.001, top 2000, no NMS), convert
  with `grid_to_seconds(..., snippet_stride=4, fps=frames/duration, window_start_frame=...)`,
  then `merge_windows` over all windows of a video: per-class Gaussian soft-NMS (sigma 0.7, no
  minimum score, 2000 per class then 2000 overall).
* ActivityNet (one resized sequence, 1 class): `decode` (no threshold / top-k with one class, as
  the reference), `soft_nms(class_agnostic=True, sigma=0.7, min_score=0.001, max_segments=100)`,
  `iou_voting(threshold=0.9)` against the pre-NMS candidates, `grid_to_seconds(resize_length=192)`,
  then `fuse_video_classifier(topk=2)`: at most 200 predictions per video.

Segments are [N, 2] (start, end) arrays; a `Detections` tuple is (segments, scores, labels).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class Detections(NamedTuple):
    segments: np.ndarray  # [N, 2] float (start, end)
    scores: np.ndarray  # [N] float
    labels: np.ndarray  # [N] int


def _empty() -> Detections:
    return Detections(np.zeros((0, 2), np.float32), np.zeros((0,), np.float32),
                      np.zeros((0,), np.int64))


def _sigmoid(x):
    x = np.asarray(x, np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))),
                    np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def decode(cls_logits, reg, points, point_mask, *, pre_nms_thresh: float = 0.001,
           pre_nms_topk: int = 2000) -> Detections:
    """Candidates of one sequence: cls_logits [P, C], reg [P, 2] (stride units), points [P, 4],
    point_mask [P] -> segments in grid units, sigmoid scores and class labels.

    Point p with stride s and prediction (d_l, d_r) gives [x_p - d_l*s, x_p + d_r*s]. With C > 1
    the (point, class) pairs with score > pre_nms_thresh are kept, best first, at most
    pre_nms_topk. With C == 1 every valid point is kept, unfiltered and in point order, as the
    reference does.
    """
    cls_logits = np.asarray(cls_logits, np.float32)
    reg = np.asarray(reg, np.float32)
    points = np.asarray(points, np.float32)
    valid = np.asarray(point_mask, bool)
    if cls_logits.ndim != 2 or reg.shape != (cls_logits.shape[0], 2) \
            or points.shape != (cls_logits.shape[0], 4) or valid.shape != (cls_logits.shape[0],):
        raise ValueError(f"decode: expected cls_logits [P, C], reg [P, 2], points [P, 4], "
                         f"point_mask [P]; got {cls_logits.shape}, {reg.shape}, {points.shape}, "
                         f"{valid.shape}")
    cls_logits, reg, points = cls_logits[valid], reg[valid], points[valid]
    segments = np.stack([points[:, 0] - reg[:, 0] * points[:, 3],
                         points[:, 0] + reg[:, 1] * points[:, 3]], axis=1)
    scores = _sigmoid(cls_logits).astype(np.float32)
    num_classes = scores.shape[1]
    if num_classes == 1:
        return Detections(segments, scores[:, 0], np.zeros(len(scores), np.int64))
    flat = scores.reshape(-1)
    kept = np.flatnonzero(flat > pre_nms_thresh)
    kept = kept[np.argsort(-flat[kept], kind="stable")][:pre_nms_topk]
    return Detections(segments[kept // num_classes], flat[kept],
                      (kept % num_classes).astype(np.int64))


def _soft_nms_one(segments, scores, sigma, min_score, max_segments):
    """Gaussian soft-NMS of one group: (indices in selection order, decayed scores)."""
    start = segments[:, 0].astype(np.float64)
    end = segments[:, 1].astype(np.float64)
    lengths = end - start + 1e-6
    live = np.arange(len(scores))  # candidates still in play
    live_scores = scores.astype(np.float64).copy()
    picked, picked_scores = [], []
    while len(live) and len(picked) < max_segments:
        best = int(np.argmax(live_scores))
        i = live[best]
        picked.append(i)
        picked_scores.append(live_scores[best])
        live = np.delete(live, best)
        live_scores = np.delete(live_scores, best)
        inter = np.maximum(np.minimum(end[i], end[live]) - np.maximum(start[i], start[live]), 0.0)
        iou = inter / (lengths[i] + lengths[live] - inter)
        live_scores = live_scores * np.exp(-(iou * iou) / sigma)
        keep = ~(live_scores < min_score)
        live, live_scores = live[keep], live_scores[keep]
    return np.asarray(picked, np.int64), np.asarray(picked_scores, np.float64)


def soft_nms(segments, scores, labels, *, sigma: float = 0.7, min_score: float = 0.0,
             max_segments: int = 2000, class_agnostic: bool = False) -> Detections:
    """Gaussian soft-NMS (reference `batched_nms` with method=2).

    Repeatedly takes the best remaining segment and multiplies every other remaining score by
    exp(-IoU^2 / sigma), IoU computed with lengths end - start + 1e-6; segments whose score drops
    below `min_score` are discarded. Per class (default) each class keeps at most `max_segments`,
    then the union is cut to the best `max_segments`. Output sorted by decayed score, descending.
    """
    segments = np.asarray(segments, np.float32).reshape(-1, 2)
    scores = np.asarray(scores, np.float32).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if not (len(segments) == len(scores) == len(labels)):
        raise ValueError(f"soft_nms: {len(segments)} segments, {len(scores)} scores, "
                         f"{len(labels)} labels")
    if len(scores) == 0:
        return _empty()
    groups = [np.arange(len(scores))] if class_agnostic else \
        [np.flatnonzero(labels == c) for c in np.unique(labels)]
    idx, dec = [], []
    for members in groups:
        picked, picked_scores = _soft_nms_one(segments[members], scores[members], sigma,
                                              min_score, max_segments)
        idx.append(members[picked])
        dec.append(picked_scores)
    idx, dec = np.concatenate(idx), np.concatenate(dec)
    order = np.argsort(-dec, kind="stable")[:max_segments]
    return Detections(segments[idx[order]], dec[order].astype(np.float32), labels[idx[order]])


def iou_matrix(a, b, eps: float = 0.0):
    """IoU of every pair of segments: a [N, 2], b [M, 2] -> [N, M]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    inter = np.maximum(np.minimum(a[:, None, 1], b[None, :, 1])
                       - np.maximum(a[:, None, 0], b[None, :, 0]), 0.0)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def iou_voting(kept_segments, candidate_segments, candidate_scores, threshold: float = 0.9):
    """Replace each kept segment by the score-weighted mean of the candidates with IoU >= threshold.

    Candidates are the pre-NMS segments with their original scores; scores of the kept segments
    are left to the caller (unchanged in the reference). A kept segment with no neighbour of
    positive weight (possible only for a degenerate zero-length segment, where the reference
    divides 0 by 0) is returned unchanged.
    """
    kept = np.asarray(kept_segments, np.float64).reshape(-1, 2)
    cand = np.asarray(candidate_segments, np.float64).reshape(-1, 2)
    weights = (iou_matrix(kept, cand) >= threshold) * np.asarray(candidate_scores,
                                                                  np.float64)[None, :]
    total = weights.sum(axis=1, keepdims=True)
    voted = (weights @ cand) / np.where(total > 0, total, 1.0)
    return np.where(total > 0, voted, kept).astype(np.float32)


def grid_to_seconds(segments, *, duration: float, fps: float | None = None,
                    snippet_stride: int | None = None, window_start_frame: int = 0,
                    offset_frames: int = 0, resize_length: int | None = None) -> np.ndarray:
    """Grid units -> seconds, clamped to [0, duration].

    Sliding windows / padding (THUMOS): t = (x * snippet_stride + window_start_frame +
    offset_frames) / fps. Resize (ActivityNet): give `resize_length` instead: t = x /
    resize_length * duration.
    """
    x = np.asarray(segments, np.float64)
    if resize_length is not None:
        if fps is not None or snippet_stride is not None:
            raise ValueError("grid_to_seconds: give either resize_length or fps/snippet_stride")
        t = x / float(resize_length) * duration
    else:
        if fps is None or snippet_stride is None:
            raise ValueError("grid_to_seconds: sliding-window mode needs fps and snippet_stride")
        t = (x * snippet_stride + window_start_frame + offset_frames) / float(fps)
    return np.clip(t, 0.0, float(duration)).astype(np.float32)


def merge_windows(windows: Sequence[Detections | tuple], *, sigma: float = 0.7,
                  min_score: float = 0.0, max_segments: int = 2000) -> Detections:
    """All windows of one video (segments already in seconds) -> one per-class soft-NMS'ed set."""
    windows = [Detections(*w) for w in windows]
    if not windows:
        return _empty()
    segments = np.concatenate([np.asarray(w.segments, np.float32).reshape(-1, 2)
                               for w in windows])
    scores = np.concatenate([np.asarray(w.scores, np.float32).reshape(-1) for w in windows])
    labels = np.concatenate([np.asarray(w.labels).reshape(-1) for w in windows])
    return soft_nms(segments, scores, labels, sigma=sigma, min_score=min_score,
                    max_segments=max_segments, class_agnostic=False)


def fuse_video_classifier(segments, scores, classifier_scores, *, topk: int = 2,
                          mode: str = "cuhk", max_outputs: int = 200) -> Detections:
    """Class-agnostic detections x a video-level classifier's top-k classes.

    Every segment is emitted once per top-k class k with label k and score det * cls_k ("cuhk",
    CUHKANETClassifier) or sqrt(det * cls_k) ("standard", StandardClassifier, no softmax).
    Output sorted by score (descending) and cut to `max_outputs`.
    """
    if mode not in ("cuhk", "standard"):
        raise ValueError(f"fuse_video_classifier: mode must be 'cuhk' or 'standard', got {mode!r}")
    segments = np.asarray(segments, np.float32).reshape(-1, 2)
    scores = np.asarray(scores, np.float64).reshape(-1)
    cls = np.asarray(classifier_scores, np.float64).reshape(-1)
    top = np.argsort(-cls, kind="stable")[:topk]
    fused = scores[None, :] * cls[top][:, None]  # [k, N]
    if mode == "standard":
        fused = np.sqrt(fused)
    out_scores = fused.reshape(-1)
    out_labels = np.repeat(top, len(scores)).astype(np.int64)
    out_segments = np.tile(segments, (len(top), 1))
    order = np.argsort(-out_scores, kind="stable")[:max_outputs]
    return Detections(out_segments[order], out_scores[order].astype(np.float32),
                      out_labels[order])
