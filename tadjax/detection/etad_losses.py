"""ETAD targets and losses (spec etad.md §2.5-2.6), batch-flattened as the reference.

All segments are normalised to [0, 1] (grid units / T). The matched ground truth of an anchor is
the one of maximal IoU with the *initial* anchors; it is reused by all stages, whose own IoU,
regression and boundary targets are recomputed from the anchors each stage saw.

  total = L_tem + sum_i [ 1·L_iou_cls + 5·L_iou_reg + 10·(L_Δc + L_Δw) + 10·(L_Δs + L_Δe)
                          + 0.5·(L_cls_s + L_cls_e) (+ 1·L_class, num_classes > 1) ]

Random subsampling of negatives (sampled BCE / L2) draws from explicit keys, one per term and stage.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-6


def segment_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """IoU of every pair: a [..., K, 2], b [..., M, 2] -> [..., K, M]."""
    inter = jnp.maximum(0.0, jnp.minimum(a[..., :, None, 1], b[..., None, :, 1])
                        - jnp.maximum(a[..., :, None, 0], b[..., None, :, 0]))
    union = (a[..., :, None, 1] - a[..., :, None, 0]) + (b[..., None, :, 1] - b[..., None, :, 0]) - inter
    return inter / jnp.maximum(union, 1e-8)


def boundary_targets(gt: jax.Array, valid: jax.Array, t: int) -> jax.Array:
    """[B, T, 2] (start, end): max over GTs of the overlap of [g - 1.5/T, g + 1.5/T] with snippet
    cell [k/T, (k+1)/T], divided by the cell length 1/T."""
    cell_lo = jnp.arange(t) / t
    cell_hi = cell_lo + 1.0 / t

    def one(points):  # [B, M] -> [B, T]
        lo, hi = points - 1.5 / t, points + 1.5 / t
        overlap = jnp.maximum(0.0, jnp.minimum(hi[:, :, None], cell_hi) - jnp.maximum(lo[:, :, None], cell_lo))
        overlap = jnp.where(valid[:, :, None], overlap * t, 0.0)
        return overlap.max(axis=1)

    return jnp.stack([one(gt[..., 0]), one(gt[..., 1])], axis=-1)


def match_ground_truth(anchors: jax.Array, gt: jax.Array, valid: jax.Array):
    """Index [B, K] of the GT of maximal IoU with each anchor, and whether the video has any GT."""
    iou = jnp.where(valid[:, None, :], segment_iou(anchors, gt), -1.0)
    return jnp.argmax(iou, axis=-1), valid.any(axis=-1)


def balanced_bce(p: jax.Array, target: jax.Array) -> jax.Array:
    p, pos = p.reshape(-1), target.reshape(-1) > 0.5
    n = p.size
    n_pos = pos.sum()
    n_neg = n - n_pos
    log_pos = jnp.log(p + EPS)
    log_neg = jnp.log(1.0 - p + EPS)
    both = -jnp.mean(0.5 * n / jnp.maximum(n_pos, 1) * pos * log_pos
                     + 0.5 * n / jnp.maximum(n_neg, 1) * (~pos) * log_neg)
    only_neg = -jnp.mean(log_neg)
    only_pos = -jnp.mean(log_pos)
    return jnp.where(n_pos == 0, only_neg, jnp.where(n_neg == 0, only_pos, both))


def sampled_bce(p: jax.Array, target: jax.Array, threshold: float, key) -> jax.Array:
    """Positives target > threshold; each negative kept with probability N_pos / N_neg."""
    p, pos = p.reshape(-1), target.reshape(-1) > threshold
    n_pos = pos.sum()
    n_neg = p.size - n_pos
    keep = (~pos) & (jax.random.uniform(key, p.shape) < n_pos / jnp.maximum(n_neg, 1))
    total = -(jnp.sum(jnp.where(pos, jnp.log(p + EPS), 0.0))
              + jnp.sum(jnp.where(keep, jnp.log(1.0 - p + EPS), 0.0)))
    sampled = total / jnp.maximum(n_pos + keep.sum(), 1)
    return jnp.where(n_pos > 0, sampled, -jnp.mean(jnp.log(1.0 - p + EPS)))


def sampled_l2(p: jax.Array, target: jax.Array, key) -> jax.Array:
    """MSE over high (> 0.7), and mid (0.3, 0.7] / low (<= 0.3) kept with probability N_h/N_m,
    N_h/N_l; plain MSE without highs."""
    p, target = p.reshape(-1), target.reshape(-1)
    high = target > 0.7
    mid = (target > 0.3) & ~high
    low = target <= 0.3
    n_h, n_m, n_l = high.sum(), mid.sum(), low.sum()
    k_m, k_l = jax.random.split(key)
    keep = (high | (mid & (jax.random.uniform(k_m, p.shape) < n_h / jnp.maximum(n_m, 1)))
            | (low & (jax.random.uniform(k_l, p.shape) < n_h / jnp.maximum(n_l, 1))))
    sq = (p - target) ** 2
    sampled = jnp.sum(jnp.where(keep, sq, 0.0)) / jnp.maximum(keep.sum(), 1)
    return jnp.where(n_h > 0, sampled, jnp.mean(sq))


def masked_smooth_l1(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """SmoothL1 (beta 1) averaged over the masked rows; 0 when none."""
    d = jnp.abs(pred - target)
    loss = jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)
    return jnp.sum(jnp.where(mask, loss, 0.0)) / jnp.maximum(mask.sum(), 1)


def stage_targets(anchors, matched_gt, start_map, end_map, t: int):
    """gt_iou [B,K], (Δs, Δe, Δc, Δw) [B,K,4], (cls_s, cls_e) [B,K,2] for one stage's anchors."""
    a_s, a_e = anchors[..., 0], anchors[..., 1]
    g_s, g_e = matched_gt[..., 0], matched_gt[..., 1]
    inter = jnp.maximum(0.0, jnp.minimum(a_e, g_e) - jnp.maximum(a_s, g_s))
    gt_iou = inter / jnp.maximum((a_e - a_s) + (g_e - g_s) - inter, 1e-8)
    la = jnp.maximum(a_e - a_s, 1e-6)
    lg = jnp.maximum(g_e - g_s, 1e-6)
    ds, de = (g_s - a_s) / la, (g_e - a_e) / la
    deltas = jnp.stack([ds, de, (ds + de) / 2, jnp.log(lg / la + 1e-6)], axis=-1)
    idx_s = jnp.clip((a_s * t).astype(jnp.int32), 0, t - 1)
    idx_e = jnp.clip((a_e * t).astype(jnp.int32), 0, t - 1)
    cls = jnp.stack([jnp.take_along_axis(start_map, idx_s, axis=1),
                     jnp.take_along_axis(end_map, idx_e, axis=1)], axis=-1)
    return gt_iou, deltas, cls


