"""Temporal action detection metrics by the ActivityNet protocol (numpy only).

Detection mAP (`evaluate_detection`), per tIoU threshold t:

1. For each class, all predictions of that class are ranked by descending score. Ties keep the
   input order: videos in sorted id order, then the order of the predictions within a video.
2. In rank order, each prediction visits the ground truth (GT) of the same video and class by
   descending tIoU (equal tIoU: the GT listed first). A GT with tIoU < t ends the visit (false
   positive); a GT already matched at t is skipped; the first free one is matched (true positive).
   A prediction in a video with no GT of its class is a false positive; this includes videos
   absent from the GT altogether, as in ActivityNet's `eval_detection.py`. Predictions on videos
   removed by the GT's block list (`AnnotationSet.excluded`) are ignored, as there too.
3. AP is the all-point interpolated area under the precision/recall curve (precision made
   monotone from the right, summed at the recall change points; VOC2011, not 11-point).
4. mAP averages AP over the classes that have GT in the evaluated set (a class with GT but no
   prediction scores 0); `average_mAP` averages mAP over the thresholds.

tIoU = intersection / max(union, 1e-8) (OpenTAD's clamp; the official code divides by the union).

Speed. The reference evaluator loops over predictions in Python. Here, matching only depends on
predictions and GT of one (video, class), so candidate (prediction, GT) pairs with tIoU >= t are
found per video with one numpy matrix, and the greedy sequential matching is solved in rounds: a
prediction whose preferred free GT is wanted by no earlier unsettled prediction is certain to get
it, so all such predictions settle at once (the earliest unsettled one always does, so every round
makes progress; in practice a handful of rounds). The result is exactly the sequential one.

Average recall (`average_recall`): class-agnostic. Per video, the k highest-scoring predictions
(any label); a GT segment is recalled at t when one of them has tIoU >= t with it (no one-to-one
matching, as in ActivityNet's proposal evaluation). Within a video, GT segments equal to within
1e-3 s (e.g. THUMOS CliffDiving and its Diving copy) count once. Recall = recalled / all GT,
AR@k = mean recall over the thresholds.

Command line::

    python -m tadjax.evaluation --gt GT.json --pred PRED.json --subset Test [--tiou 0.3:0.7:5] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Sequence

import numpy as np

from tadjax.data.annotations import AnnotationSet, load_annotations

THRESHOLDS = {
    "thumos14": np.linspace(0.3, 0.7, 5),
    "activitynet": np.linspace(0.5, 0.95, 10),
    "multithumos": np.linspace(0.1, 0.9, 9),
    "charades": np.linspace(0.1, 0.9, 9),
    "epic_kitchens": np.linspace(0.1, 0.5, 5),
    "ego4d": np.linspace(0.1, 0.5, 5),
}
TIOU_EPS = 1e-8
RECALL_DUPLICATE_TOLERANCE = 1e-3

Predictions = dict[str, dict]  # video_id -> {"segments": [N, 2] s, "scores": [N], "labels": [N]}


# ---------------------------------------------------------------------------------------------
# Thresholds and tIoU

def parse_thresholds(spec) -> np.ndarray:
    """tIoU thresholds from a preset name ("thumos14"), "lo:hi:n" (= linspace(lo, hi, n)),
    "a,b,c", a single number, or a sequence of numbers."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() in THRESHOLDS:
            values = THRESHOLDS[text.lower()]
        elif text.count(":") == 2:
            lo, hi, n = text.split(":")
            try:
                values = np.linspace(float(lo), float(hi), int(n))
            except ValueError:
                raise ValueError(f"bad tIoU range {spec!r}; expected lo:hi:count") from None
        else:
            try:
                values = np.array([float(x) for x in text.split(",")])
            except ValueError:
                raise ValueError(f"bad tIoU thresholds {spec!r}; expected a preset "
                                 f"({', '.join(THRESHOLDS)}), lo:hi:count or a,b,c") from None
    else:
        values = np.atleast_1d(np.asarray(spec, np.float64))
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 0 or not np.all((values > 0) & (values <= 1)):
        raise ValueError(f"tIoU thresholds must be in (0, 1], got {values.tolist()}")
    return values


def threshold_key(t: float) -> str:
    """"0.30" style key; more digits only where two decimals would not identify the value."""
    key = f"{t:.2f}"
    return key if abs(float(key) - t) < 1e-9 else f"{t:g}"


