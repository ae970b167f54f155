"""Label assignment of ActionFormer: which ground truth (GT) each anchor point regresses.

For point p (position x, range [lo, hi], stride s) and GT [g_s, g_e] with centre c:

* centre sampling (radius r = 1.5): p lies strictly inside [max(c - r*s, g_s), min(c + r*s, g_e)];
* range check: lo <= max(x - g_s, g_e - x) <= hi (inclusive at both ends);
* of the GTs passing both tests the shortest wins the regression target (x - g_s, g_e - x) / s;
  every passing GT whose length is within 1e-3 of the shortest adds its class to a multi-hot
  target (clamped to 1).

Everything is vectorised over points x GTs, jit-able, and batchable with `jax.vmap` (GTs padded
to a fixed M with `gt_valid`). Regression targets of points without a GT are zero (the reference
leaves the first GT's offsets there; they are never used).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Multi-hot tolerance on GT lengths (grid units), as `filter_similar_gt` in the reference.
SIMILAR_LENGTH_TOL = 1e-3


def assign_targets(points, gt_segments, gt_labels, gt_valid, num_classes: int,
                   center_sample_radius: float = 1.5):
    """Targets of one video.

    Args:
      points: [P, 4] (position, lo, hi, stride) from `tadjax.detection.points.make_points`.
      gt_segments: [M, 2] (start, end) in grid units.
      gt_labels: [M] int class indices.
      gt_valid: [M] bool; False rows are padding and ignored.
      num_classes: size of the class axis.
      center_sample_radius: centre-sampling radius in strides.

    Returns:
      cls_targets [P, num_classes] float32 (multi-hot, 0/1) and reg_targets [P, 2] float32
      (left, right distances in stride units; zero where the point has no GT).
    """
    points = jnp.asarray(points, jnp.float32)
    gt_segments = jnp.asarray(gt_segments, jnp.float32)
    num_points, num_gts = points.shape[0], gt_segments.shape[0]
    if num_gts == 0:
        return (jnp.zeros((num_points, num_classes), jnp.float32),
                jnp.zeros((num_points, 2), jnp.float32))

    pos, lo, hi, stride = (points[:, i:i + 1] for i in range(4))  # each [P, 1]
    g_start, g_end = gt_segments[None, :, 0], gt_segments[None, :, 1]  # [1, M]
    left, right = pos - g_start, g_end - pos  # [P, M]

    center = 0.5 * (g_start + g_end)
    region_lo = jnp.maximum(center - center_sample_radius * stride, g_start)
    region_hi = jnp.minimum(center + center_sample_radius * stride, g_end)
    in_center = jnp.minimum(pos - region_lo, region_hi - pos) > 0

    max_dist = jnp.maximum(left, right)
    in_range = (max_dist >= lo) & (max_dist <= hi)

    ok = in_center & in_range & jnp.asarray(gt_valid, bool)[None, :]
    lengths = jnp.where(ok, g_end - g_start, jnp.inf)  # [P, M]
    min_len = jnp.min(lengths, axis=1, keepdims=True)
    winner = jnp.argmin(lengths, axis=1)  # first shortest GT

    similar = ok & (lengths <= min_len + SIMILAR_LENGTH_TOL)
    one_hot = jax.nn.one_hot(jnp.asarray(gt_labels, jnp.int32), num_classes, dtype=jnp.float32)
    cls_targets = jnp.minimum(similar.astype(jnp.float32) @ one_hot, 1.0)

    offsets = jnp.stack([left, right], axis=-1)  # [P, M, 2]
    reg_targets = jnp.take_along_axis(offsets, winner[:, None, None], axis=1)[:, 0] / stride
    has_gt = jnp.any(ok, axis=1, keepdims=True)
    reg_targets = jnp.where(has_gt, reg_targets, 0.0)
    return cls_targets, reg_targets


def assign_targets_batch(points, gt_segments, gt_labels, gt_valid, num_classes: int,
                         center_sample_radius: float = 1.5):
    """`assign_targets` over a batch: GT arrays [B, M, ...] -> [B, P, num_classes], [B, P, 2]."""
    fn = lambda s, l, v: assign_targets(points, s, l, v, num_classes, center_sample_radius)
    return jax.vmap(fn)(gt_segments, gt_labels, gt_valid)
