"""ETAD decoding of one window (spec etad.md §2.7, §3.1-3.3): stage-averaged refined proposals,
boundary mask from the start/end probabilities, confidence iou_cls × iou_reg (× class
probability with a class head). Soft-NMS, window merging and classifier fusion are the shared
steps of `tadjax.train.trainer.predict_videos`."""
from __future__ import annotations

import numpy as np

from tadjax.detection.postprocess import Detections


def boundary_mask(p: np.ndarray) -> np.ndarray:
    """p [T] -> bool [T]: p > 0.5·max(p), or a strict local peak (zero padding)."""
    padded = np.concatenate([[0.0], p, [0.0]])
    peak = (p > padded[:-2]) & (p > padded[2:])
    return (p > 0.5 * p.max()) | peak


def refine(anchors: np.ndarray, reg: np.ndarray) -> np.ndarray:
    s, e = anchors[..., 0], anchors[..., 1]
    length, centre = e - s, (s + e) / 2
    s1, e1 = s + length * reg[..., 0], e + length * reg[..., 1]
    c2, l2 = centre + length * reg[..., 2], length * np.exp(reg[..., 3])
    return np.stack([(s1 + c2 - l2 / 2) / 2, (e1 + c2 + l2 / 2) / 2], axis=-1)


def decode(tem, anchors, iou, reg, cls_logits=None, *, pre_nms_topk: int = 2000,
           topk_classes: int = 2) -> Detections:
    """One window: tem [T, 2], anchors [S, K, 2], iou [S, K, 2], reg [S, K, 6] (normalised),
    cls_logits [S, K, C] or None -> segments in grid units [0, T], scores, labels (0 without
    a class head; else each proposal once per top class)."""
    tem = np.asarray(tem, np.float64)
    t = tem.shape[0]
    segments = refine(np.asarray(anchors, np.float64), np.asarray(reg, np.float64)).mean(axis=0)
    conf = np.asarray(iou, np.float64).mean(axis=0)
    score = conf[:, 0] * conf[:, 1]
    start_mask, end_mask = boundary_mask(tem[:, 0]), boundary_mask(tem[:, 1])
    start_mask[0] = True
    end_mask[t - 1] = True
    s_idx = np.clip((segments[:, 0] * t).astype(np.int64), 0, t - 1)
    e_idx = np.clip((segments[:, 1] * t).astype(np.int64), 0, t - 1)
    keep = start_mask[s_idx] & end_mask[e_idx] & (segments[:, 1] > segments[:, 0])
    segments, score = segments[keep], score[keep]
    if cls_logits is None:
        labels = np.zeros(len(score), np.int64)
    else:
        logits = np.asarray(cls_logits, np.float64)[:, keep]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = (probs / probs.sum(-1, keepdims=True)).mean(axis=0)  # [K', C]
        k = min(topk_classes, probs.shape[1])
        top = np.argsort(-probs, axis=1)[:, :k]
        segments = np.repeat(segments, k, axis=0)
        score = (score[:, None] * np.take_along_axis(probs, top, axis=1)).reshape(-1)
        labels = top.reshape(-1).astype(np.int64)
    order = np.argsort(-score, kind="stable")[:pre_nms_topk]
    segs = np.clip(segments[order] * t, 0.0, t).astype(np.float32)
    return Detections(segs, score[order].astype(np.float32), labels[order])