def segment_tiou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """tIoU matrix [P, G] between segments pred [P, 2] and gt [G, 2].

    Same operation order as ActivityNet's `segment_iou`, so values are bit-identical to it.
    """
    pred = np.asarray(pred, np.float64).reshape(-1, 2)
    gt = np.asarray(gt, np.float64).reshape(-1, 2)
    inter = (np.minimum(pred[:, 1:2], gt[None, :, 1]) -
             np.maximum(pred[:, 0:1], gt[None, :, 0])).clip(0)
    union = (gt[None, :, 1] - gt[None, :, 0]) + (pred[:, 1:2] - pred[:, 0:1]) - inter
    return inter / np.maximum(union, TIOU_EPS)


# ---------------------------------------------------------------------------------------------
# Detection mAP

def evaluate_detection(gt: AnnotationSet, predictions: Predictions, tious,
                       *, ignore_videos: Sequence[str] = ()) -> dict:
    """ActivityNet-protocol detection mAP (see the module docstring).

    Returns {"mAP": {"0.30": float, ...}, "average_mAP": float, "ap_per_class": [n_tiou,
    n_classes] (nan for classes without GT), "tious": list, "num_gt": int, "num_predictions": int,
    "num_gt_per_class": int [n_classes]}.
    """
    tious = parse_thresholds(tious)
    n_classes = len(gt.classes)
    gt_seg, gt_lab, gt_slices = _flatten_gt(gt)
    if gt_seg.shape[0] == 0:
        raise ValueError(f"{gt.source}: no ground-truth segments in the evaluated set "
                         f"({len(gt.videos)} videos, subsets {gt.subsets or 'none'}); "
                         "mAP is undefined")
    skip = set(gt.excluded) | set(ignore_videos)
    vids, pred_slices, seg, score, lab = _flatten_predictions(predictions, n_classes, skip)
    n_pred = score.shape[0]

    order = np.argsort(-score, kind="stable")
    rank = np.empty(n_pred, np.int64)
    rank[order] = np.arange(n_pred)

    # Candidate pairs (same video and class, tIoU >= the lowest threshold).
    p_parts, g_parts, iou_parts = [], [], []
    t_min = tious.min()
    for vid, (a, b) in zip(vids, pred_slices):
        if vid not in gt_slices or a == b:
            continue
        c, d = gt_slices[vid]
        if c == d:
            continue
        iou = segment_tiou(seg[a:b], gt_seg[c:d])
        pi, gi = np.nonzero((lab[a:b, None] == gt_lab[None, c:d]) & (iou >= t_min))
        p_parts.append(rank[a + pi])
        g_parts.append(c + gi)
        iou_parts.append(iou[pi, gi])
    if p_parts:
        pair_rank, pair_gt, pair_iou = (np.concatenate(x) for x in (p_parts, g_parts, iou_parts))
    else:
        pair_rank = pair_gt = np.zeros(0, np.int64)
        pair_iou = np.zeros(0)
    pref = np.lexsort((pair_gt, -pair_iou, pair_rank))
    pair_rank, pair_gt, pair_iou = pair_rank[pref], pair_gt[pref], pair_iou[pref]

    tp = np.zeros((len(tious), n_pred), bool)  # indexed by rank
    for k, t in enumerate(tious):
        sel = pair_iou >= t
        tp[k] = _greedy_match(pair_rank[sel], pair_gt[sel], n_pred, gt_seg.shape[0])

    npos = np.bincount(gt_lab, minlength=n_classes)
    ap = np.full((len(tious), n_classes), np.nan)
    ranked_labels = lab[order]
    by_class = np.argsort(ranked_labels, kind="stable")  # ranks grouped by class, in rank order
    bounds = np.searchsorted(ranked_labels[by_class], np.arange(n_classes + 1))
    for c in np.nonzero(npos)[0]:
        ap[:, c] = _interpolated_ap(tp[:, by_class[bounds[c]:bounds[c + 1]]], npos[c])

    present = npos > 0
    m_ap = ap[:, present].mean(axis=1)
    return {
        "mAP": {threshold_key(t): float(v) for t, v in zip(tious, m_ap)},
        "average_mAP": float(m_ap.mean()),
        "ap_per_class": ap,
        "tious": [float(t) for t in tious],
        "num_gt": int(gt_seg.shape[0]),
        "num_predictions": int(n_pred),
        "num_gt_per_class": npos,
    }