def detection_loss(out: dict, gt_segments, gt_labels, gt_valid, key, *, length: int,
                   stage_thresholds=(0.7, 0.8, 0.9), coef_cls: float = 1.0,
                   coef_reg: float = 5.0, coef_bnd: float = 10.0, coef_class: float = 1.0,
                   class_iou: float = 0.5):
    """(total, aux) of a batch. `out` is ETADHead's training output; gt_segments [B,M,2] in grid
    units of the T = `length` grid; aux holds the terms summed over stages."""
    t = length
    gt = jnp.clip(gt_segments.astype(jnp.float32) / t, 0.0, 1.0)
    valid = gt_valid.astype(bool)
    bmap = boundary_targets(gt, valid, t)
    tem = out["tem"]
    l_tem = balanced_bce(tem[..., 0], bmap[..., 0]) + balanced_bce(tem[..., 1], bmap[..., 1])

    anchors0 = out["anchors"][:, 0]
    match, has_gt = match_ground_truth(anchors0, gt, valid)
    matched = jnp.take_along_axis(gt, match[..., None], axis=1)  # [B, K, 2]
    matched_label = jnp.take_along_axis(gt_labels, match, axis=1)
    keys = jax.random.split(key, len(stage_thresholds))
    terms = {"iou_cls": 0.0, "iou_reg": 0.0, "reg_cw": 0.0, "reg_se": 0.0, "bnd_cls": 0.0,
             "class": 0.0}
    num_pos = 0.0
    for i, thresh in enumerate(stage_thresholds):
        anchors = out["anchors"][:, i]
        gt_iou, deltas, cls_t = stage_targets(anchors, matched, bmap[..., 0], bmap[..., 1], t)
        gt_iou = jnp.where(has_gt[:, None], gt_iou, 0.0)
        iou, reg = out["iou"][:, i], out["reg"][:, i]
        k = jax.random.split(keys[i], 4)
        terms["iou_cls"] += sampled_bce(iou[..., 0], gt_iou, 0.9, k[0])
        terms["iou_reg"] += sampled_l2(iou[..., 1], gt_iou, k[1])
        positive = gt_iou > thresh
        num_pos += positive.sum()
        terms["reg_cw"] += (masked_smooth_l1(reg[..., 2], deltas[..., 2], positive)
                            + masked_smooth_l1(reg[..., 3], deltas[..., 3], positive))
        terms["reg_se"] += (masked_smooth_l1(reg[..., 0], deltas[..., 0], positive)
                            + masked_smooth_l1(reg[..., 1], deltas[..., 1], positive))
        terms["bnd_cls"] += (sampled_bce(reg[..., 4], cls_t[..., 0], 0.5, k[2])
                             + sampled_bce(reg[..., 5], cls_t[..., 1], 0.5, k[3]))
        if "cls_logits" in out:
            labelled = gt_iou > class_iou
            logp = jax.nn.log_softmax(out["cls_logits"][:, i], axis=-1)
            nll = -jnp.take_along_axis(logp, matched_label[..., None], axis=-1)[..., 0]
            terms["class"] += jnp.sum(jnp.where(labelled, nll, 0.0)) / jnp.maximum(labelled.sum(), 1)
    total = (l_tem + coef_cls * terms["iou_cls"] + coef_reg * terms["iou_reg"]
             + coef_bnd * (terms["reg_cw"] + terms["reg_se"]) + 0.5 * terms["bnd_cls"]
             + coef_class * terms["class"])
    aux = {"tem_loss": l_tem, **{f"{k}_loss": v for k, v in terms.items()},
           # the train step's generic metrics
           "cls_loss": terms["iou_cls"] + terms["class"],
           "reg_loss": coef_bnd * (terms["reg_cw"] + terms["reg_se"]),
           "num_pos": jnp.asarray(num_pos, jnp.float32)}
    return total, aux
