"""ActionFormer losses: sigmoid focal loss (classification) and DIoU loss (regression).

Loss normaliser. The reference divides both losses by an exponential moving average of the
number of positive points, kept as model state:

    norm <- momentum * norm + (1 - momentum) * max(num_pos, 1)      (momentum 0.9)

updated *before* the loss is computed, so the current batch already counts. The initial value is
100 (THUMOS) or 200 (ActivityNet); in evaluation the normaliser is max(num_pos, 1).
Here the caller keeps `norm` in its train state (EMA it with the weights if it EMAs weights) and
either

* passes it to `detection_loss(..., normalizer=norm, normalizer_momentum=0.9)`, which updates it
  first and returns the new value in `aux["normalizer"]` for the caller to store; or
* updates it itself with `update_normalizer(norm, num_pos)` and passes the result with
  `normalizer_momentum=None`;
* passes `normalizer=None` (evaluation): max(num_pos, 1).

num_pos is counted over the whole batch given to `detection_loss`. The reference counts per GPU
and averages gradients across GPUs; with a global batch, sum / global-count is the same
normalisation up to the EMA's lag (the initial value is per GPU in the reference, so scale it by
the number of reference GPUs if the first steps must match).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tadjax.detection.assignment import assign_targets_batch

DIOU_EPS = 1e-7


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise sigmoid focal loss (RetinaNet / fvcore form), computed in float32.

    loss = alpha_t * (1 - p_t)^gamma * BCE(logits, targets), with p_t = p*t + (1-p)*(1-t) and
    alpha_t = alpha*t + (1-alpha)*(1-t); alpha < 0 disables the alpha weighting. Soft targets
    (label smoothing) are allowed.
    """
    x = jnp.asarray(logits, jnp.float32)
    t = jnp.asarray(targets, jnp.float32)
    p = jax.nn.sigmoid(x)
    # Stable binary cross-entropy with logits: max(x, 0) - x*t + log(1 + exp(-|x|)).
    ce = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    p_t = p * t + (1.0 - p) * (1.0 - t)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return loss


def diou(pred_segments, target_segments, eps: float = DIOU_EPS):
    """Distance-IoU of paired 1-D segments [..., 2] (start, end): IoU - d_centre^2 / enclosing^2."""
    pred = jnp.asarray(pred_segments, jnp.float32)
    target = jnp.asarray(target_segments, jnp.float32)
    ps, pe = pred[..., 0], pred[..., 1]
    ts, te = target[..., 0], target[..., 1]
    inter = jnp.maximum(jnp.minimum(pe, te) - jnp.maximum(ps, ts), 0.0)
    union = (pe - ps) + (te - ts) - inter
    iou = inter / jnp.maximum(union, eps)
    enclosing = jnp.maximum(pe, te) - jnp.minimum(ps, ts)
    centre_dist = 0.5 * (ts + te) - 0.5 * (ps + pe)
    return iou - centre_dist * centre_dist / jnp.maximum(enclosing * enclosing, eps)


def diou_loss(pred_segments, target_segments, eps: float = DIOU_EPS):
    """Elementwise 1 - DIoU of paired segments [..., 2] (start, end), any common unit.

    `detection_loss` decodes both the predicted and the target offsets to absolute grid units
    first, as the reference does (DIoU is translation and scale invariant up to the eps clamps).
    """
    return 1.0 - diou(pred_segments, target_segments, eps)


def update_normalizer(norm, num_pos, momentum: float = 0.9):
    """One EMA step of the loss normaliser: momentum * norm + (1 - momentum) * max(num_pos, 1)."""
    num_pos = jnp.maximum(jnp.asarray(num_pos, jnp.float32), 1.0)
    return momentum * jnp.asarray(norm, jnp.float32) + (1.0 - momentum) * num_pos


def decode_offsets(points, offsets):
    """Offsets [..., P, 2] in stride units at points [P, 4] -> segments [..., P, 2] in grid units."""
    points = jnp.asarray(points, jnp.float32)
    pos, stride = points[:, 0], points[:, 3]
    start = pos - offsets[..., 0] * stride
    end = pos + offsets[..., 1] * stride
    return jnp.stack([start, end], axis=-1)