def _greedy_match(p_rank, g_idx, n_pred, n_gt):
    """True positives (bool [n_pred], by rank) of the sequential greedy matching.

    The pairs (p_rank, g_idx) are the candidates of one threshold, sorted by rank and then by
    each prediction's preference. Each round settles every prediction whose preferred free GT is
    a candidate of no earlier unsettled prediction (see the module docstring).
    """
    tp = np.zeros(n_pred, bool)
    locked = np.zeros(n_gt, bool)
    first_claim = np.zeros(n_gt, np.int64)
    while p_rank.size:
        head = np.ones(p_rank.size, bool)
        np.not_equal(p_rank[1:], p_rank[:-1], out=head[1:])
        want_p, want_g = p_rank[head], g_idx[head]
        first_claim[g_idx] = n_pred
        np.minimum.at(first_claim, g_idx, p_rank)
        win = first_claim[want_g] == want_p
        tp[want_p[win]] = True
        locked[want_g[win]] = True
        keep = ~(locked[g_idx] | tp[p_rank])
        p_rank, g_idx = p_rank[keep], g_idx[keep]
    return tp


def _interpolated_ap(tp: np.ndarray, npos: int) -> np.ndarray:
    """All-point interpolated AP per row of tp [n_tiou, P] (predictions in rank order)."""
    n_t, n = tp.shape
    if n == 0:
        return np.zeros(n_t)
    tp_cum = np.cumsum(tp, axis=1, dtype=np.float64)
    fp_cum = np.cumsum(~tp, axis=1, dtype=np.float64)
    recall = tp_cum / npos
    precision = tp_cum / (tp_cum + fp_cum)
    out = np.zeros(n_t)
    for k in range(n_t):
        mrec = np.concatenate([[0.0], recall[k], [1.0]])
        mprec = np.concatenate([[0.0], precision[k], [0.0]])
        mprec = np.maximum.accumulate(mprec[::-1])[::-1]
        idx = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
        out[k] = np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx])
    return out


# ---------------------------------------------------------------------------------------------
# Average recall

def average_recall(gt: AnnotationSet, predictions: Predictions, tious,
                   topk: Sequence[int] = (1, 5, 10, 50, 100),
                   *, ignore_videos: Sequence[str] = ()) -> dict:
    """Class-agnostic recall of the top-k predictions per video (see the module docstring).

    Returns {"AR": {k: float}, "recall": [n_tiou, n_topk], "tious": list, "topk": list,
    "num_gt": int}.
    """
    tious = parse_thresholds(tious)
    topk = [int(k) for k in topk]
    if not topk or min(topk) < 1:
        raise ValueError(f"topk values must be >= 1, got {topk}")
    skip = set(gt.excluded) | set(ignore_videos)
    vids, pred_slices, seg, score, _ = _flatten_predictions(predictions, None, skip)
    pred_slices = dict(zip(vids, pred_slices))
    recalled = np.zeros((len(tious), len(topk)), np.int64)
    total = 0
    k_max = max(topk)
    for vid, video in gt.videos.items():
        gseg = _unique_segments(video.segments)
        if gseg.shape[0] == 0:
            continue
        total += gseg.shape[0]
        a, b = pred_slices.get(vid, (0, 0))
        if a == b:
            continue
        top = a + np.argsort(-score[a:b], kind="stable")[:k_max]
        best = np.maximum.accumulate(segment_tiou(seg[top], gseg), axis=0)  # [k, G]
        for j, k in enumerate(topk):
            row = best[min(k, len(top)) - 1]
            recalled[:, j] += (row[None, :] >= tious[:, None]).sum(axis=1)
    if total == 0:
        raise ValueError(f"{gt.source}: no ground-truth segments in the evaluated set; "
                         "recall is undefined")
    recall = recalled / total
    return {"AR": {k: float(recall[:, j].mean()) for j, k in enumerate(topk)},
            "recall": recall, "tious": [float(t) for t in tious], "topk": topk,
            "num_gt": int(total)}


def _unique_segments(segments):
    out = []
    for s, e in np.asarray(segments, np.float64).reshape(-1, 2):
        if not any(abs(s - s2) <= RECALL_DUPLICATE_TOLERANCE and
                   abs(e - e2) <= RECALL_DUPLICATE_TOLERANCE for s2, e2 in out):
            out.append((s, e))
    return np.array(out, np.float64).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------
# Flattening and validation

def _flatten_gt(gt: AnnotationSet):
    segs, labs, slices, n = [], [], {}, 0
    for vid in sorted(gt.videos):
        v = gt.videos[vid]
        s = np.asarray(v.segments, np.float64).reshape(-1, 2)
        segs.append(s)
        labs.append(np.asarray(v.labels, np.int64).reshape(-1))
        slices[vid] = (n, n + s.shape[0])
        n += s.shape[0]
    seg = np.concatenate(segs) if segs else np.zeros((0, 2))
    lab = np.concatenate(labs) if labs else np.zeros(0, np.int64)
    return seg, lab, slices


def _flatten_predictions(predictions: Predictions, n_classes, skip):
    vids, slices, segs, scores, labs, n = [], [], [], [], [], 0
    for vid in sorted(predictions):
        if vid in skip:
            continue
        entry = predictions[vid]
        where = f"predictions for video {vid!r}"
        for field in ("segments", "scores", "labels"):
            if field not in entry:
                raise ValueError(f"{where}: missing field {field!r}")
        s = np.asarray(entry["segments"], np.float64)
        if s.size == 0:
            s = s.reshape(0, 2)
        if s.ndim != 2 or s.shape[1] != 2:
            raise ValueError(f"{where}: 'segments' must have shape [N, 2], got {s.shape}")
        p = np.asarray(entry["scores"], np.float64).reshape(-1)
        l_raw = np.asarray(entry["labels"]).reshape(-1)
        if not (p.shape[0] == l_raw.shape[0] == s.shape[0]):
            raise ValueError(f"{where}: {s.shape[0]} segments, {p.shape[0]} scores and "
                             f"{l_raw.shape[0]} labels")
        if l_raw.size and not np.issubdtype(l_raw.dtype, np.integer):
            raise ValueError(f"{where}: 'labels' must be integer class indices, "
                             f"got dtype {l_raw.dtype}")
        l = l_raw.astype(np.int64)
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(p))):
            raise ValueError(f"{where}: segments and scores must be finite")
        bad = np.nonzero(s[:, 1] < s[:, 0])[0]
        if bad.size:
            raise ValueError(f"{where}: prediction {bad[0]} ends before it starts "
                             f"{s[bad[0]].tolist()}")
        if n_classes is not None and l.size and (l.min() < 0 or l.max() >= n_classes):
            raise ValueError(f"{where}: label index outside [0, {n_classes})")
        vids.append(vid)
        slices.append((n, n + s.shape[0]))
        segs.append(s)
        scores.append(p)
        labs.append(l)
        n += s.shape[0]
    seg = np.concatenate(segs) if segs else np.zeros((0, 2))
    score = np.concatenate(scores) if scores else np.zeros(0)
    lab = np.concatenate(labs) if labs else np.zeros(0, np.int64)
    return vids, slices, seg, score, lab


# ---------------------------------------------------------------------------------------------
# Official results JSON

def load_results(path, classes: Sequence[str]) -> Predictions:
    """Reads `{"version", "results": {video: [{"label", "score", "segment"}]}, ...}`.

    Labels are class names (an integer is taken as a class index). Names outside `classes` are
    ignored and counted in a warning (OpenTAD's behaviour; the official code raises KeyError).
    """
    path = os.fspath(path)
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path}: missing top-level field 'results' (a dict of videos)")
    index = {name: i for i, name in enumerate(classes)}
    out: Predictions = {}
    unknown: dict[str, int] = {}
    for vid, items in data["results"].items():
        where = f"{path}: video {vid!r}"
        if not isinstance(items, list):
            raise ValueError(f"{where}: expected a list of predictions")
        segs, scores, labels = [], [], []
        for i, item in enumerate(items):
            iwhere = f"{where}, prediction {i}"
            if not isinstance(item, dict):
                raise ValueError(f"{iwhere}: expected an object")
            for field in ("label", "score", "segment"):
                if field not in item:
                    raise ValueError(f"{iwhere}: missing field {field!r}")
            label = item["label"]
            if isinstance(label, int) and not isinstance(label, bool):
                if not 0 <= label < len(classes):
                    raise ValueError(f"{iwhere}: label index {label} outside [0, {len(classes)})")
                c = label
            elif str(label) in index:
                c = index[str(label)]
            else:
                unknown[str(label)] = unknown.get(str(label), 0) + 1
                continue
            seg = item["segment"]
            try:
                s, e = (float(x) for x in seg)
                score = float(item["score"])
            except (TypeError, ValueError):
                raise ValueError(f"{iwhere}: 'segment' must be [start, end] and 'score' a "
                                 f"number, got {seg!r} and {item['score']!r}") from None
            segs.append((s, e))
            scores.append(score)
            labels.append(c)
        out[vid] = {"segments": np.array(segs, np.float64).reshape(-1, 2),
                    "scores": np.array(scores, np.float64),
                    "labels": np.array(labels, np.int64)}
    if unknown:
        listing = ", ".join(f"{k!r} x{n}" for k, n in sorted(unknown.items())[:10])
        warnings.warn(f"{path}: ignored {sum(unknown.values())} predictions with labels "
                      f"outside the class list: {listing}", stacklevel=2)
    return out