def detection_loss(outputs, points, gt_segments, gt_labels, gt_valid, *, num_classes: int,
                   normalizer=None, normalizer_momentum: float | None = None,
                   label_smoothing: float = 0.0, loss_weight: float = 1.0,
                   center_sample_radius: float = 1.5, alpha: float = 0.25, gamma: float = 2.0):
    """Focal + DIoU loss of a batch of B videos.

    Args:
      outputs: the `ActionFormer` output dict: cls_logits [B, P, C], reg [B, P, 2] (stride
        units), point_mask [B, P] bool.
      points: [P, 4] from `make_points` (same level order as the model's outputs).
      gt_segments [B, M, 2] grid units, gt_labels [B, M] int, gt_valid [B, M] bool (padding rows
        False).
      normalizer: the loss normaliser (see the module docstring); None means max(num_pos, 1).
      normalizer_momentum: if given, `normalizer` is the stored EMA and is updated with this
        batch's num_pos before use.
      label_smoothing: eps; targets become t * (1 - eps) + eps / (num_classes + 1), negatives too.
      loss_weight: weight of the regression loss; <= 0 means the reference's adaptive weight
        cls_loss / max(reg_loss, 0.01) (no gradient through the weight).

    Returns:
      (total, aux) with aux = {cls_loss, reg_loss (already multiplied by the weight, as the
      reference logs it), num_pos, normalizer (the value used)}.
    """
    cls_logits = jnp.asarray(outputs["cls_logits"], jnp.float32)
    reg = jnp.asarray(outputs["reg"], jnp.float32)
    valid = jnp.asarray(outputs["point_mask"], bool)
    if cls_logits.shape[-1] != num_classes:
        raise ValueError(f"detection_loss: cls_logits has {cls_logits.shape[-1]} classes, "
                         f"num_classes={num_classes}")
    if cls_logits.shape[1] != points.shape[0]:
        raise ValueError(f"detection_loss: outputs have {cls_logits.shape[1]} points but "
                         f"`points` has {points.shape[0]}; build them for the same seq_len")

    cls_targets, reg_targets = assign_targets_batch(points, gt_segments, gt_labels, gt_valid,
                                                    num_classes, center_sample_radius)
    cls_targets = jax.lax.stop_gradient(cls_targets)
    reg_targets = jax.lax.stop_gradient(reg_targets)
    positive = (cls_targets.sum(-1) > 0) & valid
    num_pos = positive.sum().astype(jnp.float32)

    if normalizer is None:
        norm = jnp.maximum(num_pos, 1.0)
    elif normalizer_momentum is not None:
        norm = update_normalizer(normalizer, num_pos, normalizer_momentum)
    else:
        norm = jnp.asarray(normalizer, jnp.float32)
    norm_for_loss = jax.lax.stop_gradient(norm)

    if label_smoothing:
        cls_targets = cls_targets * (1.0 - label_smoothing) + label_smoothing / (num_classes + 1)
    focal = sigmoid_focal_loss(cls_logits, cls_targets, alpha, gamma)
    cls_loss = jnp.sum(jnp.where(valid[..., None], focal, 0.0)) / norm_for_loss

    per_point = diou_loss(decode_offsets(points, reg), decode_offsets(points, reg_targets))
    # With no positives this is exactly 0 (the reference's 0 * sum(preds)).
    reg_loss = jnp.sum(jnp.where(positive, per_point, 0.0)) / norm_for_loss

    if loss_weight > 0:
        weight = loss_weight
    else:
        weight = jax.lax.stop_gradient(cls_loss / jnp.maximum(reg_loss, 0.01))
    reg_loss = reg_loss * weight
    total = cls_loss + reg_loss
    aux = {"cls_loss": cls_loss, "reg_loss": reg_loss, "num_pos": num_pos, "normalizer": norm}
    return total, aux