def write_results(path, predictions: Predictions, classes: Sequence[str],
                  version: str = "tadjax", external_data: dict | None = None) -> None:
    """Writes the official ActivityNet results JSON."""
    results = {}
    for vid in sorted(predictions):
        entry = predictions[vid]
        segs = np.asarray(entry["segments"], np.float64).reshape(-1, 2)
        results[vid] = [{"label": classes[int(l)], "score": float(p),
                         "segment": [float(s), float(e)]}
                        for (s, e), p, l in zip(segs, np.asarray(entry["scores"]).reshape(-1),
                                                np.asarray(entry["labels"]).reshape(-1))]
    if external_data is None:
        external_data = {"used": False, "details": ""}
    with open(os.fspath(path), "w") as f:
        json.dump({"version": version, "results": results, "external_data": external_data}, f)


def gt_as_predictions(gt: AnnotationSet) -> Predictions:
    """The ground truth as predictions with score 1 (a sanity check: mAP 1 at every tIoU)."""
    return {vid: {"segments": v.segments.copy(), "scores": np.ones(len(v.labels)),
                  "labels": v.labels.astype(np.int64)} for vid, v in gt.videos.items()}


# ---------------------------------------------------------------------------------------------
# Reporting and command line

def format_table(result: dict) -> str:
    lines = [f"{'tIoU':>6}  {'mAP (%)':>8}"]
    for key, value in result["mAP"].items():
        lines.append(f"{key:>6}  {100 * value:8.2f}")
    lines.append(f"{'avg':>6}  {100 * result['average_mAP']:8.2f}")
    if "num_gt" in result:
        lines.append(f"({result['num_gt']} ground-truth segments, "
                     f"{result['num_predictions']} predictions)")
    return "\n".join(lines)


def _parser():
    p = argparse.ArgumentParser(prog="python -m tadjax.evaluation",
                                description="ActivityNet-protocol detection mAP.")
    p.add_argument("--gt", required=True, help="ActivityNet-style annotation JSON")
    p.add_argument("--pred", required=True, help="results JSON {'results': {video: [...]}}")
    p.add_argument("--subset", required=True, help="subset to evaluate, e.g. Test or validation")
    p.add_argument("--tiou", default=None,
                   help="thresholds: lo:hi:count (linspace), a,b,c, or a preset name "
                        f"({', '.join(THRESHOLDS)}); default thumos14 for THUMOS "
                        "annotations, else activitynet")
    p.add_argument("--classes", default=None, help="class list file (default: from the GT)")
    p.add_argument("--blocked", default=None, help="file of video ids to leave out")
    p.add_argument("--on-error", default="raise", choices=("raise", "warn"),
                   help="invalid GT segments / unknown GT labels: fail or drop and count")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        gt = load_annotations(args.gt, args.subset, classes=args.classes,
                              blocked=args.blocked or (), on_error=args.on_error)
        spec = args.tiou or ("thumos14" if gt.thumos_conventions else "activitynet")
        tious = parse_thresholds(spec)
        predictions = load_results(args.pred, gt.classes)
        result = evaluate_detection(gt, predictions, tious)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"mAP": result["mAP"], "average_mAP": result["average_mAP"],
                          "seconds": round(seconds, 4)}))
    else:
        print(f"{args.gt} [{args.subset}] vs {args.pred}")
        print(format_table(result))
        print(f"{seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
